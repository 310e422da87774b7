"""Trainer (train/loop.py, train/step.py, train/optim.py, train/main.py): learning, exact BPB, resume
determinism, the CLI end to end and its early errors, optimizer details, the non-finite guard."""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import subprocess
import sys

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hnet.sharding import batch_sharding, global_batch_from_local, mesh_context
from models.base import LN2, ModelOutput
from tests.helpers import REPO_ROOT, make_tiny_model, pydoc_text, tiny_model_fn
from train import data as data_lib
from train.loop import train
from train.optim import OptimizerConfig, decay_mask, make_optimizer, make_schedule
from train.step import cross_entropy_sums, make_train_step

STEPS = 16
CKPT_EVERY = 4
SEQ, BATCH = 32, 4


def _train_cfg():
    return data_lib.DataConfig(sources=("builtin:pydoc_topics",), byte_range=(0.0, 0.9), seq_len=SEQ,
                               batch_size=BATCH, shuffle=True, seed=0)


def _opt():
    return OptimizerConfig(learning_rate=1e-2, warmup_steps=2, schedule="cosine")


def _train(workdir, **kw):
    args = dict(workdir=str(workdir), model=tiny_model_fn(d_model=32), train_data=_train_cfg(),
                optimizer=_opt(), steps=STEPS, log_every=1, checkpoint_every=CKPT_EVERY, sample_prompts=(),
                eval_every=0)
    args.update(kw)
    return train(**args)


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """A persistent compilation cache for this module only: the interrupted and resumed runs compile
    the same train step as the uninterrupted one (saves most of their time). Restored afterwards."""
    from jax._src import compilation_cache as cc

    old_dir = jax.config.jax_compilation_cache_dir
    old_min = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    cc.reset_cache()
    yield
    jax.config.update("jax_compilation_cache_dir", old_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", old_min)
    cc.reset_cache()


@pytest.fixture(scope="module")
def eval_split(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval_corpus")
    for k in ("pass", "continue", "lambda"):
        (d / f"{k}.txt").write_text(pydoc_text(k))
    cfg = data_lib.DataConfig(sources=(str(d),), seq_len=SEQ, batch_size=BATCH, shuffle=False)
    return cfg


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, eval_split):
    gin.clear_config()
    wd = tmp_path_factory.mktemp("full_run")
    return _train(wd, eval_data=eval_split)


# ------------------------------------------------------------------------------------- learning


def test_loss_falls_on_real_text(full_run):
    hist = full_run["history"]
    assert [h["step"] for h in hist] == list(range(1, STEPS + 1))
    losses = np.array([h["loss"] for h in hist])
    assert np.isfinite(losses).all()
    assert 5.0 < losses[0] < 6.0  # ~ ln 256 at init
    assert losses[-3:].mean() < losses[0] - 1.0, losses
    assert all(h["skipped_steps"] == 0 for h in hist)
    # bpb reported by the train step is the byte NLL in bits
    for h in hist:
        assert h["bpb"] == pytest.approx(h["byte_nll_sum"] / (LN2 * h["n_bytes"]), rel=1e-5)


def test_final_eval_is_exact_bpb_over_every_byte(full_run, eval_split):
    ev = full_run["eval"]
    docs, stats = data_lib.load_documents(eval_split)
    assert ev["n_bytes"] == stats.bytes == sum(len(d) for d in docs)
    assert ev["n_masked_by_model"] == 0
    # recompute by hand: numpy log-softmax over every eval window
    setup = full_run["setup"]
    fwd = jax.jit(lambda params, rest, b: nnx.merge(setup.graphdef, params, rest)(b).logits_BxLxV)
    nll_bytes, n = 0.0, 0
    with mesh_context(setup.mesh):
        for b in data_lib.iterate_eval_batches(eval_split, docs):
            lg = np.asarray(fwd(setup.state.params, setup.state.rest, {k: jnp.asarray(v) for k, v in b.items()}),
                            np.float64)
            mx = lg.max(-1, keepdims=True)
            logp = lg - mx - np.log(np.exp(lg - mx).sum(-1, keepdims=True))
            tl = np.take_along_axis(logp, b["targets"][..., None], -1)[..., 0]
            nll_bytes -= tl[b["byte_mask"]].sum()
            n += int(b["byte_mask"].sum())
    assert n == stats.bytes
    assert ev["bpb"] == pytest.approx(nll_bytes / (math.log(2) * n), rel=1e-4)
    assert 1.0 < ev["bpb"] < 8.0


# ------------------------------------------------------------------------------------------ BPB


_ce_sums = jax.jit(cross_entropy_sums)  # one compilation instead of many eager ops


def _batch(targets, loss_mask, byte_mask):
    return {"targets": jnp.array([targets], jnp.int32), "loss_mask": jnp.array([loss_mask]),
            "byte_mask": jnp.array([byte_mask])}


def test_uniform_logits_give_exactly_8_bits_per_byte():
    # targets: 'T' 'h' EOS | next doc's BOS (not scored) | padding
    out = ModelOutput(logits_BxLxV=jnp.zeros((1, 5, 256)))
    b = _batch([84, 104, 255, 254, 0], [True, True, True, False, False], [True, True, False, False, False])
    s = {k: float(v) for k, v in _ce_sums(out, b).items()}
    assert s["n_targets"] == 3 and s["n_bytes"] == 2
    assert s["nll_sum"] == pytest.approx(3 * math.log(256), rel=1e-6)
    assert s["byte_nll_sum"] / (LN2 * s["n_bytes"]) == pytest.approx(8.0, rel=1e-6)
    assert s["n_masked_by_model"] == 0


def test_hand_computed_bpb_two_positions_and_model_mask():
    # position 0: p(target) = 1/2 (1 bit); position 1: p(target) = 1/4 (2 bits); BPB = 1.5
    logits = np.zeros((1, 4, 256), np.float32)
    logits[0, 0, 65] = math.log(255.0)  # 255 / (255 + 255) = 1/2
    logits[0, 1, 66] = math.log(255.0 / 3.0)  # (255/3) / (255/3 + 255) = 1/4
    logits[0, 2, 67] = 50.0  # EOS target: scored in the loss, not in BPB
    b = _batch([65, 66, 255, 7], [True, True, True, True], [True, True, False, True])
    # the model drops position 3 (capacity overflow): counted, never scored
    out = ModelOutput(logits_BxLxV=jnp.asarray(logits), target_mask_BxL=jnp.array([[True, True, True, False]]))
    s = {k: float(v) for k, v in _ce_sums(out, b).items()}
    assert s["n_bytes"] == 2 and s["n_targets"] == 3 and s["n_masked_by_model"] == 1
    assert s["byte_nll_sum"] / (LN2 * s["n_bytes"]) == pytest.approx(1.5, rel=1e-5)
    eos_nll = 50.0 + math.log1p(255 * math.exp(-50.0))  # logsumexp - logit[EOS] (= 0)
    assert s["nll_sum"] == pytest.approx(math.log(2) + math.log(4) + eos_nll, rel=1e-5)


# ------------------------------------------------------------------------------ resume == straight


def test_resume_is_bit_identical_to_uninterrupted(full_run, tmp_path):
    wd = tmp_path / "interrupted"
    first = _train(wd, stop_after=CKPT_EVERY)
    assert first["final_step"] == CKPT_EVERY and "eval" not in first
    steps_on_disk = sorted(int(os.path.basename(p)) for p in glob.glob(str(wd / "checkpoints" / "[0-9]*")))
    assert steps_on_disk == [CKPT_EVERY]
    straight = {h["step"]: h["loss"] for h in full_run["history"]}
    assert [h["loss"] for h in first["history"]] == [straight[s] for s in range(1, CKPT_EVERY + 1)]
    second = _train(wd)
    assert second["start_step"] == CKPT_EVERY and second["final_step"] == STEPS
    resumed = {h["step"]: h["loss"] for h in second["history"]}
    assert sorted(resumed) == list(range(CKPT_EVERY + 1, STEPS + 1))
    for s, loss in resumed.items():
        assert loss == straight[s], (s, loss, straight[s])  # bit-identical, not just close
    a = jax.tree.leaves(full_run["setup"].state.params)
    b = jax.tree.leaves(second["setup"].state.params)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert int(second["setup"].state.step) == STEPS


# ------------------------------------------------------------------------------------------ CLI


CLI_RUNS = {
    "ok": ["--gin.TRAIN_STEPS=4", "--gin.SEQ_LEN=32", "--gin.BATCH=4", "--gin.hnet.StackConfig.d_model=32",
           "--gin.hnet.StackConfig.d_ff=64", "--gin.hnet.StackConfig.layout='T2'", "--gin.train.train.log_every=2",
           "--gin.train.train.checkpoint_every=2", "--gin.train.train.sample_prompts=()",
           "--gin.eval/train.DataConfig.max_windows=8"],
    "typo": ["--gin.train.train.stepz=3"],
    "nodata": ["--gin.train/train.DataConfig.sources=('/nonexistent/x.txt',)"],
}


@pytest.fixture(scope="module", autouse=True)
def cli_runs(tmp_path_factory):
    """The CLI subprocesses start when this module starts and run alongside the in-process tests."""
    root = tmp_path_factory.mktemp("cli")
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    procs = {}
    for name, extra in CLI_RUNS.items():
        wd = root / name
        cmd = [sys.executable, "-m", "train.main", "--gin_file=configs/isotropic_tiny.gin",
               "--gin_file=configs/runs/default.gin", f"--workdir={wd}", f"--compilation_cache_dir={wd}/jax_cache",
               *extra]
        procs[name] = (wd, subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE, text=True))
    yield procs
    for _, p in procs.values():
        if p.poll() is None:
            p.kill()
            p.communicate()


