"""Byte vocabulary and document framing shared by every model and data path.

A document is its UTF-8 bytes framed as ``[BOS, bytes..., EOS]``. BOS = 254 and EOS = 255 never occur
in valid UTF-8, so the vocabulary stays at 256 byte values. There is no PAD byte: 0 (NUL) is a real
byte, and padding in packed windows is signalled by ``segment_ids == 0``.

Raw (invalid UTF-8) documents may contain 0xFE/0xFF themselves; they are kept as bytes, so code that
must tell framing from content uses a flag or the document offsets (see ``train/data.py``), not the
byte value.
"""

from __future__ import annotations

import numpy as np

BOS: int = 254
EOS: int = 255
VOCAB_SIZE: int = 256


def encode_document(text_or_bytes: str | bytes | bytearray) -> np.ndarray:
    """Frame one document: ``str`` is UTF-8 encoded, bytes are kept as-is. -> uint8 [n + 2] (BOS ... EOS)."""
    if isinstance(text_or_bytes, str):
        data = text_or_bytes.encode("utf-8")
    else:
        data = bytes(text_or_bytes)
    out_N = np.empty(len(data) + 2, dtype=np.uint8)
    out_N[0] = BOS
    out_N[1:-1] = np.frombuffer(data, dtype=np.uint8)
    out_N[-1] = EOS
    return out_N


def decode_bytes(ids) -> str:
    """Byte ids (any int array-like, [n]) -> text. Drops every 254/255 (BOS/EOS), decodes errors='replace'."""
    ids_N = np.asarray(ids).reshape(-1).astype(np.int64)
    keep_N = (ids_N != BOS) & (ids_N != EOS)
    return ids_N[keep_N].astype(np.uint8).tobytes().decode("utf-8", errors="replace")


def segment_spans(segment_ids_L) -> list[tuple[int, int, int]]:
    """Runs of equal segment id in one packed window: [(start, end, segment id)] covering [0, L)
    (padding, id 0, is a run too). Host-side rules that need a whole segment (HAT words, script routes)
    run once per span."""
    seg_L = np.asarray(segment_ids_L)
    if seg_L.shape[0] == 0:
        return []
    change_L = np.ones(seg_L.shape[0], dtype=bool)
    change_L[1:] = seg_L[1:] != seg_L[:-1]
    starts = np.flatnonzero(change_L)
    ends = np.append(starts[1:], seg_L.shape[0])
    return [(int(a), int(b), int(seg_L[a])) for a, b in zip(starts, ends)]
