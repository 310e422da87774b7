"""Learn Your Tokens, lossless (Thawani et al. 2023; shared/reference/boundaries.md §A, §10).

Words: decided HAT splitter starts (``causal_word_starts``), words longer than C bytes split every C bytes
(never truncated). Per word j with bytes w_j (<= C) and p learned prefix vectors CLS_1..p:
    encoder canvas   [CLS_1..p, emb(w_j)]  -> bidirectional word Stack -> first p outputs   (B·M rows of P=p+C)
    backbone         causal Stack over the M·p prefix outputs (positions j·p + i within the document)
    decoder canvas   [H_{j-1,1..p}, emb(w_j)] -> causal word Stack; H_{-1} = learned first prefix per document
    logits of byte t of word j = head(decoder output at its canvas slot)  (predicts x_{t+1}, the next word's
    first byte included: one-word lookahead, the word's end is known only when the next word starts)
Each decoder canvas is its own row, so the decoder mask is block-diagonal per word (never attends across
words); padding slots of a canvas are segment 0. Backbone length M·p: bytes per backbone position is
(bytes per word) / p (metric ``bytes_per_backbone_position``). Every true byte is scored (BPB is exact).

Decoding: ``decode_step(tokens_B, cache, reset_B, word_start_B)`` as HAT (decided start bit of the fed
byte). On a start the buffered word is encoded, the backbone advances p steps and the decoder canvas
restarts with the p prefix outputs.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from hnet import chunking
from hnet.boundary_rules import offsets_since_start
from hnet.layers import Stack, StackConfig, normal
from hnet.sharding import constrain, param_init
from models.base import ModelOutput, capacity_slots, dtype_from_name
from models.common import (WordPooledLM, byte_embed, chunk_layout, chunk_metrics, dense, lm_head, masked_update,
                           segment_sum, shift_chunks)


class LYTLM(WordPooledLM):
    def __init__(self, word_encoder: StackConfig, backbone: StackConfig, word_decoder: StackConfig, *,
                 num_prefix: int = 1, max_word_bytes: int = 12, capacity: float = 0.5, dtype="float32",
                 param_dtype="float32", remat: bool = False, seed: int = 0):
        assert word_encoder.d_model == word_decoder.d_model
        rngs = nnx.Rngs(seed)
        self.p, self.C, self.capacity, self.deterministic = num_prefix, max_word_bytes, capacity, False
        Dw, Db = word_encoder.d_model, backbone.d_model
        dtype, param_dtype = dtype_from_name(dtype), dtype_from_name(param_dtype)
        kw = dict(dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=rngs)
        self.embed = byte_embed(Dw, param_dtype, rngs)
        self.encoder = Stack(dataclasses.replace(word_encoder, causal=False), length_axis="chunk_len", **kw)
        self.backbone = Stack(backbone, length_axis="chunk_len", **kw)
        self.decoder = Stack(word_decoder, length_axis="chunk_len", **kw)
        self.cls = nnx.Param(param_init(normal(1.0), (None, "embed"))(rngs.params(), (self.p, Dw), param_dtype))
        self.first = nnx.Param(param_init(normal(1.0), (None, "embed"))(rngs.params(), (self.p, Dw), param_dtype))
        self.to_backbone = dense(Dw, Db, 0.02, jnp.float32, param_dtype, rngs)
        self.from_backbone = dense(Db, Dw, 0.02, jnp.float32, param_dtype, rngs, ("mlp", "embed"))
        self.lm_head = lm_head(Dw, dtype, param_dtype, rngs)

    def _canvas(self, head_NxpxD, emb_NxCxD, in_word_NxC):
        """Rows [head, bytes] of length P = p + C; padding slots are segment 0."""
        n = emb_NxCxD.shape[0]
        x = jnp.concatenate([head_NxpxD.astype(jnp.float32), emb_NxCxD.astype(jnp.float32)], axis=1)
        seg = jnp.concatenate([jnp.ones((n, self.p), jnp.int32), in_word_NxC.astype(jnp.int32)], axis=1)
        pos = jnp.broadcast_to(jnp.arange(self.p + self.C, dtype=jnp.int32), seg.shape)
        return x, seg, pos

    def encode_words(self, emb_BxMxCxD, in_word_BxMxC):
        """-> the p prefix outputs of each word, [B, M, p, Dw] (bidirectional inside the word)."""
        B, M, C, D = emb_BxMxCxD.shape
        cls = jnp.broadcast_to(self.cls[...], (B * M, self.p, D))
        out = self.encoder(*self._canvas(cls, emb_BxMxCxD.reshape(B * M, C, D), in_word_BxMxC.reshape(B * M, C)))
        return out[:, :self.p].reshape(B, M, self.p, D)

    def decode_words(self, prefix_BxMxpxD, emb_BxMxCxD, in_word_BxMxC):
        """Per-word causal decoder, one canvas row per word -> byte-slot outputs [B, M, C, Dw]."""
        B, M, C, D = emb_BxMxCxD.shape
        out = self.decoder(*self._canvas(prefix_BxMxpxD.reshape(B * M, self.p, D), emb_BxMxCxD.reshape(B * M, C, D),
                                         in_word_BxMxC.reshape(B * M, C)))
        return out[:, self.p:].reshape(B, M, C, D)

    def word_starts(self, batch):
        """Decided word starts, words longer than C bytes split every C bytes."""
        ws = super().word_starts(batch)
        return ws | (offsets_since_start(ws) % self.C == 0)

    def __call__(self, batch) -> ModelOutput:
        x, seg = batch["inputs"], batch["segment_ids"]
        B, L = x.shape
        M, C, p = capacity_slots(self.capacity, L, self.deterministic), self.C, self.p
        ws = self.word_starts(batch)
        lay = chunk_layout(ws, seg, M)
        n_bytes = segment_sum(jnp.ones((B, L, 1), jnp.int32), lay.cid_BxL, M)
        in_word = jnp.arange(C)[None, None] < n_bytes
        idx = jnp.clip(lay.start_BxM[..., None] + jnp.arange(C), 0, L - 1).reshape(B, M * C)
        emb = self.embed(jnp.take_along_axis(x, idx, axis=1)).astype(jnp.float32).reshape(B, M, C, -1)
        zin = self.to_backbone(self.encode_words(emb, in_word)).reshape(B, M * p, -1)
        zseg = jnp.repeat(lay.seg_BxM, p, axis=1)
        zpos = (lay.pos_BxM[..., None] * p + jnp.arange(p)).reshape(B, M * p)
        z = self.backbone(constrain(zin, ("batch", "chunk_len", "act_embed")), zseg, zpos)
        H = self.from_backbone(z).reshape(B, M, p, -1)
        out = self.decode_words(shift_chunks(H, self.first[...], lay.doc_first_BxM), emb, in_word)
        y = chunking.take_chunks(out.reshape(B, M * C, -1), lay.cid_BxL * C + offsets_since_start(ws))
        logits = constrain(self.lm_head(y).astype(jnp.float32), ("batch", "byte_len", "act_vocab"))
        return ModelOutput(logits_BxLxV=logits, target_mask_BxL=lay.byte_ok_BxL | (seg == 0),
                           metrics=chunk_metrics(ws, seg, lay.dropped_B, per_chunk=p), boundaries={"s0": ws})

    # ----- incremental decoding -----
    def init_cache(self, batch_size: int, max_len: int):
        B, M = batch_size, capacity_slots(self.capacity, max_len, self.deterministic)
        zi = jnp.zeros((B,), jnp.int32)
        return {"backbone": self.backbone.init_cache(B, M * self.p),
                "decoder": self.decoder.init_cache(B, self.p + self.C),
                "buf": jnp.zeros((B, self.C), jnp.int32), "n": zi, "count": zi,
                "cur_first": jnp.zeros((B,), bool), "cap": jnp.full((B,), M, jnp.int32)}

    def decode_step(self, tokens_B, cache, reset_B, side_B=None):
        """``side_B``: the decided word-start bit of each fed byte (``decode_trackers``)."""
        word_start_B = self.word_start_side(side_B)
        c = dict(cache)
        B, p = tokens_B.shape[0], self.p
        start = word_start_B | reset_B | (c["n"] >= self.C)
        fin = start & ~reset_B & (c["count"] >= 1) & (c["count"] - 1 < c["cap"])
        # the finished word: encoder -> p backbone steps
        in_word = jnp.arange(self.C)[None] < c["n"][:, None]
        zin = self.to_backbone(self.encode_words(self.embed(c["buf"])[:, None].astype(jnp.float32),
                                                 in_word[:, None])[:, 0])
        bb, zs = c["backbone"], []
        for i in range(p):
            z, bb = self.backbone.step(zin[:, i], bb, c["cur_first"] & (i == 0))
            zs.append(z)
        c["backbone"] = masked_update(bb, c["backbone"], fin)
        prefix = jnp.where(reset_B[:, None, None], self.first[...].astype(jnp.float32),
                           self.from_backbone(jnp.stack(zs, 1)))
        # a new word: fresh decoder canvas fed with the p prefix vectors
        dec = masked_update(self.decoder.init_cache(B, p + self.C), c["decoder"], start)
        for i in range(p):
            _, d2 = self.decoder.step(prefix[:, i], dec, start & (i == 0))
            dec = masked_update(d2, dec, start)
        c["count"] = c["count"] + start
        c["cur_first"] = jnp.where(start, reset_B, c["cur_first"])
        n = jnp.where(start, 0, c["n"])
        buf = jnp.where(start[:, None], 0, c["buf"])
        c["buf"] = jnp.where(jnp.arange(self.C)[None] == n[:, None], tokens_B[:, None], buf)
        c["n"] = n + 1
        y, c["decoder"] = self.decoder.step(self.embed(tokens_B).astype(jnp.float32), dec, jnp.zeros_like(reset_B))
        return self.lm_head(y).astype(jnp.float32), c
