"""Shared model parts: one copy of each piece that more than one model family uses. A family module
(``models/<family>.py``) imports from here, ``models.base`` and ``hnet`` only, never another family module
(tests/test_layering.py). Primitives with no model contract (layers, chunking, boundary rules, the Dynamic Token
Pooling layers) live in ``hnet``.

  byte_embed, lm_head, dense            Embedding(256, D), the output head, a bias-free dense layer
  masked_update                         per-row select over a cache pytree (decode steps that advance some rows)
  ChunkLayout, chunk_layout,            static-capacity layout of a START mask and its helpers (rule-pooled
  segment_sum, shift_chunks,            models: HAT, LYT, SpaceByte, mean pooling)
  chunk_metrics
  WordPooledLM                          base of the word-pooled models (HAT, LYT): annotation, decoding input
  DTPConfig, HourglassLM                the DTP hourglass: one forward and decode step for DTP and MAGNET
  MrT5Config, DeleteGate, PIController, the MrT5 delete gate, its regulariser and metrics (causal and
  gate_losses, score_regs, loss_metrics encoder-decoder MrT5)

Chunk conventions (shared/reference/boundaries.md §0, §9): chunk boundaries are START bits ``b_BxL`` (b_t = 1
iff byte t opens a chunk; forced at every document start). A row holds at most M chunks (static); chunk ids
cid_t = cumsum(b)_t - 1; chunks with cid >= M are dropped and every byte that would need them gets
``target_mask`` False (counted as overflow).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from hnet import chunking
from hnet.boundary_rules import WordStartTracker, causal_word_starts, doc_starts, end_to_start, offsets_since_start
from hnet.bytes import VOCAB_SIZE
from hnet.dynamic_pooling import (EVAL_NOISE_STEP, DTPPooling, NoiseStep, RoutedPredictor, bce_with_logits,
                                  entropy_spike_targets, gumbel_noise, route_binomial_loss, select_route)
from hnet.layers import Linear, RMSNorm, Stack, StackConfig, normal
from hnet.premium import INVENTORY_MODELS
from hnet.sharding import constrain, param_init
from models.base import (ByteLM, ModelOutput, bits_per_byte, capacity_slots, configurable, cross_entropy_sums,
                         dtype_from_name)

# ------------------------------------------------------------------------------------------------
# Embedding, head, dense layers; cache updates
# ------------------------------------------------------------------------------------------------


def byte_embed(d: int, param_dtype, rngs: nnx.Rngs) -> nnx.Embed:
    """Embedding(256, d), N(0, 1) init."""
    return nnx.Embed(VOCAB_SIZE, d, param_dtype=param_dtype, embedding_init=param_init(normal(1.0), ("vocab", "embed")),
                     rngs=rngs)


def lm_head(d: int, dtype, param_dtype, rngs: nnx.Rngs) -> Linear:
    """[.., d] -> next-byte logits [.., 256], no bias, N(0, 0.02) init."""
    return Linear(d, VOCAB_SIZE, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                  kernel_init=param_init(normal(0.02), ("embed", "vocab")), rngs=rngs)


def dense(d_in: int, d_out: int, std: float, dtype, param_dtype, rngs: nnx.Rngs, names=("embed", "mlp")) -> Linear:
    """Bias-free [.., d_in] -> [.., d_out], N(0, std) init, kernel axes ``names``."""
    return Linear(d_in, d_out, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                  kernel_init=param_init(normal(std), names), rngs=rngs)


def masked_update(new, old, active_B):
    """Per-row select over a pytree whose leaves have the batch as leading axis: ``new`` where ``active_B``."""
    return jax.tree.map(lambda n, o: jnp.where(active_B.reshape((-1,) + (1,) * (n.ndim - 1)), n, o), new, old)


# ------------------------------------------------------------------------------------------------
# Chunk layout of the rule-pooled models
# ------------------------------------------------------------------------------------------------


class ChunkLayout(NamedTuple):
    """Static-capacity description of the chunks of a START mask (M slots per row)."""

    cid_BxL: jax.Array  # chunk id of every byte (may be >= M)
    start_BxM: jax.Array  # position of each chunk's first byte (0 for empty slots)
    valid_BxM: jax.Array
    seg_BxM: jax.Array  # segment id of each chunk (0 for empty slots)
    pos_BxM: jax.Array  # chunk index within its document (backbone positions)
    doc_first_BxM: jax.Array  # chunk opens its document (reads the learned first/null vector)
    byte_ok_BxL: jax.Array  # cid < M
    dropped_B: jax.Array


def chunk_layout(starts_BxL, segment_ids_BxL, M: int) -> ChunkLayout:
    start, valid = chunking.compaction_indices(starts_BxL, M)
    seg = jnp.where(valid, jnp.take_along_axis(segment_ids_BxL, start, axis=1), 0)
    first = doc_starts(seg) & valid
    dropped, ok = chunking.overflow(starts_BxL, M)
    return ChunkLayout(chunking.chunk_ids(starts_BxL), start, valid, seg, offsets_since_start(doc_starts(seg)),
                       first, ok, dropped)


def segment_sum(v_BxLx_, idx_BxL, M: int):
    """out[b, j] = sum_{t: idx[b,t] = j} v[b, t]; indices outside [0, M) are dropped."""
    idx = jnp.where((idx_BxL >= 0) & (idx_BxL < M), idx_BxL, M)
    return jax.vmap(lambda v, i: jax.ops.segment_sum(v, i, num_segments=M + 1))(v_BxLx_, idx)[:, :M]


def shift_chunks(z_BxMx_, first_, doc_first_BxM):
    """prev_j = first if chunk j opens its document else z_{j-1} (the one-chunk lookahead read)."""
    prev = jnp.pad(z_BxMx_, ((0, 0), (1, 0)) + ((0, 0),) * (z_BxMx_.ndim - 2))[:, :-1]
    first = jnp.broadcast_to(first_.astype(prev.dtype), prev.shape)
    return jnp.where(doc_first_BxM.reshape(doc_first_BxM.shape + (1,) * (z_BxMx_.ndim - 2)), first, prev)


def chunk_metrics(starts_BxL, segment_ids_BxL, dropped_B, per_chunk: int = 1) -> dict:
    """Bytes per chunk (ratio of sums and per-row mean, non-pad bytes), overflow count."""
    real = segment_ids_BxL > 0
    n_chunks = jnp.sum(starts_BxL & real, axis=1).astype(jnp.float32)
    n_pos = jnp.sum(real, axis=1).astype(jnp.float32)
    out = {"bytes_per_chunk": jnp.sum(n_pos) / jnp.maximum(jnp.sum(n_chunks), 1),
           "bytes_per_chunk_row_mean": jnp.mean(n_pos / jnp.maximum(n_chunks, 1)),
           "overflow_chunks": jnp.sum(dropped_B).astype(jnp.float32)}
    if per_chunk != 1:
        out["bytes_per_backbone_position"] = out["bytes_per_chunk"] / per_chunk
    return out


class WordPooledLM(ByteLM):
    """Base of the models pooled on the HAT splitter's words (HAT, LYT): the forward reads the ``word_starts``
    annotation through ``word_starts`` (the decided rule, ``hnet.boundary_rules.causal_word_starts``), and
    ``decode_step`` takes the same decided bit of each fed byte from ``decode_trackers``
    (``WordStartTracker``)."""

    def required_annotations(self) -> tuple[str, ...]:
        return ("word_starts",)

    def word_starts(self, batch):
        """Decided word starts of the batch, bool [B, L]."""
        return causal_word_starts(batch["word_starts"], batch["inputs"], batch["segment_ids"])

    def decode_trackers(self, prompts, langs=None) -> list[WordStartTracker]:
        return [WordStartTracker() for _ in prompts]

    def word_start_side(self, side_B):
        """``decode_step``'s ``side_B``: the decided word-start bit of each fed byte, bool [B]; raises when missing."""
        if side_B is None:
            raise ValueError(f"{type(self).__name__} needs the per-byte word-start flag: decode_step(tokens_B, cache, "
                             "reset_B, word_start_B); use train.generate.generate for sampling")
        return side_B


