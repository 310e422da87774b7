"""Faithful MrT5 (ByT5-style encoder-decoder, span corruption) on the shared backbone.

Batch transform (inside the model, deterministic: key = fold_in(seed, controller step, content hash)):
    spans of ``mean_span_length`` bytes start with prob. density / span at non-first bytes of a document;
    encoder input = the row with each span replaced by one sentinel byte 0xF5 + (span rank mod 9)
                    (bytes that never occur in UTF-8), compacted and re-positioned per document;
    decoder target = per document [s_0, span_0 bytes, s_1, span_1 bytes, ...] (capacity ⌈c·L⌉), decoder
                    input = the target shifted right within its document, BOS first.
    encoder (bidirectional, l layers) -> delete gate G -> backbone (bidirectional) ->
    decoder (causal self-attention, cross-attention to the encoder output, key bias G in soft mode).
    soft (train): full-length encoder output, G added to every backbone and cross-attention logit;
    hard (eval): kept positions compacted (original positions kept for RoPE), no bias.

Output semantics (so the shared trainer scores it unchanged): ``logits_BxLxV[t]`` is the decoder's
prediction of the original byte x_{t+1} (= batch targets[t]) made at its slot of the target sequence,
``target_mask[t]`` = x_{t+1} was dropped into a span and its slot fits the decoder capacity. The
trainer's CE / BPB are therefore over the reconstructed span bytes. The sentinel predictions (which end
each span) have no position in the original row: their summed NLL / (number of scored bytes) is added
to ``aux_loss`` (so loss = joint sum over all target tokens / scored bytes) and logged as
``sentinel_ce``. There is no byte-LM ``decode_step`` (use sample_prompts = () in its configs).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from hnet import chunking
from hnet.boundary_rules import doc_starts, offsets_since_start
from hnet.bytes import BOS
from hnet.layers import Attention, RMSNorm, Stack, SwiGLU, _round_ff, parse_layout
from hnet.sharding import constrain
from models.base import ByteLM, ModelOutput, dtype_from_name
from models.common import (DeleteGate, MrT5Config, PIController, byte_embed, gate_losses, lm_head, loss_metrics,
                           score_regs)

SENTINEL_FIRST, N_SENTINELS = 0xF5, 9


def _shift_right(x_BxL, fill):
    return jnp.pad(x_BxL[:, :-1], ((0, 0), (1, 0)), constant_values=fill)


def span_noise(key, segment_ids_BxL, density: float, span: int):
    """(noise_BxL, span_start_BxL): spans of ``span`` bytes inside documents, never on a document's first byte."""
    real = segment_ids_BxL > 0
    starts = (jax.random.uniform(key, real.shape) < density / span) & real & ~doc_starts(segment_ids_BxL)
    noise = starts
    for j in range(1, span):
        same = jnp.pad(segment_ids_BxL[:, :-j], ((0, 0), (j, 0)), constant_values=-1) == segment_ids_BxL
        noise = noise | (jnp.pad(starts[:, :-j], ((0, 0), (j, 0))) & same)
    noise = noise & real
    cont = _shift_right(noise, False) & (_shift_right(segment_ids_BxL, -1) == segment_ids_BxL)
    return noise, noise & ~cont


def span_corruption(key, batch, density: float, span: int, target_len: int) -> dict:
    """Encoder / decoder streams of a span-corrupted batch (see the module docstring); static shapes."""
    inputs, seg = batch["inputs"], batch["segment_ids"]
    B, L = inputs.shape
    noise, start = span_noise(key, seg, density, span)
    sid = SENTINEL_FIRST + jnp.mod(jnp.cumsum(start, axis=1) - 1, N_SENTINELS)
    enc_keep = (seg > 0) & (~noise | start)
    enc_tok, enc_seg = chunking.compact_ids(enc_keep, L, jnp.where(start, sid, inputs), seg)
    # decoder stream: slot 2t = sentinel (kept at span starts), slot 2t+1 = byte t (kept if dropped)
    keep2 = jnp.stack([start, noise], -1).reshape(B, 2 * L)
    tok2 = jnp.stack([sid, inputs], -1).reshape(B, 2 * L)
    is_byte2 = jnp.broadcast_to(jnp.arange(2 * L) % 2 == 1, (B, 2 * L)).astype(jnp.int32)
    dec_tgt, dec_seg, dec_is_byte = chunking.compact_ids(keep2, target_len, tok2, jnp.repeat(seg, 2, axis=1), is_byte2)
    dec_start = doc_starts(dec_seg)
    slot_BxL = (jnp.cumsum(keep2, axis=1) - 1).reshape(B, L, 2)[..., 1]  # decoder slot of byte t
    next_slot = jnp.pad(slot_BxL[:, 1:], ((0, 0), (0, 1)), constant_values=target_len)
    next_noise = jnp.pad(noise[:, 1:], ((0, 0), (0, 1)))
    return {"noise": noise, "enc_keep": enc_keep, "enc_tok": enc_tok, "enc_seg": enc_seg,
            "enc_pos": offsets_since_start(doc_starts(enc_seg)),
            "dec_in": jnp.where(dec_start, BOS, _shift_right(dec_tgt, BOS)), "dec_tgt": dec_tgt,
            "dec_seg": dec_seg, "dec_pos": offsets_since_start(dec_start),
            "sentinel_slot": (dec_seg > 0) & (dec_is_byte == 0),
            "target_slot": jnp.clip(next_slot, 0, target_len - 1), "target_ok": next_noise & (next_slot < target_len),
            "dec_overflow": jnp.maximum(jnp.sum(keep2, axis=1) - target_len, 0)}


