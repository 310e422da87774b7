"""Blockwise (flash-style) attention for XLA:CPU with a custom VJP: no [B, H, L, L] tensor, no work on
blocks that the causal mask or the local window rule out.

Queries are split into blocks of ``block_q`` rows; block i only sees the keys its rows can reach, one
contiguous static range ``[lo_i, hi_i)``: ``hi_i`` = the block's last query + 1 (causal) and ``lo_i`` = its
first query - ``window`` (local window), both rounded outwards to multiples of ``block_k``. The softmax over
that range is exact (no online rescaling is needed: one matmul per block, which is what XLA:CPU runs
fastest), so for causal global attention the work is (n + 1) / 2n of the dense path for n query blocks.
The ranges are enumerated in Python, so the skipping is static; segments (packed documents) are masked
inside a range, not skipped (a data-dependent skip cannot shrink a static range), except that with
``skip_padding`` a query block that is all padding is skipped at run time.

The forward keeps only q, k, v, o and the per-row log-sum-exp; the backward recomputes each block's
probabilities (FlashAttention-2's backward, one q-block at a time, dK/dV accumulated over the key range).
The blocks run one after the other (``_after``), so only one block's [B, H, block_q, range] tensors are live.

Semantics equal the dense path (``hnet.layers.attention_mask`` + ``Attention._attend``): logits q·k/√K in
fp32, plus ``key_bias`` per key; a key is visible if it is in the query's segment, not after it (causal)
and at most ``window`` positions away (-1 = global); ``softmax1`` adds a zero-logit, zero-value sink key.
Query i and key j sit at positions i and j (self-attention). One difference: a row that sees no key at all
(impossible in self-attention, where a query sees itself) gives 0, where the dense path averages every value.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

__all__ = ["blockwise_attention", "key_ranges"]


def key_ranges(Q: int, S: int, block_q: int, block_k: int, causal: bool, window: int) -> list[tuple[int, int, int, int]]:
    """Static (q0, q1, lo, hi): query rows [q0, q1) of each block and the key range [lo, hi) they can see."""
    out = []
    for q0 in range(0, Q, block_q):
        q1 = min(Q, q0 + block_q)
        hi = min(S, q1) if causal else S
        if window >= 0 and not causal:
            hi = min(S, q1 + window)
        lo = max(0, q0 - window) if window >= 0 else 0
        lo = lo // block_k * block_k
        hi = min(S, -(-hi // block_k) * block_k)
        out.append((q0, q1, lo, max(hi, lo)))
    return out


def _visible(qseg_BxT, kseg_BxR, q0, lo, causal, window, skip_padding=False):
    """[B, 1, T, R] bool for query rows q0 + [0, T) and key rows lo + [0, R) (none for padding queries when
    ``skip_padding``)."""
    T, R = qseg_BxT.shape[1], kseg_BxR.shape[1]
    delta = (q0 + jnp.arange(T))[:, None] - (lo + jnp.arange(R))[None, :]
    ok = jnp.ones((T, R), bool)
    if causal:
        ok &= delta >= 0
    if window >= 0:
        ok &= jnp.abs(delta) <= window
    same = qseg_BxT[:, :, None] == kseg_BxR[:, None, :]
    if skip_padding:
        same &= qseg_BxT[:, :, None] != 0
    return (same & ok)[:, None]


def _after(x, dep):
    """x, made to depend on ``dep`` (finite) so that XLA runs the query blocks one after the other: they are
    independent, and XLA:CPU's scheduler otherwise overlaps them and holds many blocks' logits at once
    (5.5 GB of temporaries at L = 8192). optimization_barrier does not order anything on XLA:CPU."""
    return x + (0 * dep.reshape(-1)[0]).astype(x.dtype)


def _block_logits(q_BxHxTxK, k_BxHxRxK, bias_BxR, visible_Bx1xTxR):
    scale = 1.0 / math.sqrt(q_BxHxTxK.shape[-1])
    s = jnp.matmul(q_BxHxTxK, k_BxHxRxK.swapaxes(-1, -2), preferred_element_type=jnp.float32) * scale
    return jnp.where(visible_Bx1xTxR, s + bias_BxR[:, None, None, :], -jnp.inf)


def _skippable(fn, skip_padding, qseg_BxT, *shapes_dtypes):
    """``fn()``, or zeros of ``shapes_dtypes`` when ``skip_padding`` and every query row of the block is
    padding in the whole batch (a run-time lax.cond; such a block's forward and backward are both skipped)."""
    if not skip_padding:
        return fn()
    return jax.lax.cond(jnp.any(qseg_BxT != 0), fn, lambda: tuple(jnp.zeros(sh, dt) for sh, dt in shapes_dtypes))


def _forward_block(qi, kr, vr, bias_r, vis, softmax1):
    s = _block_logits(qi, kr, bias_r, vis)
    m = jnp.max(s, axis=-1, keepdims=True)
    if softmax1:
        m = jnp.maximum(m, 0.0)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m)
    denom = jnp.sum(p, axis=-1, keepdims=True) + (jnp.exp(-m) if softmax1 else 0.0)
    probs = p / jnp.where(denom > 0, denom, 1.0)
    # a row that sees no key gets lse = +inf, so that its backward probabilities are exp(-inf) = 0
    lse = jnp.where(denom > 0, m + jnp.log(jnp.where(denom > 0, denom, 1.0)), jnp.inf)[..., 0]
    return jnp.matmul(probs.astype(vr.dtype), vr), lse


