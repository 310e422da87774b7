"""MrT5 delete gates (Kallini et al., ICLR 2025; spec: shared/reference/boundaries.md §C, §9-10, traps 9-12),
causal decoder-only form (§10, a project proposal: not in the paper).

    h = encoder(embed(x))                                   l local causal layers (bytes)
    G = k · σ(−(w·RMSNorm(h) + b))  ∈ (k, 0)                k = −30, b₀ = +1; pads G = k; doc starts G = 0
    keep = G > k/2                                          START convention: kept bytes open chunks
    train (soft):  y = backbone(h, key_bias = G)            full length, every later layer biased by G
    eval  (hard):  y = expand-back(backbone(compact(h, keep, M), original positions))   M = L in eval;
                   benchmarks/mrt5_inference.py buckets M to the most kept bytes of a row (the speed-up)
    u_t = y[latest kept s ≤ t]                              select_start + broadcast (hard keep in both)
    logits = lm_head(decoder(h + u))
    loss += α·mean(G over non-pad) + β·mean_layers mean(max(s, 5) − 5)   (raw backbone scores)

α comes from a PI controller on the hard deleted fraction δ̂ (``PIController``): e = δ − δ̂,
P ← 0.9P + 0.1·k_p·e, I ← I + k_i·e, α = max(0, P + I) (paper; ``alpha_min = None``: unclipped, as the
causal config uses, see ``PIController`` for why), updated in every training forward once
``regularizer_delay`` steps have passed. Its state is a non-param ``PIState`` (TrainState.rest,
checkpointed). Minimising α·mean(G) pushes G → k (more deletion), so δ̂ < δ raises α: the rate rises.
``use_gate`` False gives the same model without deletion (the baseline of the BPB comparison).

In eval mode (``model.eval()``) the logits are the hard ones; the soft forward is run too and its loss
reported in the metrics (``soft_ce``/``soft_bpb`` next to ``hard_ce``/``hard_bpb``).
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from hnet import chunking
from hnet.boundary_rules import doc_starts
from hnet.layers import Stack
from hnet.sharding import constrain
from models.base import ByteLM, ModelOutput, dtype_from_name
from models.common import (DeleteGate, MrT5Config, PIController, byte_embed, gate_losses, lm_head, loss_metrics,
                           masked_update, score_regs)


class MrT5CausalLM(ByteLM):
    """Causal decoder-only MrT5 (§10): local encoder -> delete gate -> backbone over kept bytes -> broadcast
    from the latest kept byte -> local decoder -> lm_head."""

    chunk_stage = "kept"  # the kept bytes are its chunks (compression and parity metrics)

    def __init__(self, config: MrT5Config = MrT5Config(), *, dtype="float32", param_dtype="float32",
                 remat: bool = False, seed: int = 0):
        rngs = nnx.Rngs(seed)
        self.config = config
        self.deterministic = False
        dtype, param_dtype = dtype_from_name(dtype), dtype_from_name(param_dtype)
        D = config.d_model
        kw = dict(dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=rngs)
        self.embed = byte_embed(D, param_dtype, rngs)
        self.encoder = Stack(config.stack_config(config.encoder_layout), **kw)
        self.gate = DeleteGate(config, param_dtype=param_dtype, rngs=rngs)
        self.backbone = Stack(config.stack_config(config.backbone_layout, score=True), **kw)
        self.decoder = Stack(config.stack_config(config.decoder_layout), **kw)
        self.lm_head = lm_head(D, dtype, param_dtype, rngs)
        self.controller = PIController(config)

    def encode(self, batch):
        """(h_BxLxD, G_BxL, keep_BxL): local encoder, delete gate and hard keep."""
        seg, pos = batch["segment_ids"], batch["positions"]
        real = seg > 0
        x = constrain(self.embed(batch["inputs"]).astype(jnp.float32), ("batch", "byte_len", "act_embed"))
        h = self.encoder(x, seg, pos)
        G = self.gate(h, real, doc_starts(seg))
        return h, G, (G > self.config.threshold) & real

    def soft_logits(self, h, G, keep, seg, pos):
        """Training form: full-length backbone with key bias G, read at the latest kept byte ≤ t."""
        y = self.backbone(h, seg, pos, G)
        return self._logits(h, chunking.expand(chunking.compact(y, keep, y.shape[1])[0], keep), seg, pos)

    def hard_logits(self, h, keep, seg, pos, M: int):
        """Inference form: the kept bytes compacted into M static slots (original positions for RoPE), the
        backbone run on them, expanded back. M must be ≥ the most kept bytes of a row (bytes past the M-th
        kept one would read u = 0); M = L is always safe, a smaller M is where the speed-up comes from."""
        z, _ = chunking.compact(h, keep, M)
        zseg, zpos = chunking.compact_ids(keep, M, seg, pos)  # original positions, not renumbered
        return self._logits(h, chunking.expand(self.backbone(z, zseg, zpos), keep), seg, pos)

    def _logits(self, h, u, seg, pos):
        out = self.decoder(h + u, seg, pos)
        return constrain(self.lm_head(out).astype(jnp.float32), ("batch", "byte_len", "act_vocab"))

    def __call__(self, batch) -> ModelOutput:
        seg, pos = batch["segment_ids"], batch["positions"]
        h, G, keep = self.encode(batch)
        metrics = {}
        if self.deterministic:  # hard first: the score regulariser metric is the soft forward's, as in training
            logits = self.hard_logits(h, keep, seg, pos, h.shape[1])
            soft = self.soft_logits(h, G, keep, seg, pos)
            metrics.update(loss_metrics("hard", logits, None, batch), **loss_metrics("soft", soft, None, batch))
        else:
            logits = self.soft_logits(h, G, keep, seg, pos)
        aux, gm = gate_losses(self.config, self.controller, G, keep, seg > 0, score_regs(self.backbone),
                              training=not self.deterministic)
        return ModelOutput(logits_BxLxV=logits, aux_loss=aux, metrics={**gm, **metrics},
                           boundaries={"kept": keep})

    # ----- incremental decoding (hard deletion: the backbone advances only at kept bytes) -----
    def init_cache(self, batch_size: int, max_len: int):
        return {"encoder": self.encoder.init_cache(batch_size, max_len),
                "backbone": self.backbone.init_cache(batch_size, max_len),
                "decoder": self.decoder.init_cache(batch_size, max_len),
                "u": jnp.zeros((batch_size, self.config.d_model), jnp.float32),
                "pos": jnp.zeros((batch_size,), jnp.int32)}

    def decode_step(self, tokens_B, cache, reset_B, side_B=None):
        pos = jnp.where(reset_B, 0, cache["pos"] + 1)
        h, enc = self.encoder.step(self.embed(tokens_B).astype(jnp.float32), cache["encoder"], reset_B)
        G = self.gate(h[:, None], jnp.ones_like(reset_B)[:, None], reset_B[:, None])[:, 0]
        keep = (G > self.config.threshold) | reset_B
        y, bb = self.backbone.step(h, cache["backbone"], reset_B, pos)
        bb = masked_update(bb, cache["backbone"], keep)
        u = jnp.where(keep[:, None], y, cache["u"])
        out, dec = self.decoder.step(h + u, cache["decoder"], reset_B)
        return (self.lm_head(out).astype(jnp.float32),
                {"encoder": enc, "backbone": bb, "decoder": dec, "u": u, "pos": pos})
