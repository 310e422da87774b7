"""Rule-based chunk boundaries, in the START convention.

START: ``b_t = 1`` iff byte t opens a chunk (``b_0 = 1``). END rules (DTP/MAGNET: ``e_t = 1`` iff byte t
closes its chunk) are converted once with ``b_{t+1} = e_t``, ``b_0 = 1`` (``end_to_start``).

Packed windows (``segment_ids`` int32 [B, L]: 0 = padding, one positive id per document): every rule
forces ``b = 1`` at each segment start (``doc_starts``) and never lets a chunk span two segments. A run
of padding is treated as one extra segment: it opens one chunk at its first position and has no other
boundary, so padding never merges into the last document's chunk.

Two flavours:
  * in-graph (jnp, jit-able, static shapes): ``doc_starts``, ``fixed_stride_starts``,
    ``spacebyte_starts``, ``end_to_start``, ``whitespace_end_to_start``;
  * host-side numpy for the HAT word rule (``hat_splitter`` package): ``hat_word_starts``,
    ``hat_starts_for_window``, ``incomplete_utf8_tail_len``.

HAT and invalid UTF-8: the splitter takes ``str``. A document is decoded with 'surrogateescape'; each
maximal valid run is split by ``HATSplitter.split_with_limit`` on its own, and every byte that is not
part of a valid character (stray continuation bytes, invalid leads, 0xFE/0xFF, i.e. BOS/EOS too, and
a character truncated by the end of the input) is a one-byte word. No byte is ever lost (asserted).

HAT prefix stability (what holds, tested): for any byte prefix ``d[:k]`` of a document ``d``,
``hat_word_starts(d[:k])[:j] == hat_word_starts(d)[:j]`` with ``j = k - incomplete_utf8_tail_len(d[:k])``:
every position agrees except the bytes of a trailing character whose continuation bytes have not
arrived yet. In particular, whether the lead byte of a multi-byte character opens a word is in general
only known once the character is complete ("中" after a letter opens a word, "ü" does not). A model
that reads the START bit at the lead byte therefore sees at most the rest of that one character; the
HAT rule needs lookahead = 1 at word level anyway (§9.2 of the reference notes). The models' decided
word starts (one rule for the forward and for generation) are ``models.pooling.causal_word_starts``.
"""

from __future__ import annotations

import codecs
import functools
import re

import jax.numpy as jnp
import numpy as np
from jax import lax

from hnet.bytes import BOS, EOS, segment_spans

SPACE = 0x20

# ---------------------------------------------------------------------------------------------------
# In-graph rules (jnp)
# ---------------------------------------------------------------------------------------------------


def doc_starts(segment_ids_BxL: jnp.ndarray, xp=jnp) -> jnp.ndarray:
    """bool [B, L]: True at t = 0 and wherever the segment id changes (documents and padding runs).
    ``xp``: jax.numpy (in-graph) or numpy (host)."""
    seg_BxL = xp.asarray(segment_ids_BxL)
    prev_BxL = xp.concatenate([xp.full_like(seg_BxL[:, :1], -1), seg_BxL[:, :-1]], axis=1)
    return seg_BxL != prev_BxL


def _segment_offsets(segment_ids_BxL: jnp.ndarray) -> jnp.ndarray:
    """int32 [B, L]: offset of t inside its segment (0 at every segment start)."""
    starts_BxL = doc_starts(segment_ids_BxL)
    L = starts_BxL.shape[1]
    pos_BxL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), starts_BxL.shape)
    seg_start_BxL = lax.cummax(jnp.where(starts_BxL, pos_BxL, 0), axis=1)
    return pos_BxL - seg_start_BxL


def _shift_right(x_BxL: jnp.ndarray, fill) -> jnp.ndarray:
    return jnp.concatenate([jnp.full_like(x_BxL[:, :1], fill), x_BxL[:, :-1]], axis=1)


def fixed_stride_starts(segment_ids_BxL: jnp.ndarray, stride: int) -> jnp.ndarray:
    """bool [B, L]: starts at per-document offsets ≡ 0 (mod ``stride``) (offset 0 = the BOS)."""
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    seg_BxL = jnp.asarray(segment_ids_BxL)
    rule_BxL = (_segment_offsets(seg_BxL) % stride == 0) & (seg_BxL != 0)
    return doc_starts(seg_BxL) | rule_BxL


def spacelike(tokens_BxL: jnp.ndarray) -> jnp.ndarray:
    """bool [B, L]: SpaceByte's spacelike bytes: not an ASCII letter/digit and not a UTF-8 continuation
    byte (0x80-0xBF). UTF-8 lead bytes >= 0xC0 and BOS/EOS are spacelike."""
    x_BxL = jnp.asarray(tokens_BxL).astype(jnp.int32)
    digit = (x_BxL >= 0x30) & (x_BxL <= 0x39)
    upper = (x_BxL >= 0x41) & (x_BxL <= 0x5A)
    lower = (x_BxL >= 0x61) & (x_BxL <= 0x7A)
    cont = (x_BxL >= 0x80) & (x_BxL <= 0xBF)
    return ~(digit | upper | lower | cont)


def spacebyte_starts(tokens_BxL: jnp.ndarray, segment_ids_BxL: jnp.ndarray) -> jnp.ndarray:
    """bool [B, L]: SpaceByte global positions: the first byte of each spacelike run, plus every
    document start. (Capping at T_G and masking the targets after the cap is the caller's job.)"""
    seg_BxL = jnp.asarray(segment_ids_BxL)
    sl_BxL = spacelike(tokens_BxL)
    rule_BxL = sl_BxL & ~_shift_right(sl_BxL, True) & (seg_BxL != 0)
    return doc_starts(seg_BxL) | rule_BxL


