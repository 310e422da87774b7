"""Blockwise attention (hnet/kernels/blockwise_attention.py) against the dense reference path
(hnet.layers.attention_mask + Attention._attend): values and gradients of q, k, v and the key bias."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hnet.kernels.blockwise_attention import blockwise_attention, key_tiles, query_tiles, tile_sizes
from hnet.layers import Attention, attention_mask

B, L, H, K = 2, 37, 2, 8  # L is not a multiple of the blocks


@pytest.fixture(scope="module", autouse=True)
def _highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


def _segments():
    # row 0: three packed documents and right padding (segment 0); row 1: two documents
    s0 = [1] * 5 + [2] * 14 + [3] * 12 + [0] * 6
    s1 = [4] * 20 + [5] * 17
    return jnp.asarray([s0, s1], jnp.int32)


def _dense(q, k, v, seg, bias, causal, window, softmax1):
    att = Attention(H * K, H, window=window, softmax1=softmax1, causal=causal, rngs=nnx.Rngs(0))
    idx = jnp.broadcast_to(jnp.arange(L)[None], (B, L))
    return att._attend(q, k, v, attention_mask(seg, seg, idx, idx, window, causal), bias)


def _blockwise(q, k, v, seg, bias, causal, window, softmax1):
    return blockwise_attention(q, k, v, q_segment_ids_BxQ=seg, k_segment_ids_BxS=seg, causal=causal, window=window,
                               softmax1=softmax1, key_bias_BxS=bias, block_q=8, block_k=4)


CASES = {  # causal, window, softmax1, key bias
    "causal": (True, -1, False, False),
    "causal_window": (True, 5, False, False),
    "softmax1_bias": (True, -1, True, True),
    "window_softmax1_bias": (True, 9, True, True),
    "bidirectional_window": (False, 6, False, True),
    "bidirectional": (False, -1, True, False),
}


@pytest.mark.parametrize("case,dtype", [(c, jnp.float32) for c in CASES]
                         + [(c, jnp.bfloat16) for c in ("causal_window", "window_softmax1_bias")])
def test_values_and_grads_match_dense(case, dtype):
    causal, window, softmax1, with_bias = CASES[case]
    ks = jax.random.split(jax.random.key(0), 5)
    q, k, v = ((2.0 * jax.random.normal(kk, (B, L, H, K))).astype(dtype) for kk in ks[:3])
    bias = jax.random.normal(ks[3], (B, L)) if with_bias else None
    seg = _segments()
    ct = jax.random.normal(ks[4], (B, L, H, K)).astype(dtype)

    @jax.jit
    def run_dense(*a):
        return run(_dense, *a)

    @jax.jit
    def run_blockwise(*a):
        return run(_blockwise, *a)

    def run(fn, q, k, v, bias):
        out, vjp = jax.vjp(lambda *a: fn(*a[:3], seg, a[3] if with_bias else None, causal, window, softmax1),
                           q, k, v, bias)
        return out, vjp(ct)

    args = (q, k, v, bias if with_bias else jnp.zeros(()))
    (o_ref, g_ref), (o, g) = run_dense(*args), run_blockwise(*args)
    assert o.dtype == o_ref.dtype == dtype
    tol = 1e-5 if dtype == jnp.float32 else 4e-2
    scale = lambda x: float(jnp.max(jnp.abs(x.astype(jnp.float32)))) + 1e-6  # noqa: E731
    np.testing.assert_allclose(np.asarray(o, np.float32), np.asarray(o_ref, np.float32), atol=tol * scale(o_ref))
    names = ["dq", "dk", "dv", "dbias"] if with_bias else ["dq", "dk", "dv"]
    for name, a, b in zip(names, g, g_ref):
        assert a.dtype == b.dtype, name
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=tol * scale(b),
                                   err_msg=name)


@pytest.mark.parametrize("causal,window", [(True, -1), (True, 7), (False, 7), (False, -1)])
def test_tile_ranges_are_tight(causal, window):
    # with tiles of 1 on the other side, the key tiles of a query tile are exactly the span of the keys its
    # rows can see, and the query tiles of a key tile exactly the span of the rows that see its keys
    n, t = 37, 8
    idx = jnp.arange(n)[None]
    seg = jnp.ones((1, n), jnp.int32)
    vis = np.asarray(attention_mask(seg, seg, idx, idx, window, causal))[0, 0]
    for i in range(-(-n // t)):
        cols = np.nonzero(vis[i * t:(i + 1) * t].any(axis=0))[0]
        assert tuple(map(int, key_tiles(i, t, 1, n, causal, window))) == (cols.min(), cols.max() + 1), i
        rows = np.nonzero(vis[:, i * t:(i + 1) * t].any(axis=1))[0]
        assert tuple(map(int, query_tiles(i, 1, t, n, causal, window))) == (rows.min(), rows.max() + 1), i


def test_static_tile_skipping():
    # causal global: query tile i visits key tiles [0, i] -> (n + 1) / 2n of the dense work
    assert [tuple(map(int, key_tiles(i, 128, 128, 8, True, -1))) for i in range(8)] == [(0, i + 1) for i in range(8)]
    # a local window of 100 keeps each query tile's keys within [q0 - 100, q1), rounded out to 128
    r = [tuple(map(int, key_tiles(i, 256, 128, 8, True, 100))) for i in range(4)]
    assert r == [(0, 2), (1, 4), (3, 6), (5, 8)]
    # backward: key tile j is seen by query tiles [j, 8) (causal) and [j, j + 2) (window 100)
    assert [tuple(map(int, query_tiles(j, 128, 128, 8, True, -1))) for j in range(8)] == [(j, 8) for j in range(8)]
    assert [tuple(map(int, query_tiles(j, 128, 128, 8, True, 100))) for j in range(8)] == [
        (j, min(8, j + 2)) for j in range(8)]


def test_tile_sizes_are_the_measured_ones():
    # the fastest tiles measured on XLA:CPU (docs/benchmarks.md): B * H, query length, key length
    assert tile_sizes(32, 1024, 1024) == (128, 128)  # isotropic_tiny, L = 1024
    assert tile_sizes(8, 4096, 4096) == (256, 512)  # isotropic_tiny, L = 4096
    assert tile_sizes(4, 8192, 8192) == (512, 512)  # isotropic_tiny, L = 8192
    assert tile_sizes(32, 512, 512) == (64, 64)  # hnet_1stage_tiny's main network, L = 1024
    assert tile_sizes(4, 4096, 4096) == (512, 512)  # hnet_1stage_tiny's main network, L = 8192


def test_no_quadratic_intermediate():
    # forward + backward never hold an [L, L] block: the largest values are [B, H, L, K] and [B, H, block_q, block_k]
    n = 256
    q = jnp.ones((1, n, 1, 8))
    seg = jnp.ones((1, n), jnp.int32)

    def loss(q):
        return blockwise_attention(q, q, q, q_segment_ids_BxQ=seg, k_segment_ids_BxS=seg, causal=True, window=-1,
                                   softmax1=False, block_q=32, block_k=32).sum()

    jaxpr = jax.make_jaxpr(jax.grad(loss))(q)
    sizes = [np.prod(v.aval.shape) for e in jaxpr.eqns for v in e.outvars if hasattr(v.aval, "shape")]
    sizes += [np.prod(v.aval.shape) for e in jaxpr.eqns for sub in jax.extend.core.jaxprs_in_params(e.params)
              for e2 in sub.eqns for v in e2.outvars if hasattr(v.aval, "shape")]
    assert max(sizes) <= 32 * n, max(sizes)


@pytest.mark.parametrize("padded_tail", [6, 16])  # 16: the last tile (rows 32..36) and the one before are all padding
def test_skip_padding(padded_tail):
    # padding queries give 0; real rows and every gradient (cotangent 0 on padding rows, as when a caller
    # discards them) equal the dense path, whether or not whole blocks are skipped
    ks = jax.random.split(jax.random.key(1), 5)
    q, k, v = (jax.random.normal(kk, (B, L, H, K)) for kk in ks[:3])
    bias = jax.random.normal(ks[3], (B, L))
    seg = jnp.asarray([[1] * 10 + [2] * (L - 10 - padded_tail) + [0] * padded_tail,
                       [3] * (L - padded_tail) + [0] * padded_tail], jnp.int32)
    real = (seg != 0)[:, :, None, None]
    ct = jnp.where(real, jax.random.normal(ks[4], (B, L, H, K)), 0.0)

    def dense(q, k, v, bias):
        return _dense(q, k, v, seg, bias, True, -1, False)

    def blockwise(q, k, v, bias):
        return blockwise_attention(q, k, v, q_segment_ids_BxQ=seg, k_segment_ids_BxS=seg, causal=True, window=-1,
                                   softmax1=False, key_bias_BxS=bias, block_q=8, block_k=4, skip_padding=True)

    run = jax.jit(lambda fn, *a: (lambda o, vjp: (o, vjp(ct)))(*jax.vjp(fn, *a)), static_argnums=0)
    # queries of the tiles after the last real one are never read: NaN there would reach dk through
    # dS^T Q (0 * NaN) if such a tile were visited
    dead = -(-(L - padded_tail) // 8) * 8
    q_dead = q.at[:, dead:].set(jnp.nan)
    (o_ref, g_ref), (o, g) = run(dense, q, k, v, bias), run(blockwise, q_dead, k, v, bias)
    np.testing.assert_allclose(np.where(real, o, 0.0), np.where(real, o_ref, 0.0), atol=1e-5)
    assert not np.any(np.where(real, 0.0, o))
    for name, a, b in zip(["dq", "dk", "dv", "dbias"], g, g_ref):
        np.testing.assert_allclose(a, b, atol=1e-5, err_msg=name)
