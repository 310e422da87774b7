"""Chunk compaction and expansion with a static capacity M: the one op every chunker reuses.

A boundary mask ``mask[b, t]`` (True where a new chunk starts at byte t) defines chunks as
the contiguous runs [p_j, p_{j+1}) between boundary positions p_0 < p_1 < ... . With

        cid[b, t] = cumsum(mask[b])[t] - 1           (chunk id of byte t; -1 before p_0)

    * compact:  z[b, j] = x[b, p_j]        for j < min(n_b, M), else 0          [B, M, D]
    * expand:   y[b, t] = z[b, cid[b, t]]  if 0 <= cid[b, t] < M, else 0        [B, L, D]

where n_b = number of boundaries in row b. Chunks past M are dropped (their bytes expand
to zeros; ``overflow`` reports them). Everything has static shapes, is jit-able, and uses
no boolean indexing and no host sync.

Both directions are row gathers (``hnet.kernels.gather_rows``), and so are their
gradients (custom VJPs):
    * d compact:  dx[t] = keep[t] * dz[cid[t]],   keep = mask & (cid < M)   (expansion gather)
    * d expand:   dz[j] = sum_{t: cid[t]=j} g[t] = C[e_j] - C[e_{j-1}], with C = cumsum(g) in f32
                                over bytes with 0 <= cid < M and e_j the last byte of chunk j
                                (compaction gather at run ends, then a difference).

``impl`` picks the gather: 'jnp' (``jnp.take_along_axis``), 'pallas' (Pallas kernel for
the current backend; on CPU the TPU kernel in interpret mode), or 'pallas:tpu' /
'pallas:gpu' to force one kernel (interpret mode on CPU). ``None`` (the default) means ``default_impl()``: the kernel on TPU, jnp on CPU and GPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from hnet.kernels.gather_rows import default_backend as _kernel_backend
from hnet.kernels.gather_rows import gather_rows as _gather_rows
from hnet.kernels.gather_rows import gather_rows_sharded as _gather_rows_sharded
from hnet.kernels.gather_rows import reference_gather_rows as _reference_gather_rows
from hnet.sharding import target_platform, use_reference_kernels

__all__ = [
    "chunk_ids",
    "compaction_indices",
    "compact",
    "compact_ids",
    "expand",
    "overflow",
    "take_chunks",
    "default_impl",
    "set_default_impl",
    "reference_compact",
    "reference_expand",
]

_IMPLS = ("jnp", "pallas", "pallas:tpu", "pallas:gpu")
_default_impl_override: str | None = None


def default_impl() -> str:
    """'pallas' on TPU (the target platform: the current mesh's devices, so an ahead-of-time compile for a
    TPU topology on a CPU host gets the kernel), 'jnp' on CPU and GPU, unless overridden with
    ``set_default_impl``. On an H200 (docs/benchmarks.md, "GPU") the Triton gather beats XLA's alone, but
    compact + expand forward + backward took 2.90 ms with it against 1.75 ms with jnp, and the bf16 H-Net
    train step 62.8 against 61.2 ms."""
    if _default_impl_override is not None:
        return _default_impl_override
    return "pallas" if target_platform() == "tpu" else "jnp"


def set_default_impl(impl: str | None) -> None:
    """Overrides ``default_impl()`` (``None`` restores the per-backend default)."""
    if impl is not None and impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
    global _default_impl_override
    _default_impl_override = impl


def _gather(x_BxLxD: jax.Array, idx_BxM: jax.Array, impl: str) -> jax.Array:
    """out[b, j] = x[b, idx[b, j]] with the chosen implementation. idx must be in [0, L)."""
    if impl == "jnp":
        return _reference_gather_rows(x_BxLxD, idx_BxM)
    if impl.startswith("pallas"):
        on_cpu = target_platform() == "cpu"
        backend = impl.partition(":")[2] or (_kernel_backend() if not on_cpu else "tpu")
        mesh = jax.sharding.get_abstract_mesh()
        manual = any(t == jax.sharding.AxisType.Manual for t in mesh.axis_types)
        if not mesh.empty and mesh.size > 1 and not manual:  # pallas_call is not auto-partitioned: shard_map
            return _gather_rows_sharded(x_BxLxD, idx_BxM, mesh, backend=backend, interpret=on_cpu)
        return _gather_rows(x_BxLxD, idx_BxM, backend=backend, interpret=on_cpu)
    raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")


def _resolve(impl: str | None) -> str:
    impl = default_impl() if impl is None else impl
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
    return "jnp" if use_reference_kernels() else impl


def _as_bool(mask_BxL: jax.Array) -> jax.Array:
    return mask_BxL if mask_BxL.dtype == jnp.bool_ else mask_BxL != 0


# ----------------------------------------------------------------------------------
# Index maths.
# ----------------------------------------------------------------------------------


def chunk_ids(mask_BxL: jax.Array) -> jax.Array:
    """cid[b, t] = (sum_{s<=t} mask[b, s]) - 1, int32 (-1 before the first boundary)."""
    return jnp.cumsum(_as_bool(mask_BxL), axis=1, dtype=jnp.int32) - 1


def compaction_indices(mask_BxL: jax.Array, M: int) -> tuple[jax.Array, jax.Array]:
    """Positions of the first M True entries of each row, in order.

    idx[b, j] = min{t : cumsum(mask[b])[t] >= j + 1} (the j-th boundary), found by a
    per-row binary search of the cumsum (O(M log L), equivalent to a stable argsort of
    ~mask). Slots j >= n_b get idx 0 and valid False.

    Returns: (idx_BxM int32, valid_BxM bool).
    """
    m = _as_bool(mask_BxL)
    csum_BxL = jnp.cumsum(m, axis=1, dtype=jnp.int32)
    rank_M = jnp.arange(1, M + 1, dtype=jnp.int32)
    idx_BxM = jax.vmap(lambda c: jnp.searchsorted(c, rank_M, side="left"))(csum_BxL)
    valid_BxM = rank_M[None, :] <= csum_BxL[:, -1:]
    idx_BxM = jnp.where(valid_BxM, idx_BxM, 0).astype(jnp.int32)
    return idx_BxM, valid_BxM


def compact_ids(mask_BxL: jax.Array, M: int, *ids_BxL: jax.Array) -> list[jax.Array]:
    """Integer side arrays (segment ids, positions, tokens; int [B, L] each) compacted like ``compact``: the value
    at each chunk's first byte, 0 in empty slots. -> one int32 [B, M] per array (no gradient)."""
    idx_BxM, valid_BxM = compaction_indices(mask_BxL, M)
    return [jnp.where(valid_BxM, jnp.take_along_axis(v, idx_BxM, axis=1), 0).astype(jnp.int32) for v in ids_BxL]