# ------------------------------------------------------------------------------------------------
# The DTP hourglass (DTP, MAGNET)
# ------------------------------------------------------------------------------------------------


@configurable
@dataclasses.dataclass(frozen=True)
class DTPConfig:
    """Configuration of the hourglass models. ``boundary``: 'gumbel' | 'entropy' | 'unigram'. ``routing``:
    'single' (one predictor: ``models.DTPLM``) or, for ``models.MagnetLM``, 'script' | 'doc' | 'lang' with
    ``script_groups`` the grouping (``hnet.scripts.GROUPINGS``) or language set (``LANGUAGE_SETS``) whose names
    ``route_names`` must be (see ``models/magnet.py``). ``priors`` has one α per route, in route-id order."""

    pre_layout: str = "T2"
    inner_layout: str = "T4"
    post_layout: str = "T2"
    d_model: int = 128
    d_ff: int = 384
    num_heads: int = 4
    predictor_hidden: int = 0  # 0 = d_ff (MAGNET: d_inner)
    boundary: str = "gumbel"
    routing: str = "single"
    script_groups: str = "magnet"
    route_names: Sequence[str] = ("all",)
    priors: Sequence[float] = (0.2,)
    # the bytes of these routes start from α_t = premium_scale / π̂_t, π̂_t the document's byte premium estimated
    # from its prefix (``hnet.premium``, model ``premium_model``: annotation 'premium_<premium_model>'), where
    # there is an estimate; MAGNET's catch-all for scripts never seen in training (issue 19)
    premium_routes: Sequence[str] = ()
    premium_model: str = ""
    premium_scale: float = 0.0  # c of ``hnet.scripts.parity_priors`` (α_r = c / π_r) on the training text
    temperature: float = 0.5
    eval_rule: str = "noise"  # gumbel at eval: 'noise' (fixed-key Bernoulli(p), training's rate) | 'threshold' (p > 0.5)
    prior_weight: float = 1.0
    bce_weight: float = 1.0
    spikes_left: int = 2
    capacity: float = 0.5  # slots M = ceil(capacity * L) (nulls + closed chunks)
    noise_seed: int = 0

    def stack(self, layout: str) -> StackConfig:
        return StackConfig(layout=layout, d_model=self.d_model, d_ff=self.d_ff, num_heads=self.num_heads)


