"""Byte data pipeline: sources -> documents -> framed byte stream -> packed windows -> grain batches.

A document is UTF-8 bytes framed as [BOS, bytes..., EOS] (254/255 never occur in valid UTF-8; invalid
UTF-8 is kept as raw bytes and counted, and framing is tracked by a flag, not by byte value). The
stream of all documents is cut into windows of L+1 bytes overlapping by one, so every target byte is
scored exactly once. Each window carries, per position t (inputs x_t, target x_{t+1}):

  inputs, targets   int32 [L]  byte ids
  segment_ids       int32 [L]  1, 2, ... per document inside the window; 0 = padding
  positions         int32 [L]  offset of x_t inside its document (resets at every document)
  loss_mask         bool  [L]  target is in the same document as the input (and not padding)
  byte_mask         bool  [L]  loss_mask and the target is a real byte (not BOS/EOS): the BPB count

Optional per-byte annotations computed on whole documents before windowing (so they see the full
document context), named in ``DataConfig.annotations``:
  word_starts       bool  [L]  HAT splitter word starts (BOS and EOS are one-byte words)
  script_routes     int32 [L]  causal per-byte Unicode-script route (hnet.scripts.SCRIPT_GROUPS)

Sources: text files, directories (recursively, sorted), globs, ``*.jsonl`` (one document per line,
field ``jsonl_field``), ``shared:<path>`` (under ../shared/data or $HNET_SHARED_DATA), and
``builtin:pydoc_topics`` (the Python reference documentation shipped with
every CPython install: the default corpus, no download needed).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
from typing import Iterator

import grain
import jax
import numpy as np

from hnet.bytes import BOS, EOS
from train.annotations import ANNOTATIONS

SHARED_DATA = os.environ.get(
    "HNET_SHARED_DATA", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data"))


class DataError(ValueError):
    """A data source is missing, unreadable or empty (raised before any compilation)."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """One split of one corpus. ``byte_range`` selects a fraction of every source (see ``load_documents``)."""

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


@dataclasses.dataclass
class DataStats:
    files: int = 0
    documents: int = 0
    bytes: int = 0
    empty_skipped: int = 0
    invalid_utf8: int = 0
    bad_json: int = 0

    def merge(self, o: "DataStats"):
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(o, f.name))


def shared_path(*parts: str) -> str:
    return os.path.normpath(os.path.join(SHARED_DATA, *parts))


# ------------------------------------------------------------------------------------------------
# Sources -> documents
# ------------------------------------------------------------------------------------------------

def _expand_source(src: str) -> list[str]:
    if src.startswith("builtin:"):
        return [src]
    if src.startswith("shared:"):  # ../shared/data (or $HNET_SHARED_DATA)
        src = shared_path(src[len("shared:"):])
    if any(c in src for c in "*?["):
        paths = sorted(glob.glob(src, recursive=True))
        if not paths:
            raise DataError(f"data source glob {src!r} matches no file")
        return [p for p in paths if os.path.isfile(p)]
    if os.path.isdir(src):
        paths = sorted(os.path.join(r, f) for r, _, fs in os.walk(src) for f in fs)
        if not paths:
            raise DataError(f"data source directory {src!r} contains no file")
        return paths
    if not os.path.exists(src):
        raise DataError(f"data source {src!r} does not exist")
    return [src]


def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise DataError(f"cannot read data source {path!r}: {e.strerror or e}") from e


class Document(bytes):
    """A document's bytes tagged with where they came from: ``source`` is the file path (or
    ``builtin:<name>``). Annotations that need a per-document label read it (``lang_routes_<set>``);
    everything else treats a Document as plain bytes."""

    source: str

    def __new__(cls, data: bytes, source: str = ""):
        doc = super().__new__(cls, data)
        doc.source = source
        return doc


def _builtin_documents(name: str) -> list[bytes]:
    if name == "pydoc_topics":
        from pydoc_data.topics import topics

        return [topics[k].encode("utf-8") for k in sorted(topics)]
    raise DataError(f"unknown builtin corpus {name!r} (known: pydoc_topics)")


def _split_text(data: bytes, how: str) -> list[bytes]:
    if how == "file":
        return [data]
    if how == "line":
        return data.split(b"\n")
    if how == "blank_line":
        return data.split(b"\n\n")
    raise DataError(f"unknown doc_split {how!r} (file | line | blank_line)")


def _source_documents(path: str, cfg: DataConfig, stats: DataStats) -> list[bytes]:
    if path.startswith("builtin:"):
        return _builtin_documents(path.split(":", 1)[1])
    data = _read_bytes(path)
    stats.files += 1
    if not path.endswith(".jsonl"):
        return _split_text(data, cfg.doc_split)
    docs = []
    for line in data.splitlines():
        if not line.strip():
            continue
        try:
            text = json.loads(line).get(cfg.jsonl_field)
        except (ValueError, AttributeError):
            text = None
        if not isinstance(text, str):
            stats.bad_json += 1
            continue
        docs.append(text.encode("utf-8", errors="surrogatepass"))
    return docs


def _select_range(docs: list[bytes], lo: float, hi: float) -> list[bytes]:
    """A single document is cut at byte fractions [lo, hi); several documents are assigned whole,
    by the fraction of the source at which they start."""
    if (lo, hi) == (0.0, 1.0):
        return docs
    if len(docs) == 1:
        n = len(docs[0])
        return [docs[0][int(lo * n):int(hi * n)]]
    total = sum(len(d) for d in docs) or 1
    out, start = [], 0
    for d in docs:
        if lo <= start / total < hi:
            out.append(d)
        start += len(d)
    return out


def load_documents(cfg: DataConfig) -> tuple[list[Document], DataStats]:
    """All non-empty documents of the split, each tagged with its source path; raises DataError when
    nothing usable is found."""
    stats = DataStats()
    docs: list[Document] = []
    for src in cfg.sources:
        for path in _expand_source(src):
            for d in _select_range(_source_documents(path, cfg, stats), *cfg.byte_range):
                if not d:
                    stats.empty_skipped += 1
                    continue
                try:
                    d.decode("utf-8")
                except UnicodeDecodeError:
                    stats.invalid_utf8 += 1
                docs.append(Document(d, path))
    stats.documents = len(docs)
    stats.bytes = sum(len(d) for d in docs)
    if not docs:
        raise DataError(f"no non-empty document in sources {list(cfg.sources)} (range {cfg.byte_range}): {stats}")
    return docs, stats


# ------------------------------------------------------------------------------------------------
# Documents -> packed windows
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class ByteStream:
    """All documents framed and concatenated. Arrays are [N]."""

    tokens: np.ndarray  # uint8
    doc_ids: np.ndarray  # int32, 0-based document index
    positions: np.ndarray  # int32, offset inside the document (BOS = 0)
    is_frame: np.ndarray  # bool, BOS/EOS
    extra: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # annotations, [N] each

    @classmethod
    def from_documents(cls, docs: list[bytes], annotations: tuple[str, ...] = ()) -> "ByteStream":
        lens = np.array([len(d) + 2 for d in docs], np.int64)
        framed = b"".join(bytes([BOS]) + d + bytes([EOS]) for d in docs)
        tokens = np.frombuffer(framed, np.uint8)
        doc_ids = np.repeat(np.arange(len(docs), dtype=np.int32), lens)
        starts = np.repeat(np.cumsum(lens) - lens, lens)
        positions = (np.arange(len(tokens), dtype=np.int64) - starts).astype(np.int32)
        is_frame = (positions == 0) | (positions == np.repeat(lens - 1, lens))
        unknown = set(annotations) - set(ANNOTATIONS)
        if unknown:
            raise DataError(f"unknown annotations {sorted(unknown)} (known: {sorted(ANNOTATIONS)})")
        extra = {name: np.concatenate([ANNOTATIONS[name][0](d) for d in docs]).astype(ANNOTATIONS[name][1])
                 for name in annotations}
        return cls(tokens, doc_ids, positions, is_frame, extra)


class WindowSource:
    """Random-access packed windows of ``seq_len`` inputs (grain data source)."""

    def __init__(self, stream: ByteStream, seq_len: int, *, pad_last: bool, max_windows: int = 0):
        self.s, self.L = stream, seq_len
        n = len(stream.tokens) - 1  # number of (input, target) pairs
        self.n = (-(-n // seq_len) if pad_last else n // seq_len)
        if max_windows:
            self.n = min(self.n, max_windows)
        if self.n == 0:
            raise DataError(f"corpus has {len(stream.tokens)} framed bytes: too short for one window of {seq_len}")

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        s, L = self.s, self.L
        lo = int(i) * L
        hi = min(lo + L + 1, len(s.tokens))
        n = hi - lo - 1
        out = empty_window(L, s.extra)
        doc = s.doc_ids[lo:hi]
        out["inputs"][:n] = s.tokens[lo:hi - 1]
        out["targets"][:n] = s.tokens[lo + 1:hi]
        out["segment_ids"][:n] = doc[:-1] - doc[0] + 1
        out["positions"][:n] = s.positions[lo:hi - 1]
        out["loss_mask"][:n] = doc[:-1] == doc[1:]
        out["byte_mask"][:n] = out["loss_mask"][:n] & ~s.is_frame[lo + 1:hi]
        for name, arr in s.extra.items():
            out[name][:n] = arr[lo:hi - 1]
        return out


def empty_window(L: int, extra: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    z = lambda dt: np.zeros((L,), dt)  # noqa: E731
    out = {"inputs": z(np.int32), "targets": z(np.int32), "segment_ids": z(np.int32), "positions": z(np.int32),
           "loss_mask": z(bool), "byte_mask": z(bool)}
    out.update({name: z(arr.dtype) for name, arr in (extra or {}).items()})
    return out


def local_batch_size(global_batch: int) -> int:
    pc = jax.process_count()
    if global_batch % pc:
        raise ValueError(f"global batch {global_batch} is not divisible by {pc} processes")
    return global_batch // pc


def make_train_iterator(cfg: DataConfig, docs: list[bytes]):
    """Infinite, deterministic, per-process grain iterator of process-local batches (state savable)."""
    src = WindowSource(ByteStream.from_documents(docs, cfg.annotations), cfg.seq_len, pad_last=False,
                       max_windows=cfg.max_windows)
    ds = grain.MapDataset.source(src)
    if cfg.shuffle:
        ds = ds.seed(cfg.seed).shuffle()
    ds = ds.repeat(None)
    ds = ds[jax.process_index()::jax.process_count()]
    ds = ds.batch(local_batch_size(cfg.batch_size), drop_remainder=True)
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)).__iter__()


def iterate_eval_batches(cfg: DataConfig, docs: list[bytes]) -> Iterator[dict[str, np.ndarray]]:
    """Every window of the split exactly once, in order; the last batch is padded with empty windows.
    Each process yields its slice of every global batch, so all processes yield the same count."""
    src = WindowSource(ByteStream.from_documents(docs, cfg.annotations), cfg.seq_len, pad_last=True,
                       max_windows=cfg.max_windows)
    b_local = local_batch_size(cfg.batch_size)
    first = jax.process_index() * b_local
    for g in range(0, len(src), cfg.batch_size):
        rows = [src[g + first + r] if g + first + r < len(src) else empty_window(cfg.seq_len, src.s.extra)
                for r in range(b_local)]
        yield {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def describe(stats: DataStats, name: str) -> str:
    return (f"{name}: {stats.documents} docs, {stats.bytes:,} bytes from {stats.files} files; "
            f"skipped {stats.empty_skipped} empty docs, {stats.bad_json} bad JSON records; "
            f"{stats.invalid_utf8} docs with invalid UTF-8 kept as bytes")


log = logging.getLogger(__name__)
