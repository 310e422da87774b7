"""Batched row gather ``out[b, j] = x[b, idx[b, j]]`` as Pallas kernels.

This one op serves all four directions of chunk compaction / expansion (see
``hnet/chunking.py``): compaction gathers boundary rows (idx = boundary positions),
expansion gathers chunk rows (idx = chunk id of each byte), and each backward pass is
again such a gather.

Backends (``backend=``):
    * ``'tpu'``: Mosaic TensorCore kernel. Indices are scalar-prefetched into SMEM; each
        grid step (b, j) fills a ``[T, D]`` output tile with T single-row DMAs from HBM
        (``pltpu.make_async_copy``), waited on in start order on one DMA semaphore.
        Sub-32-bit dtypes are moved as uint32: for even D, ``[..., D]`` bf16 is viewed as
        ``[..., D/2]`` uint32 (lane packing), otherwise each element is widened.
    * ``'gpu'``: Triton kernel. Program (b, i, k) loads a ``[T]`` block of indices and
        gather-loads the ``[T, TD]`` rows x[b, idx, k*TD:(k+1)*TD].
    * ``'reference'``: ``jnp.take_along_axis`` (XLA gather).

``interpret=True`` (or a ``pltpu.InterpretParams()`` for the TPU kernel) runs the
kernels on CPU. Indices must lie in ``[0, L)``; out-of-range indices are undefined
behaviour for the kernels (the reference clamps).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from hnet.sharding import mesh_axes, target_platform

__all__ = [
    "gather_rows",
    "gather_rows_sharded",
    "reference_gather_rows",
    "default_backend",
]

_TPU_TILE_ROWS = 128  # rows (DMAs in flight) per TPU grid step
# Above this many indices the whole-array scalar prefetch into SMEM (small) is replaced by
# per-step [1, T] index blocks in SMEM. Both variants are interpret-verified only.
_MAX_PREFETCH_INDICES = 1 << 14
_GPU_TILE_ROWS = 32  # rows per Triton program
_GPU_TILE_COLS = 512  # max feature columns per Triton program (power of two)


def reference_gather_rows(x_BxLxD: jax.Array, idx_BxM: jax.Array) -> jax.Array:
    """out[b, j, :] = x[b, idx[b, j], :] via ``jnp.take_along_axis``. -> [B, M, D]."""
    return jnp.take_along_axis(x_BxLxD, idx_BxM[:, :, None].astype(jnp.int32), axis=1)


def default_backend() -> str:
    """'tpu' | 'gpu' | 'reference' from the target platform (the current mesh's devices, else
    ``jax.default_backend()``; see ``hnet.sharding.target_platform``)."""
    plat = target_platform()
    return plat if plat in ("tpu", "gpu") else "reference"


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _pad_indices(idx_BxM: jax.Array, multiple: int) -> tuple[jax.Array, int]:
    """Pads M up to a multiple of ``multiple`` with index 0. -> (idx_BxMp, M)."""
    m = idx_BxM.shape[1]
    mp = _round_up(max(m, 1), multiple)
    idx_BxM = idx_BxM.astype(jnp.int32)
    if mp != m:
        idx_BxM = jnp.pad(idx_BxM, ((0, 0), (0, mp - m)))
    return idx_BxM, m


# ----------------------------------------------------------------------------------
# 32-bit views (TPU DMAs of single rows want 32-bit elements).
# ----------------------------------------------------------------------------------


def _to_u32(x_BxLxD: jax.Array):
    """Exact 32-bit view of a sub-32-bit x (wider dtypes pass through). -> (x32, restore)."""
    dtype = x_BxLxD.dtype
    bits = jnp.dtype(dtype).itemsize * 8
    if bits >= 32:
        return x_BxLxD, lambda o: o
    b, l, d = x_BxLxD.shape
    uint = {8: jnp.uint8, 16: jnp.uint16}[bits]
    per = 32 // bits
    if d % per == 0:  # lane packing: [.., D] narrow -> [.., D/per] uint32
        x32 = lax.bitcast_convert_type(x_BxLxD.reshape(b, l, d // per, per), jnp.uint32)

        def restore(o_BxMxDp):
            bm, mm, _ = o_BxMxDp.shape
            return lax.bitcast_convert_type(o_BxMxDp, dtype).reshape(bm, mm, d)

        return x32, restore
    # Odd widths: widen every element (exact for any bit pattern).
    x32 = lax.bitcast_convert_type(x_BxLxD, uint).astype(jnp.uint32)
    return x32, lambda o: lax.bitcast_convert_type(o.astype(uint), dtype)


# ----------------------------------------------------------------------------------
# TPU TensorCore kernel: scalar-prefetched indices + manual single-row DMAs.
# ----------------------------------------------------------------------------------


def _tpu_kernel(idx_ref, x_hbm, o_ref, sem, *, tile: int, blocked_idx: bool):
    """Grid (b, j): o[t] <- x[b, idx[b, j*T + t]] for t < T, by T row DMAs.

    Indices come either scalar-prefetched whole ([B, Mp] in SMEM; read at [b, j*T + t]) or,
    for large index arrays, as a pipelined [T] SMEM block of the flattened [B*Mp] indices
    per step (read at [t]; T a multiple of 128 for the TPU block-shape rule).
    """
    b = pl.program_id(0)
    j = pl.program_id(1)

    def start(t, carry):
        src = idx_ref[t] if blocked_idx else idx_ref[b, j * tile + t]
        pltpu.make_async_copy(
            x_hbm.at[pl.ds(b, 1), pl.ds(src, 1)], o_ref.at[:, pl.ds(t, 1)], sem
        ).start()
        return carry

    def wait(t, carry):
        # Same-shaped descriptor; waits on a shared semaphore must follow start order.
        pltpu.make_async_copy(
            x_hbm.at[pl.ds(b, 1), pl.ds(0, 1)], o_ref.at[:, pl.ds(t, 1)], sem
        ).wait()
        return carry

    lax.fori_loop(0, tile, start, 0)
    lax.fori_loop(0, tile, wait, 0)


def _gather_rows_tpu(x_BxLxD, idx_BxM, *, interpret: Any, tile_rows: int, vma: bool,
                     blocked_idx: bool | None):
    x32, restore = _to_u32(x_BxLxD)
    b, _, d = x32.shape
    m = idx_BxM.shape[1]
    if blocked_idx is None:
        blocked_idx = b * _round_up(max(m, 1), 8) > _MAX_PREFETCH_INDICES
    if blocked_idx:
        tile = _round_up(tile_rows, 128)
    else:
        tile = min(tile_rows, _round_up(max(m, 1), 8))
    idx_p, m = _pad_indices(idx_BxM, tile)
    mp = idx_p.shape[1]
    nj = mp // tile
    out_shape = _shape_struct((b, mp, d), x32.dtype, x32 if vma else None)
    out_spec = pl.BlockSpec((1, tile, d), lambda bi, ji, *_: (bi, ji, 0))
    x_spec = pl.BlockSpec(memory_space=pl.ANY)
    scratch = [pltpu.SemaphoreType.DMA(())]
    if blocked_idx:
        grid_spec = pl.GridSpec(
            grid=(b, nj),
            in_specs=[
                pl.BlockSpec((tile,), lambda bi, ji: (bi * nj + ji,), memory_space=pltpu.SMEM),
                x_spec,
            ],
            out_specs=out_spec,
            scratch_shapes=scratch,
        )
    else:
        grid_spec = pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(b, nj),
            in_specs=[x_spec],
            out_specs=out_spec,
            scratch_shapes=scratch,
        )
    out = pl.pallas_call(
        functools.partial(_tpu_kernel, tile=tile, blocked_idx=blocked_idx),
        out_shape=out_shape,
        grid_spec=grid_spec,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=interpret,
        name="gather_rows_tpu",
    )(idx_p.reshape(-1) if blocked_idx else idx_p, x32)
    return restore(out[:, :m])


# ----------------------------------------------------------------------------------
# GPU Triton kernel: vector-index gather loads.
# ----------------------------------------------------------------------------------


def _gpu_kernel(idx_ref, x_ref, o_ref, *, tile_cols: int):
    """Program (b, i, k): o[:, :] <- x[b, idx[i*T:(i+1)*T], k*TD:(k+1)*TD]."""
    b = pl.program_id(0)
    k = pl.program_id(2)
    rows_T = idx_ref[...]
    o_ref[...] = x_ref[b, rows_T, pl.ds(k * tile_cols, tile_cols)]


def _gather_rows_gpu(x_BxLxD, idx_BxM, *, interpret: Any, tile_rows: int, vma: bool):
    b, _, d = x_BxLxD.shape
    dp = pl.next_power_of_2(d)
    x_p = x_BxLxD if dp == d else jnp.pad(x_BxLxD, ((0, 0), (0, 0), (0, dp - d)))
    td = min(dp, _GPU_TILE_COLS)
    m = idx_BxM.shape[1]
    tile = min(tile_rows, pl.next_power_of_2(max(m, 1)))
    idx_p, m = _pad_indices(idx_BxM, tile)
    mp = idx_p.shape[1]
    out = pl.pallas_call(
        functools.partial(_gpu_kernel, tile_cols=td),
        out_shape=_shape_struct((b, mp, dp), x_p.dtype, x_p if vma else None),
        grid=(b, mp // tile, dp // td),
        in_specs=[
            pl.BlockSpec((None, tile), lambda bi, i, k: (bi, i)),
            pl.BlockSpec(memory_space=pl.ANY),
        ],
        out_specs=pl.BlockSpec((None, tile, td), lambda bi, i, k: (bi, i, k)),
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="gather_rows_gpu",
    )(idx_p, x_p)
    return out[:, :m, :d]


def _shape_struct(shape, dtype, like):
    """ShapeDtypeStruct carrying ``like``'s manual-axis (vma) type inside shard_map."""
    if like is None:
        return jax.ShapeDtypeStruct(shape, dtype)
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=jax.typeof(like).mat)