def end_to_start(e_BxL: jnp.ndarray, segment_ids_BxL: jnp.ndarray) -> jnp.ndarray:
    """END -> START: ``b_t = e_{t-1}`` inside a segment, ``b = 1`` at every segment start. bool [B, L].

    An END at a document's last byte is dropped (the next byte is a document start anyway)."""
    seg_BxL = jnp.asarray(segment_ids_BxL)
    e_BxL = jnp.asarray(e_BxL).astype(bool)
    return doc_starts(seg_BxL) | (_shift_right(e_BxL, False) & (seg_BxL != 0))


def whitespace_end_to_start(tokens_BxL: jnp.ndarray, segment_ids_BxL: jnp.ndarray) -> jnp.ndarray:
    """DTP 'whitespaces': ``e_t = [x_t == ' ']`` (the chunk is "word␣"), converted to START. bool [B, L]."""
    return end_to_start(jnp.asarray(tokens_BxL) == SPACE, segment_ids_BxL)


# ---------------------------------------------------------------------------------------------------
# HAT word rule (host-side numpy)
# ---------------------------------------------------------------------------------------------------

DEFAULT_MAX_WORD_BYTES = 100  # the vLLM HAT port's max_word_size


@functools.lru_cache(maxsize=1)
def _splitter():
    from hat_splitter import HATSplitter

    return HATSplitter()


def incomplete_utf8_tail_len(data: bytes) -> int:
    """Number (0..3) of trailing bytes of ``data`` that form a valid but unfinished UTF-8 character."""
    dec = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")
    dec.decode(bytes(data[-4:]), final=False)
    return len(dec.getstate()[0])


_ESCAPED = re.compile("[\udc80-\udcff]")


def _valid_runs(data: bytes):
    """Yield (byte offset, text) for maximal valid UTF-8 runs and (byte offset, None) per invalid byte."""
    s = data.decode("utf-8", errors="surrogateescape")  # invalid bytes -> U+DC80..U+DCFF
    pos = 0
    prev = 0
    for m in _ESCAPED.finditer(s):
        i = m.start()
        if i > prev:
            yield pos, s[prev:i]
            pos += len(s[prev:i].encode("utf-8"))
        yield pos, None
        pos += 1
        prev = i + 1
    if len(s) > prev:
        yield pos, s[prev:]
        pos += len(s[prev:].encode("utf-8"))
    assert pos == len(data)


def hat_word_starts(doc_bytes: bytes, max_word_bytes: int = DEFAULT_MAX_WORD_BYTES) -> np.ndarray:
    """HAT word rule on one document's bytes (no BOS/EOS needed). -> bool [len(doc_bytes)], START.

    Valid UTF-8 runs go through ``HATSplitter.split_with_limit`` (words capped at ``max_word_bytes``
    bytes); every other byte is a one-byte word (see the module docstring)."""
    data = bytes(doc_bytes)
    starts_N = np.zeros(len(data), dtype=bool)
    if not data:
        return starts_N
    if data.isascii():  # fast path: pure ASCII is one valid run
        runs = [(0, data.decode("ascii"))]
    else:
        runs = _valid_runs(data)
    sp = _splitter()
    for off, text in runs:
        if text is None:
            starts_N[off] = True
            continue
        words = sp.split_with_limit(text, max_word_bytes)
        raw = text.encode("utf-8")
        assert b"".join(words) == raw, "hat_splitter lost or changed bytes"
        lens_W = np.fromiter((len(w) for w in words), dtype=np.int64, count=len(words))
        starts_N[off + np.concatenate([[0], np.cumsum(lens_W)[:-1]])] = True
    return starts_N


def hat_starts_for_window(tokens_L, segment_ids_L, max_word_bytes: int = DEFAULT_MAX_WORD_BYTES) -> np.ndarray:
    """HAT START mask of one packed window. tokens_L int [L] (0..255), segment_ids_L int [L] -> bool [L].

    Each segment is split on its own bytes, so BOS/EOS (invalid UTF-8) are one-byte words, a segment
    start always opens a word and no word spans two segments. A padding run opens one chunk at its
    first position. A segment that continues a document from an earlier window is split without that
    context: for masks identical to the document-level ones, run ``hat_word_starts`` per document
    before windowing and slice."""
    tok_L = np.asarray(tokens_L).astype(np.uint8)
    out_L = np.zeros(tok_L.shape[0], dtype=bool)
    for a, b, seg in segment_spans(segment_ids_L):
        out_L[a] = True
        if seg != 0:
            out_L[a:b] |= hat_word_starts(tok_L[a:b].tobytes(), max_word_bytes)
    return out_L


def hat_starts_for_batch(tokens_BxL, segment_ids_BxL, max_word_bytes: int = DEFAULT_MAX_WORD_BYTES) -> np.ndarray:
    """``hat_starts_for_window`` per row. -> bool [B, L]."""
    tok_BxL, seg_BxL = np.asarray(tokens_BxL), np.asarray(segment_ids_BxL)
    return np.stack([hat_starts_for_window(t, g, max_word_bytes) for t, g in zip(tok_BxL, seg_BxL)])


__all__ = [
    "BOS",
    "EOS",
    "DEFAULT_MAX_WORD_BYTES",
    "doc_starts",
    "fixed_stride_starts",
    "spacelike",
    "spacebyte_starts",
    "end_to_start",
    "whitespace_end_to_start",
    "incomplete_utf8_tail_len",
    "hat_word_starts",
    "hat_starts_for_window",
    "hat_starts_for_batch",
]