def _forward(q, k, v, qseg, kseg, bias, causal, window, softmax1, skip_padding, block_q, block_k):
    """q, k, v: [B, H, L, K]. Returns o [B, H, Q, K] (v's dtype) and lse [B, H, Q] (fp32, sink included)."""
    os, lses = [], []
    B, H, _, K = q.shape
    for q0, q1, lo, hi in key_ranges(q.shape[2], k.shape[2], block_q, block_k, causal, window):
        qi = q[:, :, q0:q1]
        if os:
            qi = _after(qi, os[-1])
        vis = _visible(qseg[:, q0:q1], kseg[:, lo:hi], q0, lo, causal, window, skip_padding)
        fn = functools.partial(_forward_block, qi, k[:, :, lo:hi], v[:, :, lo:hi], bias[:, lo:hi], vis, softmax1)
        o_i, lse_i = _skippable(fn, skip_padding, qseg[:, q0:q1], ((B, H, q1 - q0, K), v.dtype),
                                ((B, H, q1 - q0), jnp.float32))
        os.append(o_i)
        lses.append(lse_i)
    return jnp.concatenate(os, axis=2), jnp.concatenate(lses, axis=2)


def _backward_block(qi, kr, vr, bias_r, vis, lse_i, doi, delta_i):
    f32 = jnp.float32
    scale = 1.0 / math.sqrt(qi.shape[-1])
    s = _block_logits(qi, kr, bias_r, vis)
    p = jnp.exp(s - lse_i[..., None])  # masked entries: exp(-inf) = 0
    dv_r = jnp.matmul(p.astype(vr.dtype).swapaxes(-1, -2), doi, preferred_element_type=f32)
    dp = jnp.matmul(doi, vr.swapaxes(-1, -2), preferred_element_type=f32)
    ds = p * (dp - delta_i[..., None])
    ds_c = ds.astype(qi.dtype)
    dq_i = jnp.matmul(ds_c, kr, preferred_element_type=f32) * scale
    dk_r = jnp.matmul(ds_c.swapaxes(-1, -2), qi, preferred_element_type=f32) * scale
    return dq_i, dk_r, dv_r, jnp.sum(ds, axis=(1, 2))


