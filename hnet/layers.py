"""Shared backbone layers: RMSNorm, partial RoPE, causal attention with document resets, SwiGLU,
pre-norm blocks and isotropic stacks described by a layout string (``"T4"``, ``"m4"``, ``"T1m4"``).

Every stack is usable in two modes with identical maths:
  * full sequence: ``stack(x_BxLxD, segment_ids_BxL, positions_BxL)``;
  * incremental: ``stack.step(x_BxD, cache, reset_B)`` one position at a time, with per-row caches
    (the attention cache keeps its own per-row write pointer, so rows advance independently).

Conventions: segment_ids > 0 for real tokens (a new id per packed document), 0 for padding.
Attention never crosses a segment; positions restart at every document.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from hnet.attention import attention_mask, dot_product_attention, masked_attention, padded_tail_length
from hnet.sharding import constrain, param_init, target_platform, use_reference_kernels

Array = jax.Array


def normal(std: float):
    return nnx.initializers.normal(stddev=std)


def ste_one(c):
    """Straight-through: forward value exactly 1, gradient identity w.r.t. c."""
    return 1.0 + (c - jax.lax.stop_gradient(c))


def scale_channels(x_NxC: Array, scale_C: Array) -> Array:
    """``x * scale`` along the last axis, on x flattened to [N, C]: XLA:CPU reduces the gradient of
    ``scale`` over [N, C] well but over [1, L, C] (a batch of one row) 3x more slowly (issue 18)."""
    return (x_NxC.reshape(-1, x_NxC.shape[-1]) * scale_C).reshape(x_NxC.shape)


class Linear(nnx.Linear):
    """``nnx.Linear`` (same parameters) whose input goes in flattened to [N, in] on CPU. There, the kernel
    gradient of a [B, L, in] x [in, out] product contracts two axes: XLA:CPU copies the cotangent transposed
    and runs the dot outside XNNPACK. Flattened, it is one XNNPACK dot: forward + backward of [8, 1024, 128] x
    [128, 384] took 7.7 against 13.9 ms, the isotropic_tiny train step 1.19x faster (docs/benchmarks.md,
    session 11). Other backends keep the 3-D product (unmeasured there)."""

    def __call__(self, inputs, out_sharding=None):
        if inputs.ndim <= 2 or target_platform() != "cpu":
            return super().__call__(inputs, out_sharding=out_sharding)
        y = super().__call__(inputs.reshape(-1, inputs.shape[-1]), out_sharding=out_sharding)
        return y.reshape(*inputs.shape[:-1], self.out_features)


# rows (batch x slots) per block of a padded-tail stack's position-wise parts (``over_live_blocks``): at
# L = 1024, B = 8 blocks of 64 slots beat 32 and 128; at L = 8192, B = 1, 512 slots beat 64 (1.12x vs 1.0x)
LIVE_BLOCK_ROWS = 512


def live_block(batch: int, slots: int) -> int:
    """Slots per block for ``over_live_blocks``: the largest power of two ≤ LIVE_BLOCK_ROWS / batch;
    0 (no blocks) unless it divides ``slots`` at least twice."""
    block = 1 << max(0, (LIVE_BLOCK_ROWS // batch).bit_length() - 1)
    return block if slots % block == 0 and slots >= 2 * block else 0


def over_live_blocks(f, n_live: Array, block: int, *xs_BxMx_):
    """``f(*xs)`` for position-wise ``f`` over slot blocks [i·T, (i+1)·T) that start before ``n_live`` (the
    batch's last live slot + 1); the blocks after it give zeros. Each x is [B, M, ...] with M a multiple of
    T = ``block``; -> f's output(s), [B, M, ...] each. A ``lax.scan`` over the M / T blocks with a
    ``lax.cond`` per block, so the forward and the backward both skip the dead blocks. The blocks travel as
    the scan's inputs, not as slices of closed-over arrays, whose cotangents the backward would accumulate in
    full-size buffers at every step."""
    B, M = xs_BxMx_[0].shape[:2]
    nb = M // block
    blocks = [jnp.moveaxis(x.reshape(B, nb, block, *x.shape[2:]), 1, 0) for x in xs_BxMx_]  # [nb, B, T, ...]
    shapes = jax.eval_shape(f, *(b[0] for b in blocks))

    def body(_, i_blk):
        i, blk = i_blk
        dead = lambda *a: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)  # noqa: E731
        return None, jax.lax.cond(i * block < n_live, f, dead, *blk)

    _, ys = jax.lax.scan(body, None, (jnp.arange(nb), tuple(blocks)))
    return jax.tree.map(lambda y: jnp.moveaxis(y, 0, 1).reshape(B, M, *y.shape[3:]), ys)


class RMSNorm(nnx.Module):
    """y = x / sqrt(mean(x^2) + eps) * scale, computed in fp32, returned in ``out_dtype``."""

    def __init__(self, dim: int, *, eps: float = 1e-5, out_dtype=jnp.float32, param_dtype=jnp.float32):
        self.eps = eps
        self.out_dtype = out_dtype
        self.scale = nnx.Param(param_init(nnx.initializers.ones, ("norm",))(None, (dim,), param_dtype))

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale_channels(y, self.scale[...].astype(jnp.float32)).astype(self.out_dtype)


def apply_rope(x_BxLxHxK: Array, positions_BxL: Array, rotary_dim: int, base: float = 10000.0) -> Array:
    """Non-interleaved (NeoX rotate-half) RoPE on the first ``rotary_dim`` channels of each head."""
    if rotary_dim == 0:
        return x_BxLxHxK
    half = rotary_dim // 2
    inv_freq = 1.0 / (base ** (jnp.arange(half, dtype=jnp.float32) * 2.0 / rotary_dim))
    ang_BxLxR = positions_BxL.astype(jnp.float32)[..., None] * inv_freq
    cos, sin = jnp.cos(ang_BxLxR)[:, :, None, :], jnp.sin(ang_BxLxR)[:, :, None, :]
    xr = x_BxLxHxK[..., :rotary_dim].astype(jnp.float32)
    x1, x2 = xr[..., :half], xr[..., half:]
    rot = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return jnp.concatenate([rot.astype(x_BxLxHxK.dtype), x_BxLxHxK[..., rotary_dim:]], axis=-1)


class AttentionScoreReg(nnx.Variable):
    """Non-param statistic written by ``Attention.__call__``: mean(max(s, m) - m) of the raw scores (MrT5 App. D)."""


class Attention(nnx.Module):
    """Causal multi-head attention with partial RoPE, segment masking, sliding window and an optional
    additive key bias (MrT5 soft deletion: logits[b,h,q,k] += key_bias[b,k]).

    ``softmax1``: e^{s_j} / (1 + Σ_k e^{s_k}), i.e. an always-visible zero-logit, zero-value sink key.
    ``causal`` False: bidirectional within each segment (encoders; ``step`` stays causal-only).
    ``score_margin`` m (not None): every full forward stores mean over unmasked scores of max(s, m) - m
    (raw scores q·k/√d before the key bias) in ``self.score_reg`` (an ``AttentionScoreReg`` variable).
    ``padded_tail``: each row's padding (segment 0) is a tail whose outputs the caller discards (H-Net's
    compacted chunks), so the kernel may skip it (``hnet.attention.dot_product_attention``).
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        *,
        rotary_dim: int | None = None,
        window: int = -1,
        out_init_std: float = 0.02,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        length_axis: str = "byte_len",
        softmax1: bool = False,
        score_margin: float | None = None,
        causal: bool = True,
        impl: str = "auto",
        padded_tail: bool = False,
        rngs: nnx.Rngs,
    ):
        assert d_model % num_heads == 0, (d_model, num_heads)
        self.softmax1, self.score_margin, self.causal, self.impl = softmax1, score_margin, causal, impl
        self.padded_tail = padded_tail
        self.score_reg = AttentionScoreReg(jnp.zeros((), jnp.float32)) if score_margin is not None else None
        self.num_heads, self.head_dim = num_heads, d_model // num_heads
        self.rotary_dim = self.head_dim if rotary_dim is None else rotary_dim
        self.window, self.dtype, self.length_axis = window, dtype, length_axis
        self.wqkv = Linear(
            d_model, 3 * d_model, use_bias=False, dtype=dtype, param_dtype=param_dtype,
            kernel_init=param_init(normal(0.02), ("embed", "heads")), rngs=rngs)
        self.out = Linear(
            d_model, d_model, use_bias=False, dtype=dtype, param_dtype=param_dtype,
            kernel_init=param_init(normal(out_init_std), ("heads", "embed")), rngs=rngs)

    def qkv(self, x_BxLxD, positions_BxL):
        """x [B, L, D] -> q, k, v [B, L, H, K], q and k rotated (RoPE at ``positions_BxL``)."""
        B, L, _ = x_BxLxD.shape
        qkv = self.wqkv(x_BxLxD.astype(self.dtype)).reshape(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q = apply_rope(q, positions_BxL, self.rotary_dim)
        k = apply_rope(k, positions_BxL, self.rotary_dim)
        return q, k, v

    def _attend(self, q_BxQxHxK, k_BxSxHxK, v_BxSxHxK, mask_Bx1xQxS, key_bias_BxS=None, record: bool = False):
        """Dense attention under an explicit mask (decoding, cross-attention); ``record``: store the score
        regulariser."""
        o, reg = masked_attention(q_BxQxHxK, k_BxSxHxK, v_BxSxHxK, mask_Bx1xQxS, softmax1=self.softmax1,
                                  key_bias_BxS=key_bias_BxS,
                                  score_margin=self.score_margin if record and self.score_reg is not None else None)
        if reg is not None:
            # a new Variable, not an in-place write: the caller's state variables may belong to an outer trace
            self.score_reg = AttentionScoreReg(reg)
        return o

    def __call__(self, x_BxLxD, segment_ids_BxL, positions_BxL, key_bias_BxL=None):
        q, k, v = self.qkv(x_BxLxD, positions_BxL)
        return self.out(self.attend(q, k, v, segment_ids_BxL, key_bias_BxL))

    def attend(self, q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, segment_ids_BxL, key_bias_BxL=None):
        """Self-attention of projected q, k, v (``qkv``) -> o_BxLxD, before the output projection."""
        B, L, H, K = q_BxLxHxK.shape
        q = constrain(q_BxLxHxK, ("batch", self.length_axis, "act_heads", "act_kv"))
        k, v = k_BxLxHxK, v_BxLxHxK
        if self.score_reg is not None:  # the kernels do not expose the scores: dense
            idx = jnp.broadcast_to(jnp.arange(L)[None], (B, L))
            mask = attention_mask(segment_ids_BxL, segment_ids_BxL, idx, idx, self.window, self.causal)
            o = self._attend(q, k, v, mask, key_bias_BxL, record=True)
        else:
            o = dot_product_attention(q, k, v, q_segment_ids_BxQ=segment_ids_BxL, k_segment_ids_BxS=segment_ids_BxL,
                                      causal=self.causal, window=self.window, softmax1=self.softmax1,
                                      key_bias_BxS=key_bias_BxL, impl=self.impl, padded_tail=self.padded_tail)
        return o.reshape(B, L, H * K)

    # ----- incremental decoding -----
    def init_cache(self, batch_size: int, max_len: int) -> dict:
        shape = (batch_size, max_len, self.num_heads, self.head_dim)
        zeros_b = jnp.zeros((batch_size,), jnp.int32)
        return {"k": jnp.zeros(shape, self.dtype), "v": jnp.zeros(shape, self.dtype), "pos": zeros_b, "start": zeros_b}

    def step(self, x_BxD, cache, reset_B, positions_B=None):
        """One position per row. ``pos`` is the row's next cache slot, ``start`` its document start slot.
        RoPE uses ``positions_B`` when given (MrT5 keeps original positions), else the slot offset pos - start."""
        B, D = x_BxD.shape
        pos, start = cache["pos"], jnp.where(reset_B, cache["pos"], cache["start"])
        q, k, v = self.qkv(x_BxD[:, None], (pos - start if positions_B is None else positions_B)[:, None])
        write = jax.nn.one_hot(pos, cache["k"].shape[1], dtype=cache["k"].dtype)[:, :, None, None]
        k_cache = cache["k"] * (1 - write) + write * k
        v_cache = cache["v"] * (1 - write) + write * v
        slots = jnp.arange(cache["k"].shape[1])[None]
        ok = (slots <= pos[:, None]) & (slots >= start[:, None])
        if self.window >= 0:
            ok &= pos[:, None] - slots <= self.window
        o = self._attend(q, k_cache, v_cache, ok[:, None, None, :])
        y = self.out(o.reshape(B, 1, D))[:, 0]
        return y, {"k": k_cache, "v": v_cache, "pos": pos + 1, "start": start}


class SwiGLU(nnx.Module):
    """fc1: D -> 2F split as [value | gate]; y = fc2(silu(gate) * value)."""

    def __init__(self, d_model, d_ff, *, out_init_std=0.02, dtype=jnp.float32, param_dtype=jnp.float32, rngs):
        self.dtype = dtype
        self.fc1 = Linear(d_model, 2 * d_ff, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                          kernel_init=param_init(normal(0.02), ("embed", "mlp")), rngs=rngs)
        self.fc2 = Linear(d_ff, d_model, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                          kernel_init=param_init(normal(out_init_std), ("mlp", "embed")), rngs=rngs)

    def __call__(self, x):
        value, gate = jnp.split(self.fc1(x.astype(self.dtype)), 2, axis=-1)
        return self.fc2(jax.nn.silu(gate) * value)


# ----------------------------------------------------------------------------------------------
# Layout strings and stacks
# ----------------------------------------------------------------------------------------------

_LAYOUT_TOKEN = re.compile(r"([mMtT])(\d+)")


def parse_layout(layout: str) -> list[tuple[str, bool]]:
    """``"T1m4"`` -> [('t', True), ('m', False) x4]: letter = mixer, uppercase = with SwiGLU."""
    if not layout or _LAYOUT_TOKEN.sub("", layout):
        raise ValueError(f"bad layer layout {layout!r}; expected tokens like 'm4', 'T22', 'T1m4'")
    out = []
    for letter, count in _LAYOUT_TOKEN.findall(layout):
        out += [(letter.lower(), letter.isupper())] * int(count)
    return out


def layout_height(layout: str) -> int:
    """Residual-branch count of a stack (1 per mixer-only layer, 2 per layer with an MLP)."""
    return sum(2 if mlp else 1 for _, mlp in parse_layout(layout))


@dataclasses.dataclass(frozen=True)
class StackConfig:
    """Hyper-parameters of one isotropic stack (one H-Net stage network, or the whole isotropic LM)."""

    layout: str = "T4"
    d_model: int = 256
    d_ff: int = 0  # SwiGLU width (rounded up to a multiple of 128 if > 128); 0 only for mixer-only layouts
    num_heads: int = 4
    rotary_dim: int | None = None  # None = full head dim
    window: int = -1  # attention sees this many previous positions (-1 = global)
    softmax1: bool = False  # attention with a zero-logit, zero-value sink (MrT5)
    score_margin: float | None = None  # record the attention-score regulariser (MrT5 App. D)
    causal: bool = True  # False: bidirectional attention within each segment (full forward only; no step)
    attention_impl: str = "auto"  # hnet.attention IMPLS: 'auto' | 'dense' | 'splash' | 'cudnn' | 'blockwise'
    padded_tail: bool = False  # rows end in padding whose outputs are discarded: attention may skip it
    ssm_d_state: int = 128
    ssm_d_conv: int = 4
    ssm_expand: int = 2
    ssm_headdim: int = 64
    ssm_chunk_size: int = 256


def _round_ff(d_ff: int) -> int:
    return d_ff if d_ff <= 128 else 128 * math.ceil(d_ff / 128)


class Block(nnx.Module):
    """Pre-norm residual block; the residual stream stays fp32: x += mixer(norm1(x)); x += mlp(norm2(x))."""

    def __init__(self, kind: str, has_mlp: bool, cfg: StackConfig, *, out_init_std, dtype, param_dtype,
                 length_axis, rngs):
        self.kind, self.padded_tail = kind, cfg.padded_tail
        self.norm1 = RMSNorm(cfg.d_model, out_dtype=dtype, param_dtype=param_dtype)
        if kind == "t":
            self.mixer = Attention(cfg.d_model, cfg.num_heads, rotary_dim=cfg.rotary_dim, window=cfg.window,
                                   out_init_std=out_init_std, dtype=dtype, param_dtype=param_dtype,
                                   length_axis=length_axis, softmax1=cfg.softmax1, score_margin=cfg.score_margin,
                                   causal=cfg.causal, impl=cfg.attention_impl, padded_tail=cfg.padded_tail,
                                   rngs=rngs)
        else:
            from hnet.mamba2 import Mamba2

            self.mixer = Mamba2(cfg.d_model, d_state=cfg.ssm_d_state, d_conv=cfg.ssm_d_conv, expand=cfg.ssm_expand,
                                headdim=cfg.ssm_headdim, chunk_size=cfg.ssm_chunk_size, out_init_std=out_init_std,
                                dtype=dtype, param_dtype=param_dtype, length_axis=length_axis, rngs=rngs)
        if has_mlp:
            self.norm2 = RMSNorm(cfg.d_model, out_dtype=dtype, param_dtype=param_dtype)
            self.mlp = SwiGLU(cfg.d_model, _round_ff(cfg.d_ff), out_init_std=out_init_std, dtype=dtype,
                              param_dtype=param_dtype, rngs=rngs)
        else:
            self.norm2 = self.mlp = None

    def _mix(self, h, segment_ids, positions, key_bias):
        if self.kind == "t":
            return self.mixer(h, segment_ids, positions, key_bias)
        return self.mixer(h, segment_ids)

    def _add_mlp(self, x):
        return x if self.mlp is None else x + self.mlp(self.norm2(x)).astype(jnp.float32)

    def __call__(self, x_BxLxD, segment_ids_BxL, positions_BxL, key_bias_BxL=None):
        skip = self.padded_tail and target_platform() == "cpu" and not use_reference_kernels()
        block = live_block(*x_BxLxD.shape[:2]) if skip else 0
        if block:  # padded tail: the position-wise parts skip the slot blocks after the batch's last live slot
            n_live = padded_tail_length(segment_ids_BxL)
            live = lambda f, *xs: over_live_blocks(f, n_live, block, *xs)  # noqa: E731
            if self.kind == "t":
                q, k, v = live(lambda x, p: self.mixer.qkv(self.norm1(x), p), x_BxLxD, positions_BxL)
                o = self.mixer.attend(q, k, v, segment_ids_BxL, key_bias_BxL)
                return live(lambda x, o: self._add_mlp(x + self.mixer.out(o).astype(jnp.float32)), x_BxLxD, o)
        x = x_BxLxD + self._mix(self.norm1(x_BxLxD), segment_ids_BxL, positions_BxL, key_bias_BxL).astype(jnp.float32)
        return live(self._add_mlp, x) if block else self._add_mlp(x)

    def init_cache(self, batch_size, max_len):
        if self.kind == "t":
            return self.mixer.init_cache(batch_size, max_len)
        return self.mixer.init_cache(batch_size)

    def step(self, x_BxD, cache, reset_B, positions_B=None):
        if self.kind == "t":
            y, cache = self.mixer.step(self.norm1(x_BxD), cache, reset_B, positions_B)
        else:
            y, cache = self.mixer.step(self.norm1(x_BxD), cache, reset_B)
        x = x_BxD + y.astype(jnp.float32)
        if self.mlp is not None:
            x = x + self.mlp(self.norm2(x)).astype(jnp.float32)
        return x, cache


def remat_policy(remat: bool | str):
    """``remat`` True: recompute everything in the backward pass; a name of ``jax.checkpoint_policies``
    (e.g. 'dots_with_no_batch_dims_saveable'): save what that policy saves."""
    if isinstance(remat, str):
        if not hasattr(jax.checkpoint_policies, remat):
            raise ValueError(f"remat policy {remat!r} is not in jax.checkpoint_policies")
        return getattr(jax.checkpoint_policies, remat)
    return None


class Stack(nnx.Module):
    """Isotropic stack of blocks from a layout string, ending with an RMSNorm (fp32 output).

    ``remat``: per-block rematerialisation, False / True / a ``jax.checkpoint_policies`` name.
    out_proj/fc2 use N(0, 0.02 / sqrt(n_res)); ``n_res`` defaults to the stack's own residual count
    (H-Net passes the count cumulative down the hierarchy).
    """

    def __init__(self, cfg: StackConfig, *, n_res: int | None = None, dtype=jnp.float32, param_dtype=jnp.float32,
                 length_axis: str = "byte_len", remat: bool | str = False, rngs: nnx.Rngs):
        self.cfg, self.length_axis, self.remat = cfg, length_axis, remat
        self.n_res = n_res or layout_height(cfg.layout)
        std = 0.02 / math.sqrt(self.n_res)
        self.blocks = nnx.List([
            Block(kind, mlp, cfg, out_init_std=std, dtype=dtype, param_dtype=param_dtype,
                  length_axis=length_axis, rngs=rngs)
            for kind, mlp in parse_layout(cfg.layout)
        ])
        self.final_norm = RMSNorm(cfg.d_model, out_dtype=jnp.float32, param_dtype=param_dtype)

    def __call__(self, x_BxLxD, segment_ids_BxL, positions_BxL, key_bias_BxL=None):
        x = x_BxLxD.astype(jnp.float32)
        for block in self.blocks:
            if self.remat:
                x = nnx.remat(lambda b, *a: b(*a), policy=remat_policy(self.remat))(
                    block, x, segment_ids_BxL, positions_BxL, key_bias_BxL)
            else:
                x = block(x, segment_ids_BxL, positions_BxL, key_bias_BxL)
            x = constrain(x, ("batch", self.length_axis, "act_embed"))
        return self.final_norm(x)

    def init_cache(self, batch_size: int, max_len: int) -> list[Any]:
        return [b.init_cache(batch_size, max_len) for b in self.blocks]

    def step(self, x_BxD, cache, reset_B, positions_B=None):
        x = x_BxD.astype(jnp.float32)
        new = []
        for block, c in zip(self.blocks, cache):
            x, c = block.step(x, c, reset_B, positions_B)
            new.append(c)
        return self.final_norm(x), new