def _cli_result(cli_runs, name, timeout=300):
    wd, p = cli_runs[name]
    out, err = p.communicate(timeout=timeout)
    return wd, p.returncode, out, err


def test_cli_end_to_end(cli_runs):
    wd, rc, out, err = _cli_result(cli_runs, "ok")
    assert rc == 0, err[-3000:]
    res = json.loads((wd / "results.json").read_text())
    assert res["final_step"] == 4 and res["start_step"] == 0
    assert [h["step"] for h in res["history"]] == [2, 4]
    assert 0 < res["eval"]["bpb"] < 9 and res["eval"]["n_bytes"] > 0
    assert "samples" not in res  # sample_prompts=() binds through the CLI
    ckpts = sorted(int(os.path.basename(p)) for p in glob.glob(str(wd / "checkpoints" / "[0-9]*")))
    assert ckpts == [2, 4]
    assert glob.glob(str(wd / "tb" / "events.out.tfevents.*"))
    op = (wd / "operative_config.gin").read_text()
    assert "StackConfig.d_model = 32" in op and "TRAIN_STEPS = 4" in op
    assert "bits per byte" in out
    assert os.listdir(wd / "jax_cache")  # --compilation_cache_dir: the compiled steps were stored


def test_cli_misspelled_binding_fails_before_compiling(cli_runs):
    wd, rc, out, err = _cli_result(cli_runs, "typo", timeout=120)
    assert rc != 0
    assert "stepz" in err
    assert "valid parameters" in err and "steps" in err and "checkpoint_every" in err
    assert not os.path.exists(wd / "checkpoints")
    assert "first step" not in out + err


