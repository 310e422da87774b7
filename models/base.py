"""The contract between a model and the rest of the code: one trainer, evaluator and sampler serve every
model that subclasses ``ByteLM``. Nothing outside a model's own module asks it anything else.

    out = model(batch)                      # batch: inputs/segment_ids/positions [B, L] + its annotations
    out.logits_BxLxV                        # next-byte logits (fp32)
    out.aux_loss                            # scalar, already weighted (ratio loss, priors, ...)
    out.target_mask_BxL                     # False where a target must not be scored (capacity overflow in
                                            # training; in eval mode, ``capacity_slots``, chunks never overflow)
    out.metrics                             # scalars for logging (boundary rate, bytes/chunk, ...)
    out.boundaries                          # {stage name: bool[B, L]} chunk starts, for visualisation

    model.required_annotations()            # per-byte data annotations the forward reads (the data pipeline
                                            # provides them: train.annotations names)
    model.lr_multiplier(path)               # per-parameter LR factor (H-Net's Eq. 11); default 1
    model.chunk_stage                       # the ``boundaries`` key counted as chunks (None: one per byte)
    model.supports_decoding                 # False: no byte-LM decoding (the trainer skips sampling)
    cache = model.init_cache(batch_size, max_len)
    trackers = model.decode_trackers(prompts, langs)                  # None, or one host tracker per row
    logits_BxV, cache = model.decode_step(tokens_B, cache, reset_B, side_B)   # one byte per row

``decode_step`` must reproduce the full forward's logits position by position (tested for every model).
``side_B`` is the per-byte host input of a model whose ``decode_trackers`` returns trackers
(``tracker.push(byte) -> side value``: HAT/LYT word starts, MAGNET routes); None otherwise.

Registration: every ``ByteLM`` subclass is bindable in .gin files as ``models.<ClassName>`` as soon as
its class is defined; ``configurable`` does the same for a model's config dataclass. ``train.config``
imports every module of this package before parsing, so a new family is one new module.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Sequence

import gin
import jax
import jax.numpy as jnp
from flax import nnx

from hnet.layers import StackConfig

LN2 = math.log(2.0)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ModelOutput:
    logits_BxLxV: jax.Array
    aux_loss: jax.Array = dataclasses.field(default_factory=lambda: jnp.zeros((), jnp.float32))
    target_mask_BxL: jax.Array | None = None
    metrics: dict[str, jax.Array] = dataclasses.field(default_factory=dict)
    boundaries: dict[str, jax.Array] = dataclasses.field(default_factory=dict)


def configurable(cls, module: str = "models"):
    """Make ``cls`` bindable in .gin files as ``<module>.<name>``; returns ``cls`` itself (usable as a
    decorator). Registering the same name again replaces the binding target (a re-imported module)."""
    gin.external_configurable(cls, module=module)
    return cls


configurable(StackConfig, module="hnet")


_REGISTERING: list[type] = []


class ByteLM(nnx.Module):
    """Base class of every byte language model; see the module docstring for the contract. Subclasses are
    registered with gin (``models.<ClassName>``) when they are defined."""

    supports_decoding: ClassVar[bool] = True
    chunk_stage: ClassVar[str | None] = "s0"

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if not _REGISTERING:  # gin's own wrapper subclass is not registered again
            _REGISTERING.append(cls)
            try:
                configurable(cls)
            finally:
                _REGISTERING.pop()

    def __call__(self, batch) -> "ModelOutput":
        raise NotImplementedError

    def required_annotations(self) -> tuple[str, ...]:
        """Names of the per-byte annotations ``__call__`` reads from the batch (``train.annotations``)."""
        return ()

    def lr_multiplier(self, path: Sequence[str]) -> float:
        """LR factor of the parameter at ``path`` (its pytree key names)."""
        del path
        return 1.0

    def decode_trackers(self, prompts: list[bytes], langs: list[str] | None = None) -> list | None:
        """One host-side tracker per row whose ``push(byte)`` gives ``decode_step``'s ``side_B`` value of each
        fed byte; None when ``decode_step`` needs no host input. ``langs``: the document language of each
        prompt (language-routed models)."""
        del prompts, langs
        return None

    def init_cache(self, batch_size: int, max_len: int):
        raise NotImplementedError(f"{type(self).__name__} does not decode bytes")

    def decode_step(self, tokens_B, cache, reset_B, side_B=None):
        raise NotImplementedError(f"{type(self).__name__} does not decode bytes")


def capacity_slots(capacity: float, L: int, evaluation: bool = False, max_slots: int | None = None) -> int:
    """Static chunk slots of a row of L positions: M = ceil(capacity · L) in training; in evaluation
    (``model.eval()``) M = ``max_slots``, the most slots a row can fill (default L, one chunk per byte; 2L for
    poolings that also give every document a null slot), so no chunk can overflow and every byte is scored."""
    return (max_slots or L) if evaluation else max(1, math.ceil(capacity * L))


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


def bits_per_byte(byte_nll_sum, n_bytes, xp=jnp):
    """Σ NLL over real UTF-8 target bytes / (ln 2 · #bytes) (no bytes: the sum itself / ln 2). ``xp``: jax.numpy
    (in-graph) or numpy (host)."""
    return byte_nll_sum / (LN2 * xp.maximum(n_bytes, 1.0))


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
