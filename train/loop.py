"""The one training loop (big_vision-style readable trainer), configured by gin.

data (fails before compilation) -> mesh -> sharded init or restore -> jit(train_step) loop with
logging, periodic eval (``train.eval``), async checkpoints, sampled generations -> final eval + checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any, Callable

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from hnet import sharding
from models.base import ByteLM
from train import data as data_lib
from train import storage
from train.checkpoint import Checkpointer, abstract_like
from train.eval import evaluate, log_boundaries, make_boundaries_fn, make_eval_fn
from train.generate import generate
from train.logger import MetricWriter, Progress, log
from train.optim import OptimizerConfig, make_optimizer
from train.step import TrainState, flops_per_byte, make_train_step

# gin registrations for the dataclasses the .gin files bind
DataConfig = gin.external_configurable(data_lib.DataConfig, module="train")
OptimizerConfig = gin.external_configurable(OptimizerConfig, module="train")
UnigramTargets = gin.external_configurable(data_lib.UnigramTargets, module="train")


@dataclasses.dataclass
class Setup:
    """Everything built before the loop: reused by train(), the evaluator and tests."""

    mesh: Any
    graphdef: Any
    state: TrainState
    state_shardings: Any
    tx: Any
    schedule: Callable
    model: ByteLM  # the abstract model (shapes only): what it declares (``models.base``)

    def data_config(self, cfg: data_lib.DataConfig) -> data_lib.DataConfig:
        """``cfg`` with the per-byte annotations the model reads added, and gin's ``train.UnigramTargets`` as
        the targets of ``unigram_ends`` when that is one of them."""
        cfg = data_lib.with_annotations(cfg, self.model.required_annotations())
        return dataclasses.replace(cfg, unigram=UnigramTargets()) if "unigram_ends" in cfg.annotations else cfg


def build_state(model_fn: Callable[[], nnx.Module], opt_cfg: OptimizerConfig, total_steps: int, mesh,
                *, allocate: bool = True) -> Setup:
    """Graphdef + TrainState initialised inside jit under the mesh, so every array is born sharded
    (``state_shardings``). ``allocate=False``: abstract state (ShapeDtypeStructs with shardings), nothing
    compiled or allocated (``launch.aot``)."""
    with sharding.mesh_context(mesh):
        abstract_model = nnx.eval_shape(model_fn)
        if not isinstance(abstract_model, ByteLM):
            raise TypeError(f"{type(abstract_model).__name__} is not a models.base.ByteLM")
        graphdef, abs_params, abs_rest = nnx.split(abstract_model, nnx.Param, ...)
        tx, schedule = make_optimizer(opt_cfg, total_steps, abs_params, abstract_model.lr_multiplier)

        def init():
            model = model_fn()
            _, params, rest = nnx.split(model, nnx.Param, ...)
            zero = jnp.zeros((), jnp.int32)
            return TrainState(step=zero, params=params, rest=rest, opt_state=tx.init(params), bad_steps=zero,
                              skipped_steps=zero)

    shardings = state_shardings(tx, abs_params, abs_rest, mesh)  # off the mesh: optax inits eagerly here
    with sharding.mesh_context(mesh):
        init_jit = jax.jit(init, out_shardings=shardings)
        state = init_jit() if allocate else abstract_like(jax.eval_shape(init), shardings)
    return Setup(mesh, graphdef, state, shardings, tx, schedule, abstract_model)


def jit_train_step(setup: Setup, **step_kw):
    """``make_train_step`` jitted with the state's pinned shardings in and out, the batch sharded over the
    batch axes and the state donated (the trainer, ``launch.aot`` and the benchmarks compile this one)."""
    step_fn = make_train_step(setup.graphdef, setup.tx, setup.schedule, **step_kw)
    return jax.jit(step_fn, in_shardings=(setup.state_shardings, sharding.batch_sharding(setup.mesh)),
                   out_shardings=(setup.state_shardings, None), donate_argnums=(0,))


def state_shardings(tx, abs_params, abs_rest, mesh) -> TrainState:
    """Every leaf's sharding, pinned rather than left to propagation: parameters and ``rest`` from their
    logical axes; the optimizer's per-parameter leaves (Adam moments, ...) like their parameter (so FSDP
    shards them too); its other leaves (counts) and the counters replicated."""
    repl = sharding.replicated(mesh)
    with sharding.axis_rules():
        params, rest = nnx.get_named_sharding(abs_params, mesh), nnx.get_named_sharding(abs_rest, mesh)
    opt = optax.tree_map_params(tx, lambda _, s: s, jax.eval_shape(tx.init, abs_params), params,
                                transform_non_params=lambda _: repl)
    return TrainState(step=repl, params=params, rest=rest, opt_state=opt,
                      bad_steps=repl, skipped_steps=repl)


def sample_texts(setup: Setup, prompts: list[str], max_new_bytes: int, seed: int,
                 langs: list[str] | None = None) -> list[str]:
    with sharding.mesh_context(setup.mesh):
        model = nnx.merge(setup.graphdef, setup.state.params, setup.state.rest)
        return generate(model, [p.encode() for p in prompts], max_new_bytes=max_new_bytes, seed=seed, langs=langs)


@gin.configurable(module="train")
def train(
    workdir: str,
    model: Callable[[], nnx.Module] = gin.REQUIRED,
    train_data: data_lib.DataConfig = gin.REQUIRED,
    eval_data: data_lib.DataConfig | None = None,
    optimizer: OptimizerConfig = OptimizerConfig(),
    steps: int = gin.REQUIRED,
    grad_accum_steps: int = 1,
    mesh_shape: dict | None = None,
    log_every: int = 20,
    eval_every: int = 0,
    checkpoint_every: int = 500,
    keep_checkpoints: int = 3,
    async_checkpoints: bool = True,
    sample_prompts: tuple[str, ...] = ("The ",),
    sample_langs: tuple[str, ...] = (),
    sample_every: int = 0,
    sample_bytes: int = 120,
    max_bad_steps: int = 20,
    stop_after: int = 0,
    seed: int | None = None,
) -> dict[str, Any]:
    """Train ``model`` for ``steps`` steps; resumes from ``workdir/checkpoints`` when present.

    ``stop_after`` > 0 ends the process after that many steps of this invocation (for tests of
    interrupted runs: the schedule still follows ``steps``). ``seed`` (sweeps) overrides both the
    model's initialisation seed and the training data order's. ``sample_langs``: the document language of
    each sample prompt (models routed by language need one per prompt).
    """
    if seed is not None:
        model = functools.partial(model, seed=seed)
        train_data = dataclasses.replace(train_data, seed=seed)
    t_setup = time.time()
    is_main = jax.process_index() == 0
    storage.make_dirs(workdir)  # local or gs://: an unreachable bucket fails here, before any compilation
    train_docs = data_lib.open_documents(train_data)  # lazy: an index of the prepared shards
    train_stats = train_docs.stats
    log.info(data_lib.describe(train_stats, "train data"))
    eval_docs = None
    if eval_data is not None:
        eval_docs = data_lib.open_documents(eval_data)
        log.info(data_lib.describe(eval_docs.stats, "eval data"))

    mesh = sharding.make_mesh(mesh_shape or {"data": -1})
    setup = build_state(model, optimizer, steps, mesh)
    train_data = setup.data_config(train_data)
    eval_data = eval_data and setup.data_config(eval_data)
    data_iter = data_lib.make_train_iterator(train_data, train_docs)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(setup.state.params))
    log.info("model: %s parameters; mesh %s", f"{n_params:,}", dict(mesh.shape))

    sample_langs = list(sample_langs) or None
    if sample_prompts and setup.model.supports_decoding:  # a prompt the model cannot sample fails now
        setup.model.decode_trackers([p.encode() for p in sample_prompts], sample_langs)

    ckpt = Checkpointer(storage.join(workdir, "checkpoints"), every_steps=checkpoint_every, keep=keep_checkpoints,
                        async_save=async_checkpoints)
    start, restored = ckpt.restore_latest(setup.state, data_iter)
    if restored is not None:
        setup.state = restored
        log.info("resumed from step %d in %s", start, ckpt.directory)
    start = int(start or 0)

    writer = MetricWriter(storage.join(workdir, "tb"))
    if is_main:
        storage.write_text(storage.join(workdir, "operative_config.gin"), gin.operative_config_str())
        writer.text(start, "config/operative", gin.operative_config_str())
        writer.scalars(start, {"train_docs": train_stats.documents, "train_bytes": train_stats.bytes,
                               "train_empty_skipped": train_stats.empty_skipped,
                               "train_invalid_utf8_docs": train_stats.invalid_utf8,
                               "train_bad_json": train_stats.bad_json}, "data/")

    train_step = jit_train_step(setup, grad_accum_steps=grad_accum_steps, max_bad_steps=max_bad_steps)
    eval_fn, boundaries_fn = make_eval_fn(setup), make_boundaries_fn(setup)
    viz_batch = next(data_lib.iterate_eval_batches(eval_data, eval_docs)) if eval_docs is not None else None

    bytes_per_step = train_data.batch_size * train_data.seq_len
    progress = Progress(steps, start)
    history: list[dict] = []
    results: dict[str, Any] = {"workdir": workdir, "params": n_params, "start_step": start, "steps": steps,
                               "bytes_per_step": bytes_per_step,
                               "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}  # train/malloc.py
    t_last, steps_since = time.time(), 0
    compiled, compile_s = None, None
    step = start
    with sharding.mesh_context(mesh):
        while step < steps:
            local = next(data_iter)
            batch = sharding.global_batch_from_local(mesh, local)
            t0 = time.time()
            if compiled is None:  # compiled ahead of time: a batch of another shape then fails, not recompiles
                compiled = train_step.lower(setup.state, batch).compile()
                # one step without accumulation (a scan, whose body XLA would count once): same FLOPs per byte
                results["flops_per_byte"] = flops_per_byte(
                    make_train_step(setup.graphdef, setup.tx, setup.schedule, max_bad_steps=max_bad_steps),
                    setup.state, batch, bytes_per_step)
            setup.state, metrics = compiled(setup.state, batch)
            step += 1
            steps_since += 1
            if compile_s is None:
                jax.block_until_ready(metrics["loss"])
                compile_s = time.time() - t0
                log.info("first step (compile + run) took %.1f s; setup before it %.1f s", compile_s, t0 - t_setup)
                t_last, steps_since = time.time(), 0
            if step % log_every == 0 or step == steps:
                m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                if steps_since:
                    dt = time.time() - t_last
                    m.update(bytes_per_s=bytes_per_step * steps_since / dt, step_time_s=dt / steps_since)
                    t_last, steps_since = time.time(), 0
                history.append({"step": step, **m})
                if is_main:
                    log.info(progress.line(step, m, m.get("bytes_per_s", float("nan"))))
                writer.scalars(step, m, "train/")
                if m["bad_steps"] >= max_bad_steps > 0:
                    raise FloatingPointError(
                        f"{int(m['bad_steps'])} consecutive steps with non-finite loss or gradients at step {step} "
                        f"(loss {m['loss']}, grad norm {m['grad_norm']}); last good state is in {ckpt.directory}")
            ckpt.save(step, setup.state, data_iter)
            if eval_docs is not None and eval_every and step % eval_every == 0 and step != steps:
                ev = evaluate(setup, eval_data, eval_docs, eval_fn)
                writer.scalars(step, ev, "eval/")
                log_boundaries(setup, writer, step, viz_batch, boundaries_fn)
                log.info("eval step %d: bpb %.4f", step, ev["bpb"])
            if sample_every and step % sample_every == 0 and setup.model.supports_decoding:  # all processes run it
                texts = sample_texts(setup, list(sample_prompts), sample_bytes, seed=step, langs=sample_langs)
                for i, s in enumerate(texts):
                    writer.text(step, f"samples/{i}", sample_prompts[i] + s)
            if stop_after and step - start >= stop_after:
                break

    ckpt.save(step, setup.state, data_iter, force=True)
    ckpt.close()
    results.update(final_step=step, compile_s=compile_s, history=history)
    if step >= steps and eval_docs is not None:
        ev = evaluate(setup, eval_data, eval_docs, eval_fn)
        writer.scalars(step, ev, "eval/")
        log_boundaries(setup, writer, step, viz_batch, boundaries_fn)
        results["eval"] = ev
        log.info("final eval at step %d: bpb %.4f over %d bytes", step, ev["bpb"], ev["n_bytes"])
    if step >= steps and sample_prompts and not setup.model.supports_decoding:
        log.info("no samples: the model does not decode bytes (supports_decoding = False)")
    elif step >= steps and sample_prompts:
        samples = sample_texts(setup, list(sample_prompts), sample_bytes, seed=0, langs=sample_langs)
        results["samples"] = [p + s for p, s in zip(sample_prompts, samples)]
        for i, s in enumerate(results["samples"]):
            writer.text(step, f"samples/{i}", s)
    writer.close()
    if is_main:
        storage.write_text(storage.join(workdir, "results.json"), json.dumps(results, indent=1, default=float))
    results["setup"] = setup
    return results
