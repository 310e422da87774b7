"""Dynamic Token Pooling parts shared by the DTP and MAGNET hourglass models (Nawrot et al. 2023; Ahia et al. 2024;
shared/reference/boundaries.md §D, §E, §9-10, traps 5-6).

Layers:
  * ``DTPPooling``: mean pooling over END-convention groups with a learned null chunk per document, and the DTP
    broadcast back to the bytes (``pool`` -> inner stack -> ``broadcast``);
  * ``RoutedPredictor`` + ``select_route``: R boundary MLPs, one selected per byte (R = 1: plain DTP);
  * ``gumbel_noise``: position-keyed logistic noise (a prefix of a row draws the noise of the full row);
    ``NoiseStep``: the counter of training forwards that keys it, ``EVAL_NOISE_STEP`` the fixed evaluation key.
Boundary losses and targets (in-graph):
  * ``binomial_nll(k, n, alpha)``: -log Binom(k; n, α) via gammaln (k may be non-integer);
  * ``route_binomial_loss``: MAGNET prior per route over that route's bytes of each row;
  * ``bce_with_logits``: BCE on *logits* (the reference applies σ twice; we do not);
  * ``entropy_spike_targets``: e_t = 1 iff H_t > H_{t-i} for i = 1..spikes_left (same document),
    the first ``spikes_left`` positions of a document default to 1; H from stop-gradient logits.
The host-side annotations these losses read (``unigram_ends``, ``doc_routes``, ``script_routes_<g>``) are built
by the data pipeline (``train/annotations.py``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.scipy.special import gammaln

from hnet import chunking
from hnet.boundary_rules import doc_starts, end_to_start, offsets_since_start
from hnet.layers import Linear, normal, ste_one
from hnet.sharding import constrain, param_init


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

    Used by the DTP and MAGNET hourglass models (Gumbel, entropy, unigram boundaries):

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
        zseg, = chunking.compact_ids(slots, M, seg2)
        z = jnp.where(valid[..., None], self.norm(z), 0.0)
        dropped, ok2 = chunking.overflow(slots, M)
        return Pooled(z_BxMxD=constrain(z, ("batch", "chunk_len", "act_embed")), segment_ids_BxM=zseg,
                      positions_BxM=offsets_since_start(doc_starts(zseg)), slots_Bx2L=slots,
                      byte_ok_BxL=ok2[:, 1::2], dropped_B=dropped)

    def broadcast(self, o_BxMxD, pooled: Pooled):
        """u_t = o of the latest slot at or before byte t (zeros where that slot was dropped)."""
        return chunking.expand(o_BxMxD, pooled.slots_Bx2L)[:, 1::2]

    # ----- decoding: slot vectors one at a time -----
    def null_slot(self, batch_size: int):
        return self.norm(jnp.broadcast_to(self.null[...].astype(jnp.float32), (batch_size, self.null.shape[0])))

    def chunk_slot(self, sum_BxD, count_B):
        return self.norm(sum_BxD / jnp.maximum(count_B, 1.0)[:, None])


class RoutedPredictor(nnx.Module):
    """R boundary MLPs on the pre-layer output, all computed, one selected per byte (no batch split):
    ℓ_{t,r} = w2_r · GELU(W1_r h_t + b1_r) + b2_r, b2_r initialised to logit(α_r) (start at the prior)."""

    def __init__(self, d: int, hidden: int, priors: Sequence[float], *, param_dtype, rngs: nnx.Rngs):
        R = len(priors)
        self.R, self.hidden = R, hidden
        self.fc1 = Linear(d, R * hidden, dtype=jnp.float32, param_dtype=param_dtype,
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


def binomial_nll(k, n, alpha):
    """-log Binom(k; n, α) = -[lnΓ(n+1) - lnΓ(k+1) - lnΓ(n-k+1) + k ln α + (n-k) ln(1-α)]."""
    k, n = jnp.asarray(k, jnp.float32), jnp.asarray(n, jnp.float32)
    log_pmf = (gammaln(n + 1) - gammaln(k + 1) - gammaln(n - k + 1)
               + k * jnp.log(alpha) + (n - k) * jnp.log1p(-alpha))
    return -log_pmf


def route_binomial_loss(e_st_BxL, route_BxL, real_BxL, priors, alpha_BxL=None):
    """Per route r: L_r = mean over rows with n_br > 0 of binomial_nll(k_br, n_br, α_br) / n_br, with
    k_br = Σ_t e_st over the row's non-pad bytes of route r and α_br = α_r, or with per-byte priors
    ``alpha_BxL`` their mean over those bytes. Returns (mean over present routes, [R] L_r, [R] present)."""
    R = len(priors)
    onehot_BxLxR = (route_BxL[..., None] == jnp.arange(R)) & real_BxL[..., None]
    n_BxR = jnp.sum(onehot_BxLxR, axis=1).astype(jnp.float32)
    k_BxR = jnp.einsum("bl,blr->br", e_st_BxL.astype(jnp.float32), onehot_BxLxR.astype(jnp.float32))
    alpha_R = jnp.asarray(priors, jnp.float32)
    if alpha_BxL is not None:
        sum_BxR = jnp.einsum("bl,blr->br", alpha_BxL.astype(jnp.float32), onehot_BxLxR.astype(jnp.float32))
        alpha_R = jnp.where(n_BxR > 0, sum_BxR / jnp.maximum(n_BxR, 1.0), alpha_R)
    has_BxR = n_BxR > 0
    nll_BxR = jnp.where(has_BxR, binomial_nll(k_BxR, n_BxR, alpha_R) / jnp.maximum(n_BxR, 1.0), 0.0)
    rows_R = jnp.sum(has_BxR, axis=0)
    loss_R = jnp.sum(nll_BxR, axis=0) / jnp.maximum(rows_R, 1)
    present_R = rows_R > 0
    total = jnp.sum(loss_R) / jnp.maximum(jnp.sum(present_R), 1)
    return total, loss_R, present_R


def bce_with_logits(logits, targets, mask):
    """Mean over ``mask`` of -[y log σ(ℓ) + (1-y) log(1-σ(ℓ))], computed stably from the logits ℓ."""
    y = targets.astype(jnp.float32)
    ll = y * jax.nn.log_sigmoid(logits) + (1.0 - y) * jax.nn.log_sigmoid(-logits)
    m = mask.astype(jnp.float32)
    return -jnp.sum(ll * m) / jnp.maximum(jnp.sum(m), 1.0)


def entropy_spike_targets(logits_BxLxV, positions_BxL, spikes_left: int = 2):
    """bool [B, L]: H_t > H_{t-i} for i = 1..spikes_left, True for the first ``spikes_left`` positions
    of each document (``positions`` restart at 0 per document). No gradient."""
    lg = jax.lax.stop_gradient(logits_BxLxV.astype(jnp.float32))
    logp = jax.nn.log_softmax(lg, axis=-1)
    H = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    spike = jnp.ones(H.shape, bool)
    for i in range(1, spikes_left + 1):
        prev = jnp.pad(H[:, :-i], ((0, 0), (i, 0)))
        spike &= H > prev
    return spike | (positions_BxL < spikes_left)
