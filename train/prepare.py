"""Prepare byte corpora into sharded ArrayRecord files (the documents' bytes in fixed-size blocks) + a manifest.

    python -m train.prepare --source=SRC [--source=SRC ...] --out=DIR [--shards=N] [--workers=N]
        [--doc_split=file|line|blank_line] [--jsonl_field=text]

Sources: text files, directories (recursively, sorted), globs, ``*.jsonl`` / ``*.jsonl.gz`` / ``*.jsonl.zst``
(one document per line, field ``jsonl_field``), ``shared:<path>`` (../shared/data) and ``builtin:pydoc_topics``;
local or ``gs://``. Large line-split files are cut into units at document boundaries, so documents keep
their source order and one file is prepared in parallel. ``DIR`` (local or ``gs://``) receives:

  shard-KKKKK-of-NNNNN.arrayrecord  records: the shard's documents concatenated, cut into BLOCK-byte blocks
                                    (a window reads the one or two blocks it covers, not every document)
  shard-KKKKK-of-NNNNN.index.npz    per document incl. empty ones, in order: ``lengths`` (int32, or int64
                                    for documents of 2 GiB or more), ``invalid_utf8`` bool (what the
                                    directory's index below is built from)
  shard-KKKKK-of-NNNNN.json         done marker: counts and sha256 of both files (a killed run resumes
                                    by skipping the shards that have one)
  starts.npy, invalid.npy, empty.npy  the directory's document index, read by slices (``INDEX``):
                                    over the N non-empty documents of all shards, in order, ``starts``
                                    int64 [N + 1] the framed start of document j (cumulative length + 2j:
                                    its raw start is starts[j] - 2j), ``invalid`` int64 [N + 1] the
                                    cumulative count of documents with invalid UTF-8; ``empty`` int64 [E]
                                    for each empty document, the index j of the next non-empty one
  plan.json, manifest.json          the work plan; the manifest (format version, sources with their
                                    documents, bytes, empty / invalid UTF-8 / bad JSONL counts, shards)
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import glob
import hashlib
import io
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time

import numpy as np
from etils import epath

from train import storage
from train.sources import DataError, expand_source

FORMAT = "hnet-bytes-arrayrecord"
VERSION = 4  # 4: the directory-level document index (INDEX)
AR_OPTIONS = "group_size:1,uncompressed"  # random access to single blocks, no decompression per read
BLOCK = 32 << 10  # bytes per record
PARTIAL = ".partial-"  # shards being written
UNIT_BYTES = 64 << 20  # a line-split file is cut into units of about this size (bounded memory per worker)
SEPARATORS = {"line": b"\n", "blank_line": b"\n\n"}
INDEX = ("starts", "invalid", "empty")  # the directory's index files: NAME.npy


# ------------------------------------------------------------------------------------------------
# Sources (train.sources) -> files -> units
# ------------------------------------------------------------------------------------------------

def _kind(path: str, doc_split: str) -> str:
    if path.startswith("builtin:"):
        return "builtin"
    if path.endswith((".jsonl.gz", ".jsonl.zst")):
        return "jsonl_compressed"
    if path.endswith(".jsonl"):
        return "jsonl"
    if doc_split not in ("file", *SEPARATORS):
        raise DataError(f"unknown doc_split {doc_split!r} (file | line | blank_line)")
    return "text"


def _split_point(f, pos: int, sep: bytes, size: int) -> int | None:
    """The first position >= pos where ``data.split(sep)`` splits (start of a run of separators), or None."""
    f.seek(pos)
    off, tail = pos, b""  # tail: the last len(sep) - 1 bytes read, for a separator across two blocks
    while True:
        block = f.read(1 << 20)
        if not block:
            return None
        q = (tail + block).find(sep)
        if q >= 0:
            r = off - len(tail) + q
            break
        tail = (tail + block)[len(tail) + len(block) - (len(sep) - 1):]
        off += len(block)
    if len(sep) == 2:  # blank_line: back to the start of the newline run (the scan splits there)
        f.seek(max(r - (1 << 16), 0))
        head = f.read(r - max(r - (1 << 16), 0))
        r -= len(head) - len(head.rstrip(b"\n"))
    return r if r < size else None


def plan_units(path: str, source_id: int, doc_split: str, unit_bytes: int = 0) -> list[dict]:
    """Work units of one file: byte ranges of about ``unit_bytes`` that split into whole documents (the
    separator between two units is dropped, so the units' documents are exactly the file's, in order)."""
    unit_bytes = unit_bytes or UNIT_BYTES
    kind = _kind(path, doc_split)
    unit = {"source": source_id, "path": path, "kind": kind, "lo": 0, "hi": -1, "first": True}
    sep = b"\n" if kind == "jsonl" else SEPARATORS.get(doc_split) if kind == "text" else None
    if sep is None:
        return [unit]
    size = epath.Path(path).stat().length
    units, lo = [], 0
    with epath.Path(path).open("rb") as f:
        while size - lo > unit_bytes:
            cut = _split_point(f, lo + unit_bytes, sep, size)
            if cut is None:
                break
            units.append({**unit, "lo": lo, "hi": cut, "first": not units})
            lo = cut + len(sep)
    units.append({**unit, "lo": lo, "hi": size, "first": not units})
    return units


def _unit_bytes(u: dict) -> int:
    if u["kind"] == "builtin":
        return 1 << 20
    return (u["hi"] - u["lo"]) if u["hi"] >= 0 else epath.Path(u["path"]).stat().length


# ------------------------------------------------------------------------------------------------
# Units -> documents
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Counts:
    documents: int = 0  # non-empty documents
    bytes: int = 0
    empty: int = 0
    invalid_utf8: int = 0
    bad_json: int = 0
    files: int = 0

    def add(self, o: "Counts"):
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(o, f.name))


def _builtin_documents(name: str) -> list[bytes]:
    if name == "pydoc_topics":
        from pydoc_data.topics import topics

        return [topics[k].encode("utf-8") for k in sorted(topics)]
    raise DataError(f"unknown builtin corpus {name!r} (known: pydoc_topics)")


def _read_range(path: str, lo: int, hi: int) -> bytes:
    try:
        with epath.Path(path).open("rb") as f:
            f.seek(lo)
            return f.read(hi - lo) if hi >= 0 else f.read()
    except OSError as e:
        raise DataError(f"cannot read data source {path!r}: {e.strerror or e}") from e


def _jsonl_documents(lines, field: str, counts: Counts):
    for line in lines:
        if not line.strip():
            continue
        try:
            text = json.loads(line).get(field)
        except (ValueError, AttributeError):
            text = None
        if not isinstance(text, str):
            counts.bad_json += 1
            continue
        yield text.encode("utf-8", errors="surrogatepass")


def _open_compressed(path: str):
    raw = epath.Path(path).open("rb")
    if path.endswith(".gz"):
        import gzip

        return gzip.GzipFile(fileobj=raw)
    import zstandard

    return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw))


def unit_documents(u: dict, doc_split: str, jsonl_field: str, counts: Counts):
    """The documents of one unit (empty ones included), counting bad JSONL lines into ``counts``."""
    if u["kind"] == "builtin":
        yield from _builtin_documents(u["path"].split(":", 1)[1])
        return
    counts.files += int(u["first"])
    if u["kind"] == "jsonl_compressed":
        try:
            with _open_compressed(u["path"]) as f:
                yield from _jsonl_documents(f, jsonl_field, counts)
        except (OSError, EOFError, ValueError) as e:
            raise DataError(f"cannot read compressed data source {u['path']!r}: {e}") from e
        return
    data = _read_range(u["path"], u["lo"], u["hi"])
    if u["kind"] == "jsonl":
        yield from _jsonl_documents(data.splitlines(), jsonl_field, counts)
    elif doc_split == "file":
        yield data
    else:
        yield from data.split(SEPARATORS[doc_split])


def is_valid_utf8(d: bytes) -> bool:
    try:
        d.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


# ------------------------------------------------------------------------------------------------
# Shards
# ------------------------------------------------------------------------------------------------

def shard_name(k: int, n: int) -> str:
    return f"shard-{k:05d}-of-{n:05d}"


def sha256_of(path) -> str:
    h = hashlib.sha256()
    with epath.Path(path).open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def write_shard(out: str, k: int, n: int, units: list[dict], doc_split: str, jsonl_field: str) -> dict:
    """Write one shard (ArrayRecord + index) and its done marker; returns the marker."""
    from array_record.python.array_record_module import ArrayRecordWriter

    name = shard_name(k, n)
    counts = Counts()
    per_source: dict[int, Counts] = {}
    lengths, invalid = [], []
    # ArrayRecord writes local files: next to the output when it is local (a killed run's leftovers are
    # removed by the next prepare of that directory), else in the system's temporary directory
    with tempfile.TemporaryDirectory(prefix=PARTIAL, dir=None if storage.is_remote(out) else out) as tmp:
        local = os.path.join(tmp, name + ".arrayrecord")
        w = ArrayRecordWriter(local, AR_OPTIONS)
        buf = bytearray()
        for u in units:
            c = per_source.setdefault(u["source"], Counts())
            for d in unit_documents(u, doc_split, jsonl_field, c):
                lengths.append(len(d))
                invalid.append(bool(d) and not is_valid_utf8(d))
                if d:
                    buf += d
                    full = len(buf) // BLOCK * BLOCK
                    if full:
                        with memoryview(buf) as mv:
                            for i in range(0, full, BLOCK):
                                w.write(bytes(mv[i:i + BLOCK]))
                        del buf[:full]
                    c.documents += 1
                    c.bytes += len(d)
                    c.invalid_utf8 += invalid[-1]
                else:
                    c.empty += 1
        if buf:
            w.write(bytes(buf))
        w.close()
        index = os.path.join(tmp, name + ".index.npz")
        np.savez(index, lengths=np.asarray(lengths, np.int32 if max(lengths, default=0) < 2**31 else np.int64),
                 invalid_utf8=np.asarray(invalid, bool))
        marker = {"name": name, "shard": name + ".arrayrecord", "index": name + ".index.npz",
                  "sha256": sha256_of(local), "index_sha256": sha256_of(index), "size": os.path.getsize(local),
                  "documents_incl_empty": len(lengths),
                  "sources": {str(s): dataclasses.asdict(c) for s, c in per_source.items()}}
        for c in per_source.values():
            counts.add(c)
        marker["counts"] = dataclasses.asdict(counts)
        for f in (local, index):  # copy, then the marker last: a shard without a marker is redone
            epath.Path(f).copy(epath.Path(out) / os.path.basename(f), overwrite=True)
    storage.write_text(storage.join(out, name + ".json"), json.dumps(marker))
    return marker


def make_plan(sources: list[str], doc_split: str, jsonl_field: str, shards: int) -> dict:
    files = [p for s in sources for p in expand_source(s)]
    total = sum(_unit_bytes({"kind": _kind(p, doc_split), "path": p, "hi": -1}) for p in files)
    shards = shards or max(1, total // (256 << 20))
    unit_bytes = min(UNIT_BYTES, max(total // shards, 1 << 12))  # at least one unit per shard
    units = [u for i, p in enumerate(files) for u in plan_units(p, i, doc_split, unit_bytes)]
    sizes = np.array([_unit_bytes(u) for u in units], np.float64)
    n = max(1, min(shards, len(units)))
    # contiguous groups of units of about equal bytes (documents keep their order across shards)
    bounds = np.searchsorted(np.cumsum(sizes), np.arange(1, n) * sizes.sum() / n, side="left")
    groups = np.split(np.arange(len(units)), np.minimum(bounds + 1, len(units)))
    groups = [g for g in groups if len(g)]
    return {"format": FORMAT, "version": VERSION, "sources": sources, "files": files, "doc_split": doc_split,
            "jsonl_field": jsonl_field, "shards": [[units[i] for i in g] for g in groups]}


def prepare(sources: list[str], out: str, *, shards: int = 0, doc_split: str = "file", jsonl_field: str = "text",
            workers: int = 0, progress: bool = True) -> dict:
    """Prepare ``sources`` into ``out`` (resumable: finished shards are kept); returns the manifest."""
    plan = make_plan(list(sources), doc_split, jsonl_field, shards)
    outp = epath.Path(out)
    outp.mkdir(parents=True, exist_ok=True)
    if not storage.is_remote(out):
        for stale in glob.glob(os.path.join(out, PARTIAL + "*")):
            shutil.rmtree(stale, ignore_errors=True)
    plan_file = outp / "plan.json"
    if plan_file.exists():
        if json.loads(plan_file.read_text()) != plan:
            raise DataError(f"{out} holds a different preparation (plan.json differs); choose another --out")
    else:
        storage.write_text(str(plan_file), json.dumps(plan))
    n = len(plan["shards"])
    markers: dict[int, dict] = {}
    todo = []
    for k in range(n):
        m = outp / (shard_name(k, n) + ".json")
        if m.exists():
            markers[k] = json.loads(m.read_text())
        else:
            todo.append(k)
    total = sum(_unit_bytes(u) for g in plan["shards"] for u in g)
    bar = _Progress(n, len(markers), total, progress)
    workers = workers or min(len(todo), os.cpu_count() or 1)
    args = (doc_split, jsonl_field)
    if workers > 1 and len(todo) > 1:
        spawn = multiprocessing.get_context("spawn")  # no fork of a process that may run JAX threads
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=spawn) as ex:
            futs = {ex.submit(write_shard, out, k, n, plan["shards"][k], *args): k for k in todo}
            for f in concurrent.futures.as_completed(futs):
                markers[futs[f]] = f.result()
                bar.update(sum(_unit_bytes(u) for u in plan["shards"][futs[f]]))
    else:
        for k in todo:
            markers[k] = write_shard(out, k, n, plan["shards"][k], *args)
            bar.update(sum(_unit_bytes(u) for u in plan["shards"][k]))
    bar.close()
    manifest = make_manifest(plan, [markers[k] for k in range(n)], write_index(out, [markers[k] for k in range(n)]))
    storage.write_text(storage.join(out, "manifest.json"), json.dumps(manifest, indent=1))
    return manifest


def write_index(out: str, markers: list[dict]) -> dict[str, str]:
    """Write the directory's index (``INDEX``) from the shards' indexes, one shard in memory at a time;
    returns the sha256 of each file."""
    n = sum(m["counts"]["documents"] for m in markers)
    e = sum(m["counts"]["empty"] for m in markers)
    with tempfile.TemporaryDirectory(prefix=PARTIAL, dir=None if storage.is_remote(out) else out) as tmp:
        arr = {name: np.lib.format.open_memmap(os.path.join(tmp, name + ".npy"), "w+", np.int64, (size,))
               for name, size in zip(INDEX, (n + 1, n + 1, e))}
        j, k, raw, invalid = 0, 0, 0, 0  # non-empty documents, empty documents, bytes, invalid so far
        for m in markers:
            with (epath.Path(out) / m["index"]).open("rb") as fh, np.load(fh) as f:
                lengths, bad = f["lengths"].astype(np.int64), f["invalid_utf8"]
            ok = lengths > 0
            nj = int(ok.sum())
            arr["starts"][j:j + nj] = raw + np.cumsum(lengths[ok]) - lengths[ok] + 2 * np.arange(j, j + nj)
            arr["invalid"][j:j + nj] = invalid + np.cumsum(bad[ok]) - bad[ok]
            arr["empty"][k:k + len(ok) - nj] = j + np.cumsum(ok)[~ok]
            j, k, raw, invalid = j + nj, k + len(ok) - nj, raw + int(lengths.sum()), invalid + int(bad[ok].sum())
        arr["starts"][n], arr["invalid"][n] = raw + 2 * n, invalid
        sums = {}
        for name, a in arr.items():
            a.flush()
            local = os.path.join(tmp, name + ".npy")
            sums[name] = sha256_of(local)
            epath.Path(local).copy(epath.Path(out) / (name + ".npy"), overwrite=True)
        arr.clear()
    return sums


def make_manifest(plan: dict, markers: list[dict], index: dict[str, str]) -> dict:
    src = {i: Counts() for i in range(len(plan["files"]))}
    for m in markers:
        for s, c in m["sources"].items():
            src[int(s)].add(Counts(**c))
    totals = Counts()
    for c in src.values():
        totals.add(c)
    return {"format": FORMAT, "version": VERSION, "doc_split": plan["doc_split"], "jsonl_field": plan["jsonl_field"],
            "source_specs": plan["sources"],
            "sources": [{"path": p, **dataclasses.asdict(src[i])} for i, p in enumerate(plan["files"])],
            "totals": dataclasses.asdict(totals), "index": {name + ".npy": h for name, h in index.items()},
            "shards": [{k: m[k] for k in ("shard", "index", "sha256", "index_sha256", "size", "documents_incl_empty")}
                       | {"documents": m["counts"]["documents"], "bytes": m["counts"]["bytes"]} for m in markers]}


class _Progress:
    """One stderr line: shards done, bytes, rate, ETA."""

    def __init__(self, n: int, done: int, total: int, enabled: bool):
        self.n, self.done, self.total, self.bytes, self.t0, self.enabled = n, done, total, 0, time.time(), enabled
        self._show()

    def _show(self, end=""):
        if not self.enabled:
            return
        dt = max(time.time() - self.t0, 1e-9)
        frac = self.done / self.n
        bar = "#" * int(30 * frac) + "." * (30 - int(30 * frac))
        print(f"\rprepare [{bar}] {self.done}/{self.n} shards  {self.bytes / 2**20:,.0f} MiB  "
              f"{self.bytes / dt / 1e6:.1f} MB/s", end=end, file=sys.stderr, flush=True)

    def update(self, nbytes: int):
        self.done += 1
        self.bytes += nbytes
        self._show()

    def close(self):
        self._show("\n")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", action="append", required=True, help="source spec (repeatable)")
    ap.add_argument("--out", required=True, help="output directory (local or gs://)")
    ap.add_argument("--shards", type=int, default=0, help="number of shards (default: one per ~256 MiB)")
    ap.add_argument("--workers", type=int, default=0, help="worker processes (default: CPU count)")
    ap.add_argument("--doc_split", default="file", choices=["file", "line", "blank_line"])
    ap.add_argument("--jsonl_field", default="text")
    args = ap.parse_args(argv)
    try:
        m = prepare(args.source, args.out, shards=args.shards, doc_split=args.doc_split,
                    jsonl_field=args.jsonl_field, workers=args.workers)
    except DataError as e:
        print(f"data error: {e}", file=sys.stderr)
        sys.exit(2)
    t = m["totals"]
    print(f"{args.out}: {len(m['shards'])} shards, {t['documents']:,} documents, {t['bytes']:,} bytes from "
          f"{t['files']} files; {t['empty']} empty documents skipped, {t['bad_json']} bad JSONL lines, "
          f"{t['invalid_utf8']} documents with invalid UTF-8 kept as bytes")
    return m


if __name__ == "__main__":
    main()