class HourglassLM(ByteLM):
    """Hourglass byte LM with DTP pooling and learned boundaries (spec: shared/reference/boundaries.md §D, §E,
    §9-10), the shared forward of ``models.DTPLM`` (one predictor) and ``models.MagnetLM`` (routed predictors).
    A subclass checks its configuration (``check``) and gives the route of every byte (``routes``) and the
    per-route metrics (``route_metrics``):

        h = pre(embed(x))                                   byte-level layers (pre-layer output)
        ℓ_{t,r} = MLP_r(h_t)   (d -> H -> 1, GELU), one predictor per route r (R = 1: plain DTP)
        ℓ_t = ℓ_{t, route_t}                 route_t: 0 | byte t's script | document's script | language
        e_t  (END convention: byte t closes its chunk), decided from h_t only (lookahead 0):
            gumbel, training : e_t = 1[ℓ_t + n_t > 0],  n_t ~ Logistic from fold_in(key(step), row, t),
                               e_st = e + σ((ℓ+n)/τ) - sg(σ((ℓ+n)/τ))   (hard sample ~ Bernoulli(p) for any τ)
            otherwise        : e_t = 1[ℓ_t > 0]  (p > 0.5),  e_st = e + p - sg(p)
        chunks (DTPPooling): START convention once, b_{t+1} = e_t, b = 1 at document starts;
            s_k = LayerNorm(mean of chunk k's h), readable from its closing byte on; a learned null chunk
            opens every document; byte t reads the latest slot at or before t (the DTP rule: the closing
            byte reads its own chunk). Chunks never closed (document tails) are dropped, as in DTP.
        o = inner(slots) ; y = post(h + o_{idx_t}) ; logits = lm_head(y)

    Aux losses (all already weighted):
        gumbel  : binomial prior per route r over that route's bytes of each row:
                  L_r = mean_rows -log Binom(k; n, α_r)/n, k = Σ e_st (straight-through counts), n = non-pad
                  bytes of route r (gammaln, non-integer k); total = mean over the routes present (MAGNET).
        entropy : BCE on logits ℓ vs spikes of the model's own next-byte entropy (stop-gradient).
        unigram : BCE on logits ℓ vs batch['unigram_ends'] (SentencePiece unigram piece ends, ``train.annotations``).

    Deterministic evaluation rule (``model.eval()`` sets ``deterministic=True``; ``DTPConfig.eval_rule``):
      * 'noise' (default): the training rule with a *fixed* key (step ``EVAL_NOISE_STEP``), i.e. e_t =
        1[ℓ_t + n_t > 0], n from fold_in(key, row, t): Bernoulli(p_t) decisions, so eval compression has
        the training distribution (the reference samples noise at eval too), yet runs are repeatable and
        prefix/decode-consistent.
      * 'threshold': e_t = 1[p_t > 0.5]. The hard Gumbel sample is Bernoulli(p) for any τ, so this gives
        a different (usually coarser) compression than training: with p ≈ α = 0.2 it may close no chunk.
    Entropy/unigram predictors always use 1[p > 0.5] (trained by BCE towards hard targets). Compression is
    measured under the rule in use: ``boundary_rate_s0``, ``bytes_per_chunk_s0`` (ratio of sums) and
    ``bytes_per_chunk_row_mean_s0``; ``boundary_prob_s0`` = mean p is the expected training rate.
    """

    def __init__(self, config: DTPConfig = DTPConfig(), *, dtype="float32", param_dtype="float32",
                 remat: bool = False, seed: int = 0):
        cfg = config
        self.check(cfg)
        rngs = nnx.Rngs(seed)
        self.config, self.deterministic = cfg, False
        dtype, param_dtype = dtype_from_name(dtype), dtype_from_name(param_dtype)
        D = cfg.d_model
        self.embed = byte_embed(D, param_dtype, rngs)
        kw = dict(dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=rngs)
        self.pre = Stack(cfg.stack(cfg.pre_layout), **kw)
        self.predictor = RoutedPredictor(D, cfg.predictor_hidden or cfg.d_ff, cfg.priors, param_dtype=param_dtype,
                                         rngs=rngs)
        self.pooling = DTPPooling(D, param_dtype=param_dtype, rngs=rngs)
        self.inner = Stack(cfg.stack(cfg.inner_layout), length_axis="chunk_len", **kw)
        self.post = Stack(cfg.stack(cfg.post_layout), **kw)
        self.lm_head = lm_head(D, dtype, param_dtype, rngs)
        self.noise_step = NoiseStep(jnp.zeros((), jnp.uint32))

    def check(self, cfg: DTPConfig) -> None:
        """Raise ValueError for a configuration this model cannot run (subclasses add their routing rules)."""
        if cfg.boundary not in ("gumbel", "entropy", "unigram"):
            raise ValueError(f"bad boundary {cfg.boundary!r}")
        if len(cfg.priors) != len(cfg.route_names):
            raise ValueError(f"priors {cfg.priors} must match route_names {cfg.route_names}")
        if cfg.premium_routes and (cfg.boundary != "gumbel" or not set(cfg.premium_routes) <= set(cfg.route_names)
                                   or cfg.premium_model not in INVENTORY_MODELS or not 0 < cfg.premium_scale < 1):
            raise ValueError(f"premium_routes {cfg.premium_routes} need a gumbel boundary, routes among "
                             f"{cfg.route_names}, a premium_model in {list(INVENTORY_MODELS)} and 0 < premium_scale < 1")

    def required_annotations(self) -> tuple[str, ...]:
        cfg = self.config
        return (("unigram_ends",) if cfg.boundary == "unigram" else ()) + (
            (f"premium_{cfg.premium_model}",) if cfg.premium_routes else ())

    def route_logit(self, h_BxLxD, route_BxL, premium_BxL=None):
        """(ℓ_t of each byte's route [B, L], per-byte priors α [B, L] or None). With ``premium_routes``, a byte of
        those routes with an estimate π̂_t > 0 (``premium_BxL``) starts from α_t = premium_scale / π̂_t instead
        of its route's α_r: ℓ_t + logit(α_t) - logit(α_r), and its prior counts α_t."""
        cfg = self.config
        logit = select_route(self.predictor(h_BxLxD), route_BxL)
        if not cfg.premium_routes:
            return logit, None
        if premium_BxL is None:
            raise ValueError(f"premium_routes {cfg.premium_routes} need the premium_{cfg.premium_model} annotation "
                             "(and, decoding, (route, premium) side inputs from decode_trackers)")
        alpha_r = jnp.asarray(cfg.priors, jnp.float32)[route_BxL]
        ids = jnp.asarray([list(cfg.route_names).index(r) for r in cfg.premium_routes], jnp.int32)
        est = jnp.any(route_BxL[..., None] == ids, axis=-1) & (premium_BxL > 0)
        alpha = jnp.where(est, jnp.clip(cfg.premium_scale / jnp.where(est, premium_BxL, 1.0), 1e-3, 0.5), alpha_r)
        to_logit = lambda a: jnp.log(a) - jnp.log1p(-a)  # noqa: E731
        return logit + to_logit(alpha) - to_logit(alpha_r), alpha

    def routes(self, batch):
        """Route of every byte, int32 [B, L] (one predictor: 0)."""
        return jnp.zeros_like(batch["inputs"])

    def route_metrics(self, route_BxL, real_BxL, e_BxL, prior_loss_R) -> dict[str, jax.Array]:
        """Per-route metrics (``prior_loss_R``: the per-route prior losses, None without a prior)."""
        del route_BxL, real_BxL, e_BxL, prior_loss_R
        return {}

    def decide(self, logit, t_BxL):
        """(hard e, straight-through e_st) from the selected logits ``logit`` [B, L] at row positions
        ``t_BxL`` (see the class docstring)."""
        cfg = self.config
        p = jax.nn.sigmoid(logit)
        if cfg.boundary != "gumbel" or (self.deterministic and cfg.eval_rule == "threshold"):
            return logit > 0, (logit > 0) + p - jax.lax.stop_gradient(p)
        if self.deterministic:  # eval_rule 'noise': training's Bernoulli(p) rule with a fixed key
            noise = gumbel_noise(EVAL_NOISE_STEP, t_BxL, cfg.noise_seed)
        else:
            noise = gumbel_noise(self.noise_step[...], t_BxL, cfg.noise_seed)
            self.noise_step = NoiseStep(self.noise_step[...] + 1)  # replaced, not mutated (valid under grad)
        soft = jax.nn.sigmoid((logit + noise) / cfg.temperature)
        hard = logit + noise > 0
        return hard, hard + soft - jax.lax.stop_gradient(soft)

    def __call__(self, batch) -> ModelOutput:
        cfg = self.config
        seg, pos = batch["segment_ids"], batch["positions"]
        B, L = seg.shape
        real = seg > 0
        x = constrain(self.embed(batch["inputs"]).astype(jnp.float32), ("batch", "byte_len", "act_embed"))
        h = self.pre(x, seg, pos)
        route = self.routes(batch)
        logit, alpha = self.route_logit(h, route, batch.get(f"premium_{cfg.premium_model}"))
        e, e_st = self.decide(logit, jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L)))
        e, e_st = e & real, e_st * real

        M = capacity_slots(cfg.capacity, L, self.deterministic, max_slots=2 * L)  # a null per document + chunks
        pooled = self.pooling.pool(h, e, seg, M, e_st)
        o = self.inner(pooled.z_BxMxD, pooled.segment_ids_BxM, pooled.positions_BxM)
        y = self.post(h + self.pooling.broadcast(o, pooled), seg, pos)
        logits = constrain(self.lm_head(y).astype(jnp.float32), ("batch", "byte_len", "act_vocab"))

        metrics, loss_R = {}, None
        if cfg.boundary == "gumbel":
            prior, loss_R, _ = route_binomial_loss(e_st, route, real, cfg.priors, alpha)
            aux = cfg.prior_weight * prior
            metrics["prior_loss"] = prior
        else:
            target = (entropy_spike_targets(logits, pos, cfg.spikes_left) if cfg.boundary == "entropy"
                      else batch["unigram_ends"])
            bce = bce_with_logits(logit, target, real)
            aux = cfg.bce_weight * bce
            metrics.update(boundary_bce=bce, target_rate=jnp.sum(target & real) / jnp.maximum(jnp.sum(real), 1))
        n_real, n_chunks = jnp.sum(real, 1), jnp.sum(e, 1)
        metrics.update(
            boundary_rate_s0=jnp.sum(n_chunks) / jnp.maximum(jnp.sum(n_real), 1),
            boundary_prob_s0=jnp.sum(jax.nn.sigmoid(logit) * real) / jnp.maximum(jnp.sum(n_real), 1),
            bytes_per_chunk_s0=jnp.sum(n_real) / jnp.maximum(jnp.sum(n_chunks), 1),
            bytes_per_chunk_row_mean_s0=jnp.sum(jnp.where(n_real > 0, n_real / jnp.maximum(n_chunks, 1), 0.0))
            / jnp.maximum(jnp.sum(n_real > 0), 1),
            overflow_chunks_s0=jnp.sum(pooled.dropped_B).astype(jnp.float32),
            **self.route_metrics(route, real, e, loss_R))
        ok = pooled.byte_ok_BxL | ~real
        return ModelOutput(logits_BxLxV=logits, aux_loss=aux, target_mask_BxL=ok, metrics=metrics,
                           boundaries={"s0": end_to_start(e, seg) & real})

    # ----- incremental decoding: the evaluation rule (call model.eval() first for Gumbel models) -----
    def init_cache(self, batch_size: int, max_len: int):
        D = self.config.d_model
        return {"pre": self.pre.init_cache(batch_size, max_len), "inner": self.inner.init_cache(batch_size, 2 * max_len),
                "post": self.post.init_cache(batch_size, max_len), "sum": jnp.zeros((batch_size, D), jnp.float32),
                "count": jnp.zeros((batch_size,), jnp.float32), "last_o": jnp.zeros((batch_size, D), jnp.float32),
                "route": jnp.zeros((batch_size,), jnp.int32),
                "t": jnp.zeros((batch_size,), jnp.int32)}

    def _inner_step(self, z_BxD, cache, cond_B, reset_B):
        """Advance the inner stack by one slot in the rows where ``cond`` holds."""
        o, new = self.inner.step(z_BxD, cache["inner"], reset_B)
        return dict(cache, inner=masked_update(new, cache["inner"], cond_B),
                    last_o=jnp.where(cond_B[:, None], o, cache["last_o"]))

    def decode_step(self, tokens_B, cache, reset_B, side_B=None):
        """One byte per row. ``side_B``: the byte's route (script / document route) for routed models, from
        ``decode_trackers``, [B], or with ``premium_routes`` [B, 2]: (route, premium estimate π̂); None keeps
        the row's previous route (route 0 from the start). Decisions follow ``decide``; the 'noise' rule keys
        the noise by the row index and the row position t counted from ``init_cache``."""
        B = tokens_B.shape[0]
        h, pre = self.pre.step(self.embed(tokens_B).astype(jnp.float32), cache["pre"], reset_B)
        premium = None
        if side_B is not None and side_B.ndim == 2:
            side_B, premium = side_B[:, 0], side_B[:, 1:].astype(jnp.float32)
        route = cache["route"] if side_B is None else side_B.astype(jnp.int32)
        cache = dict(cache, pre=pre, route=route)
        cache = self._inner_step(self.pooling.null_slot(B), cache, reset_B, reset_B)  # a document opens
        s = jnp.where(reset_B[:, None], 0.0, cache["sum"]) + h
        c = jnp.where(reset_B, 0.0, cache["count"]) + 1.0
        e = self.decide(self.route_logit(h[:, None], route[:, None], premium)[0], cache["t"][:, None])[0][:, 0]
        cache = self._inner_step(self.pooling.chunk_slot(s, c), cache, e, jnp.zeros_like(reset_B))
        cache = dict(cache, sum=jnp.where(e[:, None], 0.0, s), count=jnp.where(e, 0.0, c))
        y, post = self.post.step(h + cache["last_o"], cache["post"], reset_B)
        return self.lm_head(y).astype(jnp.float32), dict(cache, post=post, t=cache["t"] + 1)


