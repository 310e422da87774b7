"""Optimizer: AdamW with warmup+cosine or WSD schedules, global-norm clipping, a deliberate weight-decay
mask and per-parameter LR multipliers (H-Net's per-stage Eq. 11 modulation uses them)."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    learning_rate: float = 1e-3
    schedule: str = "cosine"  # 'cosine' (warmup + cosine) | 'wsd' (warmup-stable-decay) | 'constant'
    warmup_steps: int = 100
    decay_fraction: float = 0.2  # WSD: last fraction of steps decays (inverse square root shape)
    final_lr_fraction: float = 0.1  # cosine/WSD end value as a fraction of the peak
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # <= 0 disables clipping


def make_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    peak, warm = cfg.learning_rate, max(1, min(cfg.warmup_steps, total_steps))
    end = peak * cfg.final_lr_fraction
    if cfg.schedule == "constant":
        return optax.join_schedules([optax.linear_schedule(0.0, peak, warm), optax.constant_schedule(peak)], [warm])
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, warm, max(total_steps, warm + 1), end)
    if cfg.schedule == "wsd":
        decay = max(1, int(cfg.decay_fraction * total_steps))
        stable = max(0, total_steps - warm - decay)

        def inv_sqrt_decay(step):  # peak -> end over `decay` steps, 1/sqrt shape (H-Net WSD)
            frac = jnp.clip(step / decay, 0.0, 1.0)
            shape = (1.0 / jnp.sqrt(1.0 + 8.0 * frac) - 1.0 / 3.0) / (1.0 - 1.0 / 3.0)
            return end + (peak - end) * shape

        return optax.join_schedules(
            [optax.linear_schedule(0.0, peak, warm), optax.constant_schedule(peak), inv_sqrt_decay],
            [warm, warm + stable])
    raise ValueError(f"unknown schedule {cfg.schedule!r} (cosine | wsd | constant)")


def path_names(path) -> tuple[str, ...]:
    """Key names of a pytree path; the trailing ``value`` of an nnx.Variable leaf is dropped."""
    names = tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
    return names[:-1] if names and names[-1] == "value" else names


def decay_mask(params) -> Any:
    """Weight decay only on matrices of dense layers (leaves named ``kernel`` with ndim >= 2).
    Embeddings, norms, biases, SSM dynamics (A_log, D, dt_bias), convs, pad vectors and router
    projections are not decayed."""

    def rule(path, x):
        names = path_names(path)
        return names[-1] == "kernel" and x.ndim >= 2 and "router" not in names

    return jax.tree_util.tree_map_with_path(rule, params)


def scale_by_multipliers(multipliers) -> optax.GradientTransformation:
    """Multiply every update by a static per-parameter factor (a pytree of floats like the params)."""

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, m: u * jnp.asarray(m, u.dtype), updates, multipliers), state

    return optax.GradientTransformation(lambda p: optax.EmptyState(), update)


def make_optimizer(cfg: OptimizerConfig, total_steps: int, params,
                   lr_multiplier: Callable[[tuple[str, ...]], float] | None = None):
    """optax chain: clip -> Adam moments -> decoupled weight decay (masked) -> -lr(t) -> per-param LR mult."""
    schedule = make_schedule(cfg, total_steps)
    chain = []
    if cfg.grad_clip > 0:
        chain.append(optax.clip_by_global_norm(cfg.grad_clip))
    chain += [optax.scale_by_adam(cfg.b1, cfg.b2, cfg.eps),
              optax.add_decayed_weights(cfg.weight_decay, decay_mask(params)),
              optax.scale_by_learning_rate(schedule)]
    if lr_multiplier is not None:
        mults = jax.tree_util.tree_map_with_path(lambda p, _: float(lr_multiplier(path_names(p))), params)
        if any(m != 1.0 for m in jax.tree.leaves(mults)):
            chain.append(scale_by_multipliers(mults))
    return optax.chain(*chain), schedule
