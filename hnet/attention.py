"""Dot-product attention with document (segment) masking, causal and local-window masks: one dispatcher
over a dense jnp reference and the accelerator kernels.

    dot_product_attention(q_BxQxHxK, k_BxSxHxK, v_BxSxHxK, *, q_segment_ids_BxQ, k_segment_ids_BxS,
                          causal, window, softmax1, key_bias_BxS, impl) -> o_BxQxHxK

Query i sees key j iff seg_q[i] == seg_k[j], (not causal or j <= i) and (window < 0 or |i - j| <= window);
q and k positions are their indices. ``impl``:
    * 'dense':  jnp, [B, H, Q, S] logits in f32 (the reference; CPU).
    * 'splash': Pallas splash attention (``jax.experimental.pallas.ops.tpu.splash_attention``; TPU):
                segment ids, causal / local masks, never materialises [Q, S].
    * 'cudnn':  ``jax.nn.dot_product_attention(implementation='cudnn')`` (GPU flash attention; bf16/fp16,
                head dim a multiple of 8; the segment mask goes in as a [B, 1, Q, S] bias).
    * 'blockwise': ``hnet.kernels.blockwise_attention`` (XLA:CPU; every feature; no [Q, S] tensor, no work
                on tiles the causal mask, the window or a padded tail rule out).
    * 'auto':   by the target platform (``hnet.sharding.target_platform``: the mesh's devices): splash on
                TPU, cudnn on GPU, on CPU blockwise for self-attention of length >= ``BLOCKWISE_MIN_LEN``
                (dense below: one tile saves nothing), and dense wherever
                the kernel lacks a feature (softmax1, key_bias), a shape (splash: Q and S multiples of 128) or a
                dtype (cudnn: no fp32).
New kernels are one more entry of ``_KERNELS`` plus a line in ``_supports``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from hnet.kernels.blockwise_attention import blockwise_attention, padded_tail_length
from hnet.sharding import mesh_axes, target_platform, use_reference_kernels

NEG_INF = -1e30
IMPLS = ("auto", "dense", "splash", "cudnn", "blockwise")
_SPLASH_BLOCK = 128
# CPU train step of isotropic_tiny, blockwise vs dense (docs/benchmarks.md, issue 18): 1.02x at L = 128
# (noise), 1.17x at 256; the gain grows with L.
BLOCKWISE_MIN_LEN = 256


def attention_mask(q_seg_BxQ, k_seg_BxK, q_idx_BxQ, k_idx_BxK, window: int, causal: bool = True) -> jax.Array:
    """[B,1,Q,K] bool: causal (unless ``causal`` is False), same segment, and within ``window`` positions
    (-1 = global)."""
    same = q_seg_BxQ[:, :, None] == k_seg_BxK[:, None, :]
    delta = q_idx_BxQ[:, :, None] - k_idx_BxK[:, None, :]
    ok = same & (delta >= 0) if causal else same
    if window >= 0:
        ok &= jnp.abs(delta) <= window
    return ok[:, None]


def masked_attention(q_BxQxHxK, k_BxSxHxK, v_BxSxHxK, mask_Bx1xQxS, *, softmax1: bool = False,
                     key_bias_BxS=None, score_margin: float | None = None):
    """Dense attention under an explicit mask. -> (o_BxQxHxK, score_reg).

    ``softmax1``: e^{s_j} / (1 + Σ_k e^{s_k}) (a zero-logit, zero-value sink key). ``key_bias_BxS`` is added
    to the logits. ``score_margin`` m: score_reg = mean over unmasked raw scores s = q·k/√d of max(s, m) - m
    (MrT5 App. D), else None."""
    scale = 1.0 / math.sqrt(q_BxQxHxK.shape[-1])
    # head-major batched matmuls (3x faster than the equivalent einsum on XLA:CPU)
    q_BxHxQxK, k_BxHxSxK = q_BxQxHxK.transpose(0, 2, 1, 3), k_BxSxHxK.transpose(0, 2, 1, 3)
    logits = jnp.matmul(q_BxHxQxK, k_BxHxSxK.transpose(0, 1, 3, 2), preferred_element_type=jnp.float32) * scale
    score_reg = None
    if score_margin is not None:
        mask = jnp.broadcast_to(mask_Bx1xQxS, logits.shape)
        excess = jnp.where(mask, jnp.maximum(logits, score_margin) - score_margin, 0.0)
        score_reg = jnp.sum(excess) / jnp.maximum(jnp.sum(mask), 1)
    if key_bias_BxS is not None:
        logits = logits + key_bias_BxS[:, None, None, :].astype(jnp.float32)
    logits = jnp.where(mask_Bx1xQxS, logits, NEG_INF)
    if softmax1:
        logits = jnp.concatenate([logits, jnp.zeros_like(logits[..., :1])], axis=-1)
    probs = jax.nn.softmax(logits, axis=-1)
    if softmax1:
        probs = probs[..., :-1]
    o_BxHxQxK = jnp.matmul(probs.astype(v_BxSxHxK.dtype), v_BxSxHxK.transpose(0, 2, 1, 3))
    return o_BxHxQxK.transpose(0, 2, 1, 3), score_reg


def _positions(seg_BxN):
    return jnp.broadcast_to(jnp.arange(seg_BxN.shape[1])[None], seg_BxN.shape)


def _dense(q, k, v, *, q_segment_ids_BxQ, k_segment_ids_BxS, causal, window, softmax1, key_bias_BxS):
    mask = attention_mask(q_segment_ids_BxQ, k_segment_ids_BxS, _positions(q_segment_ids_BxQ),
                          _positions(k_segment_ids_BxS), window, causal)
    return masked_attention(q, k, v, mask, softmax1=softmax1, key_bias_BxS=key_bias_BxS)[0]


def _splash_mask(q_len: int, s_len: int, causal: bool, window: int):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    shape = (q_len, s_len)
    if window >= 0:
        return sa.LocalMask(shape, (window, 0 if causal else window), offset=0)
    return sa.CausalMask(shape) if causal else sa.FullMask(shape)


def _splash_local(q_BxQxHxK, k_BxSxHxK, v_BxSxHxK, qseg_BxQ, kseg_BxS, *, causal, window, interpret=False):
    """Splash attention on one device's shard (vmapped over its rows); ``interpret`` runs it on CPU."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    _, Q, H, K = q_BxQxHxK.shape
    mask = sa.MultiHeadMask([_splash_mask(Q, k_BxSxHxK.shape[1], causal, window)] * H)
    kernel = sa.make_splash_mha(mask, head_shards=1, q_seq_shards=1, interpret=interpret)

    def one(q_QxHxK, k_SxHxK, v_SxHxK, qs_Q, ks_S):
        o_HxQxK = kernel((q_QxHxK / math.sqrt(K)).transpose(1, 0, 2), k_SxHxK.transpose(1, 0, 2),
                         v_SxHxK.transpose(1, 0, 2), segment_ids=sa.SegmentIds(qs_Q, ks_S))
        return o_HxQxK.transpose(1, 0, 2)

    return jax.vmap(one)(q_BxQxHxK, k_BxSxHxK, v_BxSxHxK, qseg_BxQ.astype(jnp.int32), kseg_BxS.astype(jnp.int32))


