"""Blockwise (flash-style) attention for XLA:CPU with a custom VJP: no [B, H, L, L] tensor, no work on
tiles that the causal mask, the local window or trailing padding rule out.

Queries are split into tiles of ``block_q`` rows and keys into tiles of ``block_k``. Query tile i visits
only the key tiles ``key_tiles(i)`` its rows can reach (up to its last query if causal, from its first
query - ``window`` with a local window), with an online softmax over them (FlashAttention-2, Alg. 1): a
running row max m, sum l and unnormalised output acc, rescaled by exp(m_old - m_new) at every key tile.
The loops are ``lax.fori_loop``s with run-time bounds, so compile time does not grow with the length, one
tile pair's [B, H, block_q, block_k] tensors stay in cache, and the bounds can depend on the data: with
``skip_padding`` the query tiles after the last real query of the batch are not visited at all.

The forward keeps only q, k, v, o and the per-row log-sum-exp; the backward (FlashAttention-2, Alg. 2)
loops over key tiles, and for each over the query tiles ``query_tiles(j)`` that can see it, recomputing
the probabilities p = exp(s - lse): dV_j += pᵀ dO_i, dS = p ⊙ (dO_i V_jᵀ - Δ_i) with Δ = rowsum(dO ⊙ O),
dK_j += dSᵀ Q_i, dQ_i += dS K_j.

Semantics equal the dense path (``hnet.layers.attention_mask`` + ``Attention._attend``): logits q·k/√K in
fp32, plus ``key_bias`` per key; a key is visible if it is in the query's segment, not after it (causal)
and at most ``window`` positions away (-1 = global); ``softmax1`` adds a zero-logit, zero-value sink key
(the running max and sum start at the sink: m = 0, l = 1). Query i and key j sit at positions i and j
(self-attention). One difference: a row that sees no key at all (impossible in self-attention, where a
query sees itself) gives 0, where the dense path averages every value.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["blockwise_attention", "key_tiles", "padded_tail_length", "query_tiles", "tile_sizes"]

_PAD_Q, _PAD_K = -2, -1  # segment ids of the rows added to reach whole tiles: they never match each other


def padded_tail_length(segment_ids_BxL) -> jax.Array:
    """The batch's last non-padding position + 1 (0 if all padding): when padding (segment 0) trails every
    row, positions from here on are padding in every row."""
    L = segment_ids_BxL.shape[1]
    return jnp.max(jnp.where(segment_ids_BxL != 0, jnp.arange(1, L + 1)[None], 0))


def key_tiles(i, block_q: int, block_k: int, n_k: int, causal: bool, window: int):
    """Key tiles [lo, hi) that some row of query tile ``i`` can see (Python or traced ints)."""
    q0, q_last = i * block_q, i * block_q + block_q - 1
    if causal:
        hi = jnp.minimum(n_k, q_last // block_k + 1)
    elif window >= 0:
        hi = jnp.minimum(n_k, (q_last + window) // block_k + 1)
    else:
        hi = n_k
    lo = jnp.maximum(0, q0 - window) // block_k if window >= 0 else 0
    return lo, hi


def query_tiles(j, block_q: int, block_k: int, n_q: int, causal: bool, window: int):
    """Query tiles [lo, hi) with some row that can see a key of key tile ``j`` (Python or traced ints)."""
    k0, k_last = j * block_k, j * block_k + block_k - 1
    if causal:
        lo = k0 // block_q
    elif window >= 0:
        lo = jnp.maximum(0, k0 - window) // block_q
    else:
        lo = 0
    hi = jnp.minimum(n_q, (k_last + window) // block_q + 1) if window >= 0 else n_q
    return lo, hi


def tile_sizes(n_heads_total: int, q_len: int, k_len: int, elements: int = 2 ** 20) -> tuple[int, int]:
    """(block_q, block_k): powers of two from 64 x 64, key side first, until one tile pair's logits over
    all ``n_heads_total`` = B * H heads hold ``elements`` values (bigger ops run closer to XLA:CPU's peak),
    but each side at most 1/8 of its length (bigger tiles waste work at the causal diagonal and at a padded
    tail). Measured (docs/benchmarks.md): 128 x 128 at B * H = 32 and L = 1024, 256 x 512 at 8 and 4096,
    512 x 512 at 4 and 8192, 64 x 64 for H-Net's main network at 32 and M = 512."""
    block_q = block_k = 64
    while n_heads_total * block_q * block_k < elements:
        if block_k <= block_q and 2 * block_k <= k_len // 8:
            block_k *= 2
        elif 2 * block_q <= q_len // 8:
            block_q *= 2
        else:
            break
    return block_q, block_k


def _tile(x, start, size, axis):
    return lax.dynamic_slice_in_dim(x, start, size, axis)


def _logits(qi, kj, bias_j, qseg_i, kseg_j, q0, k0, causal, window, skip_padding, keys_major=False):
    """Masked logits [B, H, Tq, Tk] (fp32, -inf where not visible) of query rows q0 + [0, Tq) against key
    rows k0 + [0, Tk); ``keys_major``: the same logits as [B, H, Tk, Tq]."""
    scale = 1.0 / math.sqrt(qi.shape[-1])
    a, b = (kj, qi) if keys_major else (qi, kj)
    s = jnp.matmul(a, b.swapaxes(-1, -2), preferred_element_type=jnp.float32) * scale
    q_col = lambda x: x[..., :, None] if not keys_major else x[..., None, :]  # noqa: E731  (along the query axis)
    k_col = lambda x: x[..., None, :] if not keys_major else x[..., :, None]  # noqa: E731
    delta = q_col(q0 + jnp.arange(qi.shape[2])) - k_col(k0 + jnp.arange(kj.shape[2]))
    ok = q_col(qseg_i) == k_col(kseg_j)
    if skip_padding:
        ok &= q_col(qseg_i) != 0
    if causal:
        ok &= delta >= 0
    if window >= 0:
        ok &= jnp.abs(delta) <= window
    return jnp.where(ok[:, None], s + k_col(bias_j)[:, None], -jnp.inf)


def _forward(q, k, v, qseg, kseg, bias, n_q_live, causal, window, softmax1, skip_padding, block_q, block_k):
    """q, k, v: [B, H, L, K] (lengths multiples of the tiles). -> o [B, H, Q, K] (v's dtype), lse [B, H, Q]
    (fp32, sink included; +inf for a row that sees nothing)."""
    B, H, Q, K = q.shape
    f32 = jnp.float32
    mask_kw = dict(causal=causal, window=window, skip_padding=skip_padding)

    def q_tile(i, carry):
        o_all, lse_all = carry
        q0 = i * block_q
        qi, qseg_i = _tile(q, q0, block_q, 2), _tile(qseg, q0, block_q, 1)

        def k_tile(j, c):
            m, l, acc = c
            k0 = j * block_k
            s = _logits(qi, _tile(k, k0, block_k, 2), _tile(bias, k0, block_k, 1), qseg_i,
                        _tile(kseg, k0, block_k, 1), q0, k0, **mask_kw)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # no visible key yet: keep exp() finite
            p = jnp.exp(s - m_safe[..., None])
            rescale = jnp.exp(m - m_safe)
            pv = jnp.matmul(p.astype(v.dtype), _tile(v, k0, block_k, 2), preferred_element_type=f32)
            return m_new, l * rescale + jnp.sum(p, axis=-1), acc * rescale[..., None] + pv

        m0 = jnp.full((B, H, block_q), 0.0 if softmax1 else -jnp.inf, f32)  # softmax1: start at the sink
        l0 = jnp.full((B, H, block_q), 1.0 if softmax1 else 0.0, f32)
        m, l, acc = lax.fori_loop(*key_tiles(i, block_q, block_k, k.shape[2] // block_k, causal, window),
                                  k_tile, (m0, l0, jnp.zeros((B, H, block_q, K), f32)))
        seen = l > 0  # then m is finite (a visible key, or the sink)
        l_safe = jnp.where(seen, l, 1.0)
        lse = jnp.where(seen, m + jnp.log(l_safe), jnp.inf)
        o = (acc / l_safe[..., None]).astype(o_all.dtype)
        return lax.dynamic_update_slice_in_dim(o_all, o, q0, 2), lax.dynamic_update_slice_in_dim(lse_all, lse, q0, 2)

    return lax.fori_loop(0, n_q_live, q_tile, (jnp.zeros(q.shape, v.dtype), jnp.zeros((B, H, Q), f32)))


def _backward(q, k, v, qseg, kseg, bias, n_q_live, o, lse, do, causal, window, softmax1, skip_padding,
              block_q, block_k):
    """dq, dk, dv (input dtypes) and dbias (fp32). Logits are recomputed key-major, [B, H, Tk, Tq], and dQ is
    accumulated transposed, [B, H, K, Q]: every product then contracts its left operand's last axis, the
    form XLA:CPU hands to XNNPACK (the others ran as plain dots at half the speed)."""
    del softmax1  # the sink has value 0: it enters only through lse
    f32 = jnp.float32
    B, H, Q, K = q.shape
    scale = 1.0 / math.sqrt(K)
    delta = jnp.sum(do.astype(f32) * o.astype(f32), axis=-1)
    k_t = k.swapaxes(-1, -2)
    mask_kw = dict(causal=causal, window=window, skip_padding=skip_padding, keys_major=True)

    def k_tile(j, carry):
        dq_t, dk, dv, dbias = carry
        k0 = j * block_k
        kj, kj_t, vj = _tile(k, k0, block_k, 2), _tile(k_t, k0, block_k, 3), _tile(v, k0, block_k, 2)
        bias_j, kseg_j = _tile(bias, k0, block_k, 1), _tile(kseg, k0, block_k, 1)

        def q_tile(i, c):
            dq_t, dk_j, dv_j, dbias_j = c
            q0 = i * block_q
            qi, doi = _tile(q, q0, block_q, 2), _tile(do, q0, block_q, 2)
            s_t = _logits(qi, kj, bias_j, _tile(qseg, q0, block_q, 1), kseg_j, q0, k0, **mask_kw)
            p_t = jnp.exp(s_t - _tile(lse, q0, block_q, 2)[..., None, :])  # not visible: exp(-inf) = 0
            dv_j += jnp.matmul(p_t.astype(vj.dtype), doi, preferred_element_type=f32)
            dp_t = jnp.matmul(vj, doi.swapaxes(-1, -2), preferred_element_type=f32)
            ds_t = p_t * (dp_t - _tile(delta, q0, block_q, 2)[..., None, :])
            ds_c = ds_t.astype(q.dtype)
            dq_i = _tile(dq_t, q0, block_q, 3) + jnp.matmul(kj_t, ds_c, preferred_element_type=f32) * scale
            dk_j += jnp.matmul(ds_c, qi, preferred_element_type=f32) * scale
            return lax.dynamic_update_slice_in_dim(dq_t, dq_i, q0, 3), dk_j, dv_j, dbias_j + jnp.sum(ds_t, axis=(1, 3))

        lo, hi = query_tiles(j, block_q, block_k, Q // block_q, causal, window)
        zeros = jnp.zeros((B, H, block_k, K), f32)
        dq_t, dk_j, dv_j, dbias_j = lax.fori_loop(lo, jnp.minimum(hi, n_q_live), q_tile,
                                                  (dq_t, zeros, zeros, jnp.zeros((B, block_k), f32)))
        put = lambda full, tile, axis=2: lax.dynamic_update_slice_in_dim(full, tile, k0, axis)  # noqa: E731
        return dq_t, put(dk, dk_j), put(dv, dv_j), put(dbias, dbias_j, 1)

    init = (jnp.zeros((B, H, K, Q), f32), *(jnp.zeros(x.shape, f32) for x in (k, v, bias)))
    dq_t, dk, dv, dbias = lax.fori_loop(0, k.shape[2] // block_k, k_tile, init)
    return dq_t.swapaxes(-1, -2).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dbias


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10, 11, 12))
def _attention_bhlk(q, k, v, qseg, kseg, bias, n_q_live, *static):
    return _forward(q, k, v, qseg, kseg, bias, n_q_live, *static)[0]


def _attention_fwd(q, k, v, qseg, kseg, bias, n_q_live, *static):
    o, lse = _forward(q, k, v, qseg, kseg, bias, n_q_live, *static)
    return o, (q, k, v, qseg, kseg, bias, n_q_live, o, lse)


def _attention_bwd(*args):
    *static, res, do = args
    q, k, v, qseg, kseg, bias, n_q_live, o, lse = res
    dq, dk, dv, dbias = _backward(q, k, v, qseg, kseg, bias, n_q_live, o, lse, do, *static)
    return dq, dk, dv, None, None, dbias.astype(bias.dtype), None


_attention_bhlk.defvjp(_attention_fwd, _attention_bwd)


def _pad_to(x, n, axis, value):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, n - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)


def blockwise_attention(q_BxQxHxK, k_BxSxHxK, v_BxSxHxK, *, q_segment_ids_BxQ, k_segment_ids_BxS, causal: bool,
                        window: int, softmax1: bool, key_bias_BxS=None, block_q: int | None = None,
                        block_k: int | None = None, skip_padding: bool = False):
    """Attention output [B, Q, H, K] in v's dtype (softmax in fp32). Segment id 0 = padding (attends to
    padding only, like the dense path); ``window`` -1 = global; ``key_bias_BxS`` is added to the logits.
    Lengths need not be multiples of the tiles (rows are added that see and are seen by nothing). Tiles
    default to ``tile_sizes(B * H, Q, S)``.

    ``skip_padding``: padding queries (segment 0) see no key and give 0 (the dense path lets them attend to
    padding), and the query tiles after the batch's last real query are not visited, forward or backward.
    For callers that discard padding rows, e.g. H-Net's inner network, whose chunks sit at the front of a
    static capacity M and whose padding tail is never expanded back to bytes."""
    (B, Q, H, _), S = q_BxQxHxK.shape, k_BxSxHxK.shape[1]
    round_up = lambda n, m: -(-n // m) * m  # noqa: E731
    auto_q, auto_k = tile_sizes(B * H, Q, S)
    block_q, block_k = min(block_q or auto_q, round_up(Q, 8)), min(block_k or auto_k, round_up(S, 8))
    Qp, Sp = round_up(Q, block_q), round_up(S, block_k)
    n_q_live = Qp // block_q
    if skip_padding:  # padding trails every row: stop after the last tile that holds a real query
        n_q_live = (padded_tail_length(q_segment_ids_BxQ) + block_q - 1) // block_q
    bias = jnp.zeros((B, S), jnp.float32) if key_bias_BxS is None else key_bias_BxS.astype(jnp.float32)
    to_bhlk = lambda x, n: _pad_to(x.transpose(0, 2, 1, 3), n, 2, 0)  # noqa: E731  (head-major: fastest matmuls)
    o = _attention_bhlk(to_bhlk(q_BxQxHxK, Qp), to_bhlk(k_BxSxHxK, Sp), to_bhlk(v_BxSxHxK, Sp),
                        _pad_to(q_segment_ids_BxQ, Qp, 1, _PAD_Q), _pad_to(k_segment_ids_BxS, Sp, 1, _PAD_K),
                        _pad_to(bias, Sp, 1, 0.0), jnp.asarray(n_q_live, jnp.int32), causal, window, softmax1,
                        skip_padding, block_q, block_k)
    return o[:, :, :Q].transpose(0, 2, 1, 3)
