"""The contract every language model in ``models/`` fulfils, so one trainer serves them all.

    out = model(batch)                      # batch: inputs/segment_ids/positions [B, L]
    out.logits_BxLxV                        # next-byte logits (fp32)
    out.aux_loss                            # scalar, already weighted (ratio loss, priors, ...)
    out.target_mask_BxL                     # False where a target must not be scored (capacity overflow in
                                            # training; in eval mode, ``capacity_slots``, chunks never overflow)
    out.metrics                             # scalars for logging (boundary rate, bytes/chunk, ...)
    out.boundaries                          # {stage name: bool[B, L]} chunk starts, for visualisation

    cache = model.init_cache(batch_size, max_len)
    logits_BxV, cache = model.decode_step(tokens_B, cache, reset_B)   # one byte per row

``decode_step`` must reproduce the full forward's logits position by position (tested for every model).
A model without byte-LM decoding sets the class attribute ``supports_decoding = False`` (the trainer then
skips sampling; default True).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

LN2 = math.log(2.0)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ModelOutput:
    logits_BxLxV: jax.Array
    aux_loss: jax.Array = dataclasses.field(default_factory=lambda: jnp.zeros((), jnp.float32))
    target_mask_BxL: jax.Array | None = None
    metrics: dict[str, jax.Array] = dataclasses.field(default_factory=dict)
    boundaries: dict[str, jax.Array] = dataclasses.field(default_factory=dict)


def capacity_slots(capacity: float, L: int, evaluation: bool = False) -> int:
    """Static chunk slots of a row of L positions: M = ceil(capacity · L) in training; M = L in evaluation
    (``model.eval()``: no chunk can overflow, so every byte is scored)."""
    return L if evaluation else max(1, math.ceil(capacity * L))


def dtype_from_name(name: str | Any):
    """'float32' | 'bfloat16' -> jnp dtype (gin files name dtypes as strings)."""
    return jnp.dtype(name) if isinstance(name, str) else name


def token_nll(out: ModelOutput, batch) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Next-byte NLL [B, L] (fp32), scored-target weights [B, L] and real-UTF-8-byte weights [B, L]."""
    logits = out.logits_BxLxV.astype(jnp.float32)
    nll_BxL = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0]
    w_BxL = batch["loss_mask"]
    if out.target_mask_BxL is not None:
        w_BxL = w_BxL & out.target_mask_BxL
    return nll_BxL, w_BxL, batch["byte_mask"] & w_BxL


def masked_by_model(batch, w_BxL) -> jax.Array:
    """Real UTF-8 bytes whose targets the model did not score (``w_BxL`` from ``token_nll``; capacity
    overflow): counted, never silently dropped. fp32 scalar."""
    return jnp.sum(batch["byte_mask"] & ~w_BxL).astype(jnp.float32)


def cross_entropy_sums(out: ModelOutput, batch) -> dict[str, jax.Array]:
    """Summed next-byte NLL over scored targets, and over real UTF-8 bytes (the BPB numerator)."""
    nll_BxL, w, byte_w = token_nll(out, batch)
    return {
        "nll_sum": jnp.sum(nll_BxL * w),
        "n_targets": jnp.sum(w).astype(jnp.float32),
        "byte_nll_sum": jnp.sum(nll_BxL * byte_w),
        "n_bytes": jnp.sum(byte_w).astype(jnp.float32),
        "n_masked_by_model": masked_by_model(batch, w),
    }
