"""HAT: Hierarchical Autoregressive Transformer (Neitemeier et al. 2025; shared/reference/boundaries.md §B).

    e = encoder(embed(x))                                   byte Stack, width D_e
    words: decided HAT splitter starts (hnet.boundary_rules.causal_word_starts on batch['word_starts'])
    u_j = W_o Σ_{t ∈ word j} softmax_t(q·W_k RMSNorm(e_t)) W_v RMSNorm(e_t)   one learned latent query q
          (non-causal inside the word; a per-word segment softmax over the byte sequence, no length cap)
    z = backbone(u)                                         word Stack, positions = word index in the document
    ẑ_t = z_{j-1} for the bytes of word j, the learned first-word vector for a document's first word
    decoder: r = e ; per layer l: r += W_l RMSNorm(ẑ_t), then the byte-level block ; logits = head(norm(r))
(HAT's decoder cross-attention has a single key, so it is exactly the gather + per-layer dense used here.)

Static capacity M = ceil(capacity · L) words per row; bytes of words past M get target_mask False.

Decoding: ``decode_step(tokens_B, cache, reset_B, word_start_B)`` takes the decided start bit of each fed
byte (``causal_word_starts``, in the full forward in-graph; at generation time the same function on the host,
``hnet.boundary_rules.WordStartTracker``). On a start the finished word goes through the connector (online softmax
accumulated byte by byte) and one backbone step. ``train.generate.generate`` sees ``decode_trackers`` and feeds
each row's tracker bits.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from hnet import chunking
from hnet.layers import RMSNorm, Stack, StackConfig, normal
from hnet.sharding import constrain, param_init
from models.base import ModelOutput, capacity_slots, dtype_from_name
from models.common import (WordPooledLM, byte_embed, chunk_layout, chunk_metrics, dense, lm_head, masked_update,
                           segment_sum, shift_chunks)


class HATLM(WordPooledLM):
    def __init__(self, encoder: StackConfig, backbone: StackConfig, decoder: StackConfig, *, connector_heads: int = 4,
                 capacity: float = 0.5, dtype="float32", param_dtype="float32", remat: bool = False, seed: int = 0):
        assert encoder.d_model == decoder.d_model, "the decoder's residual stream starts from the encoder states"
        rngs = nnx.Rngs(seed)
        self.capacity, self.remat, self.deterministic = capacity, remat, False
        De, Db = encoder.d_model, backbone.d_model
        self.heads, self.head_dim = connector_heads, Db // connector_heads
        dtype, param_dtype = dtype_from_name(dtype), dtype_from_name(param_dtype)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.embed = byte_embed(De, param_dtype, rngs)
        self.encoder = Stack(encoder, remat=remat, **kw)
        self.backbone = Stack(backbone, length_axis="chunk_len", remat=remat, **kw)
        self.decoder = Stack(decoder, **kw)
        self.latent = nnx.Param(param_init(normal(1.0), ("embed",))(rngs.params(), (Db,), param_dtype))
        self.first_word = nnx.Param(param_init(normal(1.0), ("embed",))(rngs.params(), (Db,), param_dtype))
        self.kv_norm = RMSNorm(De, param_dtype=param_dtype)
        self.q_proj = dense(Db, Db, 0.02, jnp.float32, param_dtype, rngs)
        self.k_proj = dense(De, Db, 0.02, jnp.float32, param_dtype, rngs)
        self.v_proj = dense(De, Db, 0.02, jnp.float32, param_dtype, rngs)
        self.o_proj = dense(Db, Db, 1.0 / math.sqrt(Db), jnp.float32, param_dtype, rngs, ("mlp", "embed"))
        self.z_norm = RMSNorm(Db, param_dtype=param_dtype)
        self.inject = nnx.List([dense(Db, De, 0.02, jnp.float32, param_dtype, rngs, ("mlp", "embed"))
                                for _ in self.decoder.blocks])
        self.lm_head = lm_head(De, dtype, param_dtype, rngs)

    # ----- connector: one latent query per word -----
    def _keys_values(self, e):
        kv = self.kv_norm(e)
        sh = e.shape[:-1] + (self.heads, self.head_dim)
        k, v = self.k_proj(kv).reshape(sh), self.v_proj(kv).reshape(sh)
        q = self.q_proj(self.latent[...].astype(jnp.float32)).reshape(self.heads, self.head_dim)
        return jnp.einsum("...hd,hd->...h", k, q) / math.sqrt(self.head_dim), v

    def _word_out(self, acc, s):
        pooled = acc / jnp.maximum(s, 1e-30)[..., None]
        return self.o_proj(pooled.reshape(pooled.shape[:-2] + (-1,)))

    def connector(self, e_BxLxD, cid_BxL, M: int):
        logit, v = self._keys_values(e_BxLxD)
        ok = ((cid_BxL >= 0) & (cid_BxL < M))[..., None]
        mx = jax.vmap(lambda a, i: jax.ops.segment_max(a, i, num_segments=M + 1))(
            logit, jnp.where(ok[..., 0], cid_BxL, M))[:, :M]
        ref = jnp.where(ok, chunking.take_chunks(jax.lax.stop_gradient(mx), cid_BxL), jax.lax.stop_gradient(logit))
        p = jnp.exp(logit - ref)
        return self._word_out(segment_sum(p[..., None] * v, cid_BxL, M), segment_sum(p, cid_BxL, M))

    # ----- decoder with per-layer injection of the previous word -----
    def _decode(self, r, zhat, run_block):
        zn = self.z_norm(zhat)
        for block, inj in zip(self.decoder.blocks, self.inject):
            r = run_block(block, r + inj(zn))
        return r

    def __call__(self, batch) -> ModelOutput:
        x, seg, pos = batch["inputs"], batch["segment_ids"], batch["positions"]
        M = capacity_slots(self.capacity, x.shape[1], self.deterministic)
        e = self.encoder(constrain(self.embed(x).astype(jnp.float32), ("batch", "byte_len", "act_embed")), seg, pos)
        ws = self.word_starts(batch)
        lay = chunk_layout(ws, seg, M)
        u = self.connector(e, lay.cid_BxL, M)
        z = self.backbone(constrain(u, ("batch", "chunk_len", "act_embed")), lay.seg_BxM, lay.pos_BxM)
        zhat = chunking.take_chunks(shift_chunks(z, self.first_word[...], lay.doc_first_BxM), lay.cid_BxL)

        def run_block(block, r):
            if self.remat:
                return nnx.remat(lambda b, *a: b(*a))(block, r, seg, pos)
            return block(r, seg, pos)

        r = self.decoder.final_norm(self._decode(e, zhat, run_block))
        logits = constrain(self.lm_head(r).astype(jnp.float32), ("batch", "byte_len", "act_vocab"))
        return ModelOutput(logits_BxLxV=logits, target_mask_BxL=lay.byte_ok_BxL | (seg == 0),
                           metrics=chunk_metrics(ws, seg, lay.dropped_B), boundaries={"s0": ws})

    # ----- incremental decoding -----
    def init_cache(self, batch_size: int, max_len: int):
        B, M = batch_size, capacity_slots(self.capacity, max_len, self.deterministic)
        zi = jnp.zeros((B,), jnp.int32)
        return {"encoder": self.encoder.init_cache(B, max_len), "decoder": self.decoder.init_cache(B, max_len),
                "backbone": self.backbone.init_cache(B, M),
                "m": jnp.zeros((B, self.heads), jnp.float32), "s": jnp.zeros((B, self.heads), jnp.float32),
                "acc": jnp.zeros((B, self.heads, self.head_dim), jnp.float32),
                "zprev": jnp.zeros((B, self.latent.shape[0]), jnp.float32), "count": zi,
                "cur_first": jnp.zeros((B,), bool), "cap": jnp.full((B,), M, jnp.int32)}

    def decode_step(self, tokens_B, cache, reset_B, side_B=None):
        """``side_B``: the decided word-start bit of each fed byte (``decode_trackers``)."""
        word_start_B = self.word_start_side(side_B)
        c = dict(cache)
        e, c["encoder"] = self.encoder.step(self.embed(tokens_B).astype(jnp.float32), c["encoder"], reset_B)
        start = word_start_B | reset_B
        fin = start & ~reset_B & (c["count"] >= 1) & (c["count"] - 1 < c["cap"])
        z, bb = self.backbone.step(self._word_out(c["acc"], c["s"]), c["backbone"], c["cur_first"])
        c["backbone"] = masked_update(bb, c["backbone"], fin)
        zprev = jnp.where(fin[:, None], z, c["zprev"])
        c["zprev"] = jnp.where(reset_B[:, None], self.first_word[...].astype(jnp.float32), zprev)
        c["count"] = c["count"] + start
        c["cur_first"] = jnp.where(start, reset_B, c["cur_first"])
        # online softmax of the connector over the bytes of the current word
        logit, v = self._keys_values(e)
        m = jnp.where(start[:, None], logit, jnp.maximum(c["m"], logit))
        old, new = jnp.exp(c["m"] - m), jnp.exp(logit - m)
        c["s"] = jnp.where(start[:, None], 1.0, c["s"] * old + new)
        c["acc"] = jnp.where(start[:, None, None], v, c["acc"] * old[..., None] + new[..., None] * v)
        c["m"] = m
        zhat = jnp.where((c["count"] - 1 < c["cap"])[:, None], c["zprev"], 0.0)
        caches = iter(c["decoder"])
        new_dec = []

        def run_block(block, r):
            r, bc = block.step(r, next(caches), reset_B)
            new_dec.append(bc)
            return r

        r = self.decoder.final_norm(self._decode(e, zhat, run_block))
        c["decoder"] = new_dec
        return self.lm_head(r).astype(jnp.float32), c