def test_cli_missing_data_path_is_a_clear_data_error(cli_runs):
    wd, rc, out, err = _cli_result(cli_runs, "nodata", timeout=120)
    assert rc != 0
    assert "data error" in err and "/nonexistent/x.txt" in err
    assert "Traceback" not in err
    assert not os.path.exists(wd / "checkpoints")


# ------------------------------------------------------------------------------------ optimizer


def test_decay_mask_excludes_norms_embeddings_biases():
    params = {
        "embed": {"embedding": jnp.ones((256, 8))},
        "dense": {"kernel": jnp.ones((8, 8)), "bias": jnp.ones((8,))},
        "norm": {"scale": jnp.ones((8,))},
        "router": {"q": {"kernel": jnp.ones((8, 8))}},
        "conv": {"kernel": jnp.ones((4,))},
    }
    m = decay_mask(params)
    assert m == {"embed": {"embedding": False}, "dense": {"kernel": True, "bias": False},
                 "norm": {"scale": False}, "router": {"q": {"kernel": False}}, "conv": {"kernel": False}}


def test_weight_decay_applies_only_to_masked_leaves():
    params = {"dense": {"kernel": jnp.full((2, 2), 2.0)}, "norm": {"scale": jnp.full((2,), 2.0)}}
    cfg = OptimizerConfig(learning_rate=0.1, schedule="constant", warmup_steps=1, weight_decay=0.5, grad_clip=0)
    tx, _ = make_optimizer(cfg, 10, params)

    @jax.jit
    def second_update(params):
        zeros, st = jax.tree.map(jnp.zeros_like, params), tx.init(params)
        _, st = tx.update(zeros, st, params)  # step 0: lr 0 during warmup
        return tx.update(zeros, st, params)[0]

    up = second_update(params)
    np.testing.assert_allclose(up["dense"]["kernel"], -0.1 * 0.5 * 2.0, rtol=1e-6)
    np.testing.assert_array_equal(up["norm"]["scale"], 0.0)