def _splash(q, k, v, *, q_segment_ids_BxQ, k_segment_ids_BxS, causal, window, softmax1, key_bias_BxS):
    del softmax1, key_bias_BxS  # unsupported: _supports routes those to dense
    fn = functools.partial(_splash_local, causal=causal, window=window)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or mesh.manual_axes:
        return fn(q, k, v, q_segment_ids_BxQ, k_segment_ids_BxS)
    # A pallas_call is not auto-partitioned: each device runs its rows and heads, placed as the rules place
    # 'batch' and 'act_heads' (heads replicated when they do not divide).
    P = jax.sharding.PartitionSpec
    batch = mesh_axes("batch", mesh) or None
    heads = mesh_axes("act_heads", mesh)
    heads = heads if heads and q.shape[2] % math.prod(mesh.shape[a] for a in heads) == 0 else None
    qkv, seg = P(batch, None, heads, None), P(batch, None)
    return jax.shard_map(fn, mesh=mesh, in_specs=(qkv, qkv, qkv, seg, seg), out_specs=qkv, check_vma=False)(
        q, k, v, q_segment_ids_BxQ, k_segment_ids_BxS)


def _cudnn(q, k, v, *, q_segment_ids_BxQ, k_segment_ids_BxS, causal, window, softmax1, key_bias_BxS):
    del softmax1, key_bias_BxS  # unsupported: _supports routes those to dense
    same_Bx1xQxS = (q_segment_ids_BxQ[:, :, None] == k_segment_ids_BxS[:, None, :])[:, None]
    return jax.nn.dot_product_attention(q, k, v, mask=same_Bx1xQxS, is_causal=causal,
                                        local_window_size=(window, 0) if window >= 0 else None,
                                        implementation="cudnn")