# ------------------------------------------------------------------------------------------------
# MrT5 (causal and encoder-decoder)
# ------------------------------------------------------------------------------------------------


@configurable
@dataclasses.dataclass(frozen=True)
class MrT5Config:
    """Layouts: ``encoder_layout`` = the l layers before the gate, ``backbone_layout`` = the layers after it
    (biased / shortened), ``decoder_layout`` = the local byte decoder (causal LM) or the ByT5 decoder
    depth as 'T<n>' (encoder-decoder)."""

    d_model: int = 128
    d_ff: int = 384
    num_heads: int = 4
    rotary_dim: int | None = None  # None = full head dim
    encoder_layout: str = "T3"
    backbone_layout: str = "T6"
    decoder_layout: str = "T2"
    gate_scale: float = -30.0  # k (sigmoid_mask_scale)
    gate_bias_init: float = 1.0  # b₀ = +1: keep-leaning start
    softmax1: bool = True
    score_reg_weight: float = 0.5  # β (0.5 from scratch)
    score_margin: float = 5.0
    target_deletion: float = 0.5  # δ
    kp: float = 0.5
    ki: float = 1e-5
    alpha_init: float = 0.0
    alpha_min: float | None = 0.0  # α = max(alpha_min, P + I); 0 = the paper, None = two-sided (see PIController)
    regularizer_delay: int = 0  # steps before the controller starts
    use_gate: bool = True  # False: the no-deletion baseline of the same model (G = 0, every byte kept)
    # encoder-decoder span corruption (models/mrt5_encdec.py)
    noise_density: float = 0.15
    mean_span_length: int = 3
    target_capacity: float = 0.5  # decoder length / L
    corruption_seed: int = 0

    @property
    def threshold(self) -> float:
        return self.gate_scale / 2.0

    def stack_config(self, layout: str, *, causal: bool = True, score: bool = False) -> StackConfig:
        return StackConfig(layout=layout, d_model=self.d_model, d_ff=self.d_ff, num_heads=self.num_heads,
                           rotary_dim=self.rotary_dim, softmax1=self.softmax1,
                           score_margin=self.score_margin if score else None, causal=causal)


