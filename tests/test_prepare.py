"""Prepared shards (train/prepare.py) and the lazy reading path over them (train/data.py): sources and counts,
unit cuts at document boundaries, parallel shards, resume after a kill, corrupt shards, prepared == raw."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import REPO_ROOT, pydoc_text, pydoc_topics
from train import data as D
from train import prepare as P
from train.sources import DataError, expand_source


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HNET_DATA_CACHE", str(tmp_path / "cache"))
    D.open_prepared.cache_clear()


def _docs(cfg):
    docs, stats = D.load_documents(cfg)
    return [bytes(d) for d in docs], stats


def _corpus(tmp_path):
    """Real text as every kind of source: plain files in a directory, JSONL (with bad lines), .gz, .zst."""
    import zstandard

    keys = sorted(pydoc_topics())[:40]
    d = tmp_path / "src"
    (d / "sub").mkdir(parents=True)
    for i, k in enumerate(keys[:10]):
        (d / ("sub" if i % 2 else "") / f"{k}.txt").write_text(pydoc_text(k))
    lines = [json.dumps({"text": pydoc_text(k)}) for k in keys[10:20]] + ["{broken", json.dumps({"body": "x"}),
                                                                           json.dumps({"text": ""})]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    gz = [json.dumps({"text": pydoc_text(k)}) for k in keys[20:30]]
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write("\n".join(gz + ["nope"]) + "\n")
    zs = "\n".join(json.dumps({"text": pydoc_text(k)}) for k in keys[30:40]).encode()
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(zs))
    want = ([pydoc_text(k).encode() for k in sorted(keys[:10])]  # directory: recursive, sorted by path
            + [pydoc_text(k).encode() for k in keys[10:40]])
    return [str(d), str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl.gz"), str(tmp_path / "c.jsonl.zst")], want


def test_prepare_every_source_kind_counts_and_reads_back(tmp_path):
    sources, want = _corpus(tmp_path)
    # the directory sorts by full path: sub/ after the top-level files whose names sort after 's'
    files = expand_source(sources[0])
    want[:10] = [open(f, "rb").read() for f in files]
    out = str(tmp_path / "prep")
    m = P.prepare(sources, out, shards=3, progress=False)
    t = m["totals"]
    assert (t["documents"], t["bad_json"], t["empty"], t["files"]) == (40, 3, 1, 13)
    assert t["bytes"] == sum(map(len, want)) and t["invalid_utf8"] == 0
    assert len(m["shards"]) == 3 and all(len(s["sha256"]) == 64 for s in m["shards"])
    assert [s["path"] for s in m["sources"]] == files + sources[1:]
    docs, stats = _docs(D.DataConfig(sources=(f"prepared:{out}",)))
    assert docs == want
    assert (stats.documents, stats.bad_json, stats.empty_skipped, stats.files) == (40, 3, 1, 13)
    # the same sources given raw (prepared into the cache on first use) read identically
    assert _docs(D.DataConfig(sources=tuple(sources)))[0] == want


@pytest.mark.parametrize("split", ["line", "blank_line"])
def test_large_file_is_cut_into_units_at_document_boundaries(tmp_path, monkeypatch, split):
    """Units cut inside runs of newlines still give exactly ``data.split(sep)`` (empty documents counted)."""
    text = "".join(pydoc_text(k) for k in sorted(pydoc_topics())[:30]).encode()
    text = text.replace(b"\n\n", b"\n\n\n", 40)  # odd-length newline runs: the cut must find the run start
    p = tmp_path / "big.txt"
    p.write_bytes(text)
    monkeypatch.setattr(P, "UNIT_BYTES", 4000)
    plan = P.make_plan([str(p)], split, "text", 4)
    assert sum(len(g) for g in plan["shards"]) > 20 and len(plan["shards"]) == 4
    out = str(tmp_path / "prep")
    m = P.prepare([str(p)], out, shards=4, doc_split=split, progress=False, workers=2)
    parts = text.split(P.SEPARATORS[split])
    assert m["totals"]["empty"] == sum(1 for x in parts if not x) > 0
    docs, _ = _docs(D.DataConfig(sources=(f"prepared:{out}",)))
    assert docs == [x for x in parts if x]


def test_prepare_resumes_after_a_kill(tmp_path):
    """SIGKILL the CLI after its first shard is done; the rerun keeps the finished shards (same bytes) and
    writes only the rest."""
    src = tmp_path / "text.txt"
    src.write_bytes(("".join(pydoc_text(k) for k in sorted(pydoc_topics()))).encode() * 10)
    out = tmp_path / "prep"
    cmd = [sys.executable, "-m", "train.prepare", f"--source={src}", f"--out={out}", "--shards=6",
           "--doc_split=blank_line", "--workers=1"]
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    p = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stderr=subprocess.PIPE, stdout=subprocess.PIPE)
    while not (out / "shard-00000-of-00006.json").exists() and p.poll() is None:
        pass
    p.send_signal(signal.SIGKILL)
    p.wait()
    done = sorted(f.name for f in out.glob("*.json") if f.name.startswith("shard-"))
    assert done and len(done) < 6 and not (out / "manifest.json").exists()
    before = {f: (out / f).read_bytes() for f in done}
    mtimes = {f: (out / f).stat().st_mtime_ns for f in done}
    r = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "6 shards" in r.stdout and "prepare [" in r.stderr  # summary line and progress bar
    assert all((out / f).read_bytes() == before[f] and (out / f).stat().st_mtime_ns == mtimes[f] for f in done)
    docs, _ = _docs(D.DataConfig(sources=(f"prepared:{out}",)))
    assert docs == [x for x in src.read_bytes().split(b"\n\n") if x]


def _prepared(tmp_path, shards=2):
    src = tmp_path / "t.txt"
    src.write_text("".join(pydoc_text(k) for k in sorted(pydoc_topics())[:20]))
    out = str(tmp_path / "prep")
    P.prepare([str(src)], out, shards=shards, doc_split="blank_line", progress=False, workers=1)
    return out


def test_truncated_or_corrupt_shard_is_an_error_naming_it(tmp_path):
    out = _prepared(tmp_path)
    shard = os.path.join(out, "shard-00001-of-00002.arrayrecord")
    data = open(shard, "rb").read()
    with open(shard, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(DataError, match="shard-00001-of-00002.arrayrecord is missing, truncated or corrupt"):
        D.open_documents(D.DataConfig(sources=(f"prepared:{out}",)))
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x20
    with open(shard, "wb") as f:
        f.write(bytes(flipped))
    D.open_prepared.cache_clear()
    # same size: the content hash (checked in the background) fails, and no read of that shard returns data
    cfg = D.DataConfig(sources=(f"prepared:{out}",), seq_len=64, batch_size=4, shuffle=False)
    docs = D.open_documents(cfg)
    with pytest.raises(DataError, match="shard-00001-of-00002.arrayrecord is corrupt: sha256"):
        list(D.iterate_eval_batches(cfg, docs))
    it = D.make_train_iterator(D.DataConfig(**{**cfg.__dict__, "shuffle": True}), docs)  # through grain's threads
    with pytest.raises(DataError, match="shard-00001-of-00002.arrayrecord is corrupt: sha256"):
        for _ in range(100):
            next(it)
    assert docs.read(0, 1)  # shard 0 is intact and readable


def test_missing_prepared_dir_and_plan_mismatch(tmp_path):
    with pytest.raises(DataError, match="does not exist or has no manifest"):
        D.open_documents(D.DataConfig(sources=(f"prepared:{tmp_path / 'nope'}",)))
    out = _prepared(tmp_path)
    with pytest.raises(DataError, match="different preparation"):
        P.prepare(["builtin:pydoc_topics"], out, progress=False)


def test_prepared_training_batches_equal_raw_and_resume(tmp_path):
    """A prepared directory (several shards) gives the same train batches as the raw source, and the
    iterator state resumes it exactly."""
    out = _prepared(tmp_path, shards=3)
    raw = D.DataConfig(sources=(str(tmp_path / "t.txt"),), doc_split="blank_line", seq_len=64, batch_size=4,
                       annotations=("word_starts",), byte_range=(0.0, 0.8))
    prepared = D.DataConfig(**{**raw.__dict__, "sources": (f"prepared:{out}",)})
    a = D.make_train_iterator(raw, D.open_documents(raw))
    b = D.make_train_iterator(prepared, D.open_documents(prepared))
    for _ in range(3):
        x, y = next(a), next(b)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    state = b.get_state()
    want = next(b)
    c = D.make_train_iterator(prepared, D.open_documents(prepared))
    c.set_state(state)
    got = next(c)
    for k in want:
        np.testing.assert_array_equal(want[k], got[k])
    assert want["word_starts"].any()


def test_long_document_windows_match_whole_stream(tmp_path):
    """Windows inside one long document (read per window, annotations cached) equal the reference framing."""
    text = "".join(pydoc_text(k) for k in sorted(pydoc_topics())[:5]).encode()
    docs = D.DocumentList([text[:5000], text[5000:5003], text[5003:]])
    src = D.WindowSource(docs, 64, pad_last=True, annotations=("word_starts",))
    framed = b"".join(bytes([254]) + d + bytes([255]) for d in docs.docs)
    got = np.concatenate([src[i]["inputs"] for i in range(len(src))])[:len(framed) - 1]
    assert bytes(got.astype(np.uint8)) == framed[:-1]
    ws = np.concatenate([src[i]["word_starts"] for i in range(len(src))])[:len(framed) - 1]
    ref = np.concatenate([D.annotate(d, ("word_starts",))["word_starts"] for d in docs.docs])[:-1]
    np.testing.assert_array_equal(ws, ref)


def test_data_pipeline_benchmark_measures_a_prepared_dir(tmp_path):
    sys.path.insert(0, os.path.join(REPO_ROOT, "benchmarks"))
    import data_pipeline

    src = tmp_path / "gen.txt"
    n = data_pipeline.generate(str(src), 300_000)
    assert n >= 300_000 and b"\n\n" in src.read_bytes()[:100_000]
    out = str(tmp_path / "prep")
    P.prepare([str(src)], out, doc_split="blank_line", progress=False, workers=1)
    row = data_pipeline.measure(out, 256, 4, ("word_starts",), seconds=0.3)
    assert row["batches"] > 0 and row["bytes_per_s"] > 0 and 0 < row["first_batch_s"] < 60
    assert row["corpus_bytes"] == sum(len(x) for x in src.read_bytes().split(b"\n\n"))
    table = data_pipeline.markdown([{**row, "size_mib": 1, "prepare_s": 1.0, "annotations": ("word_starts",),
                                     "load_before": (1.0,), "load_after": (2.0,)}])
    assert table.splitlines()[2].startswith("| 1 MiB | ") and "| word_starts |" in table


def test_document_index_is_not_loaded_into_memory(tmp_path):
    """A million one-byte documents: opening them (with and without a byte range) and reading batches
    allocates less than 4 bytes per document: the index is read from the prepared directory by slices."""
    import tracemalloc

    n = 1_000_000
    src = tmp_path / "tiny.txt"
    src.write_bytes(b"x\n" * n)
    out = str(tmp_path / "prep")
    P.prepare([str(src)], out, doc_split="line", progress=False, workers=1)
    tracemalloc.start()
    try:
        for byte_range in ((0.0, 1.0), (0.1, 0.9)):
            cfg = D.DataConfig(sources=(f"prepared:{out}",), seq_len=64, batch_size=4, byte_range=byte_range)
            docs = D.open_documents(cfg)
            batch = D.WindowSource(docs, 64, pad_last=False).batch([0, 7, len(docs) // 3 // 64])
            assert batch["inputs"][0, :3].tolist() == [254, ord("x"), 255]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(docs) == 800_000 and docs.stats.empty_skipped == 0  # the empty last line lies at fraction 1
    assert isinstance(D.open_prepared(out).starts, D.IndexFile)
    assert peak < 4 * n, f"{peak / n:.1f} bytes allocated per document"


def test_older_format_is_a_clear_error_and_the_cache_re_prepares(tmp_path, monkeypatch):
    out = _prepared(tmp_path)
    manifest = json.loads(open(os.path.join(out, "manifest.json")).read())
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump({**manifest, "version": P.VERSION - 1}, f)
    with pytest.raises(DataError, match=f"version {P.VERSION - 1}, this code reads .* prepare it again"):
        D.open_documents(D.DataConfig(sources=(f"prepared:{out}",)))
    raw = D.DataConfig(sources=(str(tmp_path / "t.txt"),), doc_split="blank_line")
    version = P.VERSION
    monkeypatch.setattr(P, "VERSION", version - 1)  # a cache entry written by the older version ...
    old = D.prepared_dir(raw.sources[0], raw)
    monkeypatch.setattr(P, "VERSION", version)
    new = D.prepared_dir(raw.sources[0], raw)  # ... is not reused: the cache key holds the version
    assert new != old and json.loads(open(os.path.join(new, "manifest.json")).read())["version"] == P.VERSION
    assert len(D.open_documents(raw)) == len(D.open_documents(D.DataConfig(sources=(f"prepared:{new}",))))