class CrossAttention(Attention):
    """q from the decoder, k/v from the encoder output (the fused wqkv kernel split as [q | k | v]).
    No RoPE (T5 cross-attention has no position bias); a query sees every key of its document."""

    def __call__(self, x_BxQxD, seg_BxQ, mem_BxSxD, mem_seg_BxS, key_bias_BxS=None):
        (B, Q, D), S = x_BxQxD.shape, mem_BxSxD.shape[1]
        W = self.wqkv.kernel[...].astype(self.dtype)
        q = (x_BxQxD.astype(self.dtype) @ W[:, :D]).reshape(B, Q, self.num_heads, self.head_dim)
        kv = (mem_BxSxD.astype(self.dtype) @ W[:, D:]).reshape(B, S, 2, self.num_heads, self.head_dim)
        mask = (seg_BxQ[:, :, None] == mem_seg_BxS[:, None, :])[:, None]
        o = self._attend(q, kv[:, :, 0], kv[:, :, 1], mask, key_bias_BxS, record=True)
        return self.out(o.reshape(B, Q, D))


class DecoderBlock(nnx.Module):
    """x += self_attn(norm(x)); x += cross_attn(norm(x), memory); x += mlp(norm(x)) (T5 decoder block)."""

    def __init__(self, cfg: MrT5Config, *, out_init_std, dtype, param_dtype, rngs):
        D = cfg.d_model
        attn = dict(rotary_dim=cfg.rotary_dim, out_init_std=out_init_std, dtype=dtype, param_dtype=param_dtype,
                    softmax1=cfg.softmax1, rngs=rngs)
        self.norm1, self.norm_x, self.norm2 = (RMSNorm(D, out_dtype=dtype, param_dtype=param_dtype) for _ in range(3))
        self.self_attn = Attention(D, cfg.num_heads, **attn)
        self.cross_attn = CrossAttention(D, cfg.num_heads, score_margin=cfg.score_margin, **attn)
        self.mlp = SwiGLU(D, _round_ff(cfg.d_ff), out_init_std=out_init_std, dtype=dtype, param_dtype=param_dtype,
                          rngs=rngs)

    def __call__(self, x, seg, pos, mem, mem_seg, key_bias):
        x = x + self.self_attn(self.norm1(x), seg, pos).astype(jnp.float32)
        x = x + self.cross_attn(self.norm_x(x), seg, mem, mem_seg, key_bias).astype(jnp.float32)
        return x + self.mlp(self.norm2(x)).astype(jnp.float32)


