"""Shared pieces of the rule-based pooled models (HAT, LYT, SpaceByte, fixed stride, DTP whitespace).

Conventions (shared/reference/boundaries.md §0, §9): chunk boundaries are START bits ``b_BxL`` (b_t = 1 iff
byte t opens a chunk; forced at every document start). A row holds at most M chunks (static); chunk ids
cid_t = cumsum(b)_t - 1; chunks with cid >= M are dropped and every byte that would need them gets
``target_mask`` False (counted as overflow).

Word rules with lookahead (HAT, LYT): a word is known complete only when the next word's first character
is known. A START bit that sits on the lead byte of a multi-byte character is decided only once that
character is complete (``hnet.boundary_rules`` module docstring), so the models use the *decided* starts
``causal_word_starts``: the bit moves to the character's last byte (the lead bytes stay in the previous
word). Generation feeds the bit of the same function, on the host (``WordStartTracker``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hnet import chunking
from hnet.boundary_rules import DEFAULT_MAX_WORD_BYTES, doc_starts, hat_word_starts
from hnet.bytes import BOS


def masked_update(new, old, active_B):
    """Per-row select over a pytree whose leaves have the batch as leading axis."""
    return jax.tree.map(lambda n, o: jnp.where(active_B.reshape((-1,) + (1,) * (n.ndim - 1)), n, o), new, old)


def offsets_in_chunk(starts_BxL):
    """Index of each position inside its chunk (0 where ``starts`` is True)."""
    n = starts_BxL.shape[1]
    idx = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), starts_BxL.shape)
    return idx - jax.lax.cummax(jnp.where(starts_BxL, idx, 0), axis=1)


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
    cummax = (lambda a: jax.lax.cummax(a, axis=1)) if xp is jnp else (lambda a: np.maximum.accumulate(a, axis=1))
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


class ChunkLayout(NamedTuple):
    """Static-capacity description of the chunks of a START mask (M slots per row)."""

    cid_BxL: jax.Array  # chunk id of every byte (may be >= M)
    start_BxM: jax.Array  # position of each chunk's first byte (0 for empty slots)
    valid_BxM: jax.Array
    seg_BxM: jax.Array  # segment id of each chunk (0 for empty slots)
    pos_BxM: jax.Array  # chunk index within its document (backbone positions)
    doc_first_BxM: jax.Array  # chunk opens its document (reads the learned first/null vector)
    byte_ok_BxL: jax.Array  # cid < M
    dropped_B: jax.Array


def chunk_layout(starts_BxL, segment_ids_BxL, M: int) -> ChunkLayout:
    start, valid = chunking.compaction_indices(starts_BxL, M)
    seg = jnp.where(valid, jnp.take_along_axis(segment_ids_BxL, start, axis=1), 0)
    first = doc_starts(seg) & valid
    dropped, ok = chunking.overflow(starts_BxL, M)
    return ChunkLayout(chunking.chunk_ids(starts_BxL), start, valid, seg, offsets_in_chunk(doc_starts(seg)),
                       first, ok, dropped)


def gather_chunks(v_BxMx_, idx_BxL):
    """out[b, t] = v[b, idx[b, t]] if 0 <= idx < M else 0 (any trailing dims; the chunk gather kernel on
    TPU/GPU)."""
    return chunking.take_chunks(v_BxMx_, idx_BxL)


def segment_sum(v_BxLx_, idx_BxL, M: int):
    """out[b, j] = sum_{t: idx[b,t] = j} v[b, t]; indices outside [0, M) are dropped."""
    idx = jnp.where((idx_BxL >= 0) & (idx_BxL < M), idx_BxL, M)
    return jax.vmap(lambda v, i: jax.ops.segment_sum(v, i, num_segments=M + 1))(v_BxLx_, idx)[:, :M]


def shift_chunks(z_BxMx_, first_, doc_first_BxM):
    """prev_j = first if chunk j opens its document else z_{j-1} (the one-chunk lookahead read)."""
    prev = jnp.pad(z_BxMx_, ((0, 0), (1, 0)) + ((0, 0),) * (z_BxMx_.ndim - 2))[:, :-1]
    first = jnp.broadcast_to(first_.astype(prev.dtype), prev.shape)
    return jnp.where(doc_first_BxM.reshape(doc_first_BxM.shape + (1,) * (z_BxMx_.ndim - 2)), first, prev)


def chunk_metrics(starts_BxL, segment_ids_BxL, dropped_B, per_chunk: int = 1) -> dict:
    """Bytes per chunk (ratio of sums and per-row mean, non-pad bytes), overflow count."""
    real = segment_ids_BxL > 0
    n_chunks = jnp.sum(starts_BxL & real, axis=1).astype(jnp.float32)
    n_pos = jnp.sum(real, axis=1).astype(jnp.float32)
    out = {"bytes_per_chunk": jnp.sum(n_pos) / jnp.maximum(jnp.sum(n_chunks), 1),
           "bytes_per_chunk_row_mean": jnp.mean(n_pos / jnp.maximum(n_chunks, 1)),
           "overflow_chunks": jnp.sum(dropped_B).astype(jnp.float32)}
    if per_chunk != 1:
        out["bytes_per_backbone_position"] = out["bytes_per_chunk"] / per_chunk
    return out


# ------------------------------------------------------------------------------------------------
# Generation with host-side word starts (HAT, LYT)
# ------------------------------------------------------------------------------------------------

def make_word_decode_fn(graphdef):
    """jit(state, tokens_B, cache, reset_B, word_start_B) -> (logits_BxV, cache) in eval mode."""

    @jax.jit
    def step(state, tok, cache, reset, ws):
        model = nnx.merge(graphdef, state)
        model.eval()
        return model.decode_step(tok, cache, reset, ws)

    return step


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


def word_start_trackers(prompts, langs=None) -> list[WordStartTracker]:
    """``decode_trackers`` of the word-pooled models (HAT, LYT): one ``WordStartTracker`` per row."""
    del langs
    return [WordStartTracker() for _ in prompts]
