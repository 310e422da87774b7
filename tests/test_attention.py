"""hnet.attention: the splash kernel (CPU interpret mode) equals the dense reference under segment, causal
and local-window masks; 'auto' picks the kernel by the mesh devices' platform (blockwise on CPU from
BLOCKWISE_MIN_LEN on) and falls back to dense for features the kernel lacks."""

from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hnet import attention


@pytest.mark.parametrize("causal,window", [(True, 16), (False, -1)])
def test_splash_matches_dense(causal, window):
    B, L, H, K = 2, 256, 2, 64
    q, k, v = (jax.random.normal(kk, (B, L, H, K)) for kk in jax.random.split(jax.random.key(0), 3))
    seg = jnp.concatenate([jnp.full((B, 100), 1), jnp.full((B, 120), 2), jnp.zeros((B, 36), int)], 1)  # + padding
    o = attention._splash_local(q, k, v, seg, seg, causal=causal, window=window, interpret=True)
    ref = attention.dot_product_attention(q, k, v, q_segment_ids_BxQ=seg, k_segment_ids_BxS=seg, causal=causal,
                                          window=window, impl="dense")
    np.testing.assert_allclose(np.asarray(o), np.asarray(ref), atol=2e-6)
    full = attention.dot_product_attention(q, k, v, q_segment_ids_BxQ=seg, k_segment_ids_BxS=seg, causal=causal,
                                           window=-1 if window >= 0 else 8, impl="dense")
    assert np.abs(np.asarray(full - ref)).max() > 1e-2  # the mask matters: the comparison can fail


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu's TPU topology devices")
def test_auto_picks_by_mesh_platform():
    from jax.experimental import topologies

    from hnet import sharding

    q = jax.ShapeDtypeStruct((4, 256, 2, 64), jnp.bfloat16)
    feats = dict(causal=True, window=-1, softmax1=False, key_bias_BxS=None)
    assert attention.resolve_impl("auto", q, q, **feats) == "blockwise"  # CPU, from BLOCKWISE_MIN_LEN = 256 on
    q128 = jax.ShapeDtypeStruct((4, 128, 2, 64), jnp.bfloat16)
    assert attention.resolve_impl("auto", q128, q128, **feats) == "dense"  # CPU, below BLOCKWISE_MIN_LEN
    devices = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu").devices
    with jax.set_mesh(sharding.make_mesh({"data": -1}, devices=devices)):
        assert jax.default_backend() == "cpu" and sharding.target_platform() == "tpu"
        assert attention.resolve_impl("auto", q, q, **feats) == "splash"
        assert attention.resolve_impl("auto", q, q, **dict(feats, softmax1=True)) == "dense"
        assert attention.resolve_impl("auto", q, q, **dict(feats, key_bias_BxS=q)) == "dense"
        q100 = jax.ShapeDtypeStruct((4, 100, 2, 64), jnp.bfloat16)
        assert attention.resolve_impl("auto", q100, q100, **feats) == "dense"  # not a multiple of 128
        assert attention.resolve_impl("cudnn", q, q, **feats) == "cudnn"  # explicit choice is kept


def test_auto_on_gpu_takes_cudnn_only_for_what_cudnn_runs(monkeypatch):
    """cuDNN flash attention raises on fp32, odd head dims and odd lengths under a mask: 'auto' must route
    those to dense (benchmarks/device_check.py checks cudnn ≡ dense on a GPU)."""
    monkeypatch.setattr(attention, "target_platform", lambda: "gpu")
    feats = dict(causal=True, window=-1, softmax1=False, key_bias_BxS=None)
    q = jax.ShapeDtypeStruct((2, 256, 4, 32), jnp.bfloat16)
    assert attention.resolve_impl("auto", q, q, **feats) == "cudnn"
    assert attention.resolve_impl("auto", q, q, **dict(feats, window=64)) == "cudnn"
    assert attention.resolve_impl("auto", q, q, **dict(feats, causal=False, window=64)) == "dense"
    assert attention.resolve_impl("auto", q, q, **dict(feats, softmax1=True)) == "dense"
    for shape, dtype in [((2, 256, 4, 32), jnp.float32), ((2, 256, 4, 12), jnp.bfloat16),
                         ((2, 255, 4, 32), jnp.bfloat16)]:
        other = jax.ShapeDtypeStruct(shape, dtype)
        assert attention.resolve_impl("auto", other, other, **feats) == "dense", (shape, dtype)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="'auto' takes the blockwise kernel on CPU only")