# ----------------------------------------------------------------------------------
# Public entry points.
# ----------------------------------------------------------------------------------


def gather_rows(
    x_BxLxD: jax.Array,
    idx_BxM: jax.Array,
    *,
    backend: str | None = None,
    interpret: Any = False,
    tile_rows: int | None = None,
    tpu_blocked_idx: bool | None = None,
) -> jax.Array:
    """out[b, j, :] = x[b, idx[b, j], :]. -> [B, M, D], x's dtype.

    Args:
        x_BxLxD: rows to gather from; any dtype.
        idx_BxM: int indices in [0, L).
        backend: 'tpu' | 'gpu' | 'reference'; default ``default_backend()``.
        interpret: False, True, or (TPU only) a ``pltpu.InterpretParams``; runs on CPU.
        tile_rows: rows per grid step (default 128 on TPU, 32 on GPU).
        tpu_blocked_idx: TPU only. False: scalar-prefetch all of idx into SMEM; True: stream
            [T] index blocks into SMEM per step (T rounded up to 128); None: True iff
            B * M > 2**14.
    """
    if x_BxLxD.ndim != 3 or idx_BxM.ndim != 2 or idx_BxM.shape[0] != x_BxLxD.shape[0]:
        raise ValueError(f"want x[B,L,D], idx[B,M]; got {x_BxLxD.shape}, {idx_BxM.shape}")
    backend = backend or default_backend()
    # Inside shard_map the output type must carry the manual (varying) axes of x.
    vma = bool(jax.typeof(x_BxLxD).mat.varying) if hasattr(jax.typeof(x_BxLxD), "mat") else False
    if idx_BxM.shape[1] == 0:
        return jnp.zeros((x_BxLxD.shape[0], 0, x_BxLxD.shape[2]), x_BxLxD.dtype)
    if backend == "reference":
        return reference_gather_rows(x_BxLxD, idx_BxM)
    if backend == "tpu":
        return _gather_rows_tpu(
            x_BxLxD, idx_BxM, interpret=interpret, tile_rows=tile_rows or _TPU_TILE_ROWS, vma=vma,
            blocked_idx=tpu_blocked_idx,
        )
    if backend == "gpu":
        return _gather_rows_gpu(
            x_BxLxD, idx_BxM, interpret=interpret, tile_rows=tile_rows or _GPU_TILE_ROWS, vma=vma
        )
    raise ValueError(f"unknown backend {backend!r}")


def gather_rows_sharded(
    x_BxLxD: jax.Array,
    idx_BxM: jax.Array,
    mesh: jax.sharding.Mesh,
    *,
    backend: str | None = None,
    interpret: Any = False,
    check_vma: bool | None = None,
) -> jax.Array:
    """``gather_rows`` under ``jax.shard_map`` with B split as the rules table places ``batch``.

    A pallas_call is not auto-partitioned, so each device gathers its own batch shard
    (L, M and D are replicated). Batch mesh axes absent from ``mesh`` are ignored.
    ``check_vma`` defaults to False for ``interpret=True`` (the generic interpreter trips
    the scan-carry vma check) and True otherwise.
    """
    spec = jax.sharding.PartitionSpec(mesh_axes("batch", mesh) or None)
    if check_vma is None:
        check_vma = interpret is not True
    fn = functools.partial(gather_rows, backend=backend, interpret=interpret)
    return jax.shard_map(
        fn, mesh=mesh, in_specs=(spec, spec), out_specs=spec, check_vma=check_vma
    )(x_BxLxD, idx_BxM)