def _real_params():
    """Parameters of a real (very small) IsotropicLM: an nnx.State of nnx.Param, as the trainer has them."""
    model = make_tiny_model(layout="T1", d_model=8, d_ff=16, num_heads=1)
    return nnx.split(model, nnx.Param, ...)[1]


def test_lr_multiplier_scales_updates():
    params = _real_params()  # nnx.State of nnx.Param leaves, as build_state passes them
    grads = jax.tree.map(lambda p: jnp.cos(7 * p), params)
    cfg = OptimizerConfig(learning_rate=1e-2, schedule="constant", warmup_steps=1, weight_decay=0.1)
    tx1, _ = make_optimizer(cfg, 10, params)
    tx2, _ = make_optimizer(cfg, 10, params, lambda names: 2.0 if "lm_head" in names else 1.0)

    @jax.jit
    def three_updates(grads, params):  # several steps (step 0 has lr 0 in warmup)
        s1, s2 = tx1.init(params), tx2.init(params)
        for _ in range(3):
            u1, s1 = tx1.update(grads, s1, params)
            u2, s2 = tx2.update(grads, s2, params)
        return u1, u2

    u1, u2 = three_updates(grads, params)
    head1, head2 = np.asarray(u1["lm_head"]["kernel"][...]), np.asarray(u2["lm_head"]["kernel"][...])
    assert np.abs(head1).min() > 0
    np.testing.assert_allclose(head2, 2.0 * head1, rtol=1e-6)
    for path, a, b in zip(*zip(*jax.tree_util.tree_leaves_with_path(u1)), jax.tree.leaves(u2)):
        if "lm_head" not in jax.tree_util.keystr(path):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6)


