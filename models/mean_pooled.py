"""Mean pooling with rule boundaries on the shared backbone (shared/reference/boundaries.md §E, §F, §9.8):
DTP's 'whitespaces' rule and fixed stride with the Hourglass shift rule, END convention:

    h = pre(embed(x)) ; e_t = [x_t = ' ']  (whitespace)  or  [offset_t ≡ P-1 mod P]  (fixed)
    (the END rules of ``hnet.boundary_rules``: ``whitespace_ends``, ``fixed_stride_ends``)
    per document, shortened sequence [null, s_0, s_1, ...], s_k = mean of group k (closed by its END byte)
    o = backbone(LayerNorm(shortened)) ; u_t = o_{c(t)}, c(t) = #ENDs of the document at bytes <= t
    (the END byte reads its own group: legal because e_t depends on x_t only; bytes before the first END
    read the null output) ; logits = head(post(h + u)).
  Fixed stride P is Hourglass with shift k-1: group j (offsets jP..jP+P-1) feeds offsets jP+P-1 onward
  (here through a learned null group instead of zero padding).

Capacity is static (M slots per row); overflow is masked and counted. Decodes byte by byte with per-row
masked backbone steps (``decode_step`` ≡ full forward).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from hnet import chunking
from hnet.boundary_rules import doc_starts, end_to_start, fixed_stride_ends, offsets_since_start, whitespace_ends
from hnet.layers import Stack, StackConfig, normal
from hnet.sharding import constrain, param_init
from models.base import ByteLM, ModelOutput, capacity_slots, dtype_from_name
from models.common import byte_embed, chunk_metrics, lm_head, masked_update, segment_sum


class MeanPooledLM(ByteLM):
    """DTP-style mean pooling with rule boundaries: ``rule`` = 'whitespace' (DTP) or 'fixed' (``stride``)."""

    def __init__(self, pre: StackConfig, backbone: StackConfig, post: StackConfig, *, rule: str = "whitespace",
                 stride: int = 4, capacity: float = 0.5, dtype="float32", param_dtype="float32", remat: bool = False,
                 seed: int = 0):
        if rule not in ("whitespace", "fixed"):
            raise ValueError(f"rule must be 'whitespace' or 'fixed', got {rule!r}")
        assert pre.d_model == backbone.d_model == post.d_model, "DTP keeps one width"
        rngs = nnx.Rngs(seed)
        self.rule, self.stride, self.capacity, self.deterministic = rule, stride, capacity, False
        dtype, param_dtype = dtype_from_name(dtype), dtype_from_name(param_dtype)
        d = pre.d_model
        self.embed = byte_embed(d, param_dtype, rngs)
        kw = dict(dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=rngs)
        self.pre = Stack(pre, **kw)
        self.backbone = Stack(backbone, length_axis="chunk_len", **kw)
        self.post = Stack(post, **kw)
        self.null = nnx.Param(param_init(normal(1.0), ("embed",))(rngs.params(), (d,), param_dtype))
        self.norm = nnx.LayerNorm(d, dtype=jnp.float32, param_dtype=param_dtype,
                                  scale_init=param_init(nnx.initializers.ones, ("norm",)),
                                  bias_init=param_init(nnx.initializers.zeros, ("norm",)), rngs=rngs)
        self.lm_head = lm_head(d, dtype, param_dtype, rngs)

    def _ends(self, tokens, offsets):
        """END bits of the rule (``hnet.boundary_rules``), any shape: ``offsets`` = offset in the document."""
        return whitespace_ends(tokens) if self.rule == "whitespace" else fixed_stride_ends(offsets, self.stride)

    def __call__(self, batch) -> ModelOutput:
        x, seg = batch["inputs"], batch["segment_ids"]
        L = x.shape[1]
        M = capacity_slots(self.capacity, L, self.deterministic, max_slots=2 * L)  # nulls + groups
        h = self.pre(constrain(self.embed(x).astype(jnp.float32), ("batch", "byte_len", "act_embed")), seg,
                     batch["positions"])
        ds = doc_starts(seg)
        e = self._ends(x, offsets_since_start(ds)) & (seg > 0)
        b = end_to_start(e, seg)
        # slots per row: [null_d, groups of doc d..., null_{d+1}, ...]; group slot = cid + #docs so far
        slot = chunking.chunk_ids(b) + jnp.cumsum(ds, axis=1, dtype=jnp.int32)
        null_slot = jax.lax.cummax(jnp.where(ds, slot - 1, 0), axis=1)
        ends = jnp.cumsum(e, axis=1, dtype=jnp.int32)
        read = null_slot + ends - jax.lax.cummax(jnp.where(ds, ends - e, 0), axis=1)
        ones = jnp.ones(x.shape + (1,), jnp.float32)
        mean = segment_sum(h, slot, M) / jnp.maximum(segment_sum(ones, slot, M), 1.0)
        null_here = jnp.where(ds, null_slot, -1)
        is_null = segment_sum(ones, null_here, M) > 0
        zseg = (segment_sum(seg[..., None], null_here, M)
                + segment_sum(seg[..., None], jnp.where(b, slot, -1), M))[..., 0]
        z = self.norm(jnp.where(is_null, self.null[...].astype(jnp.float32), mean))
        o = self.backbone(constrain(z, ("batch", "chunk_len", "act_embed")), zseg,
                          offsets_since_start(doc_starts(zseg)))
        y = self.post(h + chunking.take_chunks(o, read), seg, batch["positions"])
        logits = constrain(self.lm_head(y).astype(jnp.float32), ("batch", "byte_len", "act_vocab"))
        dropped = jnp.maximum(slot[:, -1] + 1 - M, 0)
        return ModelOutput(logits_BxLxV=logits, target_mask_BxL=(read < M) | (seg == 0),
                           metrics=chunk_metrics(b, seg, dropped), boundaries={"s0": b})

    def init_cache(self, batch_size: int, max_len: int):
        B, M = batch_size, capacity_slots(self.capacity, max_len, self.deterministic, max_slots=2 * max_len)
        d = self.null.shape[0]
        zi = jnp.zeros((B,), jnp.int32)
        return {"pre": self.pre.init_cache(B, max_len), "post": self.post.init_cache(B, max_len),
                "backbone": self.backbone.init_cache(B, M), "sum": jnp.zeros((B, d), jnp.float32), "cnt": zi,
                "o": jnp.zeros((B, d), jnp.float32), "slots": zi, "cap": jnp.full((B,), M, jnp.int32), "off": zi}

    def decode_step(self, tokens_B, cache, reset_B, side_B=None):
        c = dict(cache)
        h, c["pre"] = self.pre.step(self.embed(tokens_B).astype(jnp.float32), c["pre"], reset_B)
        c["off"] = jnp.where(reset_B, 0, c["off"] + 1)

        def push(z_BxD, active_B, reset):  # one backbone position in the active rows (if it fits)
            fits = c["slots"] < c["cap"]
            o, bb = self.backbone.step(self.norm(z_BxD), c["backbone"], reset)
            c["backbone"] = masked_update(bb, c["backbone"], active_B & fits)
            c["o"] = jnp.where(active_B[:, None], jnp.where(fits[:, None], o, 0.0), c["o"])
            c["slots"] = c["slots"] + active_B

        push(jnp.broadcast_to(self.null[...].astype(jnp.float32), h.shape), reset_B, reset_B)
        s = jnp.where(reset_B[:, None], 0.0, c["sum"]) + h
        n = jnp.where(reset_B, 0, c["cnt"]) + 1
        e = self._ends(tokens_B, c["off"])
        push(s / n[:, None], e, jnp.zeros_like(reset_B))
        c["sum"], c["cnt"] = jnp.where(e[:, None], 0.0, s), jnp.where(e, 0, n)
        y, c["post"] = self.post.step(h + c["o"], c["post"], reset_B)
        return self.lm_head(y).astype(jnp.float32), c
