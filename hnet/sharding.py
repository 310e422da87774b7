"""Mesh construction and the one logical-axis-rules table (t5x / MaxText style).

Every parameter is created with ``param_init(init, names)`` and every main activation is annotated
with ``constrain(x, names)``. Both resolve through ``LOGICAL_AXIS_RULES`` inside ``axis_rules()``;
the same table is used on one CPU device and on a pod.

Parameter names and activation names are disjoint on purpose (levanter's parameter-vs-compute
mapping): parameters shard their ``embed`` dim over ``fsdp`` (FSDP) while activations keep
``act_embed`` replicated and shard ``batch`` over ``(data, fsdp)``. Byte-length and chunk-length
axes have separate names so that context parallelism can place them differently.
"""

from __future__ import annotations

import contextlib
import math
from typing import Sequence

import jax
import numpy as np
from flax import linen, nnx
from flax.core import spmd as flax_spmd
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (or tuple of mesh axes, or None = replicated).
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # --- activations ---
    ("batch", ("data", "fsdp")),
    ("byte_len", None),  # sequence axis at byte level (stage 0)
    ("chunk_len", None),  # sequence axis of inner (compressed) stages
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_kv", None),
    ("act_vocab", "tensor"),
    ("act_ssm_inner", "tensor"),
    # --- parameters ---
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),  # attention q/k/v output columns (heads * head_dim)
    ("kv", None),
    ("vocab", "tensor"),
    ("ssm_inner", "tensor"),  # Mamba-2 inner channels / heads
    ("ssm_state", None),
    ("conv", None),
    ("norm", None),
    ("router", None),
)


def axis_rules():
    """Context manager activating the rules table for NNX parameters and activations."""
    return nnx.logical_axis_rules(LOGICAL_AXIS_RULES)


def param_init(init, names: Sequence[str | None]):
    """Wrap an initializer so the created ``nnx.Param`` carries logical axis names.

    The parameter is born sharded only inside ``mesh_context`` (a mesh and the rules table active);
    elsewhere it is created unsharded, so models also build in a plain script or test (flax 0.12 shards
    eagerly by default, which fails without a mesh)."""
    in_mesh = not jax.sharding.get_abstract_mesh().empty and bool(flax_spmd.get_logical_axis_rules())
    return nnx.with_partitioning(init, tuple(names), eager_sharding=in_mesh)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Logical sharding constraint on an activation (no-op outside a mesh)."""
    return linen.with_logical_constraint(x, tuple(names))


def logical_to_spec(names: Sequence[str | None]) -> P:
    """PartitionSpec for a tuple of logical names under LOGICAL_AXIS_RULES."""
    return linen.logical_to_mesh_axes(tuple(names), LOGICAL_AXIS_RULES)


def resolve_mesh_shape(shape: dict[str, int], n_devices: int) -> tuple[int, ...]:
    """Sizes for MESH_AXES from a dict with at most one -1 ("fill with the remaining devices")."""
    sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
    unknown = [i for i, s in enumerate(sizes) if s == -1]
    if len(unknown) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {shape}")
    known = math.prod(s for s in sizes if s != -1)
    if unknown:
        if n_devices % known:
            raise ValueError(f"{n_devices} devices cannot fill mesh {shape}")
        sizes[unknown[0]] = n_devices // known
    if math.prod(sizes) != n_devices:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, have {n_devices}")
    return tuple(sizes)


def make_mesh(shape: dict[str, int] | None = None, devices=None, explicit: bool = False) -> Mesh:
    """Mesh over (data, fsdp, tensor); Auto axis types unless ``explicit``."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_mesh_shape(shape or {"data": -1}, len(devices))
    kind = AxisType.Explicit if explicit else AxisType.Auto
    return jax.make_mesh(sizes, MESH_AXES, axis_types=(kind,) * len(MESH_AXES), devices=devices)


def target_platform() -> str:
    """'cpu' | 'tpu' | 'gpu': the platform of the current mesh's devices, else ``jax.default_backend()``.

    Kernels are chosen by this, not by the default backend: an ahead-of-time compile for a TPU
    topology (``launch.aot``) traces on a CPU host under a mesh of TPU devices."""
    mesh = jax.sharding.get_abstract_mesh()
    plat = jax.default_backend() if mesh.empty else mesh.abstract_device.platform
    return "gpu" if plat in ("cuda", "rocm") else plat


_REFERENCE_KERNELS = [False]


@contextlib.contextmanager
def reference_kernels():
    """While active, every kernel choice traced takes its jnp reference: dense attention, jnp gathers, and
    no skipping of padding blocks. The traced program then has no loops and no custom calls, the two things
    XLA's cost analysis cannot count (a loop's body counts once whatever its trip count; a custom call counts
    as nothing): ``train.step.flops_per_byte`` counts this program."""
    saved = _REFERENCE_KERNELS[0]
    _REFERENCE_KERNELS[0] = True
    try:
        yield
    finally:
        _REFERENCE_KERNELS[0] = saved


def use_reference_kernels() -> bool:
    """Whether ``reference_kernels`` is active."""
    return _REFERENCE_KERNELS[0]


def mesh_axes(name: str, mesh) -> tuple[str, ...]:
    """The axes of ``mesh`` (concrete or abstract) that LOGICAL_AXIS_RULES places logical axis ``name`` on
    (() = replicated): the placement a ``shard_map`` around a kernel uses."""
    axes = dict(LOGICAL_AXIS_RULES)[name]
    axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
    return tuple(a for a in axes if a in mesh.axis_names)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding of a [batch, ...] host batch: ``batch`` as the rules place it, the rest replicated."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


@contextlib.contextmanager
def mesh_context(mesh: Mesh):
    """Activate ``mesh`` and the rules table together: models built here are born sharded (``param_init``);
    outside it they are built unsharded."""
    with jax.set_mesh(mesh), axis_rules():
        yield


def global_batch_from_local(mesh: Mesh, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Assemble process-local host arrays into global jax.Arrays sharded over the batch axes."""
    return {
        k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v) for k, v in local.items()
    }