class DeleteGate(nnx.Module):
    """G = k · σ(−(w·RMSNorm(h) + b)); w Xavier-uniform, b₀ = +1; G = k at pads, G = 0 at document starts.
    ``use_gate`` False (the no-deletion baseline): G = 0 at every real byte."""

    def __init__(self, cfg: MrT5Config, *, param_dtype, rngs: nnx.Rngs):
        self.k, self.enabled = cfg.gate_scale, cfg.use_gate
        self.norm = RMSNorm(cfg.d_model, param_dtype=param_dtype)
        self.proj = Linear(
            cfg.d_model, 1, use_bias=True, dtype=jnp.float32, param_dtype=param_dtype,
            kernel_init=param_init(nnx.initializers.xavier_uniform(), ("embed", None)),
            bias_init=param_init(nnx.initializers.constant(cfg.gate_bias_init), (None,)), rngs=rngs)

    def __call__(self, h_BxLxD, real_BxL, start_BxL):
        if not self.enabled:
            return jnp.where(real_BxL, 0.0, self.k)
        G = self.k * jax.nn.sigmoid(-self.proj(self.norm(h_BxLxD))[..., 0])
        return jnp.where(real_BxL, jnp.where(start_BxL, 0.0, G), self.k)


class PIState(nnx.Variable):
    """PI-controller state: not a parameter, carried in TrainState.rest and saved in checkpoints."""


