"""The contract every language model in ``models/`` fulfils, so one trainer serves them all.

    out = model(batch)                      # batch: inputs/segment_ids/positions [B, L]
    out.logits_BxLxV                        # next-byte logits (fp32)
    out.aux_loss                            # scalar, already weighted (ratio loss, priors, ...)
    out.target_mask_BxL                     # False where a target must not be scored (capacity overflow)
    out.metrics                             # scalars for logging (boundary rate, bytes/chunk, ...)
    out.boundaries                          # {stage name: bool[B, L]} chunk starts, for visualisation

    cache = model.init_cache(batch_size, max_len)
    logits_BxV, cache = model.decode_step(tokens_B, cache, reset_B)   # one byte per row

``decode_step`` must reproduce the full forward's logits position by position (tested for every model).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ModelOutput:
    logits_BxLxV: jax.Array
    aux_loss: jax.Array = dataclasses.field(default_factory=lambda: jnp.zeros((), jnp.float32))
    target_mask_BxL: jax.Array | None = None
    metrics: dict[str, jax.Array] = dataclasses.field(default_factory=dict)
    boundaries: dict[str, jax.Array] = dataclasses.field(default_factory=dict)


def dtype_from_name(name: str | Any):
    """'float32' | 'bfloat16' -> jnp dtype (gin files name dtypes as strings)."""
    return jnp.dtype(name) if isinstance(name, str) else name
