"""Byte data pipeline: sources -> prepared shards -> documents (lazy) -> packed windows -> grain batches.

A document is UTF-8 bytes framed as [BOS, bytes..., EOS] (254/255 never occur in valid UTF-8; invalid
UTF-8 is kept as raw bytes and counted, and framing is tracked by position, not by byte value). The
stream of all documents is cut into windows of L+1 bytes overlapping by one, so every target byte is
scored exactly once. Each window carries, per position t (inputs x_t, target x_{t+1}):

  inputs, targets   int32 [L]  byte ids
  segment_ids       int32 [L]  1, 2, ... per document inside the window; 0 = padding
  positions         int32 [L]  offset of x_t inside its document (resets at every document)
  loss_mask         bool  [L]  target is in the same document as the input (and not padding)
  byte_mask         bool  [L]  loss_mask and the target is a real byte (not BOS/EOS): the BPB count

Optional per-byte annotations (``DataConfig.annotations``, ``train.annotations``) are computed on each
whole document a window touches, when the window is built (so they see the full document context):
  word_starts       bool  [L]  HAT splitter word starts (BOS and EOS are one-byte words)
  script_routes     int32 [L]  causal per-byte Unicode-script route (hnet.scripts.SCRIPT_GROUPS)
  unigram_ends      bool  [L]  DTP's unigram END targets, from the SentencePiece model that
                               ``DataConfig.unigram`` (``UnigramTargets``) trains once per process

One reading path: every source is a prepared directory of ArrayRecord shards (``train.prepare``). A
``prepared:DIR`` source (local or gs://) names one; any other source spec (``train.sources``: text files,
directories, globs, ``*.jsonl[.gz|.zst]``, ``shared:<path>``, ``builtin:pydoc_topics``) is prepared into
``cache_root()`` on first use. The per-document index is read by slices from the prepared directory (only
per-source-file offsets are held in memory) and a window reads the one or two blocks it covers, so memory
does not grow with the corpus. Training maps grain over batch numbers (``TrainBatches``): each batch draws
its window indices from a lazy per-epoch permutation and frames its windows in one call.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import functools
import hashlib
import io
import itertools
import json
import os
import shutil
import sys
import threading
import weakref
from typing import Iterator, NamedTuple

import grain
import jax
import numpy as np
from etils import epath

from hnet.bytes import BOS, EOS
from train import prepare as prep
from train import storage
from train.annotations import ANNOTATIONS, annotate
from train.sources import DataError, Document, expand_source

PREPARED = "prepared:"
READ_OPTIONS = "readahead_buffer_size:0,max_parallelism:0"  # ArrayRecord reader tuned for random access
PREFETCH_BATCHES = 4  # batches built ahead of the step


def cache_root() -> str:
    """Where raw sources are prepared on first use ($HNET_DATA_CACHE, default ~/.cache/hnet/data)."""
    return os.environ.get("HNET_DATA_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "hnet", "data"))


@dataclasses.dataclass(frozen=True)
class UnigramTargets:
    """SentencePiece unigram model trained on ``sources`` (a source list) split by ``doc_split``: what the
    ``unigram_ends`` annotation reads; trained once per configuration per process."""

    sources: tuple[str, ...] = ("builtin:pydoc_topics",)
    byte_range: tuple[float, float] = (0.0, 0.9)
    doc_split: str = "file"
    vocab_size: int = 2000
    max_sentence_bytes: int = 4096  # long documents are cut into lines/pieces of at most this for training

    def processor(self):
        return _train_unigram(self)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """One split of one corpus. ``sources``: raw sources (prepared into ``cache_root()`` on first use) or
    ``prepared:DIR`` (``python -m train.prepare``; ``doc_split`` and ``jsonl_field`` apply to raw sources, a
    prepared directory keeps those it was prepared with). ``byte_range`` selects a fraction of every source
    file (see ``Documents``)."""

    sources: tuple[str, ...] = ("builtin:pydoc_topics",)
    byte_range: tuple[float, float] = (0.0, 1.0)
    doc_split: str = "file"  # 'file' | 'line' | 'blank_line': how a text file splits into documents
    jsonl_field: str = "text"
    seq_len: int = 256
    batch_size: int = 8  # global batch (all processes)
    shuffle: bool = True
    seed: int = 0
    max_windows: int = 0  # >0: keep only the first N windows (quick evals)
    annotations: tuple[str, ...] = ()  # per-byte document annotations: see train.annotations.ANNOTATIONS
    unigram: UnigramTargets = UnigramTargets()  # what the 'unigram_ends' annotation is trained on


@dataclasses.dataclass
class DataStats:
    files: int = 0
    documents: int = 0
    bytes: int = 0
    empty_skipped: int = 0
    invalid_utf8: int = 0
    bad_json: int = 0


# ------------------------------------------------------------------------------------------------
# Prepared shards (train.prepare): opened, checked, read by record
# ------------------------------------------------------------------------------------------------

class IndexFile:
    """A 1-D int64 ``.npy`` file read by slices with ``os.pread`` (not memory-mapped: the pages it reads stay
    in the page cache, out of this process's resident memory). ``searchsorted`` bisects a coarse sample
    (every ``STRIDE``-th value, read once in chunks on first use), then reads one block."""

    STRIDE = 512

    def __init__(self, path: str):
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            (self.n,), _, dtype = getattr(np.lib.format, f"read_array_header_{version[0]}_0")(f)
            self.offset = f.tell()
        if dtype != np.int64:
            raise DataError(f"{path}: index of dtype {dtype}, want int64")
        self.fd = os.open(path, os.O_RDONLY)
        weakref.finalize(self, os.close, self.fd)
        self._coarse = None

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, k):
        """Elements [a, b) of a slice k (step 1), or element k."""
        if isinstance(k, slice):
            a, b, _ = k.indices(self.n)
            return np.frombuffer(os.pread(self.fd, 8 * max(b - a, 0), self.offset + 8 * a), np.int64)
        return int(self[k % self.n:k % self.n + 1][0])

    def coarse(self) -> np.ndarray:
        if self._coarse is None:
            step = self.STRIDE * 64  # values per chunk read
            self._coarse = np.concatenate([self[a:a + step][::self.STRIDE].copy() for a in range(0, self.n, step)])
        return self._coarse

    def searchsorted(self, x: np.ndarray, a: int, b: int) -> np.ndarray:
        """``np.searchsorted(self[a:b], x, "right") + a`` (int64 [k])."""
        out = np.empty_like(x)
        for t, (v, blk) in enumerate(zip(x.tolist(), (np.searchsorted(self.coarse(), x, "right") - 1).tolist())):
            g = 0 if blk < 0 else blk * self.STRIDE + int(
                self[blk * self.STRIDE:(blk + 1) * self.STRIDE].searchsorted(v, "right"))
            out[t] = min(max(g, a), b)
        return out


class ArrayIndex:
    """An in-memory int64 index (small, or a ``DocumentList``'s) behind ``IndexFile``'s interface."""

    def __init__(self, values):
        self.values = np.asarray(values, np.int64)

    def __getitem__(self, k):
        return self.values[k]

    def searchsorted(self, x: np.ndarray, a: int, b: int) -> np.ndarray:
        """``np.searchsorted(self[a:b], x, "right") + a`` (int64 [k])."""
        return np.searchsorted(self.values[a:b], x, "right") + a


def check_format(directory: str, manifest: dict):
    """A prepared directory of another format version (an older cache) is an error that says what to do."""
    if (manifest.get("format"), manifest.get("version")) != (prep.FORMAT, prep.VERSION):
        raise DataError(f"{directory}: format {manifest.get('format')!r} version {manifest.get('version')!r}, this "
                        f"code reads {prep.FORMAT} {prep.VERSION}: prepare it again (python -m train.prepare ...)")


class Prepared:
    """One prepared directory: its manifest, its document index (``prep.INDEX``, ``IndexFile``: nothing per
    document is read into memory) and lazy readers. The documents' bytes form one raw stream (shard after
    shard, document after document); per source file (small arrays), ``source_docs`` / ``source_empty``
    [sources + 1] are the first non-empty / empty document of each and ``source_raw`` its raw offset."""

    def __init__(self, directory: str):
        self.dir = directory
        try:
            self.manifest = json.loads((epath.Path(directory) / "manifest.json").read_text())
        except (OSError, ValueError) as e:
            raise DataError(f"{directory} is not a prepared data directory (manifest.json: {e})") from e
        check_format(directory, self.manifest)
        shards = self.manifest["shards"]
        for s in shards:
            path = os.path.join(directory, s["shard"])
            if not os.path.isfile(path) or os.path.getsize(path) != s["size"]:
                raise DataError(f"prepared shard {path} is missing, truncated or corrupt: "
                                f"{os.path.getsize(path) if os.path.isfile(path) else 'no'} bytes, manifest says "
                                f"{s['size']}")
        for name, sha256 in self.manifest["index"].items():
            self._check(name, sha256)
        # shard contents are hashed in the background; a read from a shard waits for its check
        self._verified = [threading.Event() for _ in shards]
        self._errors: list[Exception | None] = [None] * len(shards)
        todo = iter(range(len(shards)))
        for _ in range(min(len(shards), os.cpu_count() or 1)):
            threading.Thread(target=self._verify, args=(todo,), daemon=True).start()
        # int64 [N + 1], [N + 1], [E]: read by slices from the files, never into memory (prep.INDEX)
        self.starts, self.invalid, self.empty = (IndexFile(os.path.join(directory, n + ".npy")) for n in prep.INDEX)
        self.shard_start = [0, *itertools.accumulate(s["bytes"] for s in shards)]
        src = self.manifest["sources"]
        cum = lambda key: np.concatenate([[0], np.cumsum([s[key] for s in src])]).astype(np.int64)  # noqa: E731
        self.source_docs, self.source_empty, self.source_raw = cum("documents"), cum("empty"), cum("bytes")
        self._readers: list = [None] * len(shards)
        self._lock = threading.Lock()

    def raw_start(self, j: int) -> int:
        """Raw-stream offset of non-empty document j (j = N: the stream's length)."""
        return self.starts[j] - 2 * j

    def _check(self, name: str, sha256: str):
        """sha256 of a shard file against the manifest: nothing trains on a corrupted shard."""
        path = os.path.join(self.dir, name)
        if not os.path.isfile(path):
            raise DataError(f"prepared shard file {path} is missing")
        got = prep.sha256_of(path)
        if got != sha256:
            raise DataError(f"prepared shard file {path} is corrupt: sha256 {got} != manifest {sha256}")

    def _verify(self, todo):
        for k in todo:  # shared iterator: each shard is taken by one thread
            s = self.manifest["shards"][k]
            try:
                self._check(s["shard"], s["sha256"])
            except DataError as e:
                self._errors[k] = e
            self._verified[k].set()

    def _reader(self, k: int):
        if self._readers[k] is not None:  # opened after its check passed
            return self._readers[k]
        self._verified[k].wait()
        if self._errors[k] is not None:
            raise self._errors[k]
        if self._readers[k] is None:
            from array_record.python.array_record_module import ArrayRecordReader

            with self._lock:
                if self._readers[k] is None:
                    self._readers[k] = ArrayRecordReader(
                        os.path.join(self.dir, self.manifest["shards"][k]["shard"]), READ_OPTIONS)
        return self._readers[k]

    def read_raw(self, lo: int, hi: int) -> bytes:
        """Bytes [lo, hi) of the raw stream: the blocks (records) that cover them, shard by shard."""
        out = []
        k = bisect.bisect_right(self.shard_start, lo) - 1
        while lo < hi:
            a, b = lo - self.shard_start[k], min(hi, self.shard_start[k + 1]) - self.shard_start[k]
            reader = self._reader(k)
            try:  # one record per call: reading a range of records costs several times more per record
                blocks = [reader.read(i, i + 1)[0] for i in range(a // prep.BLOCK, -(-b // prep.BLOCK))]
            except Exception as e:  # noqa: BLE001 - riegeli reports corruption as a generic error
                raise DataError(f"cannot read prepared shard {self.manifest['shards'][k]['shard']} in {self.dir}: "
                                f"{e}") from e
            first = a // prep.BLOCK * prep.BLOCK
            out.append(b"".join(blocks)[a - first:b - first])
            lo, k = self.shard_start[k + 1], k + 1
        return b"".join(out)


@functools.lru_cache(maxsize=32)
def open_prepared(directory: str) -> Prepared:
    return Prepared(directory)


def _cache_key(files: list[str], cfg: DataConfig) -> str:
    def stamp(p):
        if p.startswith("builtin:"):
            return [p, sys.version]
        st = os.stat(p)
        return [os.path.abspath(p), st.st_size, st.st_mtime_ns]

    raw = json.dumps([prep.VERSION, [stamp(p) for p in files], cfg.doc_split, cfg.jsonl_field])
    return hashlib.sha256(raw.encode()).hexdigest()[:20]


def _stage(url: str) -> str:
    """A local, verified copy of a remote prepared directory (ArrayRecord reads local files)."""
    manifest = (epath.Path(url) / "manifest.json").read_text()
    local = os.path.join(cache_root(), "remote-" + hashlib.sha256((url + manifest).encode()).hexdigest()[:20])
    if not os.path.isfile(os.path.join(local, "manifest.json")):
        check_format(url, json.loads(manifest))
        tmp = f"{local}.tmp-{os.getpid()}"
        os.makedirs(tmp, exist_ok=True)
        for name in [s["shard"] for s in json.loads(manifest)["shards"]] + [i + ".npy" for i in prep.INDEX]:
            (epath.Path(url) / name).copy(epath.Path(tmp) / name, overwrite=True)
        with open(os.path.join(tmp, "manifest.json"), "w") as f:
            f.write(manifest)
        _publish(tmp, local)
    return local


def _publish(tmp: str, final: str):
    try:
        os.rename(tmp, final)
    except OSError:  # another process published the same directory first
        shutil.rmtree(tmp, ignore_errors=True)


def prepared_dir(source: str, cfg: DataConfig) -> str:
    """The local prepared directory of one source spec: ``prepared:DIR`` itself (a remote one is copied
    into the cache and verified), or the cache entry of a raw source, prepared on first use."""
    if source.startswith(PREPARED):
        d = source[len(PREPARED):]
        if storage.is_remote(d):
            try:
                return _stage(d)
            except DataError:
                raise
            except Exception as e:  # noqa: BLE001 - unreachable bucket, missing object, ...
                raise DataError(f"cannot read prepared data {d!r}: {type(e).__name__}: {str(e)[:300]}") from e
        if not os.path.isfile(os.path.join(d, "manifest.json")):
            raise DataError(f"prepared data directory {d!r} does not exist or has no manifest.json "
                            f"(run python -m train.prepare --out={d} ...)")
        return d
    files = expand_source(source)
    if any(storage.is_remote(p) for p in files):
        raise DataError(f"remote raw source {source!r}: prepare it first (python -m train.prepare --out=gs://...)")
    final = os.path.join(cache_root(), _cache_key(files, cfg))
    if not os.path.isfile(os.path.join(final, "manifest.json")):
        tmp = f"{final}.tmp-{os.getpid()}-{threading.get_ident()}"
        shutil.rmtree(tmp, ignore_errors=True)
        prep.prepare([source], tmp, doc_split=cfg.doc_split, jsonl_field=cfg.jsonl_field, workers=1, progress=False)
        _publish(tmp, final)
    return final


# ------------------------------------------------------------------------------------------------
# Documents: the selected documents of a split (lazy: an index, records read on demand)
# ------------------------------------------------------------------------------------------------

class Run(NamedTuple):
    """Documents j0..j1-1 of ``starts`` (framed starts, an ``IndexFile`` or ``ArrayIndex``), one raw stream:
    document j starts at raw offset ``starts[j] - 2j + shift`` of ``stream``."""

    stream: object  # .read_raw(lo, hi) -> bytes
    starts: object
    j0: int
    j1: int
    shift: int
    source: str


class _Bytes:
    """An in-memory raw stream."""

    def __init__(self, data: bytes):
        self.data = data

    def read_raw(self, lo: int, hi: int) -> bytes:
        return self.data[lo:hi]


class DocumentIndex:
    """Non-empty documents, in order, as ``runs``; documents are framed (BOS, bytes, EOS) into one framed
    stream of ``total`` bytes. In memory only per run [runs + 1]: ``run_doc`` its first document, ``run_framed``
    its framed start, ``run_raw`` the raw offset of document d of the run minus (framed start - 2d)."""

    def __init__(self, runs: list[Run]):
        self.runs = runs
        self.run_st0 = np.array([r.starts[r.j0] for r in runs], np.int64)
        self.run_doc = np.cumsum([0] + [r.j1 - r.j0 for r in runs], dtype=np.int64)
        self.run_framed = np.cumsum([0] + [r.starts[r.j1] - r.starts[r.j0] for r in runs], dtype=np.int64)
        self.run_raw = np.array([r.shift - 2 * r.j0 for r in runs], np.int64) + self.run_st0 - self.run_framed[:-1] \
            + 2 * self.run_doc[:-1]
        self.total = int(self.run_framed[-1])
        # Python-int copies for the per-window scalar lookups (numpy scalars cost several times more)
        self._doc, self._raw = self.run_doc.tolist(), self.run_raw.tolist()
        self._shift = (self.run_framed[:-1] - self.run_st0).tolist()  # framed start = starts[j] + shift

    def __len__(self) -> int:
        return self._doc[-1]

    def _run(self, d: int) -> int:
        return min(bisect.bisect_right(self._doc, d) - 1, len(self.runs) - 1)

    def locate(self, p: np.ndarray) -> np.ndarray:
        """The documents whose framed bytes hold framed positions p (int64 [k], 0 <= p < total)."""
        r = np.searchsorted(self.run_framed, p, "right") - 1
        d = np.empty_like(p)
        for k in np.unique(r).tolist():
            run, sel = self.runs[k], r == k
            x = p[sel] - self.run_framed[k] + self.run_st0[k]
            j = run.starts.searchsorted(x, run.j0, run.j1 + 1)
            d[sel] = self.run_doc[k] - 1 + j - run.j0
        return d

    def framed_starts(self, d0: int, d1: int) -> np.ndarray:
        """Framed starts of documents d0..d1 inclusive (d1 = len(self): ``total``), int64 [d1 - d0 + 1]."""
        parts, r = [], self._run(d0)
        while True:
            end, run = self._doc[r + 1], self.runs[r]
            j = run.j0 - self._doc[r]
            parts.append(run.starts[d0 + j:min(d1, end) + j + 1] + self._shift[r])
            if d1 <= end:
                return np.concatenate(parts) if len(parts) > 1 else parts[0]
            parts[-1], d0, r = parts[-1][:-1], end, r + 1

    def framed_starts_to(self, d0: int, p: int, k: int = 64) -> np.ndarray:
        """``framed_starts(d0, d1)`` up to d1, the first document that starts at or after framed position p
        (or len(self)): read k documents ahead, more if they end before p."""
        while True:
            f = self.framed_starts(d0, min(d0 + k, len(self)))
            if f[-1] >= p or d0 + k >= len(self):
                return f[:f.searchsorted(p) + 1]
            k *= 4

    def read_range(self, d0: int, d1: int, f: np.ndarray, head: int, tail: int) -> bytes:
        """Raw bytes of documents d0..d1-1 concatenated, from offset ``head`` of d0 to offset ``tail`` of
        d1 - 1 (the documents between whole); ``f``: ``framed_starts(d0, d1)``."""
        parts, r, base = [], self._run(d0), d0
        while d0 < d1:
            end, c = min(d1, self._doc[r + 1]), self._raw[r]
            hi = int(f[d1 - 1 - base]) - 2 * (d1 - 1) + c + tail if end == d1 else int(f[end - base]) - 2 * end + c
            parts.append(self.runs[r].stream.read_raw(int(f[d0 - base]) - 2 * d0 + c + head, hi))
            d0, r, head = end, r + 1, 0
        return b"".join(parts)

    def read(self, lo: int, hi: int) -> list[Document]:
        """Documents lo..hi-1, whole, each tagged with its source path."""
        f = self.framed_starts(lo, hi)
        lens = np.diff(f) - 2
        raw = self.read_range(lo, hi, f, 0, int(lens[-1]))
        cum = np.cumsum(lens).tolist()
        src = [self.runs[r].source for r in (np.searchsorted(self.run_doc, np.arange(lo, hi), "right") - 1).tolist()]
        return [Document(raw[e - n:e], s) for e, n, s in zip(cum, lens.tolist(), src)]


class Documents(DocumentIndex):
    """The non-empty documents of a split over one or more prepared directories: one run per source file
    over its directory's ``IndexFile``. ``byte_range`` per source file: a single document is cut
    at byte fractions [lo, hi); several documents are assigned whole, by the fraction of the source at
    which they start (a contiguous run)."""

    def __init__(self, cfg: DataConfig):
        runs, self.stats = [], DataStats()
        lo, hi = cfg.byte_range
        for spec in cfg.sources:
            p = open_prepared(prepared_dir(spec, cfg))
            for s, meta in enumerate(p.manifest["sources"]):
                j0, j1, e0, e1 = (int(x) for x in (p.source_docs[s], p.source_docs[s + 1], p.source_empty[s],
                                                    p.source_empty[s + 1]))
                self.stats.files += meta["files"]
                self.stats.bad_json += meta["bad_json"]
                base, total = int(p.source_raw[s]), meta["bytes"]
                if (lo, hi) != (0.0, 1.0) and j1 - j0 + e1 - e0 == 1:  # one document: cut at byte fractions
                    n = int(hi * total) - int(lo * total)
                    raw = base + int(lo * total)
                    if n == 0:
                        self.stats.empty_skipped += 1
                        continue
                    self.stats.invalid_utf8 += not prep.is_valid_utf8(p.read_raw(raw, raw + n))
                    runs.append(Run(p, ArrayIndex([0, n + 2]), 0, 1, raw, meta["path"]))
                    continue
                if (lo, hi) != (0.0, 1.0):  # documents whose start lies at a fraction in [lo, hi) of the source
                    frac = lambda j: (p.raw_start(j) - base) / (total or 1)  # noqa: E731, B023
                    efrac = lambda k: frac(int(p.empty[k]))  # noqa: E731, B023
                    j0, j1 = [j0 + bisect.bisect_left(range(j0, j1), x, key=frac) for x in (lo, hi)]
                    e0, e1 = [e0 + bisect.bisect_left(range(e0, e1), x, key=efrac) for x in (lo, hi)]
                self.stats.empty_skipped += e1 - e0
                self.stats.invalid_utf8 += p.invalid[j1] - p.invalid[j0]
                if j1 > j0:
                    runs.append(Run(p, p.starts, j0, j1, 0, meta["path"]))
        super().__init__(runs)
        self.stats.documents, self.stats.bytes = len(self), self.total - 2 * len(self)
        if not len(self):
            raise DataError(f"no non-empty document in sources {list(cfg.sources)} (range {cfg.byte_range}): "
                            f"{self.stats}")

    def __getitem__(self, i: int) -> Document:
        return self.read(i, i + 1)[0]


class DocumentList(DocumentIndex):
    """An in-memory list of documents behind the same interface (evaluation of perturbed texts, tests)."""

    def __init__(self, docs: list[bytes]):
        self.docs = list(docs)
        lens = np.array([len(d) for d in self.docs], np.int64)
        starts = ArrayIndex(np.concatenate([[0], np.cumsum(lens + 2)]))
        super().__init__([Run(_Bytes(b"".join(self.docs)), starts, 0, len(lens), 0, "")] if self.docs else [])

    def read(self, lo: int, hi: int) -> list[bytes]:
        return self.docs[lo:hi]


def open_documents(cfg: DataConfig) -> Documents:
    """The lazy document index of a split (prepares raw sources into the cache on first use); raises
    DataError when a source is missing, unreadable or corrupt, or nothing usable is found."""
    return Documents(cfg)


def load_documents(cfg: DataConfig) -> tuple[list[Document], DataStats]:
    """All non-empty documents of a (small) split in memory, each tagged with its source path."""
    docs = open_documents(cfg)
    return docs.read(0, len(docs)), docs.stats


@functools.lru_cache(maxsize=4)
def _train_unigram(cfg: UnigramTargets):
    import sentencepiece as spm

    docs, _ = load_documents(DataConfig(sources=cfg.sources, byte_range=cfg.byte_range, doc_split=cfg.doc_split))
    piece = cfg.max_sentence_bytes // 4
    sentences = [line[i:i + piece] for d in docs for line in d.decode("utf-8", errors="ignore").split("\n")
                 for i in range(0, len(line), piece) if line[i:i + piece].strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, model_type="unigram", vocab_size=cfg.vocab_size,
        normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
        character_coverage=0.9995, hard_vocab_limit=False, max_sentence_length=cfg.max_sentence_bytes,
        num_threads=1, minloglevel=2)
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


# ------------------------------------------------------------------------------------------------
# Documents -> packed windows
# ------------------------------------------------------------------------------------------------

class WindowSource:
    """Random-access packed windows of ``seq_len`` inputs over a document sequence (grain data source):
    window i covers framed-stream bytes [i·L, i·L + L] and reads only the documents it touches. ``unigram``:
    the targets of the ``unigram_ends`` annotation (trained here when it is one of ``annotations``)."""

    def __init__(self, docs, seq_len: int, *, pad_last: bool, max_windows: int = 0, annotations: tuple[str, ...] = (),
                 unigram: UnigramTargets = UnigramTargets()):
        unknown = set(annotations) - set(ANNOTATIONS)
        if unknown:
            raise DataError(f"unknown annotations {sorted(unknown)} (known: {sorted(ANNOTATIONS)})")
        self.docs = docs if isinstance(docs, DocumentIndex) else DocumentList(docs)
        self.L, self.annotations = seq_len, tuple(annotations)
        self.unigram_sp = unigram.processor() if "unigram_ends" in self.annotations else None
        self.total = self.docs.total
        n = self.total - 1  # number of (input, target) pairs
        self.n = (-(-n // seq_len) if pad_last else n // seq_len)
        if max_windows:
            self.n = min(self.n, max_windows)
        if self.n == 0:
            raise DataError(f"corpus has {n + 1} framed bytes: too short for one window of {seq_len}")
        self._ann_cache: collections.OrderedDict = collections.OrderedDict()  # partly-covered documents
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self.n

    def _annotations(self, j: int, doc: bytes, whole: bool) -> dict[str, np.ndarray]:
        """A document's annotations; the last few partly-covered (long) documents are cached, since the
        neighbouring windows need them again."""
        if whole:
            return annotate(doc, self.annotations, self.unigram_sp)
        with self._lock:
            if j in self._ann_cache:
                self._ann_cache.move_to_end(j)
                return self._ann_cache[j]
        out = annotate(doc, self.annotations, self.unigram_sp)
        with self._lock:
            self._ann_cache[j] = out
            while len(self._ann_cache) > 8:
                self._ann_cache.popitem(last=False)
        return out

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return {k: v[0] for k, v in self.batch([i]).items()}

    def batch(self, indices, rows: int = 0) -> dict[str, np.ndarray]:
        """Windows ``indices`` as a batch [rows, L] (default: one row each; rows after them stay empty). The
        documents are located and read window by window; the B windows are framed together, flat [B, L + 1]."""
        L, N, B = self.L, self.L + 1, len(indices)
        out = empty_window((rows or B, L), self.annotations)
        if not B:
            return out
        lo = np.asarray(indices, np.int64) * L
        n = np.minimum(lo + N, self.total) - lo  # framed bytes [lo, lo + n) of each window
        spans, raws = [], []
        for r, d0 in enumerate(self.docs.locate(lo).tolist()):
            f = self.docs.framed_starts_to(d0, int(lo[r] + n[r]))
            d1, s = d0 + len(f) - 1, f - lo[r]  # [d1 - d0 + 1] window-relative framed starts
            raws.append(self.docs.read_range(d0, d1, f, max(-int(s[0]) - 1, 0),
                                             min(int(n[r] - s[-2]), int(s[-1] - s[-2]) - 1) - 1))
            spans.append((d0, d1, s))
        m = np.array([len(s) for _, _, s in spans])  # documents per window + 1
        S = np.concatenate([s for _, _, s in spans]).astype(np.int32)  # window-relative framed starts
        last = np.cumsum(m) - 1  # each window's last entry: the first document after it (or the corpus end)
        first = last - m + 1
        n_S = np.repeat(n, m).astype(np.int32)  # per entry: its window's n, and the flat offset of its row
        row_S = np.repeat(np.arange(B, dtype=np.int32) * N, m)
        # segments of the flat [B, N] batch: document k of a window covers [S_k, S_k+1) clipped to [0, n);
        # the window's last entry covers its padding [n, N)
        C = np.clip(S, 0, n_S)
        E = np.empty_like(C)
        E[:-1], E[last] = C[1:], N
        lens = E - C
        seg_id = np.arange(len(S), dtype=np.int32) - np.repeat(first, m).astype(np.int32) + 1
        seg_id[last] = 0
        seg = np.repeat(seg_id, lens).reshape(B, N)  # 1, 2, ... per document in its window; 0 = padding
        pos = np.tile(np.arange(N, dtype=np.int32), B)
        pos -= np.repeat(S, lens)
        is_frame = np.repeat(seg_id == 0, lens)  # BOS, EOS and the padding after the corpus end
        has_eos = S - 1 < n_S  # the previous document's EOS (entry k > first) lies in the window
        has_eos[first] = False
        bos, eos = (S + row_S)[(seg_id > 0) & (S >= 0)], (S - 1 + row_S)[has_eos]
        is_frame[bos], is_frame[eos] = True, True
        tokens = np.zeros(B * N, np.uint8)
        tokens[bos], tokens[eos] = BOS, EOS
        tokens[~is_frame] = np.frombuffer(b"".join(raws), np.uint8)
        tokens, is_frame = tokens.reshape(B, N), is_frame.reshape(B, N)
        o = {k: v[:B] for k, v in out.items()}  # written in place: large temporaries cost page faults
        o["inputs"][:], o["targets"][:] = tokens[:, :-1], tokens[:, 1:]
        o["segment_ids"][:] = seg[:, :-1]
        o["positions"][:] = pos.reshape(B, N)[:, :-1]
        np.equal(seg[:, :-1], seg[:, 1:], out=o["loss_mask"])
        np.greater(o["loss_mask"], is_frame[:, 1:], out=o["byte_mask"])  # and the target is no frame
        if (n < N).any():  # after the last target
            for v in o.values():
                v[np.arange(L) >= n[:, None] - 1] = 0
        for r, (d0, d1, s) in enumerate(spans if self.annotations else ()):
            a = np.maximum(-s[:-1], 0).tolist()  # framed slice [a, b) of each document in the window
            b = np.minimum(n[r] - s[:-1], np.diff(s)).tolist()
            arrs = [self._annotations(d0 + k, d, x == 0 and y == len(d) + 2)
                    for k, (d, x, y) in enumerate(zip(self.docs.read(d0, d1), a, b))]
            for name in self.annotations:
                out[name][r, :n[r] - 1] = np.concatenate([q[name][x:y] for q, x, y in zip(arrs, a, b)])[:-1]
        return out


def empty_window(shape: int | tuple[int, ...], annotations: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """Padding: every array of a window (shape L) or batch (shape (B, L)), zero."""
    z = lambda dt: np.zeros(shape, dt)  # noqa: E731
    out = {"inputs": z(np.int32), "targets": z(np.int32), "segment_ids": z(np.int32), "positions": z(np.int32),
           "loss_mask": z(bool), "byte_mask": z(bool)}
    out.update({name: z(ANNOTATIONS[name][1]) for name in annotations})
    return out


def local_batch_size(global_batch: int) -> int:
    pc = jax.process_count()
    if global_batch % pc:
        raise ValueError(f"global batch {global_batch} is not divisible by {pc} processes")
    return global_batch // pc


class TrainBatches:
    """Batch k of this process (a grain map over batch numbers): the global window stream is epoch after
    epoch of a lazy permutation of the ``len(src)`` windows (grain's ``index_shuffle``, seed + epoch per
    epoch), and process p of P takes elements p, p + P, p + 2P, ... of it. One call per batch, so grain's
    per-element overhead is paid once per batch."""

    def __init__(self, src: WindowSource, batch: int, shuffle: bool, seed: int):
        self.src, self.batch, self.shuffle, self.seed = src, batch, shuffle, seed
        self.p, self.P = jax.process_index(), jax.process_count()

    def indices(self, k: int) -> list[int]:
        n = len(self.src)
        g = ((k * self.batch + np.arange(self.batch)) * self.P + self.p).tolist()
        if not self.shuffle:
            return [i % n for i in g]
        shuffle = grain.experimental.index_shuffle
        return [shuffle(i % n, max_index=n - 1, seed=(self.seed + i // n) % 2**32, rounds=4) for i in g]

    def __call__(self, k: int) -> dict[str, np.ndarray]:
        return self.src.batch(self.indices(k))


def make_train_iterator(cfg: DataConfig, docs):
    """Infinite, deterministic, per-process grain iterator of process-local batches (``TrainBatches``; state
    savable: the next batch number), built ahead of the step by a background thread."""
    src = WindowSource(docs, cfg.seq_len, pad_last=False, max_windows=cfg.max_windows, annotations=cfg.annotations,
                       unigram=cfg.unigram)
    ds = grain.MapDataset.range(2**62).map(TrainBatches(src, local_batch_size(cfg.batch_size), cfg.shuffle, cfg.seed))
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    # one background thread runs the pipeline ahead (a thread pool costs more in GIL hand-offs)
    return grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=PREFETCH_BATCHES).__iter__()


def iterate_eval_batches(cfg: DataConfig, docs) -> Iterator[dict[str, np.ndarray]]:
    """Every window of the split exactly once, in order; the last batch is padded with empty windows.
    Each process yields its slice of every global batch, so all processes yield the same count."""
    src = WindowSource(docs, cfg.seq_len, pad_last=True, max_windows=cfg.max_windows, annotations=cfg.annotations,
                       unigram=cfg.unigram)
    b_local = local_batch_size(cfg.batch_size)
    first = jax.process_index() * b_local
    for g in range(0, len(src), cfg.batch_size):
        yield src.batch(range(g + first, min(g + first + b_local, len(src))), b_local)


def with_annotations(cfg: DataConfig, names) -> DataConfig:
    """``cfg`` with the annotations ``names`` added (order kept, no duplicates)."""
    return dataclasses.replace(cfg, annotations=tuple(dict.fromkeys((*cfg.annotations, *names))))


def describe(stats: DataStats, name: str) -> str:
    return (f"{name}: {stats.documents} docs, {stats.bytes:,} bytes from {stats.files} files; "
            f"skipped {stats.empty_skipped} empty docs, {stats.bad_json} bad JSON records; "
            f"{stats.invalid_utf8} docs with invalid UTF-8 kept as bytes")

