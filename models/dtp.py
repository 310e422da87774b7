"""Dynamic Token Pooling (Nawrot et al. 2023) and MAGNET (Ahia et al. 2024) hourglass byte LMs.

Spec: shared/reference/boundaries.md §D, §E, §9-10. One model, ``DTPLM``:

    h = pre(embed(x))                                   byte-level layers (pre-layer output)
    ℓ_{t,r} = MLP_r(h_t)   (d -> H -> 1, GELU), one predictor per route r (R = 1: plain DTP)
    ℓ_t = ℓ_{t, route_t}                                route_t: 0 | byte t's script | document's script | language
    e_t  (END convention: byte t closes its chunk), decided from h_t only (lookahead 0):
        gumbel, training : e_t = 1[ℓ_t + n_t > 0],  n_t ~ Logistic from fold_in(key(step), row, t),
                           e_st = e + σ((ℓ+n)/τ) - sg(σ((ℓ+n)/τ))         (hard sample ~ Bernoulli(p) for any τ)
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

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from hnet import chunking
from hnet.boundary_rules import doc_starts, end_to_start
from hnet.bytes import BOS, VOCAB_SIZE
from hnet.layers import Stack, StackConfig, normal
from hnet.scripts import GROUPINGS, LANGUAGE_SETS, byte_routes, dominant_route
from hnet.sharding import constrain, param_init
from models import dtp_targets as tg
from models.base import ByteLM, ModelOutput, capacity_slots, configurable, dtype_from_name
from models.hnet import positions_within_docs, ste_one


# ----------------------------------------------------------------------------------------------
# Pooling block (shared with the DTP whitespace baseline)
# ----------------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Pooled:
    """Output of ``DTPPooling.pool``: the inner sequence and what ``broadcast`` needs."""

    z_BxMxD: jax.Array  # LayerNorm([null | chunk means]) in slot order, zeros in unused slots
    segment_ids_BxM: jax.Array  # document id of each slot, 0 = unused
    positions_BxM: jax.Array  # slot index inside its document (null = 0)
    slots_Bx2L: jax.Array  # bool: slot 2t = null of a document starting at t, slot 2t+1 = chunk closing at t
    byte_ok_BxL: jax.Array  # False where the slot a byte reads was dropped (capacity M)
    dropped_B: jax.Array  # slots past M per row


class DTPPooling(nnx.Module):
    """DTP mean pooling over END-convention groups, learned null chunk, LayerNorm, DTP broadcast.

    Reusable by any DTP-style model (whitespace, Gumbel, entropy, unigram, MAGNET):

        pooled = pooling.pool(h_BxLxD, e_BxL, segment_ids_BxL, M, e_st_BxL=None)
        o_BxMxD = inner(pooled.z_BxMxD, pooled.segment_ids_BxM, pooled.positions_BxM)
        u_BxLxD = pooling.broadcast(o_BxMxD, pooled)        # then y = post(h + u)

    ``e_BxL`` (bool, END convention: byte t closes its chunk) is converted once to START
    (b_{t+1} = e_t, b = 1 at every document start), so chunk k = bytes after the previous close.
    The slot sequence holds, in byte order, one learned ``null`` per document (at its first byte) and
    one slot per closed chunk (at its closing byte): s_k = mean(h over chunk k), so it depends only on
    bytes <= the close. Slots -> LayerNorm -> inner. Byte t reads the latest slot at or before t:
        u_t = o[#{slots with position <= t} - 1],  null before the document's first close,
    so the closing byte reads its own chunk (legal: e_t is decided from h_t). Nothing crosses a
    document; a chunk never closed (document tail) is dropped, as in DTP. Static capacity M: slots
    past M are dropped and the bytes reading them get ``byte_ok`` False (mask their targets).

    Gradient to the boundaries (DTP's pooling matrix): each member's pooling weight is
    w_t = 1 + (E_t - sg(E_t)), E_t = Σ_{s<t} e_st (value exactly 1), so mean = Σ w h / Σ w passes the
    LM gradient to the straight-through ``e_st_BxL`` (None: no gradient path, e.g. rule boundaries).

    Decoding: ``null_slot`` and ``chunk_slot(sum, count)`` give the same slot vectors one at a time.
    """

    def __init__(self, d: int, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.null = nnx.Param(param_init(normal(1.0), ("embed",))(rngs.params(), (d,), param_dtype))
        self.norm = nnx.LayerNorm(d, epsilon=1e-5, dtype=jnp.float32, param_dtype=param_dtype,
                                  scale_init=param_init(nnx.initializers.ones, ("norm",)),
                                  bias_init=param_init(nnx.initializers.zeros, ("norm",)), rngs=rngs)

    def pool(self, h_BxLxD, e_BxL, segment_ids_BxL, M: int, e_st_BxL=None) -> Pooled:
        B, L, D = h_BxLxD.shape
        real = segment_ids_BxL > 0
        e = e_BxL.astype(bool) & real
        cid_BxL = chunking.chunk_ids(end_to_start(e, segment_ids_BxL))  # >= 0 (b_0 = 1)
        h = h_BxLxD.astype(jnp.float32)
        w_BxL = jnp.ones((B, L), jnp.float32)
        if e_st_BxL is not None:
            E = jnp.cumsum(e_st_BxL.astype(jnp.float32), axis=1) - e_st_BxL
            w_BxL = ste_one(E)
        flat = (jnp.arange(B, dtype=jnp.int32)[:, None] * L + cid_BxL).reshape(-1)
        sums = jax.ops.segment_sum((w_BxL[..., None] * h).reshape(B * L, D), flat, num_segments=B * L)
        cnt = jax.ops.segment_sum(w_BxL.reshape(-1), flat, num_segments=B * L)
        mean_BxLxD = (sums[flat] / jnp.maximum(cnt[flat], 1e-6)[:, None]).reshape(B, L, D)

        starts = doc_starts(segment_ids_BxL)
        null = jnp.broadcast_to(self.null[...].astype(jnp.float32), (B, L, D))
        x2 = jnp.stack([null, mean_BxLxD], axis=2).reshape(B, 2 * L, D)
        slots = jnp.stack([starts, e], axis=2).reshape(B, 2 * L)
        seg2 = jnp.repeat(segment_ids_BxL, 2, axis=1)
        z, valid = chunking.compact(x2, slots, M)
        zseg = jnp.where(valid, chunking.compact(seg2[..., None].astype(jnp.float32), slots, M)[0][..., 0]
                         .astype(jnp.int32), 0)
        z = jnp.where(valid[..., None], self.norm(z), 0.0)
        dropped, ok2 = chunking.overflow(slots, M)
        return Pooled(z_BxMxD=constrain(z, ("batch", "chunk_len", "act_embed")), segment_ids_BxM=zseg,
                      positions_BxM=positions_within_docs(doc_starts(zseg)), slots_Bx2L=slots,
                      byte_ok_BxL=ok2[:, 1::2], dropped_B=dropped)

    def broadcast(self, o_BxMxD, pooled: Pooled):
        """u_t = o of the latest slot at or before byte t (zeros where that slot was dropped)."""
        return chunking.expand(o_BxMxD, pooled.slots_Bx2L)[:, 1::2]

    # ----- decoding: slot vectors one at a time -----
    def null_slot(self, batch_size: int):
        return self.norm(jnp.broadcast_to(self.null[...].astype(jnp.float32), (batch_size, self.null.shape[0])))

    def chunk_slot(self, sum_BxD, count_B):
        return self.norm(sum_BxD / jnp.maximum(count_B, 1.0)[:, None])


# ----------------------------------------------------------------------------------------------
# Routed boundary predictor and the model
# ----------------------------------------------------------------------------------------------


class RoutedPredictor(nnx.Module):
    """R boundary MLPs on the pre-layer output, all computed, one selected per byte (no batch split):
    ℓ_{t,r} = w2_r · GELU(W1_r h_t + b1_r) + b2_r, b2_r initialised to logit(α_r) (start at the prior)."""

    def __init__(self, d: int, hidden: int, priors: Sequence[float], *, param_dtype, rngs: nnx.Rngs):
        R = len(priors)
        self.R, self.hidden = R, hidden
        self.fc1 = nnx.Linear(d, R * hidden, dtype=jnp.float32, param_dtype=param_dtype,
                              kernel_init=param_init(normal(0.02), ("embed", "mlp")),
                              bias_init=param_init(nnx.initializers.zeros, ("mlp",)), rngs=rngs)
        self.w2 = nnx.Param(param_init(normal(0.02), ("router", None))(rngs.params(), (R, hidden), param_dtype))
        logit = [math.log(a / (1.0 - a)) for a in priors]
        self.b2 = nnx.Param(param_init(lambda k, s, dt: jnp.asarray(logit, dt), ("router",))(None, (R,), param_dtype))

    def __call__(self, h_BxLxD):
        """-> logits [..., R] (fp32)."""
        a = jax.nn.gelu(self.fc1(h_BxLxD.astype(jnp.float32)))
        a = a.reshape(*a.shape[:-1], self.R, self.hidden)
        return jnp.einsum("...rh,rh->...r", a, self.w2[...].astype(jnp.float32)) + self.b2[...].astype(jnp.float32)


def select_route(logits_BxLxR, route_BxL):
    """ℓ_t = ℓ_{t, route_t}: every route's predictor is computed, each byte takes its own."""
    return jnp.take_along_axis(logits_BxLxR, route_BxL[..., None].astype(jnp.int32), axis=-1)[..., 0]


def gumbel_noise(step, t_BxL, seed: int = 0):
    """Logistic noise n[b, t] = logit(u), u from fold_in(fold_in(fold_in(key(seed), step), b), t[b, t])
    (t = absolute position in the row): a prefix of a row draws the same noise as the full row."""
    base = jax.random.fold_in(jax.random.key(seed), step)
    rows_B = jnp.arange(t_BxL.shape[0])

    def one(b, t):
        u = jax.random.uniform(jax.random.fold_in(jax.random.fold_in(base, b), t), (), jnp.float32,
                               minval=1e-6, maxval=1.0 - 1e-6)
        return jnp.log(u) - jnp.log1p(-u)

    return jax.vmap(jax.vmap(one, (None, 0)), (0, 0))(rows_B, t_BxL)


EVAL_NOISE_STEP = 0xFFFFFFFF  # fixed key of the deterministic 'noise' evaluation rule


class NoiseStep(nnx.Variable):
    """Counter of training forwards (not a parameter; checkpointed in TrainState.rest): the Gumbel key."""


@configurable
@dataclasses.dataclass(frozen=True)
class DTPConfig:
    """``boundary``: 'gumbel' | 'entropy' | 'unigram'. ``routing``: 'single' (one predictor, plain DTP),
    'script' (per byte by the causal script route, MAGNET per-byte), 'doc' (per sequence by the
    document's dominant script, MAGNET's script-label routing) or 'lang' (per sequence by the document's
    language label, one route per language). ``script_groups`` names the grouping in
    ``hnet.scripts.GROUPINGS`` ('magnet': latin, cyrl, deva, other; 'ntrex': one group per script of
    NTREX's 22 languages), or for 'lang' the language set in ``hnet.scripts.LANGUAGE_SETS``; routed
    models read batch['script_routes' | 'doc_routes'] ('magnet') or batch['script_routes_<groups>' |
    'doc_routes_<groups>' | 'lang_routes_<groups>'] (``train.annotations``), and ``route_names`` must be
    the grouping's names. ``priors`` has one α per route, in route-id order."""

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
    temperature: float = 0.5
    eval_rule: str = "noise"  # gumbel at eval: 'noise' (fixed-key Bernoulli(p), training's rate) | 'threshold' (p > 0.5)
    prior_weight: float = 1.0
    bce_weight: float = 1.0
    spikes_left: int = 2
    capacity: float = 0.5  # slots M = ceil(capacity * L) (nulls + closed chunks)
    noise_seed: int = 0

    def stack(self, layout: str) -> StackConfig:
        return StackConfig(layout=layout, d_model=self.d_model, d_ff=self.d_ff, num_heads=self.num_heads)


_ROUTE_KEYS = {"single": None, "script": "script_routes", "doc": "doc_routes", "lang": "lang_routes"}


def route_key(routing: str, script_groups: str = "magnet") -> str | None:
    """Batch key of the per-byte route ids (None for a single predictor)."""
    key = _ROUTE_KEYS[routing]
    return key if key is None or script_groups == "magnet" else f"{key}_{script_groups}"


class RouteTracker:
    """Host-side route of each fed byte of one row (generation): a fixed document route, or with ``groups`` the
    causal script route of the bytes so far, as the ``script_routes`` annotation gives it (BOS: route 0; then
    ``hnet.scripts.byte_routes``, prefix-stable). O(row length) per byte."""

    def __init__(self, groups=None, route: int = 0):
        self.groups, self.route, self.content = groups, route, bytearray()

    def push(self, byte: int) -> int:
        if self.groups is None:
            return self.route
        if byte == BOS and not self.content:
            return 0
        self.content.append(byte)
        return int(byte_routes(bytes(self.content), self.groups)[-1])


class DTPLM(ByteLM):
    """Hourglass byte LM with DTP pooling and (routed) learned boundaries; see the module docstring."""

    def __init__(self, config: DTPConfig = DTPConfig(), *, dtype="float32", param_dtype="float32",
                 remat: bool = False, seed: int = 0):
        cfg = config
        if cfg.boundary not in ("gumbel", "entropy", "unigram") or cfg.routing not in _ROUTE_KEYS:
            raise ValueError(f"bad boundary {cfg.boundary!r} or routing {cfg.routing!r}")
        if len(cfg.priors) != len(cfg.route_names) or (cfg.routing == "single" and len(cfg.priors) != 1):
            raise ValueError(f"priors {cfg.priors} must match route_names {cfg.route_names} (1 when single)")
        if cfg.routing != "single":
            names = tuple((LANGUAGE_SETS if cfg.routing == "lang" else GROUPINGS)[cfg.script_groups])
            if tuple(cfg.route_names) != names:
                raise ValueError(f"route_names {cfg.route_names} must be the {cfg.script_groups!r} routes {names}")
        rngs = nnx.Rngs(seed)
        self.config, self.deterministic = cfg, False
        dtype, param_dtype = dtype_from_name(dtype), dtype_from_name(param_dtype)
        D = cfg.d_model
        self.embed = nnx.Embed(VOCAB_SIZE, D, param_dtype=param_dtype,
                               embedding_init=param_init(normal(1.0), ("vocab", "embed")), rngs=rngs)
        kw = dict(dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=rngs)
        self.pre = Stack(cfg.stack(cfg.pre_layout), **kw)
        self.predictor = RoutedPredictor(D, cfg.predictor_hidden or cfg.d_ff, cfg.priors, param_dtype=param_dtype,
                                         rngs=rngs)
        self.pooling = DTPPooling(D, param_dtype=param_dtype, rngs=rngs)
        self.inner = Stack(cfg.stack(cfg.inner_layout), length_axis="chunk_len", **kw)
        self.post = Stack(cfg.stack(cfg.post_layout), **kw)
        self.lm_head = nnx.Linear(D, VOCAB_SIZE, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                                  kernel_init=param_init(normal(0.02), ("embed", "vocab")), rngs=rngs)
        self.noise_step = NoiseStep(jnp.zeros((), jnp.uint32))

    def required_annotations(self) -> tuple[str, ...]:
        key = route_key(self.config.routing, self.config.script_groups)
        return ((key,) if key else ()) + (("unigram_ends",) if self.config.boundary == "unigram" else ())

    def routes(self, batch):
        key = route_key(self.config.routing, self.config.script_groups)
        return jnp.zeros_like(batch["inputs"]) if key is None else batch[key].astype(jnp.int32)

    def decide(self, logit, t_BxL):
        """(hard e, straight-through e_st) from the selected logits ``logit`` [B, L] at row positions
        ``t_BxL`` (see the module docstring)."""
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
        logit = select_route(self.predictor(h), route)
        e, e_st = self.decide(logit, jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L)))
        e, e_st = e & real, e_st * real

        M = capacity_slots(cfg.capacity, L, self.deterministic)
        pooled = self.pooling.pool(h, e, seg, M, e_st)
        o = self.inner(pooled.z_BxMxD, pooled.segment_ids_BxM, pooled.positions_BxM)
        y = self.post(h + self.pooling.broadcast(o, pooled), seg, pos)
        logits = constrain(self.lm_head(y).astype(jnp.float32), ("batch", "byte_len", "act_vocab"))

        metrics = {}
        if cfg.boundary == "gumbel":
            prior, loss_R, present_R = tg.route_binomial_loss(e_st, route, real, cfg.priors)
            aux = cfg.prior_weight * prior
            metrics["prior_loss"] = prior
        else:
            target = (tg.entropy_spike_targets(logits, pos, cfg.spikes_left) if cfg.boundary == "entropy"
                      else batch["unigram_ends"])
            bce = tg.bce_with_logits(logit, target, real)
            aux = cfg.bce_weight * bce
            metrics.update(boundary_bce=bce, target_rate=jnp.sum(target & real) / jnp.maximum(jnp.sum(real), 1))
        n_real, n_chunks = jnp.sum(real, 1), jnp.sum(e, 1)
        metrics.update(
            boundary_rate_s0=jnp.sum(n_chunks) / jnp.maximum(jnp.sum(n_real), 1),
            boundary_prob_s0=jnp.sum(jax.nn.sigmoid(logit) * real) / jnp.maximum(jnp.sum(n_real), 1),
            bytes_per_chunk_s0=jnp.sum(n_real) / jnp.maximum(jnp.sum(n_chunks), 1),
            bytes_per_chunk_row_mean_s0=jnp.sum(jnp.where(n_real > 0, n_real / jnp.maximum(n_chunks, 1), 0.0))
            / jnp.maximum(jnp.sum(n_real > 0), 1),
            overflow_chunks_s0=jnp.sum(pooled.dropped_B).astype(jnp.float32))
        if cfg.routing != "single":
            for r, name in enumerate(cfg.route_names):
                m = real & (route == r)
                # nan when the batch has no byte of this route (not 0: that would read as "no chunks")
                metrics[f"bytes_per_chunk_{name}"] = jnp.where(jnp.any(m), jnp.sum(m) / jnp.maximum(jnp.sum(e & m), 1),
                                                               jnp.nan)
                if cfg.boundary == "gumbel":
                    metrics[f"prior_loss_{name}"] = loss_R[r]
        ok = pooled.byte_ok_BxL | ~real
        return ModelOutput(logits_BxLxV=logits, aux_loss=aux, target_mask_BxL=ok, metrics=metrics,
                           boundaries={"s0": end_to_start(e, seg) & real})

    # ----- incremental decoding: the evaluation rule (call model.eval() first for Gumbel models) -----
    def init_cache(self, batch_size: int, max_len: int):
        D = self.config.d_model
        return {"pre": self.pre.init_cache(batch_size, max_len), "inner": self.inner.init_cache(batch_size, max_len),
                "post": self.post.init_cache(batch_size, max_len), "sum": jnp.zeros((batch_size, D), jnp.float32),
                "count": jnp.zeros((batch_size,), jnp.float32), "last_o": jnp.zeros((batch_size, D), jnp.float32),
                "route": jnp.zeros((batch_size,), jnp.int32),
                "t": jnp.zeros((batch_size,), jnp.int32)}

    def _inner_step(self, z_BxD, cache, cond_B, reset_B):
        """Advance the inner stack by one slot in the rows where ``cond`` holds."""
        o, new = self.inner.step(z_BxD, cache["inner"], reset_B)
        inner = jax.tree.map(lambda n, old: jnp.where(cond_B.reshape((-1,) + (1,) * (n.ndim - 1)), n, old),
                             new, cache["inner"])
        return dict(cache, inner=inner, last_o=jnp.where(cond_B[:, None], o, cache["last_o"]))

    def decode_trackers(self, prompts: list[bytes], langs: list[str] | None = None) -> list[RouteTracker] | None:
        """The host-side route of every fed byte, one tracker per row (train.generate; None for one predictor):
        'script': the causal script route of the row so far; 'doc': the prompt's dominant script group (the
        forward's is the whole document's); 'lang': the index of the row's language in ``langs``."""
        cfg = self.config
        if cfg.routing == "single":
            return None
        if cfg.routing == "lang":
            if not langs or len(langs) != len(prompts) or any(g not in cfg.route_names for g in langs):
                raise ValueError(f"a language-routed model samples with one language per prompt from "
                                 f"{list(cfg.route_names)}; got {langs!r} for {len(prompts)} prompts")
            return [RouteTracker(route=list(cfg.route_names).index(g)) for g in langs]
        groups = GROUPINGS[cfg.script_groups]
        if cfg.routing == "doc":
            return [RouteTracker(route=dominant_route(p, groups)) for p in prompts]
        return [RouteTracker(groups=groups) for _ in prompts]

    def decode_step(self, tokens_B, cache, reset_B, side_B=None):
        """One byte per row. ``side_B``: the byte's route (script / document route) for routed models, from
        ``decode_trackers``; None keeps the row's previous route (route 0 from the start). Decisions follow
        ``decide``; the 'noise' rule keys the noise by the row index and the row position t counted from
        ``init_cache``."""
        B = tokens_B.shape[0]
        h, pre = self.pre.step(self.embed(tokens_B).astype(jnp.float32), cache["pre"], reset_B)
        route = cache["route"] if side_B is None else side_B.astype(jnp.int32)
        cache = dict(cache, pre=pre, route=route)
        cache = self._inner_step(self.pooling.null_slot(B), cache, reset_B, reset_B)  # a document opens
        s = jnp.where(reset_B[:, None], 0.0, cache["sum"]) + h
        c = jnp.where(reset_B, 0.0, cache["count"]) + 1.0
        e = self.decide(select_route(self.predictor(h[:, None]), route[:, None]), cache["t"][:, None])[0][:, 0]
        cache = self._inner_step(self.pooling.chunk_slot(s, c), cache, e, jnp.zeros_like(reset_B))
        cache = dict(cache, sum=jnp.where(e[:, None], 0.0, s), count=jnp.where(e, 0.0, c))
        y, post = self.post.step(h + cache["last_o"], cache["post"], reset_B)
        return self.lm_head(y).astype(jnp.float32), dict(cache, post=post, t=cache["t"] + 1)
