"""hnet.layers.Linear: nnx.Linear's maths and parameters, with the CPU kernel gradient as one dot."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hnet.layers import Linear


def _value_and_grads(layer):
    graph, params = nnx.split(layer)

    def f(params, x, cot):
        y, vjp = jax.vjp(lambda p, x: nnx.merge(graph, p)(x), params, x)
        return y, vjp(cot)

    return jax.jit(f), params


def test_linear_is_nnx_linear_with_one_dot_for_the_kernel_gradient():
    """Same parameters, outputs and gradients as nnx.Linear on a [B, L, in] input. On CPU its compiled
    forward + backward has no transposing copy: nnx.Linear's has one (the cotangent, for a kernel gradient
    that contracts B and L), which made it 1.8x slower."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((4, 32, 16)), jnp.float32)
    cot = jnp.asarray(rng.standard_normal((4, 32, 24)), jnp.float32)
    ours, theirs = Linear(16, 24, rngs=nnx.Rngs(0)), nnx.Linear(16, 24, rngs=nnx.Rngs(0))
    assert jax.tree.map(jnp.shape, nnx.state(ours)) == jax.tree.map(jnp.shape, nnx.state(theirs))
    (f, p), (g, q) = _value_and_grads(ours), _value_and_grads(theirs)
    for a, b in zip(jax.tree.leaves(f(p, x, cot)), jax.tree.leaves(g(q, x, cot))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    assert Linear(16, 24, rngs=nnx.Rngs(0))(x[0, 0]).shape == (24,)  # a 1-D input (decoding) as before

    def transposed_cotangent(fn, params):  # the cotangent [4 * 32, 24] materialised as [24, 4 * 32]
        hlo = fn.lower(params, x, cot).compile().as_text()
        return "f32[24,128]" in hlo[hlo.index("ENTRY"):]

    assert not transposed_cotangent(f, p) and transposed_cotangent(g, q)