def test_schedules_start_peak_end():
    total, warm, peak = 100, 10, 1e-3
    cos = make_schedule(OptimizerConfig(learning_rate=peak, schedule="cosine", warmup_steps=warm,
                                        final_lr_fraction=0.1), total)
    assert float(cos(0)) == 0.0
    assert float(cos(warm // 2)) == pytest.approx(peak / 2, rel=1e-5)
    assert float(cos(warm)) == pytest.approx(peak, rel=1e-5)
    assert float(cos(total)) == pytest.approx(0.1 * peak, rel=1e-5)
    mid = warm + (total - warm) // 2
    assert float(cos(mid)) == pytest.approx(0.1 * peak + 0.9 * peak * 0.5, rel=1e-4)

    wsd = make_schedule(OptimizerConfig(learning_rate=peak, schedule="wsd", warmup_steps=warm, decay_fraction=0.2,
                                        final_lr_fraction=0.1), total)
    assert float(wsd(0)) == 0.0
    assert float(wsd(warm)) == pytest.approx(peak, rel=1e-5)
    for s in (warm + 1, 50, 80):  # stable phase up to total - decay
        assert float(wsd(s)) == pytest.approx(peak, rel=1e-5), s
    decay = [float(wsd(s)) for s in range(80, total + 1)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    assert decay[-1] == pytest.approx(0.1 * peak, rel=1e-5)
    assert float(wsd(90)) == pytest.approx(0.1 * peak + 0.9 * peak * (1 / math.sqrt(5) - 1 / 3) / (2 / 3), rel=1e-4)

    const = make_schedule(OptimizerConfig(learning_rate=peak, schedule="constant", warmup_steps=warm), total)
    assert float(const(0)) == 0.0 and float(const(warm)) == pytest.approx(peak) and float(const(total)) == \
        pytest.approx(peak)
    with pytest.raises(ValueError, match="schedule"):
        make_schedule(OptimizerConfig(schedule="linear"), total)


# ---------------------------------------------------------------------------------- FLOP count


@pytest.mark.parametrize("seq_len", [512, 2048])
def test_flops_per_byte_counts_every_attention_tile(cpu_mesh, seq_len):
    """The count results.json records. At these lengths the CPU step runs attention through the blockwise
    kernel, whose tile loops XLA's cost analysis counts once: the compiled step's own count was under half
    of the work at L = 2048. ``flops_per_byte`` counts the loop-free reference program: for an isotropic
    Transformer 6 FLOPs per matmul weight per byte, plus 12 L d per layer for attention over the full
    square (q·k and p·v, forward and backward), and a few % of elementwise work. Lowered from abstract
    state and batch: nothing is compiled or allocated."""
    from launch.aot import abstract_batch
    from train.loop import build_state
    from train.step import flops_per_byte

    d, d_ff, n_layers, B = 64, 128, 2, 2
    setup = build_state(tiny_model_fn("T2", d_model=d, d_ff=d_ff), OptimizerConfig(), 10, cpu_mesh, allocate=False)
    batch = abstract_batch(data_lib.DataConfig(sources=("builtin:pydoc_topics",), seq_len=seq_len, batch_size=B),
                           cpu_mesh)
    with mesh_context(cpu_mesh):
        step_fn = make_train_step(setup.graphdef, setup.tx, setup.schedule)
        jax.jit(step_fn).lower(setup.state, batch)  # the trainer's own trace first, as train() does: no reuse
        counted = flops_per_byte(step_fn, setup.state, batch, B * seq_len)
    matmul_weights = n_layers * (3 * d * d + d * d + 3 * d * d_ff) + d * 256  # q/k/v, out, SwiGLU; lm_head
    expected = 6 * matmul_weights + 12 * n_layers * seq_len * d
    assert 1.0 <= counted / expected < 1.08, (counted, expected)


# ---------------------------------------------------------------------------------- NaN guard


def test_non_finite_step_is_skipped_and_params_unchanged(full_run):
    setup = full_run["setup"]
    mesh = setup.mesh
    cfg = _train_cfg()
    docs, _ = data_lib.load_documents(cfg)
    local = next(data_lib.make_train_iterator(cfg, docs))
    # the same jit as train() (donating the state), so the compiled step comes from the cache
    step = jax.jit(make_train_step(setup.graphdef, setup.tx, setup.schedule, max_bad_steps=20),
                   in_shardings=(setup.state_shardings, batch_sharding(mesh)),
                   out_shardings=(setup.state_shardings, None), donate_argnums=(0,))
    host = lambda s: jax.tree.map(np.asarray, (s.params, s.opt_state))  # noqa: E731
    copy = lambda s: jax.tree.map(jnp.copy, s)  # noqa: E731
    with mesh_context(mesh):
        batch = global_batch_from_local(mesh, local)
        s0 = copy(setup.state)
        before = host(s0)
        s1, m1 = step(s0, batch)  # a good step changes every parameter
        assert int(m1["skipped_steps"]) == 0 and np.isfinite(float(m1["loss"])) and float(m1["lr"]) > 0
        after = host(s1)
        assert all(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before[0]), jax.tree.leaves(after[0])))

        # poison one lm_head column: logits become NaN (inf * mixed-sign activations)
        params = jax.tree_util.tree_map_with_path(
            lambda p, x: x.at[:, 7].set(jnp.inf) if "lm_head" in jax.tree_util.keystr(p) else x, s1.params)
        bad = dataclasses.replace(s1, params=params)
        bad_host, bad_step = host(bad), int(bad.step)
        s2, m2 = step(bad, batch)
        assert not np.isfinite(float(m2["loss"]))
        assert int(s2.skipped_steps) == 1 and int(s2.bad_steps) == 1 and float(m2["skipped_steps"]) == 1
        assert int(s2.step) == bad_step + 1
        for a, b in zip(jax.tree.leaves(bad_host), jax.tree.leaves(host(s2))):
            np.testing.assert_array_equal(a, b)  # params and optimizer state untouched

        # a finite step afterwards resets the consecutive counter and keeps the total
        s3, m3 = step(dataclasses.replace(s2, params=jax.tree.map(jnp.asarray, after[0])), batch)
        assert int(s3.skipped_steps) == 1 and int(s3.bad_steps) == 0 and np.isfinite(float(m3["loss"]))


def test_weight_decay_reaches_dense_kernels_of_real_model():
    """decay_mask on the real nnx.State the trainer passes: kernels decayed, embeddings/norms not.

    (Zero gradients: the only non-zero update is the decoupled weight decay.)"""
    params = _real_params()
    flat_mask = jax.tree_util.tree_leaves_with_path(decay_mask(params))
    decayed = {jax.tree_util.keystr(k) for k, v in flat_mask if v}
    assert any("lm_head" in k for k in decayed) and any("wqkv" in k for k in decayed), decayed
    assert all("kernel" in k for k in decayed)
    cfg = OptimizerConfig(learning_rate=1e-2, schedule="constant", warmup_steps=1, weight_decay=0.5, grad_clip=0)
    tx, _ = make_optimizer(cfg, 10, params)

    @jax.jit
    def two_updates(params):
        zeros, st = jax.tree.map(jnp.zeros_like, params), tx.init(params)
        for _ in range(2):
            up, st = tx.update(zeros, st, params)
        return up

    up = two_updates(params)
    for path, u in jax.tree_util.tree_leaves_with_path(up):
        name, u = jax.tree_util.keystr(path), np.asarray(u)
        p = np.asarray(params["lm_head"]["kernel"][...]) if "lm_head" in name else None
        if "kernel" in name:
            assert np.abs(u).max() > 0, f"{name} is not weight-decayed"
            if p is not None:
                np.testing.assert_allclose(u, -1e-2 * 0.5 * p, rtol=1e-5)
        else:
            assert np.abs(u).max() == 0, f"{name} must not be weight-decayed"


def test_checkpointer_accepts_a_relative_directory(tmp_path, monkeypatch):
    """The default job uses a relative workdir; orbax itself only takes absolute paths."""
    import jax.numpy as jnp

    from train.checkpoint import Checkpointer

    monkeypatch.chdir(tmp_path)
    ck = Checkpointer("runs/rel/checkpoints", every_steps=1)
    state = {"w": jnp.arange(4.0)}
    assert ck.save(1, state)
    ck.wait()
    step, restored = ck.restore_latest({"w": jnp.zeros(4)})
    ck.close()
    assert step == 1 and float(restored["w"][3]) == 3.0
    assert (tmp_path / "runs/rel/checkpoints/1").is_dir()


def test_metric_writer_skips_undefined_scalars(tmp_path):
    """NaN scalars (undefined in the window, e.g. a MAGNET route absent from the batch) are not written;
    finite ones are, readable with TensorBoard's own event reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from train.logger import MetricWriter

    w = MetricWriter(str(tmp_path))
    w.scalars(1, {"a": 1.5, "b": float("nan")}, prefix="train/")
    w.scalars(2, {"a": 2.5, "b": 0.25}, prefix="train/")
    w.close()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/a")] == [(1, 1.5), (2, 2.5)]
    assert [(e.step, e.value) for e in acc.Scalars("train/b")] == [(2, 0.25)]