def overflow(mask_BxL: jax.Array, M: int) -> tuple[jax.Array, jax.Array]:
    """Chunks that do not fit in M slots.

    Returns: (dropped_B int32 = max(0, n_b - M), byte_ok_BxL bool = cid < M). Bytes with
    byte_ok False expand to zeros; the model masks their targets out of the loss.
    """
    cid_BxL = chunk_ids(mask_BxL)
    dropped_B = jnp.maximum(cid_BxL[:, -1] + 1 - M, 0).astype(jnp.int32)
    return dropped_B, cid_BxL < M


def _expansion_indices(mask_BxL: jax.Array, M: int) -> tuple[jax.Array, jax.Array]:
    """(src_BxL = clip(cid, 0, M-1), ok_BxL = 0 <= cid < M)."""
    cid_BxL = chunk_ids(mask_BxL)
    ok_BxL = (cid_BxL >= 0) & (cid_BxL < M)
    return jnp.clip(cid_BxL, 0, M - 1), ok_BxL


def _zero_where_not(ok, v_BxNxD):
    return jnp.where(ok[:, :, None], v_BxNxD, jnp.zeros((), v_BxNxD.dtype))


# ----------------------------------------------------------------------------------
# compact: [B, L, D] -> [B, M, D]
# ----------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _compact(x_BxLxD, mask_BxL, M, impl):
    idx_BxM, valid_BxM = compaction_indices(mask_BxL, M)
    return _zero_where_not(valid_BxM, _gather(x_BxLxD, idx_BxM, impl))


def _compact_fwd(x_BxLxD, mask_BxL, M, impl):
    return _compact(x_BxLxD, mask_BxL, M, impl), mask_BxL


