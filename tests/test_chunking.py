"""compact / expand / overflow vs brute-force loops and vs autodiff of a jnp reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hnet import chunking

B, L, D = 6, 24, 5


def _masks(L=L, seed=0):
    """[6, L] bool: random sparse, random dense, all-true, only-first, none, late first."""
    rng = np.random.default_rng(seed)
    m = np.zeros((6, L), bool)
    m[0] = rng.random(L) < 0.25
    m[0, 0] = True
    m[1] = rng.random(L) < 0.7
    m[2] = True  # all true: overflows any M < L
    m[3, 0] = True  # only first
    # row 4: no boundary at all
    m[5, [5, 6, 13]] = True  # first boundary late: bytes 0..4 have cid = -1
    return m


# ----- brute-force references (plain Python loops) ------------------------------------


def _bf_compact(x, m, M):
    b, _, d = x.shape
    z = np.zeros((b, M, d), x.dtype)
    valid = np.zeros((b, M), bool)
    for i in range(b):
        pos = [t for t in range(m.shape[1]) if m[i, t]]
        for j, p in enumerate(pos[:M]):
            z[i, j] = x[i, p]
            valid[i, j] = True
    return z, valid


def _bf_expand(z, m):
    b, M, d = z.shape
    y = np.zeros((b, m.shape[1], d), z.dtype)
    for i in range(b):
        c = -1
        for t in range(m.shape[1]):
            c += int(m[i, t])
            if 0 <= c < M:
                y[i, t] = z[i, c]
    return y


def _bf_overflow(m, M):
    n = m.sum(1)
    dropped = np.maximum(n - M, 0)
    ok = np.zeros_like(m)
    for i in range(m.shape[0]):
        c = -1
        for t in range(m.shape[1]):
            c += int(m[i, t])
            ok[i, t] = c < M
    return dropped, ok


# ----- pure-jnp reference (autodiff) written independently of the module ------------


def _ref_compact(x, m, M):
    csum = jnp.cumsum(m, axis=1)
    # j-th boundary = number of positions with csum <= j (csum is non-decreasing).
    idx = jnp.sum(csum[:, None, :] <= jnp.arange(M)[None, :, None], axis=2)
    valid = jnp.arange(M)[None, :] < csum[:, -1:]
    idx = jnp.where(valid, idx, 0)
    z = jnp.take_along_axis(x, idx[:, :, None], axis=1)
    return jnp.where(valid[:, :, None], z, 0)


def _ref_expand(z, m):
    M = z.shape[1]
    cid = jnp.cumsum(m, axis=1) - 1
    ok = (cid >= 0) & (cid < M)
    y = jnp.take_along_axis(z, jnp.clip(cid, 0, M - 1)[:, :, None], axis=1)
    return jnp.where(ok[:, :, None], y, 0)


def _x(dtype=jnp.float32, shape=(B, L, D), seed=1):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


@pytest.mark.parametrize("M", [1, 4, 9, L, L + 3])
def test_compact_expand_overflow_vs_brute_force(M):
    m = _masks()
    x = _x()
    z, valid = jax.jit(chunking.compact, static_argnums=2)(x, m, M)
    zb, vb = _bf_compact(np.asarray(x), m, M)
    np.testing.assert_array_equal(np.asarray(z), zb)
    np.testing.assert_array_equal(np.asarray(valid), vb)

    y = jax.jit(chunking.expand)(z, m)
    np.testing.assert_array_equal(np.asarray(y), _bf_expand(zb, m))

    dropped, ok = jax.jit(chunking.overflow, static_argnums=1)(m, M)
    db, okb = _bf_overflow(m, M)
    np.testing.assert_array_equal(np.asarray(dropped), db)
    np.testing.assert_array_equal(np.asarray(ok), okb)
    assert dropped.dtype == jnp.int32 and ok.dtype == jnp.bool_


def test_index_helpers():
    m = _masks()
    cid = chunking.chunk_ids(m)
    assert cid.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(cid), np.cumsum(m, 1) - 1)
    ci = jax.jit(chunking.compaction_indices, static_argnums=1)
    idx, valid = map(np.asarray, ci(m, 7))
    assert idx.dtype == jnp.int32 and valid.dtype == jnp.bool_
    for i in range(m.shape[0]):
        pos = np.flatnonzero(m[i])[:7]
        np.testing.assert_array_equal(idx[i, : len(pos)], pos)
        assert not valid[i, len(pos):].any()
        assert (idx[i, len(pos):] == 0).all()
    # Integer masks behave like bool masks.
    idx_i, valid_i = ci(jnp.asarray(m, jnp.int32), 7)
    np.testing.assert_array_equal(np.asarray(idx_i), np.asarray(idx))
    np.testing.assert_array_equal(np.asarray(valid_i), np.asarray(valid))


@pytest.mark.parametrize("M", [L, 4])  # without / with overflow (rows 1, 2 overflow at M=4)
def test_gradients_match_autodiff_reference(M):
    m = jnp.asarray(_masks())
    x = _x()
    w = jnp.sin(jnp.arange(L * D, dtype=jnp.float32).reshape(1, L, D))

    def loss(compact_fn, expand_fn):
        def f(x):
            h = jnp.tanh(compact_fn(x))
            return jnp.sum(w * expand_fn(h) ** 2) + 0.3 * jnp.sum(h**3)

        return f

    gz = _x(shape=(B, M, D), seed=3)
    gy = _x(shape=(B, L, D), seed=4)

    @jax.jit
    def run(x):
        ours = jax.value_and_grad(
            loss(lambda x: chunking.compact(x, m, M)[0], lambda h: chunking.expand(h, m))
        )(x)
        ref = jax.value_and_grad(loss(lambda x: _ref_compact(x, m, M), lambda h: _ref_expand(h, m)))(x)
        # Each custom VJP on its own.
        z = _ref_compact(x, m, M)
        vjps = [
            (jax.vjp(lambda x: chunking.compact(x, m, M)[0], x)[1](gz)[0],
             jax.vjp(lambda x: _ref_compact(x, m, M), x)[1](gz)[0]),
            (jax.vjp(lambda z: chunking.expand(z, m), z)[1](gy)[0],
             jax.vjp(lambda z: _ref_expand(z, m), z)[1](gy)[0]),
        ]
        return ours, ref, vjps

    (v1, g1), (v2, g2), vjps = run(x)
    np.testing.assert_allclose(v1, v2, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(g1), np.asarray(g2), rtol=1e-6, atol=1e-6)
    assert np.abs(np.asarray(g1)).max() > 0.1
    for a, b in vjps:
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


def test_module_references_agree():
    m = jnp.asarray(_masks())
    x = _x()

    @jax.jit
    def run(x):
        out = []
        for M in (4, L):
            z, v = chunking.reference_compact(x, m, M)
            out.append((z, v, chunking.reference_expand(z, m), *chunking.compact(x, m, M), chunking.expand(z, m)))
        return out

    for z, v, y, z2, v2, y2 in run(x):
        np.testing.assert_array_equal(np.asarray(z), np.asarray(z2))
        np.testing.assert_array_equal(np.asarray(v), np.asarray(v2))
        np.testing.assert_array_equal(np.asarray(y), np.asarray(y2))


def test_bf16_forward_exact_and_grad_dtype():
    m = jnp.asarray(_masks())
    x = _x(jnp.bfloat16)
    M = 6

    @jax.jit
    def run(x):
        z, _ = chunking.compact(x, m, M)
        y = chunking.expand(z, m)
        g = jax.grad(lambda x: jnp.sum(chunking.expand(chunking.compact(x, m, M)[0], m), dtype=jnp.float32))(x)
        g_ref = jax.grad(lambda x: jnp.sum(_ref_expand(_ref_compact(x, m, M), m)))(x.astype(jnp.float32))
        return z, y, g, g_ref

    z, y, g, g_ref = run(x)
    assert z.dtype == y.dtype == g.dtype == jnp.bfloat16
    zb, _ = _bf_compact(np.asarray(x.astype(jnp.float32)), np.asarray(m), M)
    np.testing.assert_array_equal(np.asarray(z.astype(jnp.float32)), zb)
    np.testing.assert_array_equal(np.asarray(y.astype(jnp.float32)), _bf_expand(zb, np.asarray(m)))
    # d/dx sum(expand(compact(x))) = length of the kept chunk at its boundary byte (exact).
    np.testing.assert_array_equal(np.asarray(g.astype(jnp.float32)), np.asarray(g_ref))


def test_d1_probabilities():
    m = jnp.asarray(_masks())
    p = jax.nn.sigmoid(_x(shape=(B, L, 1)))
    M = 5

    @jax.jit
    def run(p):
        z, valid = chunking.compact(p, m, M)
        y = chunking.expand(z, m)
        g1 = jax.grad(lambda p: jnp.sum(jnp.log1p(chunking.expand(chunking.compact(p, m, M)[0], m))))(p)
        g2 = jax.grad(lambda p: jnp.sum(jnp.log1p(_ref_expand(_ref_compact(p, m, M), m))))(p)
        return z, valid, y, g1, g2

    z, valid, y, g1, g2 = run(p)
    assert z.shape == (B, M, 1)
    zb, vb = _bf_compact(np.asarray(p), np.asarray(m), M)
    np.testing.assert_array_equal(np.asarray(z), zb)
    np.testing.assert_array_equal(np.asarray(valid), vb)
    np.testing.assert_array_equal(np.asarray(y), _bf_expand(zb, np.asarray(m)))
    np.testing.assert_allclose(np.asarray(g1), np.asarray(g2), rtol=1e-6, atol=1e-6)


def test_default_impl_and_bad_impl():
    assert chunking.default_impl() == ("jnp" if jax.default_backend() == "cpu" else "pallas")
    try:
        chunking.set_default_impl("pallas")
        assert chunking.default_impl() == "pallas"
    finally:
        chunking.set_default_impl(None)
    assert chunking.default_impl() in ("jnp", "pallas")
    with pytest.raises(ValueError):
        chunking.compact(_x(), _masks(), 3, impl="nope")
    with pytest.raises(ValueError):
        chunking.set_default_impl("nope")


@pytest.mark.parametrize("impl", ["jnp", "pallas"])
def test_take_chunks_matches_take_along_axis_with_grads(impl):
    """The pooling models' chunk -> byte read (non-monotone indices, out-of-range -> 0, trailing dims)."""
    z = jax.random.normal(jax.random.key(0), (2, 5, 3, 2))
    w = jax.random.normal(jax.random.key(1), (2, 8, 3, 2))
    idx = jnp.array([[0, 0, 1, 4, 5, -1, 2, 2], [3, 3, 3, 0, 1, 9, 4, 4]])

    def ref(z):
        g = jnp.take_along_axis(z, jnp.clip(idx, 0, 4)[:, :, None, None], axis=1)
        return jnp.where(((idx >= 0) & (idx < 5))[:, :, None, None], g, 0)

    np.testing.assert_array_equal(chunking.take_chunks(z, idx, impl=impl), ref(z))
    grad = lambda f: jax.grad(lambda z: jnp.sum(jnp.sin(f(z)) * w))(z)  # noqa: E731
    np.testing.assert_allclose(grad(lambda z: chunking.take_chunks(z, idx, impl=impl)), grad(ref), rtol=1e-6,
                               atol=1e-6)
    zi = jnp.arange(30).reshape(2, 5, 3)  # integer rows: plain gather
    np.testing.assert_array_equal(chunking.take_chunks(zi, idx), ref(zi[..., None])[..., 0])