class PIController(nnx.Module):
    """α for the gate loss, driven by the hard deleted fraction (MrT5 trainer).

    Why the paper's settings over-delete in the tiny causal runs (measured on tinyshakespeare, lr 3e-3):
    without any regulariser the task loss lowers δ̂ (0.33 → 0.10 by step 120: the backbone prefers to see
    every byte), so the rate must be held up by α > 0. But the deleted fraction responds to α with a gain
    far above the paper's (lr 3e-3 vs 1e-4, and the gradient of α·mean(G) reaches the whole local encoder
    through RMSNorm(h), not just w and b): with k_p = 0.5 the loop is unstable, δ̂ went 0.20 → 0.94 within
    10 steps of the regulariser delay. Deletion is then absorbing: a key at G ≈ k gets attention weight ~e^k
    and a saturated sigmoid, hence ~no task gradient, and α ≥ 0 cannot push back (δ̂ stayed at 0.90-0.99
    for the next 60 steps with α = 0). Two departures, both configurable (defaults = the paper):
      ``alpha_min = None``: α = P + I unclipped, so δ̂ > δ gives α < 0 and α·mean(G) pushes G → 0 (in a run
        with the paper's gains, and the gate's own LR × 0.1, this pulled δ̂ from 0.93 to 0.71 in 10 steps,
        then overshot to 0.00: still unstable);
      smaller k_p and larger k_i (configs/mrt5_causal_tiny.gin: 0.05, 1e-3): the linearised loop
        δ̂ ← δ̂ + g·α with this controller is stable for plant gains g from 0.3 to 10 per step (the range
        seen: ~0.25 pulling back, ~3.5 pushing), and the I term removes the P term's steady-state error.
    """

    def __init__(self, cfg: MrT5Config):
        self.target, self.kp, self.ki, self.delay = cfg.target_deletion, cfg.kp, cfg.ki, cfg.regularizer_delay
        self.alpha_min = cfg.alpha_min
        self.p = PIState(jnp.zeros((), jnp.float32))
        self.i = PIState(jnp.zeros((), jnp.float32))
        self.alpha = PIState(jnp.full((), cfg.alpha_init, jnp.float32))
        self.step = PIState(jnp.zeros((), jnp.int32))

    def update(self, deleted_fraction):
        """One controller step on δ̂ (no gradient); inactive (only counting) before ``delay`` steps."""
        e = self.target - jax.lax.stop_gradient(deleted_fraction).astype(jnp.float32)
        active = self.step[...] >= self.delay
        p = 0.9 * self.p[...] + 0.1 * self.kp * e
        i = self.i[...] + self.ki * e
        alpha = p + i if self.alpha_min is None else jnp.maximum(self.alpha_min, p + i)
        # new Variables rather than in-place writes: under the trainer's jax.grad the merged state's
        # variables belong to the outer trace and refuse mutation; the module itself is rebuilt inside it
        self.p = PIState(jnp.where(active, p, self.p[...]))
        self.i = PIState(jnp.where(active, i, self.i[...]))
        self.alpha = PIState(jnp.where(active, alpha, self.alpha[...]))
        self.step = PIState(self.step[...] + 1)


