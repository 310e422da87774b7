"""Mamba-2 (SSD) mixer in pure JAX / Flax NNX, with packed-document resets.

Follows mamba_ssm ``Mamba2`` (ngroups=1, no dt limit): one bias-free ``in_proj`` producing
``[z | x | B | C | dt]``; a causal depthwise conv (with bias) + SiLU over ``[x, B, C]``; a per-head
scalar-decay SSM

    S_t = exp(dt_t * A_h) * S_{t-1} + dt_t * x_t ⊗ B_t        (S_t: [headdim, d_state])
    y_t = S_t · C_t + D_h * x_t

then ``rmsnorm(y * silu(z))`` (norm_before_gate=False) and a bias-free ``out_proj``.

The full-sequence path uses the chunked SSD algorithm: a quadratic (attention-like) form inside
chunks of ``chunk_size`` tokens and an associative scan over chunk states between chunks.

Document resets: ``segment_ids_BxL`` marks packed documents (a new value at each document start,
0 for padding). The state is reset wherever ``segment_ids[t] != segment_ids[t-1]``: intra-chunk
decays, chunk-state carries and conv taps are all masked so that nothing flows across a boundary.
All decay / cumsum math is done in fp32 whatever the compute dtype.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from hnet.layers import Linear, scale_channels
from hnet.sharding import constrain, param_init, target_platform


# ----------------------------------------------------------------------------------------------
# initializers
# ----------------------------------------------------------------------------------------------


def _a_log_init(a_min: float = 1.0, a_max: float = 16.0):
    """A_log = log(U(a_min, a_max)) per head."""

    def init(key, shape, dtype=jnp.float32):
        a = jax.random.uniform(key, shape, jnp.float32, a_min, a_max)
        return jnp.log(a).astype(dtype)

    return init


def _dt_bias_init(dt_min: float = 1e-3, dt_max: float = 0.1, dt_floor: float = 1e-4):
    """dt_bias = softplus^{-1}(dt), dt ~ logUniform(dt_min, dt_max) floored at dt_floor."""

    def init(key, shape, dtype=jnp.float32):
        u = jax.random.uniform(key, shape, jnp.float32)
        dt = jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = jnp.maximum(dt, dt_floor)
        return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)

    return init


def _uniform_init(bound: float):
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def split_last(x, *at):
    """``x`` cut at ``at`` along its last axis. On CPU with ``jnp.split``, whose gradient is one concatenate
    where slices' is a pad per piece and the adds (H-Net train step at L = 1024: 1.04-1.07x); elsewhere with
    slices (launch.aot, hnet_1stage_tiny on v5e: 1 % fewer bytes accessed per chip)."""
    if target_platform() == "cpu":
        return jnp.split(x, list(at), axis=-1)
    bounds = (0, *at, x.shape[-1])
    return [x[..., a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def doc_index(segment_ids_BxL: jax.Array) -> jax.Array:
    """Running document index [B, L] int32: increments wherever segment_ids changes (and at t=0)."""
    seg = segment_ids_BxL
    starts = jnp.concatenate([jnp.ones_like(seg[:, :1], dtype=bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    return jnp.cumsum(starts.astype(jnp.int32), axis=1)


def causal_conv_with_resets(xbc_BxLxC, w_KxC, b_C, doc_BxL):
    """Depthwise causal conv; tap at t-j is used only if it lies in the same document as t.

    out[t] = b + sum_{j=0}^{K-1} w[K-1-j] * x[t-j] * [t-j >= 0 and doc[t-j] == doc[t]].
    """
    K = w_KxC.shape[0]
    L = xbc_BxLxC.shape[1]
    x_pad = jnp.pad(xbc_BxLxC, ((0, 0), (K - 1, 0), (0, 0)))
    d_pad = jnp.pad(doc_BxL, ((0, 0), (K - 1, 0)), constant_values=-1)
    out = scale_channels(jnp.ones(xbc_BxLxC.shape, jnp.float32), b_C.astype(jnp.float32))  # b, broadcast in [N, C]
    for j in range(K):
        start = K - 1 - j
        xs = jax.lax.slice_in_dim(x_pad, start, start + L, axis=1)
        same = jax.lax.slice_in_dim(d_pad, start, start + L, axis=1) == doc_BxL
        out = out + scale_channels(jnp.where(same[..., None], xs.astype(jnp.float32), 0.0),
                                   w_KxC[K - 1 - j].astype(jnp.float32))
    return out


def ssd_chunked(x_BxLxHxP, dt_BxLxH, A_H, B_BxLxN, C_BxLxN, doc_BxL, chunk_size: int, dtype=jnp.float32):
    """Chunked SSD scan with document resets. Returns y [B, L, H, P] (fp32), without the D skip.

    ``dtype`` is the operand dtype of the large einsums (accumulation in fp32); decays are fp32.
    """
    Bsz, L, H, P = x_BxLxHxP.shape
    N = B_BxLxN.shape[-1]
    Q = chunk_size
    nc = -(-L // Q)
    pad = nc * Q - L
    if pad:
        x_BxLxHxP = jnp.pad(x_BxLxHxP, ((0, 0), (0, pad), (0, 0), (0, 0)))
        dt_BxLxH = jnp.pad(dt_BxLxH, ((0, 0), (0, pad), (0, 0)))
        B_BxLxN = jnp.pad(B_BxLxN, ((0, 0), (0, pad), (0, 0)))
        C_BxLxN = jnp.pad(C_BxLxN, ((0, 0), (0, pad), (0, 0)))
        doc_BxL = jnp.pad(doc_BxL, ((0, 0), (0, pad)), constant_values=-1)

    # Chunks of all rows on one axis G = B * nc (the inter-chunk scan alone splits it): per-head [Q, Q] work
    # is [G, H, Q, Q], so the batched matmul of step 1 needs no transpose of its [Q, Q] operand; states and
    # the carried-in output are token-major ([G, N, H*P] and [G, Q, H*P]), plain matmuls against C and B.
    # Against [B, H, nc, ...] decays and a three-operand einsum for the states, a Mamba-2 layer forward +
    # backward on CPU is 1.07x faster at B 8 x L 1024 and 1.21x at B 1 x L 8192, and hnet_1stage_tiny on v5e
    # accesses 17 % fewer bytes per chip (launch.aot). With B and nc apart, B = 1 ran 0.87x: the backward's
    # reductions into shapes with a leading 1 are slow on XLA:CPU (docs/benchmarks.md, session 11).
    f32 = jnp.float32
    G = Bsz * nc
    x = x_BxLxHxP.reshape(G, Q, H, P)
    dt = dt_BxLxH.astype(f32).reshape(G, Q, H)
    Bm = B_BxLxN.reshape(G, Q, N).astype(dtype)
    Cm = C_BxLxN.reshape(G, Q, N).astype(dtype)
    doc = doc_BxL.reshape(G, Q)

    # log-decay per step and its within-chunk cumsum over the same document only (earlier documents add
    # exact zeros, so the decays of one document are bit-for-bit independent of them): [G, H, Q].
    # A masked [Q, Q] matmul per chunk: the train step ran 1.02x faster than with an associative scan.
    a_GxHxQ = jnp.transpose(dt * A_H.astype(f32), (0, 2, 1))
    causal = jnp.tril(jnp.ones((Q, Q), bool))
    mask_GxQxQ = causal & (doc[:, :, None] == doc[:, None, :])
    acs = jnp.einsum("gts,ghs->ght", mask_GxQxQ.astype(f32), a_GxHxQ, precision="highest")

    xdt = (x.astype(f32) * dt[..., None]).astype(dtype)  # [G, Q, H, P]

    # 1) intra-chunk (diagonal blocks): y[t] = sum_{s<=t, same doc} C_t.B_s exp(acs_t - acs_s) dt_s x_s
    decay = jnp.exp(jnp.where(mask_GxQxQ[:, None], acs[..., :, None] - acs[..., None, :], -jnp.inf))
    cb = jnp.einsum("gtn,gsn->gts", Cm, Bm, preferred_element_type=f32)
    m_GxHxQxQ = (cb[:, None] * decay).astype(dtype)
    y_GxHxQxP = jnp.matmul(m_GxHxQxQ, jnp.transpose(xdt, (0, 2, 1, 3)), preferred_element_type=f32)
    y_diag = jnp.transpose(y_GxHxQxP, (0, 2, 1, 3))  # [G, Q, H, P]

    # 2) state produced by each chunk at its last position (only inputs from the last position's doc),
    # token-major: S_g [N, H*P] = B_g^T (xdt_g * decay to the chunk's end)
    doc_end_G = doc[:, -1]
    keep = (doc == doc_end_G[:, None])[:, None]  # [G, 1, Q]
    # (mask before exp: across a reset the difference can be large and positive -> inf -> NaN grads)
    decay_states = jnp.exp(jnp.where(keep, acs[..., -1:] - acs, -jnp.inf))  # [G, H, Q]
    w = (xdt.astype(f32) * jnp.transpose(decay_states, (0, 2, 1))[..., None]).astype(dtype)
    states = jnp.einsum("gsn,gsk->gnk", Bm, w.reshape(G, Q, H * P), preferred_element_type=f32)

    # 3) inter-chunk recurrence S_c = g_c * S_{c-1} + states_c within each row; carry only if the doc continues
    doc_end_BxC = doc_end_G.reshape(Bsz, nc)
    doc_prev_end_BxC = jnp.concatenate([jnp.full((Bsz, 1), -1, doc.dtype), doc_end_BxC[:, :-1]], axis=1)
    doc_prev_end_G = doc_prev_end_BxC.reshape(G)
    carry_ok = (doc_prev_end_G == doc_end_G)[:, None]  # [G, 1]
    g_GxH = jnp.exp(jnp.where(carry_ok, acs[..., -1], -jnp.inf))

    def combine(left, right):
        g1, s1 = left
        g2, s2 = right
        return g1 * g2, g2[:, :, None, :] * s1 + s2

    _, s_end = jax.lax.associative_scan(
        combine, (jnp.repeat(g_GxH, P, axis=-1).reshape(Bsz, nc, H * P), states.reshape(Bsz, nc, N, H * P)), axis=1)
    s_in = jnp.concatenate([jnp.zeros_like(s_end[:, :1]), s_end[:, :-1]], axis=1).reshape(G, N, H * P)

    # 4) output from the carried-in state: C_t . S_in * exp(acs_t), if t is still in the prev doc
    cont = (doc == doc_prev_end_G[:, None])[:, None]  # [G, 1, Q]
    out_decay = jnp.exp(jnp.where(cont, acs, -jnp.inf))  # [G, H, Q]
    y_off = jnp.matmul(Cm, s_in.astype(dtype), preferred_element_type=f32).reshape(G, Q, H, P)
    y_off = y_off * jnp.transpose(out_decay, (0, 2, 1))[..., None]

    y = (y_diag + y_off).reshape(Bsz, nc * Q, H, P)
    return y[:, :L]


# ----------------------------------------------------------------------------------------------
# module
# ----------------------------------------------------------------------------------------------


class Mamba2(nnx.Module):
    """Mamba-2 mixer: [B, L, d_model] -> [B, L, d_model] with packed-document resets.

    Args:
      d_model: model width. d_inner = expand * d_model, nheads = d_inner // headdim.
      d_state: SSM state size N. d_conv: conv width K. chunk_size: SSD chunk length Q.
      out_init_std: std of the out_proj init (H-Net scales it by 1/sqrt(n_res)).
      dtype: compute dtype; params in param_dtype; SSM decay math always fp32.
      length_axis: logical name of the sequence axis for the output constraint.
    """

    def __init__(
        self,
        d_model: int,
        *,
        d_state: int = 128,
        d_conv: int = 4,
        expand: int = 2,
        headdim: int = 64,
        chunk_size: int = 256,
        out_init_std: float = 0.02,
        norm_eps: float = 1e-5,
        length_axis: str | None = "byte_len",
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        d_inner = expand * d_model
        if d_inner % headdim:
            raise ValueError(f"d_inner={d_inner} not divisible by headdim={headdim}")
        self.d_model, self.d_state, self.d_conv, self.headdim = d_model, d_state, d_conv, headdim
        self.d_inner = d_inner
        self.nheads = d_inner // headdim
        self.chunk_size = chunk_size
        self.norm_eps = norm_eps
        self.length_axis = length_axis
        self.dtype, self.param_dtype = dtype, param_dtype
        self.conv_channels = d_inner + 2 * d_state
        d_in_proj = 2 * d_inner + 2 * d_state + self.nheads

        self.in_proj = Linear(
            d_model,
            d_in_proj,
            use_bias=False,
            kernel_init=param_init(nnx.initializers.normal(0.02), ("embed", "ssm_inner")),
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        bound = 1.0 / math.sqrt(d_conv)  # PyTorch Conv1d default (fan_in = d_conv for depthwise)
        self.conv_w = nnx.Param(
            param_init(_uniform_init(bound), ("conv", "ssm_inner"))(rngs.params(), (d_conv, self.conv_channels), param_dtype)
        )
        self.conv_b = nnx.Param(
            param_init(_uniform_init(bound), ("ssm_inner",))(rngs.params(), (self.conv_channels,), param_dtype)
        )
        self.dt_bias = nnx.Param(param_init(_dt_bias_init(), ("ssm_inner",))(rngs.params(), (self.nheads,), param_dtype))
        self.A_log = nnx.Param(param_init(_a_log_init(), ("ssm_inner",))(rngs.params(), (self.nheads,), param_dtype))
        self.D = nnx.Param(param_init(nnx.initializers.ones_init(), ("ssm_inner",))(rngs.params(), (self.nheads,), param_dtype))
        self.norm_scale = nnx.Param(
            param_init(nnx.initializers.ones_init(), ("ssm_inner",))(rngs.params(), (d_inner,), param_dtype)
        )
        self.out_proj = Linear(
            d_inner,
            d_model,
            use_bias=False,
            kernel_init=param_init(nnx.initializers.normal(out_init_std), ("ssm_inner", "embed")),
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    # -- shared pieces --------------------------------------------------------------------------

    def _split(self, zxbcdt):
        di, ch = self.d_inner, self.conv_channels
        return split_last(zxbcdt, di, di + ch)

    def _split_xbc(self, xbc):
        di, n = self.d_inner, self.d_state
        return split_last(xbc, di, di + n)

    def _gated_norm_out(self, y, z):
        """rmsnorm(y * silu(z)) * scale, then out_proj. y, z: [..., d_inner]."""
        g = y.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))
        g = g * jax.lax.rsqrt(jnp.mean(g * g, axis=-1, keepdims=True) + self.norm_eps)
        g = scale_channels(g, self.norm_scale[...].astype(jnp.float32))
        return self.out_proj(g.astype(self.dtype))

    # -- full sequence ---------------------------------------------------------------------------

    def __call__(self, x_BxLxD: jax.Array, segment_ids_BxL: jax.Array) -> jax.Array:
        """Full-sequence (training / prefill) path. x: [B, L, D], segment_ids: [B, L] int -> [B, L, D]."""
        Bsz, L, _ = x_BxLxD.shape
        H, P = self.nheads, self.headdim
        doc_BxL = doc_index(segment_ids_BxL)

        zxbcdt = self.in_proj(x_BxLxD.astype(self.dtype))
        z, xbc, dt_raw = self._split(zxbcdt)
        xbc = causal_conv_with_resets(xbc, self.conv_w[...], self.conv_b[...], doc_BxL)
        xbc = jax.nn.silu(xbc).astype(self.dtype)
        xs, Bm, Cm = self._split_xbc(xbc)

        dt_BxLxH = jax.nn.softplus(dt_raw.astype(jnp.float32) + self.dt_bias[...].astype(jnp.float32))
        A_H = -jnp.exp(self.A_log[...].astype(jnp.float32))
        x_BxLxHxP = xs.reshape(Bsz, L, H, P)

        y = ssd_chunked(x_BxLxHxP, dt_BxLxH, A_H, Bm, Cm, doc_BxL, self.chunk_size, self.dtype)
        y = y + self.D[...].astype(jnp.float32)[:, None] * x_BxLxHxP.astype(jnp.float32)
        out = self._gated_norm_out(y.reshape(Bsz, L, self.d_inner), z)
        return constrain(out, ("batch", self.length_axis, "act_embed"))

    # -- decoding --------------------------------------------------------------------------------

    def init_cache(self, batch_size: int) -> dict[str, jax.Array]:
        """Zero cache: conv [B, d_conv-1, conv_channels] (compute dtype), ssm [B, H, P, N] (fp32)."""
        return {
            "conv": jnp.zeros((batch_size, self.d_conv - 1, self.conv_channels), self.dtype),
            "ssm": jnp.zeros((batch_size, self.nheads, self.headdim, self.d_state), jnp.float32),
        }

    def step(self, x_BxD: jax.Array, cache: dict[str, jax.Array], reset_B: jax.Array):
        """One decoding step. x: [B, D]; reset_B: bool [B] (token starts a new document) -> (y [B, D], cache)."""
        Bsz = x_BxD.shape[0]
        H, P = self.nheads, self.headdim
        conv_state = jnp.where(reset_B[:, None, None], 0, cache["conv"])
        ssm_state = jnp.where(reset_B[:, None, None, None], 0.0, cache["ssm"])

        zxbcdt = self.in_proj(x_BxD.astype(self.dtype))
        z, xbc, dt_raw = self._split(zxbcdt)
        window = jnp.concatenate([conv_state, xbc[:, None, :].astype(conv_state.dtype)], axis=1)  # [B, K, C]
        conv_out = jnp.sum(window.astype(jnp.float32) * self.conv_w[...].astype(jnp.float32), axis=1)
        conv_out = conv_out + self.conv_b[...].astype(jnp.float32)
        xbc_act = jax.nn.silu(conv_out).astype(self.dtype)
        xs, Bm, Cm = self._split_xbc(xbc_act)

        dt_BxH = jax.nn.softplus(dt_raw.astype(jnp.float32) + self.dt_bias[...].astype(jnp.float32))
        A_H = -jnp.exp(self.A_log[...].astype(jnp.float32))
        x_BxHxP = xs.reshape(Bsz, H, P).astype(jnp.float32)
        dA = jnp.exp(dt_BxH * A_H)
        ssm_state = dA[..., None, None] * ssm_state + jnp.einsum(
            "bhp,bn->bhpn", x_BxHxP * dt_BxH[..., None], Bm.astype(jnp.float32)
        )
        y = jnp.einsum("bhpn,bn->bhp", ssm_state, Cm.astype(jnp.float32))
        y = y + self.D[...].astype(jnp.float32)[:, None] * x_BxHxP
        out = self._gated_norm_out(y.reshape(Bsz, self.d_inner), z)
        new_cache = {"conv": window[:, 1:], "ssm": ssm_state}
        return out, new_cache