def _compact_bwd(M, impl, mask_BxL, dz_BxMxD):
    # Injective map: dx[t] = keep[t] * dz[cid[t]], keep = mask & (cid < M).
    src_BxL, ok_BxL = _expansion_indices(mask_BxL, M)
    keep_BxL = _as_bool(mask_BxL) & ok_BxL
    dx_BxLxD = _zero_where_not(keep_BxL, _gather(dz_BxMxD, src_BxL, impl))
    return dx_BxLxD, None


_compact.defvjp(_compact_fwd, _compact_bwd)


def compact(
    x_BxLxD: jax.Array, mask_BxL: jax.Array, M: int, *, impl: str | None = None
) -> tuple[jax.Array, jax.Array]:
    """Gathers the rows at boundary positions into M slots.

    z[b, j] = x[b, p_j] for j < min(n_b, M), zeros elsewhere; chunks past M are dropped.
    Differentiable in x (custom VJP = expansion gather); M is static.

    Args:
        x_BxLxD: any float dtype, any D >= 1.
        mask_BxL: bool (or int 0/1) boundary mask.
        M: static capacity (python int >= 1).
        impl: 'jnp' | 'pallas' | 'pallas:tpu' | 'pallas:gpu' | None (= default_impl()).
    Returns: (z_BxMxD in x's dtype, valid_BxM bool).
    """
    if M < 1:
        raise ValueError(f"M must be >= 1, got {M}")
    impl = _resolve(impl)
    valid_BxM = jnp.arange(M, dtype=jnp.int32)[None, :] < jnp.sum(
        _as_bool(mask_BxL), axis=1, dtype=jnp.int32
    )[:, None]
    return _compact(x_BxLxD, mask_BxL, int(M), impl), valid_BxM


# ----------------------------------------------------------------------------------
# expand: [B, M, D] -> [B, L, D]
# ----------------------------------------------------------------------------------


def _expand_impl(z_BxMxD, mask_BxL, impl):
    src_BxL, ok_BxL = _expansion_indices(mask_BxL, z_BxMxD.shape[1])
    return _zero_where_not(ok_BxL, _gather(z_BxMxD, src_BxL, impl))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _expand(z_BxMxD, mask_BxL, M, impl):
    del M  # == z.shape[1]; a static argument so the backward pass knows it.
    return _expand_impl(z_BxMxD, mask_BxL, impl)


def _expand_fwd(z_BxMxD, mask_BxL, M, impl):
    return _expand(z_BxMxD, mask_BxL, M, impl), mask_BxL


def _expand_bwd(M, impl, mask_BxL, g_BxLxD):
    # Segment sum over contiguous runs without scatter:
    #   C = cumsum(g * ok) in f32;  S_j = C[e_j] (e_j = last byte of chunk j);
    #   dz_j = S_j - S_{j-1} (S_{-1} = 0), zero for slots j >= n_b.
    z_dtype = g_BxLxD.dtype
    m = _as_bool(mask_BxL)
    _, ok_BxL = _expansion_indices(mask_BxL, M)
    g_BxLxD = _zero_where_not(ok_BxL, g_BxLxD.astype(jnp.float32))
    c_BxLxD = jnp.cumsum(g_BxLxD, axis=1)
    # t is a run end iff the next byte starts a chunk (or t = L-1), and t is inside a chunk.
    nxt_BxL = jnp.concatenate([m[:, 1:], jnp.ones_like(m[:, :1])], axis=1)
    ends_BxL = nxt_BxL & (chunk_ids(m) >= 0)
    idx_BxM, valid_BxM = compaction_indices(ends_BxL, M)
    s_BxMxD = _zero_where_not(valid_BxM, _gather(c_BxLxD, idx_BxM, impl))
    prev_BxMxD = jnp.pad(s_BxMxD[:, :-1], ((0, 0), (1, 0), (0, 0)))
    dz_BxMxD = _zero_where_not(valid_BxM, s_BxMxD - prev_BxMxD)
    return dz_BxMxD.astype(z_dtype), None


_expand.defvjp(_expand_fwd, _expand_bwd)


def expand(z_BxMxD: jax.Array, mask_BxL: jax.Array, *, impl: str | None = None) -> jax.Array:
    """Broadcasts each chunk's row to every byte of the chunk.

    y[b, t] = z[b, cid[b, t]] if 0 <= cid[b, t] < M else 0 (zeros before the first
    boundary and for bytes of dropped chunks). Differentiable in z (custom VJP = f32
    cumsum + compaction gather at run ends + difference).

    Args:
        z_BxMxD: any float dtype, any D >= 1.
        mask_BxL: bool (or int 0/1) boundary mask.
        impl: 'jnp' | 'pallas' | 'pallas:tpu' | 'pallas:gpu' | None (= default_impl()).
    Returns: y_BxLxD in z's dtype.
    """
    return _expand(z_BxMxD, mask_BxL, int(z_BxMxD.shape[1]), _resolve(impl))


