"""Isotropic byte LM: Embedding(256, D) -> Stack (Transformer and/or Mamba-2 layers) -> lm_head.

The baseline every hierarchical model is compared with (LlamaByte / MambaByte in the H-Net paper).
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from hnet.layers import Stack, StackConfig
from hnet.sharding import constrain
from models.base import ByteLM, ModelOutput, dtype_from_name
from models.common import byte_embed, lm_head


class IsotropicLM(ByteLM):
    def __init__(self, stack: StackConfig, *, dtype="float32", param_dtype="float32", remat: bool = False,
                 seed: int = 0):
        rngs = nnx.Rngs(seed)
        dtype, param_dtype = dtype_from_name(dtype), dtype_from_name(param_dtype)
        d = stack.d_model
        self.embed = byte_embed(d, param_dtype, rngs)
        self.backbone = Stack(stack, dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=rngs)
        self.lm_head = lm_head(d, dtype, param_dtype, rngs)

    def __call__(self, batch) -> ModelOutput:
        x = constrain(self.embed(batch["inputs"]).astype(jnp.float32), ("batch", "byte_len", "act_embed"))
        h = self.backbone(x, batch["segment_ids"], batch["positions"])
        logits = self.lm_head(h).astype(jnp.float32)
        return ModelOutput(logits_BxLxV=constrain(logits, ("batch", "byte_len", "act_vocab")))

    def init_cache(self, batch_size: int, max_len: int):
        return self.backbone.init_cache(batch_size, max_len)

    def decode_step(self, tokens_B, cache, reset_B, side_B=None):
        h, cache = self.backbone.step(self.embed(tokens_B).astype(jnp.float32), cache, reset_B)
        return self.lm_head(h).astype(jnp.float32), cache