def _backward(q, k, v, qseg, kseg, bias, o, lse, do, causal, window, softmax1, skip_padding, block_q, block_k):
    f32 = jnp.float32
    delta_BxHxQ = jnp.sum(do.astype(f32) * o.astype(f32), axis=-1)
    dq_blocks = []
    dk = jnp.zeros(k.shape, f32)
    dv = jnp.zeros(v.shape, f32)
    dbias = jnp.zeros(bias.shape, f32)
    B, H, _, K = q.shape
    for q0, q1, lo, hi in key_ranges(q.shape[2], k.shape[2], block_q, block_k, causal, window):
        vis = _visible(qseg[:, q0:q1], kseg[:, lo:hi], q0, lo, causal, window, skip_padding)
        qi = _after(q[:, :, q0:q1], dk)
        fn = functools.partial(_backward_block, qi, k[:, :, lo:hi], v[:, :, lo:hi], bias[:, lo:hi], vis,
                               lse[:, :, q0:q1], do[:, :, q0:q1], delta_BxHxQ[:, :, q0:q1])
        T, R = q1 - q0, hi - lo
        dq_i, dk_r, dv_r, db_r = _skippable(fn, skip_padding, qseg[:, q0:q1], ((B, H, T, K), f32),
                                            ((B, H, R, K), f32), ((B, H, R, K), f32), ((B, R), f32))
        dq_blocks.append(dq_i)
        dk = dk.at[:, :, lo:hi].add(dk_r)
        dv = dv.at[:, :, lo:hi].add(dv_r)
        dbias = dbias.at[:, lo:hi].add(db_r)
    dq = jnp.concatenate(dq_blocks, axis=2)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dbias


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9, 10, 11))
def _attention_bhlk(q, k, v, qseg, kseg, bias, *static):
    return _forward(q, k, v, qseg, kseg, bias, *static)[0]


def _attention_fwd(q, k, v, qseg, kseg, bias, *static):
    o, lse = _forward(q, k, v, qseg, kseg, bias, *static)
    return o, (q, k, v, qseg, kseg, bias, o, lse)


def _attention_bwd(*args):
    *static, res, do = args
    q, k, v, qseg, kseg, bias, o, lse = res
    dq, dk, dv, dbias = _backward(q, k, v, qseg, kseg, bias, o, lse, do, *static)
    return dq, dk, dv, None, None, dbias.astype(bias.dtype)


_attention_bhlk.defvjp(_attention_fwd, _attention_bwd)


def blockwise_attention(q_BxQxHxK, k_BxSxHxK, v_BxSxHxK, *, q_segment_ids_BxQ, k_segment_ids_BxS, causal: bool,
                        window: int, softmax1: bool, key_bias_BxS=None, block_q: int = 128,
                        block_k: int = 128, max_blocks: int = 8, skip_padding: bool = False):
    """Attention output [B, Q, H, K] in v's dtype (softmax in fp32). Segment id 0 = padding (attends to
    padding only, like the dense path); ``window`` -1 = global; ``key_bias_BxS`` is added to the logits.

    The blocks are unrolled (each key range has its own shape), so compile time grows with their number:
    ``block_q`` is raised to a multiple of ``block_k`` that gives at most ``max_blocks`` query blocks.

    ``skip_padding``: padding queries (segment 0) see no key and give 0 (the dense path lets them attend to
    padding), and a query block that is padding in every row of the batch is skipped at run time (lax.cond).
    For callers that discard padding rows, e.g. H-Net's inner network, whose chunks sit at the front of a
    static capacity M and whose padding tail is never expanded back to bytes."""
    B, Q, S = k_BxSxHxK.shape[0], q_BxQxHxK.shape[1], k_BxSxHxK.shape[1]
    block_q = max(block_q, -(-Q // (max_blocks * block_k)) * block_k)
    bias = jnp.zeros((B, S), jnp.float32) if key_bias_BxS is None else key_bias_BxS.astype(jnp.float32)
    to_bhlk = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731  (head-major batched matmuls are fastest on XLA:CPU)
    o = _attention_bhlk(to_bhlk(q_BxQxHxK), to_bhlk(k_BxSxHxK), to_bhlk(v_BxSxHxK), q_segment_ids_BxQ,
                        k_segment_ids_BxS, bias, causal, window, softmax1, skip_padding, block_q, block_k)
    return o.transpose(0, 2, 1, 3)
