"""SpaceByte (Slagle 2024) on the shared backbone (shared/reference/boundaries.md §F, §9.8):

    h = local_in(embed(x)) (width d) ; global positions g = first byte of each spacelike run + doc starts
        (``hnet.boundary_rules.spacebyte_starts``)
    y_k = global([0_{D-d}; h_{g_k}]) over at most M = T_G global positions (RoPE on the index in the doc)
    h_{g_k} += last d dims of y_k (written only at g_k) ; logits = head(local_out(h)).
    Targets at or after the (M+1)-th global position of a row are masked (target_mask False).

Capacity is static (M slots per row); overflow is masked and counted. Decodes byte by byte with per-row
masked backbone steps (``decode_step`` ≡ full forward).
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from hnet import chunking
from hnet.boundary_rules import spacebyte_starts, spacelike
from hnet.layers import Stack, StackConfig
from hnet.sharding import constrain
from models.base import ByteLM, ModelOutput, capacity_slots, dtype_from_name
from models.common import byte_embed, chunk_layout, chunk_metrics, lm_head, masked_update


class SpaceByteLM(ByteLM):
    """SpaceByte: local_in (width d) -> global blocks at spacelike-run starts (width D, zero-padded) written
    back only at those positions -> local_out -> head. ``capacity`` = T_G / L."""

    def __init__(self, local_in: StackConfig, backbone: StackConfig, local_out: StackConfig, *,
                 capacity: float = 0.25, dtype="float32", param_dtype="float32", remat: bool = False, seed: int = 0):
        assert local_in.d_model == local_out.d_model <= backbone.d_model
        rngs = nnx.Rngs(seed)
        self.capacity, self.deterministic = capacity, False
        self.d, self.D = local_in.d_model, backbone.d_model
        dtype, param_dtype = dtype_from_name(dtype), dtype_from_name(param_dtype)
        kw = dict(dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=rngs)
        self.embed = byte_embed(self.d, param_dtype, rngs)
        self.local_in = Stack(local_in, **kw)
        self.backbone = Stack(backbone, length_axis="chunk_len", **kw)
        self.local_out = Stack(local_out, **kw)
        self.lm_head = lm_head(self.d, dtype, param_dtype, rngs)

    def _pad(self, h):
        return jnp.concatenate([jnp.zeros(h.shape[:-1] + (self.D - self.d,), h.dtype), h], axis=-1)

    def __call__(self, batch) -> ModelOutput:
        x, seg, pos = batch["inputs"], batch["segment_ids"], batch["positions"]
        M = capacity_slots(self.capacity, x.shape[1], self.deterministic)
        h = self.local_in(constrain(self.embed(x).astype(jnp.float32), ("batch", "byte_len", "act_embed")), seg, pos)
        g = spacebyte_starts(x, seg)
        lay = chunk_layout(g, seg, M)
        z, _ = chunking.compact(h, g, M)
        y = self.backbone(constrain(self._pad(z), ("batch", "chunk_len", "act_embed")), lay.seg_BxM, lay.pos_BxM)
        u = jnp.where(g[..., None], chunking.take_chunks(y[..., self.D - self.d:], lay.cid_BxL), 0.0)
        logits = self.lm_head(self.local_out(h + u, seg, pos)).astype(jnp.float32)
        return ModelOutput(logits_BxLxV=constrain(logits, ("batch", "byte_len", "act_vocab")),
                           target_mask_BxL=lay.byte_ok_BxL | (seg == 0),
                           metrics=chunk_metrics(g, seg, lay.dropped_B), boundaries={"s0": g})

    def init_cache(self, batch_size: int, max_len: int):
        B, M = batch_size, capacity_slots(self.capacity, max_len, self.deterministic)
        return {"local_in": self.local_in.init_cache(B, max_len), "local_out": self.local_out.init_cache(B, max_len),
                "backbone": self.backbone.init_cache(B, M), "prev_spacelike": jnp.ones((B,), bool),
                "count": jnp.zeros((B,), jnp.int32), "cap": jnp.full((B,), M, jnp.int32)}

    def decode_step(self, tokens_B, cache, reset_B, side_B=None):
        c = dict(cache)
        h, c["local_in"] = self.local_in.step(self.embed(tokens_B).astype(jnp.float32), c["local_in"], reset_B)
        sl = spacelike(tokens_B[:, None])[:, 0]
        g = reset_B | (sl & ~c["prev_spacelike"])
        active = g & (c["count"] < c["cap"])
        y, bb = self.backbone.step(self._pad(h), c["backbone"], reset_B)
        c["backbone"] = masked_update(bb, c["backbone"], active)
        h = h + jnp.where(active[:, None], y[:, self.D - self.d:], 0.0)
        c["prev_spacelike"], c["count"] = sl, c["count"] + g
        out, c["local_out"] = self.local_out.step(h, c["local_out"], reset_B)
        return self.lm_head(out).astype(jnp.float32), c
