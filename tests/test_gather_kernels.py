"""Pallas row-gather kernels in CPU interpret mode vs ``jnp.take_along_axis``."""

import functools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from hnet import chunking
from hnet.kernels import gather_rows, reference_gather_rows
from launch.local import xla_flags

L, M = 24, 8


def _masks():
    """[3, L]: all-true (overflows M), only-first, random with more than M boundaries."""
    m = np.zeros((3, L), bool)
    m[0] = True
    m[1, 0] = True
    m[2] = np.random.default_rng(0).random(L) < 0.6
    m[2, 0] = True
    assert m[2].sum() > M
    return jnp.asarray(m)


def _interpret(mode):
    return pltpu.InterpretParams() if mode == "params" else True


@functools.cache
def _indices():
    m = _masks()
    idx_c, _ = chunking.compaction_indices(m, M)  # compaction direction: [3, M] into [3, L]
    cid = jnp.clip(chunking.chunk_ids(m), 0, M - 1)  # expansion direction: [3, L] into [3, M]
    rand = jax.random.randint(jax.random.key(1), (3, 5), 0, L)  # arbitrary order / repeats
    return idx_c, cid, rand


def _inputs(dtype):
    x = jax.random.normal(jax.random.key(0), (3, L, 6), jnp.float32).astype(dtype)
    return (x, *_indices())


KERNELS = [("tpu", "true"), ("tpu", "params"), ("gpu", "true")]


