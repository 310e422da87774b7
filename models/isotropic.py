"""Isotropic byte LM: Embedding(256, D) -> Stack (Transformer and/or Mamba-2 layers) -> lm_head.

The baseline every hierarchical model is compared with (LlamaByte / MambaByte in the H-Net paper).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from hnet.bytes import VOCAB_SIZE
from hnet.layers import Stack, StackConfig, normal
from hnet.sharding import constrain, param_init
from models.base import ByteLM, ModelOutput, dtype_from_name


class IsotropicLM(ByteLM):
    def __init__(self, stack: StackConfig, *, dtype="float32", param_dtype="float32", remat: bool = False,
                 seed: int = 0):
        rngs = nnx.Rngs(seed)
        dtype, param_dtype = dtype_from_name(dtype), dtype_from_name(param_dtype)
        d = stack.d_model
        self.embed = nnx.Embed(VOCAB_SIZE, d, param_dtype=param_dtype,
                               embedding_init=param_init(normal(1.0), ("vocab", "embed")), rngs=rngs)
        self.backbone = Stack(stack, dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=rngs)
        self.lm_head = nnx.Linear(d, VOCAB_SIZE, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                                  kernel_init=param_init(normal(0.02), ("embed", "vocab")), rngs=rngs)

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
