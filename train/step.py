"""Pure train / eval steps over an explicit TrainState (t5x "trainer" layer).

The model is split once (``nnx.split``) into a static graphdef and array state; the steps merge it
back inside ``jax.jit`` (lowest dispatch overhead, explicit shardings and donation).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from hnet.sharding import reference_kernels
from models.base import ModelOutput, bits_per_byte, cross_entropy_sums


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    step: jax.Array
    params: Any  # nnx.State of nnx.Param
    rest: Any  # nnx.State of every other variable (controller state, counters, ...)
    opt_state: Any
    bad_steps: jax.Array  # consecutive non-finite steps (numerical guard)
    skipped_steps: jax.Array  # total skipped steps


def loss_and_metrics(params, rest, graphdef, batch):
    model = nnx.merge(graphdef, params, rest, copy=True)  # fresh Variables: models may update state in place
    out = model(batch)
    sums = cross_entropy_sums(out, batch)
    ce = sums["nll_sum"] / jnp.maximum(sums["n_targets"], 1.0)
    loss = ce + out.aux_loss
    new_rest = nnx.state(model, nnx.Not(nnx.Param))
    metrics = {"ce": ce, "aux_loss": out.aux_loss, **sums, **out.metrics}
    return loss, (metrics, new_rest)


def make_train_step(graphdef, tx: optax.GradientTransformation, schedule, *, grad_accum_steps: int = 1,
                    max_bad_steps: int = 0) -> Callable:
    """Returns ``step(state, batch) -> (state, metrics)``; batches are [A*b, L] for A accumulation steps.

    Non-finite loss or gradients: the update is skipped (state unchanged except the counters)."""
    grad_fn = jax.value_and_grad(loss_and_metrics, has_aux=True)

    def train_step(state: TrainState, batch):
        if grad_accum_steps == 1:
            (loss, (metrics, rest)), grads = grad_fn(state.params, state.rest, graphdef, batch)
        else:
            micro = jax.tree.map(lambda x: x.reshape(grad_accum_steps, -1, *x.shape[1:]), batch)

            def body(carry, mb):
                g_acc, rest = carry
                (l, (m, rest)), g = grad_fn(state.params, rest, graphdef, mb)
                return (jax.tree.map(jnp.add, g_acc, g), rest), (l, m)

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            (grads, rest), (losses, ms) = jax.lax.scan(body, (zeros, state.rest), micro)
            grads = jax.tree.map(lambda g: g / grad_accum_steps, grads)
            loss = jnp.mean(losses)
            metrics = {k: (jnp.sum(v) if k.startswith("n_") or k.endswith("_sum") else jnp.mean(v))
                       for k, v in ms.items()}
        grad_norm = optax.global_norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
        new_state = TrainState(
            step=state.step + 1,
            params=keep(params, state.params),
            rest=keep(rest, state.rest),
            opt_state=keep(opt_state, state.opt_state),
            bad_steps=jnp.where(ok, 0, state.bad_steps + 1),
            skipped_steps=state.skipped_steps + (~ok).astype(jnp.int32),
        )
        metrics = dict(metrics, loss=loss, grad_norm=grad_norm, lr=schedule(state.step),
                       bpb=bits_per_byte(metrics["byte_nll_sum"], metrics["n_bytes"]),
                       skipped_steps=new_state.skipped_steps.astype(jnp.float32),
                       bad_steps=new_state.bad_steps.astype(jnp.float32))
        return new_state, metrics

    return train_step


def reference_flops(fn: Callable, *args) -> float:
    """XLA's FLOP count of ``fn(*args)`` on its reference program (``hnet.sharding.reference_kernels``: dense
    attention, jnp gathers, every padding block computed). A compiled program's own count undercounts: XLA
    counts a loop's body once whatever its trip count, and a custom call (a Pallas kernel) as nothing. On CPU
    the attention kernel and H-Net's padding skip are loops: isotropic_tiny's train step at L = 4096 counted
    5.6 instead of 31.6 MFLOP per byte. So this counts the model's work (attention as the full masked square),
    not what a kernel skips. Lowered, not compiled: a trace, no XLA compile. ``fn`` must be a plain function,
    not a jitted one, whose cached trace would be reused. nan if the backend reports no count."""
    with reference_kernels():  # a new function object: a fresh trace, not jit's cached one
        cost = jax.jit(lambda *a: fn(*a)).lower(*args).cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float((cost or {}).get("flops", float("nan")))


def flops_per_byte(step_fn: Callable, state, batch, n_bytes: int) -> float:
    """``reference_flops`` of one ``step_fn(state, batch)`` (forward + backward + update) per byte."""
    return reference_flops(step_fn, state, batch) / n_bytes


def eval_forward(graphdef, params, rest, batch) -> ModelOutput:
    """The model in eval mode on one batch (``model.eval()`` sets ``deterministic = True`` on every
    submodule that has it: hard decisions, no noise). Call inside jit."""
    model = nnx.merge(graphdef, params, rest)
    model.eval()
    return model(batch)


def make_eval_step(graphdef) -> Callable:
    """``eval_step(params, rest, batch) -> sums`` of NLL and counts (exact BPB = byte_nll_sum/(ln2 n_bytes))."""

    def eval_step(params, rest, batch):
        out = eval_forward(graphdef, params, rest, batch)
        sums = cross_entropy_sums(out, batch)
        extra = {k: v for k, v in out.metrics.items()}
        return sums, extra

    return eval_step