@pytest.mark.parametrize("backend,mode", KERNELS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernel_matches_reference(backend, mode, dtype):
    x, idx_c, cid, rand = _inputs(dtype)
    z = x[:, :M]
    g = functools.partial(gather_rows, backend=backend, interpret=_interpret(mode))
    try:
        outs = jax.jit(lambda x, z, a, b, c: (g(x, a), g(z, b), g(x, c)))(x, z, idx_c, cid, rand)
    finally:
        if mode == "params":
            pltpu.reset_tpu_interpret_mode_state()
    for out, (src, idx) in zip(outs, [(x, idx_c), (z, cid), (x, rand)]):
        assert out.dtype == dtype and out.shape == (3, idx.shape[1], 6)
        np.testing.assert_array_equal(
            np.asarray(out.astype(jnp.float32)),
            np.asarray(reference_gather_rows(src, idx).astype(jnp.float32)),
        )


@pytest.mark.parametrize("backend,kw", [("tpu", {}), ("tpu", {"tpu_blocked_idx": True}), ("gpu", {})])
def test_kernel_odd_widths_and_tiles(backend, kw):
    """D = 1 and odd D (widened bf16 path), several tiles per row, M not a tile multiple;
    TPU also with per-step SMEM index blocks instead of the whole-array scalar prefetch."""
    key = jax.random.key(2)
    idx = jax.random.randint(key, (2, 21), 0, 40)
    xs = [
        jax.random.normal(key, (2, 40, d), jnp.float32).astype(dtype)
        for d, dtype in [(1, jnp.float32), (1, jnp.bfloat16), (3, jnp.bfloat16)]
    ]
    g = functools.partial(gather_rows, backend=backend, interpret=True, tile_rows=8, **kw)
    outs = jax.jit(lambda xs, idx: [g(x, idx) for x in xs])(xs, idx)
    for x, out in zip(xs, outs):
        assert out.dtype == x.dtype
        np.testing.assert_array_equal(
            np.asarray(out.astype(jnp.float32)),
            np.asarray(reference_gather_rows(x, idx).astype(jnp.float32)),
        )


@pytest.mark.parametrize("impl", ["pallas", "pallas:gpu"])
def test_chunking_pallas_grads_match_jnp(impl):
    m = _masks()
    x = jax.random.normal(jax.random.key(3), (3, L, 4), jnp.float32)
    w = jnp.cos(jnp.arange(L * 4, dtype=jnp.float32).reshape(1, L, 4))

    def loss(x, impl):
        z, _ = chunking.compact(x, m, M, impl=impl)
        y = chunking.expand(jnp.tanh(z), m, impl=impl)
        return jnp.sum(w * y**2), (z, y)

    (v1, (z1, y1)), g1 = jax.jit(jax.value_and_grad(functools.partial(loss, impl=impl), has_aux=True))(x)
    (v2, (z2, y2)), g2 = jax.jit(jax.value_and_grad(functools.partial(loss, impl="jnp"), has_aux=True))(x)
    np.testing.assert_array_equal(np.asarray(z1), np.asarray(z2))
    np.testing.assert_array_equal(np.asarray(y1), np.asarray(y2))
    np.testing.assert_allclose(v1, v2, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(g1), np.asarray(g2), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend,platform", [("tpu", "tpu"), ("gpu", "cuda")])
def test_kernels_lower_for_device_platforms(backend, platform):
    """Cross-lowers (Mosaic / Triton IR, built in Python) without the device; not a compile."""
    x = jax.ShapeDtypeStruct((2, 256, 128), jnp.bfloat16)
    idx = jax.ShapeDtypeStruct((2, 64), jnp.int32)
    fn = jax.jit(functools.partial(gather_rows, backend=backend))
    try:
        text = fn.trace(x, idx).lower(lowering_platforms=(platform,)).as_text()
    except (NotImplementedError, ImportError) as e:  # lowering support not in this jaxlib
        pytest.skip(f"no {platform} lowering here: {e}")
    assert "gather_rows_" + backend in text


_CHILD = textwrap.dedent(
    """
    import functools
    import jax, jax.numpy as jnp, numpy as np
    from jax.experimental.pallas import tpu as pltpu
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from hnet import chunking
    from hnet.kernels import gather_rows_sharded, reference_gather_rows

    assert jax.device_count() == 8, jax.devices()
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "fsdp"))
    B, L, M, D = 8, 16, 6, 4
    x = jax.random.normal(jax.random.key(0), (B, L, D), jnp.float32)
    m = jax.random.bernoulli(jax.random.key(1), 0.4, (B, L)).at[:, 0].set(True)
    m = m.at[0].set(True)  # one overflowing row
    idx, _ = chunking.compaction_indices(m, M)
    bsh = NamedSharding(mesh, P(("data", "fsdp")))
    xs, idxs = jax.device_put(x, bsh), jax.device_put(idx, bsh)
    ref = reference_gather_rows(x, idx)
    for name, kw in [
        ("tpu-interpret", dict(backend="tpu", interpret=True)),
        ("tpu-params-vma", dict(backend="tpu", interpret=pltpu.InterpretParams())),
        ("gpu-interpret", dict(backend="gpu", interpret=True)),
    ]:
        out = jax.jit(functools.partial(gather_rows_sharded, mesh=mesh, **kw))(xs, idxs)
        assert out.sharding.spec == P(("data", "fsdp")), out.sharding
        np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
        print("OK", name, flush=True)

    # Gradients of compact -> tanh -> expand with impl='pallas' inside shard_map.
    def loss(x, impl, sm):
        def body(x, m):
            z, _ = chunking.compact(x, m, M, impl=impl)
            return chunking.expand(jnp.tanh(z), m, impl=impl)
        if sm:
            body = jax.shard_map(body, mesh=mesh, in_specs=(P(("data", "fsdp")),) * 2,
                                 out_specs=P(("data", "fsdp")), check_vma=False)
        return jnp.sum(jnp.sin(body(x, m)) ** 2)
    g1 = jax.jit(jax.grad(functools.partial(loss, impl="pallas", sm=True)))(xs)
    g2 = jax.jit(jax.grad(functools.partial(loss, impl="jnp", sm=False)))(x)
    np.testing.assert_allclose(np.asarray(g1), np.asarray(g2), rtol=1e-6, atol=1e-6)
    print("OK grad-shard_map", flush=True)
    """
)


def test_gather_rows_sharded_8_devices_subprocess():
    env = dict(os.environ)
    env["XLA_FLAGS"] = xla_flags(8, env.get("XLA_FLAGS"))
    env["JAX_PLATFORMS"] = "cpu"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD], env=env, cwd=root, capture_output=True, text=True, timeout=300
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    for name in ("tpu-interpret", "tpu-params-vma", "gpu-interpret", "grad-shard_map"):
        assert f"OK {name}" in proc.stdout, out[-4000:]
