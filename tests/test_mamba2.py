"""Tests for hnet.mamba2: chunked SSD vs. naive recurrence, decoding, resets, causality, grads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hnet.mamba2 import Mamba2
from hnet.sharding import make_mesh, mesh_context



@pytest.fixture(scope="module", autouse=True)
def _highest_precision():
    # exact fp32 matmuls for the comparisons below, scoped to this module (no global config change)
    with jax.default_matmul_precision("highest"):
        yield

D_MODEL, HEADDIM, D_STATE, CHUNK, L = 32, 16, 8, 8, 37


def _segments():
    # row 0: three docs + right padding; row 1: doc boundary exactly at a chunk edge, no padding
    s0 = [1] * 5 + [2] * 14 + [3] * 12 + [0] * 6
    s1 = [4] * 8 + [5] * 20 + [6] * 9
    return jnp.asarray([s0, s1], jnp.int32)


def _make(**kw):
    """Build under the one-device mesh (params carry logical axis names); jitted init is faster on CPU."""
    with mesh_context(make_mesh()):
        return nnx.jit(lambda: Mamba2(D_MODEL, d_state=D_STATE, headdim=HEADDIM, chunk_size=CHUNK, rngs=nnx.Rngs(0), **kw))()


@pytest.fixture(scope="module")
def base_model():
    return _make()


@pytest.fixture(scope="module")
def model(base_model):
    m = nnx.clone(base_model)
    # make the dynamics non-trivial: larger dt, random D / norm scale, larger in_proj
    k = jax.random.split(jax.random.key(1), 4)
    m.dt_bias[...] = jax.random.uniform(k[0], m.dt_bias[...].shape, minval=-1.0, maxval=1.0)
    m.D[...] = jax.random.normal(k[1], m.D[...].shape)
    m.norm_scale[...] = 1.0 + 0.1 * jax.random.normal(k[2], m.norm_scale[...].shape)
    m.in_proj.kernel[...] = m.in_proj.kernel[...] * 10.0
    return m


@pytest.fixture(scope="module")
def inputs():
    x = jax.random.normal(jax.random.key(2), (2, L, D_MODEL))
    return x, _segments()


@pytest.fixture(scope="module")
def fwd(model):
    return nnx.jit(lambda m, x, s: m(x, s))


def naive_reference(m: Mamba2, x_BxLxD, seg_BxL):
    """Token-by-token recurrence written directly from the Mamba-2 equations (numpy loop over t)."""
    W_in = np.asarray(m.in_proj.kernel[...])
    W_out = np.asarray(m.out_proj.kernel[...])
    conv_w = np.asarray(m.conv_w[...])  # [K, C], conv_w[K-1] multiplies the current token
    conv_b = np.asarray(m.conv_b[...])
    A = -np.exp(np.asarray(m.A_log[...]))
    dt_bias = np.asarray(m.dt_bias[...])
    Dskip = np.asarray(m.D[...])
    scale = np.asarray(m.norm_scale[...])
    di, N, H, P, K = m.d_inner, m.d_state, m.nheads, m.headdim, m.d_conv
    x = np.asarray(x_BxLxD, np.float64)
    seg = np.asarray(seg_BxL)
    Bsz, Lq, _ = x.shape
    out = np.zeros((Bsz, Lq, m.d_model))
    silu = lambda v: v / (1.0 + np.exp(-v))
    for b in range(Bsz):
        hist = []  # pre-conv xBC of the current document
        S = np.zeros((H, P, N))
        for t in range(Lq):
            if t == 0 or seg[b, t] != seg[b, t - 1]:
                hist, S = [], np.zeros((H, P, N))
            zxbcdt = x[b, t] @ W_in
            z, xbc, dt_raw = zxbcdt[:di], zxbcdt[di : di + di + 2 * N], zxbcdt[di + di + 2 * N :]
            hist.append(xbc)
            conv = conv_b.astype(np.float64).copy()
            for j in range(K):  # tap j steps back
                if j < len(hist):
                    conv += conv_w[K - 1 - j] * hist[-1 - j]
            xbc = silu(conv)
            xs, Bt, Ct = xbc[:di].reshape(H, P), xbc[di : di + N], xbc[di + N :]
            dt = np.log1p(np.exp(dt_raw + dt_bias))
            S = np.exp(dt * A)[:, None, None] * S + (dt[:, None] * xs)[:, :, None] * Bt[None, None, :]
            y = (S @ Ct + Dskip[:, None] * xs).reshape(di)
            g = y * silu(z)
            g = g / np.sqrt(np.mean(g * g) + 1e-5) * scale
            out[b, t] = g @ W_out
    return out


def test_chunked_matches_naive_recurrence(model, inputs, fwd):
    x, seg = inputs
    y = np.asarray(fwd(model, x, seg))
    ref = naive_reference(model, x, seg)
    assert y.shape == (2, L, D_MODEL)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=2e-5 * np.abs(ref).max())


def test_chunk_size_invariance(model, inputs, fwd):
    x, seg = inputs
    y8 = fwd(model, x, seg)
    m2 = nnx.clone(model)
    m2.chunk_size = 64  # a single (padded) chunk longer than L
    np.testing.assert_allclose(fwd(m2, x, seg), y8, rtol=1e-5, atol=1e-5)


def test_step_decoding_matches_call(model, inputs, fwd):
    x, seg = inputs
    y_full = fwd(model, x, seg)
    reset = jnp.concatenate([jnp.ones((2, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)

    @nnx.jit
    def decode(m, x, reset):
        def body(cache, inp):
            x_t, r_t = inp
            y_t, cache = m.step(x_t, cache, r_t)
            return cache, y_t

        cache = m.init_cache(x.shape[0])
        _, ys = jax.lax.scan(body, cache, (jnp.swapaxes(x, 0, 1), jnp.swapaxes(reset, 0, 1)))
        return jnp.swapaxes(ys, 0, 1)

    cache = model.init_cache(2)
    assert cache["conv"].shape == (2, model.d_conv - 1, model.conv_channels)
    assert cache["ssm"].shape == (2, model.nheads, HEADDIM, D_STATE) and cache["ssm"].dtype == jnp.float32
    y_step = decode(model, x, reset)
    np.testing.assert_allclose(y_step, y_full, rtol=1e-4, atol=1e-5)


def test_document_isolation(model, inputs, fwd):
    x, seg = inputs
    y = fwd(model, x, seg)
    # perturb document 1 of row 0 (positions 0..4) and document 4 of row 1 (0..7)
    noise = jax.random.normal(jax.random.key(3), x.shape)
    doc1 = jnp.asarray([[1] * 5 + [0] * (L - 5), [1] * 8 + [0] * (L - 8)], bool)
    x2 = jnp.where(doc1[..., None], x + 3.0 * noise, x)
    y2 = fwd(model, x2, seg)
    assert not np.allclose(y[0, :5], y2[0, :5])
    np.testing.assert_array_equal(np.asarray(y[0, 5:]), np.asarray(y2[0, 5:]))
    np.testing.assert_array_equal(np.asarray(y[1, 8:]), np.asarray(y2[1, 8:]))
    # same document ids reappearing non-contiguously still count as separate documents
    seg_r = jnp.asarray([[1] * 10 + [2] * 10 + [1] * 17] * 2, jnp.int32)
    ya, yb = fwd(model, x, seg_r), fwd(model, x2, seg_r)
    np.testing.assert_array_equal(np.asarray(ya[:, 20:]), np.asarray(yb[:, 20:]))


def test_causality(model, inputs, fwd):
    x, seg = inputs
    y = fwd(model, x, seg)
    noise = jax.random.normal(jax.random.key(4), x.shape)
    for t in (3, 8, 20):
        x2 = jnp.where(jnp.arange(L)[None, :, None] > t, x + noise, x)
        y2 = fwd(model, x2, seg)
        np.testing.assert_array_equal(np.asarray(y[:, : t + 1]), np.asarray(y2[:, : t + 1]))
        assert not np.allclose(y[:, t + 1 :], y2[:, t + 1 :])


@nnx.jit
def _grads(m, x, seg):
    return nnx.grad(lambda m: jnp.sum(m(x, seg) ** 2))(m)


def test_gradients_finite_and_nonzero(model, inputs):
    x, seg = inputs

    g = _grads(model, x, seg)
    leaves = jax.tree_util.tree_leaves_with_path(nnx.state(g, nnx.Param))
    assert len(leaves) == 8
    for path, v in leaves:
        v = np.asarray(v)
        assert np.all(np.isfinite(v)), path
        assert np.any(v != 0), path


def test_param_axis_names(model):
    names = {
        "in_proj": ("embed", "ssm_inner"),
        "out_proj": ("ssm_inner", "embed"),
        "conv_w": ("conv", "ssm_inner"),
        "conv_b": ("ssm_inner",),
        "A_log": ("ssm_inner",),
    }
    assert model.in_proj.kernel.get_metadata()["out_sharding"] == names["in_proj"]
    assert model.out_proj.kernel.get_metadata()["out_sharding"] == names["out_proj"]
    assert model.conv_w.get_metadata()["out_sharding"] == names["conv_w"]
    assert model.conv_b.get_metadata()["out_sharding"] == names["conv_b"]
    assert model.A_log.get_metadata()["out_sharding"] == names["A_log"]
    assert model.in_proj.kernel[...].shape == (D_MODEL, 2 * 64 + 2 * D_STATE + 64 // HEADDIM)


def test_init_values(base_model):
    m = base_model
    A = np.exp(np.asarray(m.A_log[...]))
    assert np.all((A >= 1.0) & (A <= 16.0))
    dt = np.asarray(jax.nn.softplus(m.dt_bias[...]))
    assert np.all((dt >= 1e-3 * 0.999) & (dt <= 0.1 * 1.001))
    np.testing.assert_array_equal(np.asarray(m.D[...]), 1.0)
    np.testing.assert_array_equal(np.asarray(m.norm_scale[...]), 1.0)
    assert abs(float(jnp.std(m.in_proj.kernel[...])) - 0.02) < 0.003


def test_bf16_compute_runs(base_model, inputs, fwd):
    x, seg = inputs
    m = nnx.clone(base_model)  # same fp32 params, bf16 compute (cheaper than a second jitted init)
    m.dtype = m.in_proj.dtype = m.out_proj.dtype = jnp.bfloat16
    y = fwd(m, x, seg)
    y32 = fwd(base_model, x, seg)
    assert y.dtype == jnp.bfloat16 and m.A_log[...].dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(y, np.float32)))
    np.testing.assert_allclose(np.asarray(y, np.float32), y32, atol=0.05 * float(jnp.abs(y32).max()))


def test_gradients_finite_with_extreme_decay(model, inputs):
    """Strong decays (|dt*A| >> 1) must not produce inf/NaN through masked-out exp branches."""
    x, seg = inputs
    m = nnx.clone(model)
    m.A_log[...] = jnp.full_like(m.A_log[...], np.log(16.0))
    m.dt_bias[...] = jnp.full_like(m.dt_bias[...], 4.0)
    for path, v in jax.tree_util.tree_leaves_with_path(nnx.state(_grads(m, x, seg), nnx.Param)):
        assert np.all(np.isfinite(np.asarray(v))), path