class MrT5EncDec(ByteLM):
    """ByT5-style MrT5 trained on byte span corruption (see the module docstring for the output semantics)."""

    supports_decoding = False  # no byte-LM decoding: the trainer skips sampling, train.sample refuses
    chunk_stage = "kept"

    def __init__(self, config: MrT5Config = MrT5Config(), *, dtype="float32", param_dtype="float32",
                 remat: bool = False, seed: int = 0):
        rngs = nnx.Rngs(seed)
        self.config = config
        self.deterministic = False
        dtype, param_dtype = dtype_from_name(dtype), dtype_from_name(param_dtype)
        D = config.d_model
        kw = dict(dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=rngs)
        self.embed = byte_embed(D, param_dtype, rngs)
        self.encoder = Stack(config.stack_config(config.encoder_layout, causal=False), **kw)
        self.gate = DeleteGate(config, param_dtype=param_dtype, rngs=rngs)
        self.backbone = Stack(config.stack_config(config.backbone_layout, causal=False, score=True), **kw)
        n_dec = len(parse_layout(config.decoder_layout))
        std = 0.02 / math.sqrt(3 * n_dec)
        self.decoder = nnx.List([DecoderBlock(config, out_init_std=std, dtype=dtype, param_dtype=param_dtype,
                                              rngs=rngs) for _ in range(n_dec)])
        self.decoder_norm = RMSNorm(D, param_dtype=param_dtype)
        self.lm_head = lm_head(D, dtype, param_dtype, rngs)
        self.controller = PIController(config)

    def corrupt(self, batch) -> dict:
        cfg = self.config
        B, L = batch["inputs"].shape
        content = jnp.sum(batch["inputs"].astype(jnp.uint32) * (jnp.arange(L, dtype=jnp.uint32) + 1))
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(cfg.corruption_seed), self.controller.step[...]),
                                 content)
        return span_corruption(key, batch, cfg.noise_density, cfg.mean_span_length,
                               max(1, math.ceil(cfg.target_capacity * L)))

    def _decode(self, c, mem, mem_seg, key_bias):
        """Decoder logits [B, Lt, V] over the target sequence."""
        x = self.embed(c["dec_in"]).astype(jnp.float32)
        for block in self.decoder:
            x = block(x, c["dec_seg"], c["dec_pos"], mem, mem_seg, key_bias)
        return self.lm_head(self.decoder_norm(x)).astype(jnp.float32)

    def _soft(self, c, h, G):
        return self._decode(c, self.backbone(h, c["enc_seg"], c["enc_pos"], G), c["enc_seg"], G)

    def _hard(self, c, h, keep):
        z, _ = chunking.compact(h, keep, h.shape[1])
        zseg, zpos = chunking.compact_ids(keep, h.shape[1], c["enc_seg"], c["enc_pos"])  # original positions
        return self._decode(c, self.backbone(z, zseg, zpos), zseg, None)

    def _outputs(self, c, dec_logits):
        """Decoder logits placed at the original rows (logits[t] predicts x_{t+1}); sentinel NLL sum."""
        logits = jnp.take_along_axis(dec_logits, c["target_slot"][..., None], axis=1)
        nll = jax.nn.logsumexp(dec_logits, -1) - jnp.take_along_axis(dec_logits, c["dec_tgt"][..., None], -1)[..., 0]
        return constrain(logits, ("batch", "byte_len", "act_vocab")), jnp.sum(nll * c["sentinel_slot"])

    def __call__(self, batch) -> ModelOutput:
        cfg = self.config
        c = self.corrupt(batch)
        real = c["enc_seg"] > 0
        x = constrain(self.embed(c["enc_tok"]).astype(jnp.float32), ("batch", "byte_len", "act_embed"))
        h = self.encoder(x, c["enc_seg"], c["enc_pos"])
        G = self.gate(h, real, doc_starts(c["enc_seg"]))
        keep = (G > cfg.threshold) & real
        target_mask = c["target_ok"] & batch.get("loss_mask", True)
        metrics = {}
        if self.deterministic:
            logits, sent_sum = self._outputs(c, self._hard(c, h, keep))
            soft, _ = self._outputs(c, self._soft(c, h, G))
            metrics.update(loss_metrics("hard", logits, target_mask, batch),
                           **loss_metrics("soft", soft, target_mask, batch))
        else:
            logits, sent_sum = self._outputs(c, self._soft(c, h, G))
        regs = score_regs(self.backbone) + [b.cross_attn.score_reg[...] for b in self.decoder]
        aux, gm = gate_losses(cfg, self.controller, G, keep, real, regs, training=not self.deterministic)
        n_sent = jnp.maximum(jnp.sum(c["sentinel_slot"]), 1)
        sent_aux = sent_sum / jnp.maximum(jnp.sum(target_mask), 1)
        n_real = jnp.maximum(jnp.sum(batch["segment_ids"] > 0), 1)
        metrics.update(gm, sentinel_ce=sent_sum / n_sent, noise_rate=jnp.sum(c["noise"]) / n_real,
                       encoder_len=jnp.mean(jnp.sum(real, axis=1).astype(jnp.float32)),
                       decoder_overflow=jnp.sum(c["dec_overflow"]).astype(jnp.float32))
        kept = c["enc_keep"] & (chunking.expand(keep[..., None].astype(jnp.float32), c["enc_keep"])[..., 0] > 0.5)
        return ModelOutput(logits_BxLxV=logits, aux_loss=aux + sent_aux, target_mask_BxL=target_mask,
                           metrics=metrics, boundaries={"kept": kept, "corrupted": c["noise"]})