def test_auto_on_cpu_takes_blockwise_for_long_self_attention_and_it_matches_dense():
    L = attention.BLOCKWISE_MIN_LEN
    feats = dict(causal=True, window=-1, softmax1=True, key_bias_BxS=None)
    short, long_ = (jax.ShapeDtypeStruct((1, n, 2, 16), jnp.float32) for n in (L - 1, L))
    assert attention.resolve_impl("auto", short, short, **feats) == "dense"
    assert attention.resolve_impl("auto", long_, long_, **feats) == "blockwise"
    assert attention.resolve_impl("auto", long_, short, **feats) == "dense"  # cross-attention stays dense
    q, k, v = (jax.random.normal(kk, (1, L, 2, 16)) for kk in jax.random.split(jax.random.key(1), 3))
    seg = jnp.concatenate([jnp.full((1, L // 3), 1), jnp.full((1, L - L // 3 - 7), 2), jnp.zeros((1, 7), int)], 1)
    bias = jax.random.normal(jax.random.key(2), (1, L))
    kw = dict(q_segment_ids_BxQ=seg, k_segment_ids_BxS=seg, causal=True, window=40, softmax1=True, key_bias_BxS=bias)
    o = attention.dot_product_attention(q, k, v, impl="auto", **kw)
    ref = attention.dot_product_attention(q, k, v, impl="dense", **kw)
    np.testing.assert_allclose(np.asarray(o), np.asarray(ref), atol=2e-5)


def test_reference_kernels_trace_the_jnp_references():
    """Inside ``hnet.sharding.reference_kernels`` (what ``train.step.flops_per_byte`` counts) attention is
    dense whatever the impl or the platform picks, gathers are jnp, and a padded-tail block computes every
    slot instead of skipping the dead ones in a scan: no loops and no custom calls, which XLA's cost
    analysis would count once or not at all. Outside it, the choices are back."""
    from flax import nnx

    from hnet import chunking, layers, sharding

    feats = dict(causal=True, window=-1, softmax1=False, key_bias_BxS=None)
    q = jax.ShapeDtypeStruct((1, 1024, 2, 16), jnp.float32)
    cfg = layers.StackConfig(layout="T1", d_model=32, d_ff=128, num_heads=2, padded_tail=True)
    block = layers.Block("t", True, cfg, out_init_std=0.02, dtype=jnp.float32, param_dtype=jnp.float32,
                         length_axis="chunk_len", rngs=nnx.Rngs(0))
    seg = jnp.concatenate([jnp.ones((1, 300), jnp.int32), jnp.zeros((1, 724), jnp.int32)], 1)
    # a new function each time: jax caches a function's trace, and the switch is not part of the cache key
    trace = lambda: str(jax.make_jaxpr(lambda *a: block(*a))(jnp.zeros((1, 1024, 32)), seg,  # noqa: E731
                                                             jnp.zeros((1, 1024), jnp.int32)))

    def kernels():
        return (attention.resolve_impl("auto", q, q, **feats), attention.resolve_impl("blockwise", q, q, **feats),
                chunking._resolve("pallas"), "scan" in trace(), "while" in trace())

    assert kernels() == ("blockwise", "blockwise", "pallas", True, True)
    with sharding.reference_kernels():
        assert kernels() == ("dense", "dense", "jnp", False, False)
    assert kernels() == ("blockwise", "blockwise", "pallas", True, True)
