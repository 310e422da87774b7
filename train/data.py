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
``cache_root()`` on first use. Only a per-document index is held in memory (~20 bytes per document: lengths,
cumulative raw and framed offsets); a window reads the one or two blocks it covers, so memory does not grow
with the bytes.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import functools
import hashlib
import io
import json
import os
import shutil
import sys
import threading
from typing import Iterator

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
READ_THREADS, PREFETCH_BATCHES = 2, 4  # grain threads building batches ahead of the step


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

class Prepared:
    """One prepared directory: its manifest, the per-document index of all shards and lazy readers. The
    documents' bytes form one raw stream (shard after shard, document after document); ``source_raw``
    [sources + 1] is each source file's offset in it."""

    def __init__(self, directory: str):
        self.dir = directory
        try:
            self.manifest = json.loads((epath.Path(directory) / "manifest.json").read_text())
        except (OSError, ValueError) as e:
            raise DataError(f"{directory} is not a prepared data directory (manifest.json: {e})") from e
        if (self.manifest.get("format"), self.manifest.get("version")) != (prep.FORMAT, prep.VERSION):
            raise DataError(f"{directory}: unknown format {self.manifest.get('format')!r} "
                            f"version {self.manifest.get('version')!r} (want {prep.FORMAT} {prep.VERSION})")
        shards = self.manifest["shards"]
        for s in shards:
            path = os.path.join(directory, s["shard"])
            if not os.path.isfile(path) or os.path.getsize(path) != s["size"]:
                raise DataError(f"prepared shard {path} is missing, truncated or corrupt: "
                                f"{os.path.getsize(path) if os.path.isfile(path) else 'no'} bytes, manifest says "
                                f"{s['size']}")
            self._check(s["index"], s["index_sha256"])
        # shard contents are hashed in the background; a read from a shard waits for its check
        self._verified = [threading.Event() for _ in shards]
        self._errors: list[Exception | None] = [None] * len(shards)
        todo = iter(range(len(shards)))
        for _ in range(min(len(shards), os.cpu_count() or 1)):
            threading.Thread(target=self._verify, args=(todo,), daemon=True).start()
        index = [np.load(os.path.join(directory, s["index"])) for s in shards]
        self.lengths = np.concatenate([i["lengths"] for i in index])  # [documents incl. empty]
        self.invalid = np.concatenate([i["invalid_utf8"] for i in index])
        self.shard_start = np.concatenate([[0], np.cumsum([s["bytes"] for s in shards])]).astype(np.int64)
        n = [s["documents"] + s["empty"] for s in self.manifest["sources"]]
        self.source_first = np.concatenate([[0], np.cumsum(n)]).astype(np.int64)  # documents per source file
        self.source_raw = np.concatenate([[0], np.cumsum([s["bytes"] for s in self.manifest["sources"]])]).astype(
            np.int64)
        self._readers: list = [None] * len(shards)
        self._lock = threading.Lock()

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
        k = int(np.searchsorted(self.shard_start, lo, "right")) - 1
        while lo < hi:
            a, b = lo - int(self.shard_start[k]), min(hi, int(self.shard_start[k + 1])) - int(self.shard_start[k])
            reader = self._reader(k)
            try:
                blocks = reader.read(a // prep.BLOCK, -(-b // prep.BLOCK))
            except Exception as e:  # noqa: BLE001 - riegeli reports corruption as a generic error
                raise DataError(f"cannot read prepared shard {self.manifest['shards'][k]['shard']} in {self.dir}: "
                                f"{e}") from e
            first = a // prep.BLOCK * prep.BLOCK
            out.append(b"".join(blocks)[a - first:b - first])
            lo, k = int(self.shard_start[k + 1]), k + 1
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
        tmp = f"{local}.tmp-{os.getpid()}"
        os.makedirs(tmp, exist_ok=True)
        for s in json.loads(manifest)["shards"]:
            for name in (s["shard"], s["index"]):
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

class Documents:
    """The non-empty documents of a split, in order, over one or more prepared directories. In memory:
    ``cum`` [n + 1], the cumulative byte lengths, and per source file (small arrays) where its selected
    documents start in its directory's raw stream. ``byte_range`` per source file: a single document is cut
    at byte fractions [lo, hi); several documents are assigned whole, by the fraction of the source at
    which they start (a contiguous run)."""

    def __init__(self, cfg: DataConfig):
        self.sets: list[Prepared] = []
        self.paths: list[str] = []
        lens_parts, first, set_of, raw_of, self.stats, n_docs = [], [], [], [], DataStats(), 0
        lo, hi = cfg.byte_range
        for spec in cfg.sources:
            p = open_prepared(prepared_dir(spec, cfg))
            self.sets.append(p)
            for s, meta in enumerate(p.manifest["sources"]):
                a, b = p.source_first[s], p.source_first[s + 1]
                lens, invalid, raw = p.lengths[a:b], p.invalid[a:b], int(p.source_raw[s])
                if (lo, hi) != (0.0, 1.0) and b - a == 1:
                    n = int(lens[0])
                    raw, lens = raw + int(lo * n), np.array([int(hi * n) - int(lo * n)], np.int64)
                    invalid = np.array([bool(lens[0]) and not prep.is_valid_utf8(p.read_raw(raw, raw + int(lens[0])))])
                elif (lo, hi) != (0.0, 1.0):
                    frac = (np.cumsum(lens, dtype=np.int64) - lens) / (int(lens.sum(dtype=np.int64)) or 1)
                    i0, i1 = np.searchsorted(frac, lo, "left"), np.searchsorted(frac, hi, "left")
                    raw += int(lens[:i0].sum(dtype=np.int64))
                    lens, invalid = lens[i0:i1], invalid[i0:i1]
                ok = lens > 0
                self.stats.files += meta["files"]
                self.stats.bad_json += meta["bad_json"]
                self.stats.empty_skipped += int((~ok).sum())
                self.stats.invalid_utf8 += int(invalid[ok].sum())
                self.paths.append(meta["path"])
                lens_parts.append(lens if ok.all() else lens[ok])
                first.append(n_docs)
                set_of.append(len(self.sets) - 1)
                raw_of.append(raw)
                n_docs += len(lens_parts[-1])
        self.cum = np.zeros(n_docs + 1, np.int64)
        np.cumsum(np.concatenate(lens_parts) if len(lens_parts) != 1 else lens_parts[0], dtype=np.int64, out=self.cum[1:])
        # per source file: first view document, directory, raw-stream start of that document
        self.src_first, self.src_set, self.src_raw = np.array(first), np.array(set_of), np.array(raw_of, np.int64)
        self.stats.documents, self.stats.bytes = n_docs, int(self.cum[-1])
        if not n_docs:
            raise DataError(f"no non-empty document in sources {list(cfg.sources)} (range {cfg.byte_range}): "
                            f"{self.stats}")

    def __len__(self) -> int:
        return len(self.cum) - 1

    def read_spans(self, lo: int, hi: int, a: np.ndarray, b: np.ndarray) -> bytes:
        """Bytes [a_j, b_j) of documents j = lo..hi-1, concatenated (contiguous spans read together)."""
        src = np.searchsorted(self.src_first, np.arange(lo, hi), "right") - 1  # source file of each document
        base = self.src_raw[src] + self.cum[lo:hi] - self.cum[self.src_first[src]]
        sets, starts, ends = self.src_set[src], base + a, base + b
        cut = np.flatnonzero((sets[1:] != sets[:-1]) | (starts[1:] != ends[:-1])) + 1
        return b"".join(self.sets[sets[i]].read_raw(int(starts[i]), int(ends[j - 1]))
                        for i, j in zip(np.r_[0, cut].tolist(), np.r_[cut, hi - lo].tolist()))

    def read(self, lo: int, hi: int) -> list[Document]:
        """Documents lo..hi-1, whole."""
        lens = np.diff(self.cum[lo:hi + 1])
        raw = self.read_spans(lo, hi, np.zeros_like(lens), lens)
        ends = (self.cum[lo + 1:hi + 1] - self.cum[lo]).tolist()
        src = (np.searchsorted(self.src_first, np.arange(lo, hi), "right") - 1).tolist()
        return [Document(raw[e - n:e], self.paths[s]) for e, n, s in zip(ends, lens.tolist(), src)]

    def __getitem__(self, i: int) -> Document:
        return self.read(i, i + 1)[0]


class DocumentList:
    """An in-memory list of documents behind the same interface (evaluation of perturbed texts, tests)."""

    def __init__(self, docs: list[bytes]):
        self.docs = list(docs)
        self.cum = np.concatenate([[0], np.cumsum([len(d) for d in self.docs], dtype=np.int64)])

    def __len__(self) -> int:
        return len(self.docs)

    def read(self, lo: int, hi: int) -> list[bytes]:
        return self.docs[lo:hi]

    def read_spans(self, lo: int, hi: int, a: np.ndarray, b: np.ndarray) -> bytes:
        return b"".join(d[x:y] for d, x, y in zip(self.docs[lo:hi], a.tolist(), b.tolist()))


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
        self.docs = docs if hasattr(docs, "read") else DocumentList(docs)
        self.L, self.annotations = seq_len, tuple(annotations)
        self.unigram_sp = unigram.processor() if "unigram_ends" in self.annotations else None
        self.total = self._framed_start(len(self.docs.cum) - 1)
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

    def _framed_start(self, d: int) -> int:
        """Start of document d in the framed stream: cum[d] + 2d (found by bisection, not stored)."""
        return int(self.docs.cum[d]) + 2 * d

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
        L = self.L
        lo = int(i) * L
        hi = min(lo + L + 1, self.total)
        index = range(len(self.docs.cum))
        d0 = bisect.bisect_right(index, lo, key=self._framed_start) - 1
        d1 = bisect.bisect_right(index, hi - 1, lo=d0, key=self._framed_start)
        starts = self.docs.cum[d0:d1 + 1] + 2 * np.arange(d0, d1 + 1)
        framed = np.diff(starts)
        a = np.maximum(lo - starts[:-1], 0)  # framed slice [a, b) of each document in the window
        b = np.minimum(hi - starts[:-1], framed)
        lens = b - a
        doc = np.repeat(np.arange(d1 - d0, dtype=np.int32), lens)
        positions = np.arange(hi - lo) - np.repeat(np.cumsum(lens) - lens, lens) + np.repeat(a, lens)
        is_bos, is_eos = positions == 0, positions == np.repeat(framed - 1, lens)
        is_frame = is_bos | is_eos
        tokens = np.empty(hi - lo, np.uint8)  # BOS, EOS by position; the documents' bytes in between
        tokens[is_bos], tokens[is_eos] = BOS, EOS
        tokens[~is_frame] = np.frombuffer(self.docs.read_spans(d0, d1, np.maximum(a - 1, 0),
                                                               np.minimum(b - 1, framed - 2)), np.uint8)
        n = hi - lo - 1
        out = empty_window(L, self.annotations)
        out["inputs"][:n] = tokens[:-1]
        out["targets"][:n] = tokens[1:]
        out["segment_ids"][:n] = doc[:-1] + 1
        out["positions"][:n] = positions[:-1]
        out["loss_mask"][:n] = doc[:-1] == doc[1:]
        out["byte_mask"][:n] = out["loss_mask"][:n] & ~is_frame[1:]
        if self.annotations:
            docs = self.docs.read(d0, d1)
            arrs = [self._annotations(d0 + k, d, x == 0 and y == len(d) + 2)
                    for k, (d, x, y) in enumerate(zip(docs, a.tolist(), b.tolist()))]
            for name in self.annotations:
                out[name][:n] = np.concatenate([r[name][x:y] for r, x, y in zip(arrs, a.tolist(), b.tolist())])[:-1]
        return out


def empty_window(L: int, annotations: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    z = lambda dt: np.zeros((L,), dt)  # noqa: E731
    out = {"inputs": z(np.int32), "targets": z(np.int32), "segment_ids": z(np.int32), "positions": z(np.int32),
           "loss_mask": z(bool), "byte_mask": z(bool)}
    out.update({name: z(ANNOTATIONS[name][1]) for name in annotations})
    return out


def local_batch_size(global_batch: int) -> int:
    pc = jax.process_count()
    if global_batch % pc:
        raise ValueError(f"global batch {global_batch} is not divisible by {pc} processes")
    return global_batch // pc


def make_train_iterator(cfg: DataConfig, docs):
    """Infinite, deterministic, per-process grain iterator of process-local batches (state savable):
    windows shuffled lazily, each process takes every P-th, grain threads build batches ahead."""
    src = WindowSource(docs, cfg.seq_len, pad_last=False, max_windows=cfg.max_windows, annotations=cfg.annotations,
                       unigram=cfg.unigram)
    ds = grain.MapDataset.source(src)
    if cfg.shuffle:
        ds = ds.seed(cfg.seed).shuffle()
    ds = ds.repeat(None)
    ds = ds[jax.process_index()::jax.process_count()]
    ds = ds.batch(local_batch_size(cfg.batch_size), drop_remainder=True)
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=READ_THREADS, prefetch_buffer_size=PREFETCH_BATCHES)).__iter__()


