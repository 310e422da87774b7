"""Boundary losses and targets for the DTP / MAGNET routers (boundaries.md §E, §9.7, traps 5-6).

In-graph (jnp):
  * ``binomial_nll(k, n, alpha)``: -log Binom(k; n, α) via gammaln (k may be non-integer).
  * ``route_binomial_loss``: MAGNET prior per route over that route's bytes of each row.
  * ``bce_with_logits``: BCE on *logits* (the reference applies σ twice; we do not).
  * ``entropy_spike_targets``: e_t = 1 iff H_t > H_{t-i} for i = 1..spikes_left (same document),
    the first ``spikes_left`` positions of a document default to 1; H from stop-gradient logits.

The host-side annotations these losses read (``unigram_ends``, ``doc_routes``, ``script_routes_<g>``)
are built by the data pipeline: ``train/annotations.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import gammaln


def binomial_nll(k, n, alpha):
    """-log Binom(k; n, α) = -[lnΓ(n+1) - lnΓ(k+1) - lnΓ(n-k+1) + k ln α + (n-k) ln(1-α)]."""
    k, n = jnp.asarray(k, jnp.float32), jnp.asarray(n, jnp.float32)
    log_pmf = (gammaln(n + 1) - gammaln(k + 1) - gammaln(n - k + 1)
               + k * jnp.log(alpha) + (n - k) * jnp.log1p(-alpha))
    return -log_pmf


def route_binomial_loss(e_st_BxL, route_BxL, real_BxL, priors):
    """Per route r: L_r = mean over rows with n_br > 0 of binomial_nll(k_br, n_br, α_r) / n_br, with
    k_br = Σ_t e_st over the row's non-pad bytes of route r. Returns (mean over present routes, [R] L_r,
    [R] present)."""
    R = len(priors)
    onehot_BxLxR = (route_BxL[..., None] == jnp.arange(R)) & real_BxL[..., None]
    n_BxR = jnp.sum(onehot_BxLxR, axis=1).astype(jnp.float32)
    k_BxR = jnp.einsum("bl,blr->br", e_st_BxL.astype(jnp.float32), onehot_BxLxR.astype(jnp.float32))
    alpha_R = jnp.asarray(priors, jnp.float32)
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
