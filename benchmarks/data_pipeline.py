"""Data pipeline benchmark (no model): prepared ArrayRecord shards -> packed windows -> grain batches.

    .venv/bin/python benchmarks/data_pipeline.py --sizes_mib 200 2048 --out docs/data_pipeline_cpu.json

For each size, a corpus is generated from real text (the paragraphs of CPython's pydoc topics, reshuffled
with a new seed for every copy) into a temporary directory, prepared with ``train.prepare``
(doc_split='blank_line', one shard per ~256 MiB) and deleted afterwards. Each measurement runs in its own
subprocess: time from opening the data to the first batch (index hash and sha256 check of every shard
included), then packed window bytes per second over ``--seconds``, with annotations off and with
``word_starts`` on, and its own peak RSS (VmHWM). Every row records os.getloadavg() (the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def generate(path: str, size: int, seed: int = 0) -> int:
    """``size`` bytes (about) of real text paragraphs separated by blank lines."""
    from pydoc_data.topics import topics

    paras = [p.encode() for k in sorted(topics) for p in topics[k].split("\n\n") if p.strip()]
    rng, n = random.Random(seed), 0
    with open(path, "wb") as f:
        while n < size:
            rng.shuffle(paras)
            block = b"\n\n".join(paras) + b"\n\n"
            f.write(block)
            n += len(block)
    return n


def measure(directory: str, seq_len: int, batch: int, annotations: tuple[str, ...], seconds: float) -> dict:
    """(child process) time to first batch, packed bytes/s, peak RSS."""
    from train import data as D

    t0 = time.perf_counter()
    cfg = D.DataConfig(sources=(f"prepared:{directory}",), seq_len=seq_len, batch_size=batch, annotations=annotations)
    docs = D.open_documents(cfg)
    it = D.make_train_iterator(cfg, docs)
    next(it)
    first = time.perf_counter() - t0
    n, t1 = 0, time.perf_counter()
    while time.perf_counter() - t1 < seconds:
        b = next(it)
        n += b["inputs"].size
    dt = time.perf_counter() - t1
    return {"first_batch_s": first, "bytes_per_s": n / dt, "batches": n // (seq_len * batch),
            "documents": len(docs), "corpus_bytes": docs.stats.bytes, "peak_rss_mib": peak_rss_mib()}


def peak_rss_mib() -> float:
    """This process's own peak RSS: VmHWM of its memory map (ru_maxrss also counts the parent's RSS at the
    fork, here the process that prepared the corpus)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def run_child(directory: str, args, annotations: tuple[str, ...]) -> dict:
    cmd = [sys.executable, __file__, "--child", directory, "--seq_len", str(args.seq_len), "--batch",
           str(args.batch), "--seconds", str(args.seconds), "--annotations", *annotations]
    load = os.getloadavg()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")).stdout
    return {**json.loads(out.strip().splitlines()[-1]), "load_before": load, "load_after": os.getloadavg()}


def markdown(rows: list[dict]) -> str:
    lines = ["| corpus | documents | prepare (s, MB/s) | annotations | first batch (s) | packed MB/s | peak RSS (MiB) "
             "| load |", "|---:|---:|---|---|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['size_mib']} MiB | {r['documents']:,} | {r['prepare_s']:.0f} s, "
                     f"{r['size_mib'] * 2**20 / r['prepare_s'] / 1e6:.0f} MB/s | {'+'.join(r['annotations']) or 'off'}"
                     f" | {r['first_batch_s']:.2f} | {r['bytes_per_s'] / 1e6:.1f} | {r['peak_rss_mib']:.0f} | "
                     f"{r['load_before'][0]:.1f}→{r['load_after'][0]:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes_mib", type=int, nargs="+", default=[200, 2048])
    ap.add_argument("--seq_len", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--annotation_sets", nargs="+", default=["", "word_starts"])
    ap.add_argument("--out", default=None, help="JSON output")
    ap.add_argument("--tmp", default=None, help="where the generated corpora go (deleted afterwards)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--annotations", nargs="*", default=[], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args.seq_len, args.batch, tuple(args.annotations), args.seconds)))
        return None
    sys.path.insert(0, ROOT)
    from train import prepare

    rows = []
    for size in args.sizes_mib:
        tmp = tempfile.mkdtemp(prefix=f"data_bench_{size}_", dir=args.tmp)
        try:
            src, out = os.path.join(tmp, "corpus.txt"), os.path.join(tmp, "prepared")
            generate(src, size << 20, seed=size)
            t = time.perf_counter()
            prepare.prepare([src], out, doc_split="blank_line")
            prep_s = time.perf_counter() - t
            os.remove(src)
            for ann in args.annotation_sets:
                annotations = tuple(a for a in ann.split("+") if a)
                rows.append({"size_mib": size, "prepare_s": prep_s, "annotations": annotations,
                             "seq_len": args.seq_len, "batch": args.batch, **run_child(out, args, annotations)})
                print(markdown(rows[-1:]).splitlines()[-1], flush=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    print(markdown(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rows": rows, "cpus": os.cpu_count()}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