def gate_losses(cfg: MrT5Config, controller: PIController, G_BxL, keep_BxL, real_BxL, score_regs, *,
                training: bool):
    """(aux loss, metrics): α·mean(G) + β·mean(score regs); updates the controller when ``training``
    (the loss uses α before this step's update, as the reference trainer)."""
    n = jnp.maximum(jnp.sum(real_BxL), 1)
    gate_mean = jnp.sum(G_BxL * real_BxL) / n
    deleted = jnp.sum(real_BxL & ~keep_BxL) / n
    alpha = controller.alpha[...]
    score_reg = sum(score_regs) / max(len(score_regs), 1)
    aux = alpha * gate_mean + cfg.score_reg_weight * score_reg
    if training:
        controller.update(deleted)
    kept_B = jnp.sum(keep_BxL & real_BxL, axis=1)
    metrics = {"gate_loss": gate_mean, "score_reg": jnp.asarray(score_reg, jnp.float32), "deletion_rate": deleted,
               "deletion_target": jnp.asarray(cfg.target_deletion, jnp.float32), "alpha": alpha,
               "pi_p": controller.p[...], "pi_i": controller.i[...],
               "backbone_len": jnp.mean(kept_B.astype(jnp.float32)),
               "bytes_per_kept": jnp.sum(real_BxL) / jnp.maximum(jnp.sum(kept_B), 1)}
    return aux, metrics


def score_regs(stack: Stack) -> list[jax.Array]:
    """The score regularisers the stack's attention layers recorded in their last full forward."""
    return [b.mixer.score_reg[...] for b in stack.blocks
            if b.kind == "t" and b.mixer.score_reg is not None]


def loss_metrics(prefix: str, logits_BxLxV, target_mask_BxL, batch) -> dict[str, jax.Array]:
    """{prefix}_ce and {prefix}_bpb of one set of logits on the batch (when it carries targets)."""
    if "targets" not in batch:
        return {}
    s = cross_entropy_sums(ModelOutput(logits_BxLxV, target_mask_BxL=target_mask_BxL), batch)
    return {f"{prefix}_ce": s["nll_sum"] / jnp.maximum(s["n_targets"], 1.0),
            f"{prefix}_bpb": bits_per_byte(s["byte_nll_sum"], s["n_bytes"])}
