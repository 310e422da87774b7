"""Rule-based chunk boundaries, in the START convention.

START: ``b_t = 1`` iff byte t opens a chunk (``b_0 = 1``). END rules (DTP/MAGNET: ``e_t = 1`` iff byte t
closes its chunk) are converted once with ``b_{t+1} = e_t``, ``b_0 = 1`` (``end_to_start``).

Packed windows (``segment_ids`` int32 [B, L]: 0 = padding, one positive id per document): every rule
forces ``b = 1`` at each segment start (``doc_starts``) and never lets a chunk span two segments. A run
of padding is treated as one extra segment: it opens one chunk at its first position and has no other
boundary, so padding never merges into the last document's chunk.

Three flavours:
  * in-graph (jnp, jit-able, static shapes): ``doc_starts``, ``offsets_since_start``, ``spacebyte_starts``,
    ``end_to_start`` and the END rules of the mean-pooled models ``whitespace_ends``, ``fixed_stride_ends``;
  * host-side numpy for the HAT word rule (``hat_splitter`` package): ``hat_word_starts``,
    ``incomplete_utf8_tail_len``;
  * both (``xp`` = jax.numpy or numpy): ``doc_starts``, ``utf8_len`` and ``causal_word_starts``, the decided
    word starts of HAT and LYT (in-graph in the forward, on the host in generation: ``WordStartTracker``).

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
word starts (one rule for the forward and for generation) are ``causal_word_starts``: the bit moves to the
character's last byte (the lead bytes stay in the previous word).
"""

from __future__ import annotations

import codecs
import functools
import re

import jax.numpy as jnp
import numpy as np
from jax import lax

from hnet.bytes import BOS, EOS

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


def offsets_since_start(starts_BxL: jnp.ndarray) -> jnp.ndarray:
    """int32 [B, L]: t minus the latest position <= t where ``starts`` is True (0 at every start): the offset
    inside a document (``starts`` = ``doc_starts``) or inside a chunk (``starts`` = chunk starts)."""
    L = starts_BxL.shape[1]
    pos_BxL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), starts_BxL.shape)
    return pos_BxL - lax.cummax(jnp.where(starts_BxL, pos_BxL, 0), axis=1)


def fixed_stride_ends(offsets, stride: int):
    """END rule of fixed-stride pooling (Hourglass with shift k-1): ``e_t = [offset_t ≡ stride-1 (mod stride)]``
    with ``offset_t`` the byte's offset in its document (``offsets_since_start(doc_starts(seg))``); through
    ``end_to_start`` chunks open at offsets ≡ 0. bool, the shape of ``offsets``."""
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    return offsets % stride == stride - 1


def whitespace_ends(tokens):
    """DTP 'whitespaces' END rule: ``e_t = [x_t == ' ']`` (the chunk is "word␣"). bool, the shape of ``tokens``."""
    return tokens == SPACE


def _shift_right(x_BxL: jnp.ndarray, fill) -> jnp.ndarray:
    return jnp.concatenate([jnp.full_like(x_BxL[:, :1], fill), x_BxL[:, :-1]], axis=1)


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


# ---------------------------------------------------------------------------------------------------
# HAT word rule (host-side numpy) and the decided word starts of the models (numpy or jnp)
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
        ends_W = np.cumsum(np.fromiter(map(len, words), dtype=np.int64, count=len(words)))
        starts_N[off] = True
        starts_N[off + ends_W[:-1]] = True
    return starts_N


def utf8_len(x, xp=jnp):
    """UTF-8 character length announced by a byte read as a lead byte: 2 for C2..DF, 3 for E0..EF, 4 for F0..F4;
    1 for ASCII, continuation bytes and the bytes that never start a character (C0, C1, F5..FF)."""
    x = x.astype(xp.int32)
    return xp.where((x >= 0xC2) & (x < 0xE0), 2, xp.where((x >= 0xE0) & (x < 0xF0), 3,
                                                          xp.where((x >= 0xF0) & (x < 0xF5), 4, 1)))


def causal_word_starts(word_starts_BxL, inputs_BxL, segment_ids_BxL, xp=jnp):
    """Decided START bits, THE word rule of HAT and LYT (the full forward in-graph; generation on the host through
    ``WordStartTracker`` with ``xp=numpy``): a word start on the lead byte s of a k-byte character is moved to
    s + k - 1 (the byte that completes the character); ASCII starts, stray continuation bytes and bytes that never
    start a character (C0, C1, F5..FF) keep their own bit (one-byte words); the start of a truncated character is
    dropped. Every document start is a start. ``xp``: jax.numpy (in-graph) or numpy (host). bool [B, L]."""
    cummax = (lambda a: lax.cummax(a, axis=1)) if xp is jnp else (lambda a: np.maximum.accumulate(a, axis=1))
    x = xp.asarray(inputs_BxL).astype(xp.int32)
    ws = xp.asarray(word_starts_BxL).astype(bool)
    seg = xp.asarray(segment_ids_BxL)
    cont = (x >= 0x80) & (x < 0xC0)
    idx = xp.broadcast_to(xp.arange(x.shape[1], dtype=xp.int32), x.shape)
    lead = cummax(xp.where(cont, 0, idx))
    n_lead = utf8_len(xp.take_along_axis(x, lead, axis=1), xp)
    run = idx - lead + 1
    decided = (xp.take_along_axis(ws, lead, axis=1) & (run == n_lead)) | (ws & (run > n_lead))
    return (decided & (seg > 0)) | doc_starts(seg, xp)


class WordStartTracker:
    """Host-side decided word-start bit of each fed byte of one row (generation of HAT, LYT): the splitter's starts
    of the row so far (``hat_word_starts``, prefix-stable at decided positions) through ``causal_word_starts``,
    the rule of the full forward, so decoding and the forward cannot disagree. O(row length) per byte."""

    def __init__(self, max_word_bytes: int = DEFAULT_MAX_WORD_BYTES):
        self.max_word_bytes = max_word_bytes
        self.content = bytearray()

    def push(self, byte: int) -> bool:
        if byte == BOS and not self.content:  # the document start: reset handles it
            return True
        self.content.append(byte)
        ws = np.concatenate([[True], hat_word_starts(bytes(self.content), self.max_word_bytes)])
        x = np.concatenate([[BOS], np.frombuffer(bytes(self.content), np.uint8)])
        return bool(causal_word_starts(ws[None], x[None], np.ones((1, len(x)), np.int32), xp=np)[0, -1])


__all__ = [
    "BOS",
    "EOS",
    "DEFAULT_MAX_WORD_BYTES",
    "doc_starts",
    "offsets_since_start",
    "fixed_stride_ends",
    "whitespace_ends",
    "spacelike",
    "spacebyte_starts",
    "end_to_start",
    "incomplete_utf8_tail_len",
    "hat_word_starts",
    "utf8_len",
    "causal_word_starts",
    "WordStartTracker",
]