def iterate_eval_batches(cfg: DataConfig, docs) -> Iterator[dict[str, np.ndarray]]:
    """Every window of the split exactly once, in order; the last batch is padded with empty windows.
    Each process yields its slice of every global batch, so all processes yield the same count."""
    src = WindowSource(docs, cfg.seq_len, pad_last=True, max_windows=cfg.max_windows, annotations=cfg.annotations,
                       unigram=cfg.unigram)
    b_local = local_batch_size(cfg.batch_size)
    first = jax.process_index() * b_local
    for g in range(0, len(src), cfg.batch_size):
        rows = [src[g + first + r] if g + first + r < len(src) else empty_window(cfg.seq_len, src.annotations)
                for r in range(b_local)]
        yield {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def with_annotations(cfg: DataConfig, names) -> DataConfig:
    """``cfg`` with the annotations ``names`` added (order kept, no duplicates)."""
    return dataclasses.replace(cfg, annotations=tuple(dict.fromkeys((*cfg.annotations, *names))))


def describe(stats: DataStats, name: str) -> str:
    return (f"{name}: {stats.documents} docs, {stats.bytes:,} bytes from {stats.files} files; "
            f"skipped {stats.empty_skipped} empty docs, {stats.bad_json} bad JSON records; "
            f"{stats.invalid_utf8} docs with invalid UTF-8 kept as bytes")