# ----------------------------------------------------------------------------------
# take_chunks: [B, M, ...] rows at arbitrary chunk indices -> [B, L, ...]
# ----------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _take(z_BxMxD, idx_BxL, impl):
    M = z_BxMxD.shape[1]
    ok_BxL = (idx_BxL >= 0) & (idx_BxL < M)
    return _zero_where_not(ok_BxL, _gather(z_BxMxD, jnp.clip(idx_BxL, 0, M - 1), impl))


def _take_fwd(z_BxMxD, idx_BxL, impl):
    return _take(z_BxMxD, idx_BxL, impl), (idx_BxL, z_BxMxD.shape[1])


def _take_bwd(impl, res, g_BxLxD):
    # idx need not be monotone: a segment sum (XLA scatter-add); indices outside [0, M) are dropped.
    idx_BxL, M = res
    seg_BxL = jnp.where((idx_BxL >= 0) & (idx_BxL < M), idx_BxL, M)
    dz = jax.vmap(lambda g, i: jax.ops.segment_sum(g, i, num_segments=M + 1))(g_BxLxD, seg_BxL)[:, :M]
    return dz, None


_take.defvjp(_take_fwd, _take_bwd)


def take_chunks(z_BxMx_: jax.Array, idx_BxL: jax.Array, *, impl: str | None = None) -> jax.Array:
    """out[b, t] = z[b, idx[b, t]] if 0 <= idx[b, t] < M else 0, for any trailing dims of z (the pooling
    models' chunk -> byte reads, whose indices are not always one chunk per run of bytes).

    Float z goes through the row gather (``impl`` as for ``compact``; backward = segment sum); other
    dtypes through ``jnp.take_along_axis``. -> [B, L, ...] in z's dtype."""
    B, M = z_BxMx_.shape[:2]
    if not jnp.issubdtype(z_BxMx_.dtype, jnp.floating):
        ok = (idx_BxL >= 0) & (idx_BxL < M)
        idx = jnp.clip(idx_BxL, 0, M - 1).reshape(idx_BxL.shape + (1,) * (z_BxMx_.ndim - 2))
        g = jnp.take_along_axis(z_BxMx_, idx, axis=1)
        return jnp.where(ok.reshape(ok.shape + (1,) * (z_BxMx_.ndim - 2)), g, jnp.zeros((), g.dtype))
    y_BxLxD = _take(z_BxMx_.reshape(B, M, -1), idx_BxL.astype(jnp.int32), _resolve(impl))
    return y_BxLxD.reshape(idx_BxL.shape + z_BxMx_.shape[2:])


# ----------------------------------------------------------------------------------
# Pure-jnp references (plain autodiff; for tests and debugging).
# ----------------------------------------------------------------------------------


def reference_compact(x_BxLxD: jax.Array, mask_BxL: jax.Array, M: int):
    """Same as ``compact`` but via stable argsort + take_along_axis and jax autodiff."""
    m = _as_bool(mask_BxL)
    b, l = m.shape
    order_BxL = jnp.argsort(~m, axis=1, stable=True).astype(jnp.int32)
    if M > l:
        order_BxL = jnp.pad(order_BxL, ((0, 0), (0, M - l)))
    valid_BxM = jnp.arange(M)[None, :] < jnp.sum(m, axis=1, keepdims=True)
    idx_BxM = jnp.where(valid_BxM, order_BxL[:, :M], 0)
    z = jnp.take_along_axis(x_BxLxD, idx_BxM[:, :, None], axis=1)
    return _zero_where_not(valid_BxM, z), valid_BxM


def reference_expand(z_BxMxD: jax.Array, mask_BxL: jax.Array):
    """Same as ``expand`` but via take_along_axis and jax autodiff."""
    src_BxL, ok_BxL = _expansion_indices(mask_BxL, z_BxMxD.shape[1])
    return _zero_where_not(ok_BxL, jnp.take_along_axis(z_BxMxD, src_BxL[:, :, None], axis=1))