_KERNELS = {"dense": _dense, "splash": _splash, "cudnn": _cudnn, "blockwise": blockwise_attention}


def _supports(impl: str, q_BxQxHxK, k_BxSxHxK, *, causal, window, softmax1, key_bias_BxS) -> bool:
    if impl in ("dense", "blockwise"):
        return True
    if softmax1 or key_bias_BxS is not None:
        return False
    if impl == "splash":
        return q_BxQxHxK.shape[1] % _SPLASH_BLOCK == 0 and k_BxSxHxK.shape[1] % _SPLASH_BLOCK == 0
    if impl == "cudnn":  # cuDNN flash attention: fp16/bf16, head dim a multiple of 8 up to 128 (256 on Hopper)
        (Q, K), S = q_BxQxHxK.shape[1::2], k_BxSxHxK.shape[1]
        shape_ok = K % 8 == 0 and K <= 128 and Q % 2 == 0 and S % 2 == 0  # even lengths: the mask is a bias
        dtype_ok = q_BxQxHxK.dtype in (jnp.bfloat16, jnp.float16)
        return shape_ok and dtype_ok and (causal or window < 0)  # its window is left-only with a causal mask
    return False


def resolve_impl(impl: str, q_BxQxHxK, k_BxSxHxK, **features) -> str:
    """The kernel ``impl`` names ('auto': by target platform, dense where the kernel cannot; always dense
    inside ``hnet.sharding.reference_kernels``)."""
    if impl not in IMPLS:
        raise ValueError(f"attention impl must be one of {IMPLS}, got {impl!r}")
    if use_reference_kernels():
        return "dense"
    if impl != "auto":
        return impl
    platform = target_platform()
    kernel = {"tpu": "splash", "gpu": "cudnn"}.get(platform, "dense")
    if platform == "cpu" and q_BxQxHxK.shape[1] == k_BxSxHxK.shape[1] >= BLOCKWISE_MIN_LEN:
        kernel = "blockwise"
    return kernel if _supports(kernel, q_BxQxHxK, k_BxSxHxK, **features) else "dense"


def dot_product_attention(q_BxQxHxK, k_BxSxHxK, v_BxSxHxK, *, q_segment_ids_BxQ, k_segment_ids_BxS,
                          causal: bool = True, window: int = -1, softmax1: bool = False, key_bias_BxS=None,
                          impl: str = "auto", padded_tail: bool = False):
    """Segment-masked attention (see the module docstring). q/k/v any float dtype; -> o_BxQxHxK in v's dtype.
    ``padded_tail``: the caller discards the outputs of padding queries (segment 0), which trail each row:
    'blockwise' then skips the query tiles after the batch's last real query (``skip_padding``; padding
    outputs are 0 there instead of padding attending to padding); the other kernels compute them as usual."""
    features = dict(causal=causal, window=window, softmax1=softmax1, key_bias_BxS=key_bias_BxS)
    impl = resolve_impl(impl, q_BxQxHxK, k_BxSxHxK, **features)
    kw = {"skip_padding": True} if padded_tail and impl == "blockwise" else {}
    return _KERNELS[impl](q_BxQxHxK, k_BxSxHxK, v_BxSxHxK, q_segment_ids_BxQ=q_segment_ids_BxQ,
                          k_segment_ids_BxS=k_segment_ids_BxS, **features, **kw)


__all__ = ["IMPLS", "attention_mask", "dot_product_attention", "masked_attention", "padded_tail_length",
           "resolve_impl"]
