"""Reliability through the real CLI (issue 9): kill-safe resume (SIGKILL between checkpoints and during async
checkpoint writes, see tests/kill_harness.py), corrupt / half-written checkpoints, a battery of bad inputs,
numerical guards under router saturation and capacity overflow for every tiny model config, and config
errors (wrong types, missing values) reported before compilation."""

from __future__ import annotations

import glob
import json
import os
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import REPO_ROOT, pydoc_text
from tests.kill_harness import (KillHarness, committed_steps, data_state, load_results, pending_writes,
                                verify_resumed_run)

STEPS, CKPT_EVERY = 24, 3
TINY = ["--gin.SEQ_LEN=32", "--gin.BATCH=4", "--gin.hnet.StackConfig.layout='T1'",
        "--gin.hnet.StackConfig.d_model=32", "--gin.hnet.StackConfig.d_ff=64", "--gin.hnet.StackConfig.num_heads=2",
        "--gin.train.train.log_every=1", "--gin.train.train.eval_every=0", "--gin.train.train.sample_prompts=()",
        "--gin.train.train.eval_data=None", "--gin.train.train.keep_checkpoints=100"]


def cli(*extra: str) -> list[str]:
    return [sys.executable, "-m", "train.main", "--gin_file=configs/isotropic_tiny.gin",
            "--gin_file=configs/runs/default.gin", *TINY, *extra]


def train_cmd(steps: int = STEPS) -> list[str]:
    return cli(f"--gin.TRAIN_STEPS={steps}", f"--gin.train.train.checkpoint_every={CKPT_EVERY}")


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory):
    """Unbuffered output (the harness reads progress lines live) and a compilation cache shared by the
    reference and the restarted runs (the same executable is reused: restarts cost seconds, not minutes)."""
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
                JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


@pytest.fixture(scope="module")
def harness(cli_env):
    return KillHarness(train_cmd(), env=cli_env, cwd=REPO_ROOT, timeout=900)


@pytest.fixture(scope="module")
def reference(harness, tmp_path_factory):
    """The uninterrupted run: every step logged, every checkpoint kept."""
    wd = str(tmp_path_factory.mktemp("reference"))
    inv = harness.run(wd)
    assert inv.returncode == 0, inv.output[-3000:]
    assert committed_steps(os.path.join(wd, "checkpoints")) == list(range(CKPT_EVERY, STEPS + 1, CKPT_EVERY))
    return wd


# ------------------------------------------------------------------------------- kill-safe resume


def test_sigkill_between_checkpoints_resumes_bit_identically(harness, reference, tmp_path):
    wd = str(tmp_path / "run")
    killed = harness.run(wd, kill_at_step=2 * CKPT_EVERY + 2)  # between two checkpoints
    assert killed.killed and killed.last_step_seen >= 2 * CKPT_EVERY + 2
    assert killed.committed_after, "no checkpoint was committed before the kill"
    resumed = harness.run(wd)
    assert resumed.expected_start > 0
    report = verify_resumed_run(reference, wd, [killed, resumed])
    # steps after the last checkpoint were recomputed, not skipped
    assert report["steps_compared_bitexact"] == STEPS - resumed.expected_start


@pytest.mark.slow
def test_ten_random_sigkills_incl_during_async_checkpoint_writes(harness, reference, tmp_path):
    wd = str(tmp_path / "run")
    rng = random.Random(9)
    invocations = []
    for k in range(10):
        start = max(committed_steps(os.path.join(wd, "checkpoints")), default=0)
        if k % 2:  # during the async write of the next checkpoint (or a random later one)
            nxt = (start // CKPT_EVERY + rng.randint(1, 2)) * CKPT_EVERY
            inv = harness.run(wd, kill_in_checkpoint_write=min(nxt, STEPS - CKPT_EVERY))
        else:
            inv = harness.run(wd, kill_at_step=min(start + rng.randint(1, 2 * CKPT_EVERY), STEPS - 1))
        assert inv.killed, inv.output[-3000:]
        invocations.append(inv)
    invocations.append(harness.run(wd))
    report = verify_resumed_run(reference, wd, invocations)
    report["kills"] = [(i.kill_mode, i.kill_target, i.last_step_seen, i.caught_write, i.resumed_from)
                       for i in invocations]
    print(json.dumps(report))
    assert sum(bool(i.caught_write) for i in invocations) >= 1, "no kill landed inside a checkpoint write"


# -------------------------------------------------------------------------------- corrupt checkpoints


def _truncate_files(d):
    for f in glob.glob(os.path.join(d, "**", "*"), recursive=True):
        if os.path.isfile(f) and "ocdbt.process_0/d/" in f:
            with open(f, "r+b") as fh:
                fh.truncate(os.path.getsize(f) // 2)


def test_corrupt_latest_checkpoints_fall_back_to_previous_good_one(harness, reference, tmp_path):
    """Four unusable newest steps, each broken differently: the run falls back to the newest good one,
    says so for each, recomputes bit-identically and replaces the unreadable copies."""
    wd = str(tmp_path / "run")
    ck = os.path.join(wd, "checkpoints")
    shutil.copytree(os.path.join(reference, "checkpoints"), ck)
    s24, s21, s18, s15 = (os.path.join(ck, str(s)) for s in (24, 21, 18, 15))
    os.rename(s24, s24 + ".orbax-checkpoint-tmp-1")  # half-written: never committed
    _truncate_files(os.path.join(s21, "state"))  # truncated array data
    os.remove(os.path.join(s18, "state", "_METADATA"))  # missing metadata
    for f in os.listdir(os.path.join(s15, "state")):  # empty state directory
        p = os.path.join(s15, "state", f)
        shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
    inv = harness.run(wd)
    assert inv.returncode == 0, inv.output[-3000:]
    for s in (21, 18, 15):
        assert f"checkpoint step {s} in {ck} is unreadable" in inv.output
    assert "checkpoint step 24" not in inv.output  # the uncommitted write is not a checkpoint at all
    assert inv.resumed_from == 12
    res, ref = load_results(wd), load_results(reference)
    ref_loss = {h["step"]: h["loss"] for h in ref["history"]}
    assert res["start_step"] == 12
    assert {h["step"]: h["loss"] for h in res["history"]} == {s: ref_loss[s] for s in range(13, STEPS + 1)}
    # the unreadable steps were replaced by the recomputed (identical) ones
    assert committed_steps(ck) == list(range(CKPT_EVERY, STEPS + 1, CKPT_EVERY))
    for s in (15, 18, 21, 24):
        assert data_state(ck, s) == data_state(os.path.join(reference, "checkpoints"), s)
    assert "replacing unreadable checkpoint step 21" in inv.output


def test_all_checkpoints_unreadable_is_an_error_not_a_fresh_start(harness, reference, tmp_path):
    wd = str(tmp_path / "run")
    ck = os.path.join(wd, "checkpoints")
    os.makedirs(ck)
    for s in (3, 6):
        shutil.copytree(os.path.join(reference, "checkpoints", str(s)), os.path.join(ck, str(s)))
        _truncate_files(os.path.join(ck, str(s), "state"))
    inv = harness.run(wd)
    assert inv.returncode == 2  # a clean 'checkpoint error', not a crash (orbax still logs each failed read)
    assert "checkpoint error: no readable checkpoint among steps [3, 6]" in inv.output
    assert not inv.progress and "first step" not in inv.output  # nothing trained
    assert committed_steps(ck) == [3, 6] and not pending_writes(ck)
    assert not os.path.exists(os.path.join(wd, "results.json"))


# ------------------------------------------------------------------------------------- bad inputs


def _invalid_utf8_text() -> bytes:
    t = pydoc_text("assignment").encode("utf-8")
    # a stray continuation byte, an overlong encoding, a lone 0xff and a truncated 3-byte sequence
    return t[:500] + b"\x80" + t[500:900] + b"\xc0\xaf" + t[900:1300] + b"\xff" + t[1300:2000] + b"\xe2\x82"


def _jsonl_records() -> tuple[bytes, int, int, int, int]:
    """(file, usable records, bad records, empty-string records, records with lone surrogates)."""
    enc = lambda obj: json.dumps(obj).encode()  # noqa: E731
    good = [enc({"text": pydoc_text(k)}) for k in ("pass", "continue", "lambda")]
    bad = [enc({"body": pydoc_text("pass")}),  # missing field
           enc({"text": 42}), enc({"text": None}), enc({"text": ["a", "b"]}), enc({"text": {"nested": "x"}}),
           enc([pydoc_text("pass")]), enc(pydoc_text("pass")),  # not an object
           b'{"text": "unterminated', b"not json at all",
           b'{"text": "\xff\xfe"}']  # invalid UTF-8 inside the JSON line
    empty = [enc({"text": ""})]
    surrogate = [b'{"text": "lone \\ud800 surrogate"}']  # valid JSON, not encodable as UTF-8
    lines = good[:1] + bad[:5] + [b""] + good[1:] + bad[5:] + empty + surrogate + [b"   "]
    return b"\n".join(lines), len(good) + len(surrogate), len(bad), len(empty), len(surrogate)


def _binary_200k() -> bytes:
    """The first 200 KB of a real executable (the python binary, or libpython / numpy's extension module
    when the binary is a small launcher)."""
    import sysconfig

    cands = [os.path.realpath(sys.executable),
             os.path.join(sysconfig.get_config_var("LIBDIR") or "", sysconfig.get_config_var("LDLIBRARY") or "-"),
             *glob.glob(os.path.join(os.path.dirname(np.__file__), "_core", "_multiarray_umath*.so"))]
    for c in cands:
        if os.path.isfile(c) and os.path.getsize(c) >= 200_000:
            with open(c, "rb") as f:
                return f.read(200_000)
    pytest.skip("no executable of 200 KB found")


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad_inputs")
    files = {}

    def put(name, data: bytes):
        (d / name).write_bytes(data)
        files[name] = str(d / name)

    put("invalid_utf8.txt", _invalid_utf8_text())
    put("empty.txt", b"")
    put("nul.txt", pydoc_text("pass").encode().replace(b" ", b"\x00"))
    put("binary.bin", _binary_200k())
    put("records.jsonl", _jsonl_records()[0])
    put("good.txt", pydoc_text("lambda").encode())
    (d / "empty_dir").mkdir()
    files["empty_dir"] = str(d / "empty_dir")
    (d / "only_empty").mkdir()
    (d / "only_empty" / "a.txt").write_bytes(b"")
    (d / "only_empty" / "b.txt").write_bytes(b"")
    files["only_empty"] = str(d / "only_empty")
    put("all_bad.jsonl", b'{"x": 1}\n{"text": 3}\nnope\n')
    put("tiny.txt", b"ok")  # one framed window needs SEQ_LEN + 1 = 33 bytes
    files["missing"] = str(d / "does_not_exist.txt")
    return files


def test_bad_inputs_are_counted_at_the_data_layer(bad_inputs):
    from train import data as data_lib

    _, n_good_json, n_bad_json, n_empty_json, n_surrogate = _jsonl_records()
    cfg = lambda *names: data_lib.DataConfig(sources=tuple(bad_inputs[n] for n in names))  # noqa: E731
    docs, st = data_lib.load_documents(cfg("invalid_utf8.txt"))
    assert (st.documents, st.invalid_utf8) == (1, 1) and docs[0] == _invalid_utf8_text()
    docs, st = data_lib.load_documents(cfg("nul.txt"))  # NUL is valid UTF-8: kept as is, not counted
    assert (st.documents, st.invalid_utf8) == (1, 0) and b"\x00" in docs[0]
    docs, st = data_lib.load_documents(cfg("binary.bin"))
    assert (st.documents, st.invalid_utf8, st.bytes) == (1, 1, 200_000)
    docs, st = data_lib.load_documents(cfg("records.jsonl"))
    assert (st.documents, st.bad_json, st.empty_skipped, st.invalid_utf8) == (
        n_good_json, n_bad_json, n_empty_json, n_surrogate)
    docs, st = data_lib.load_documents(cfg("empty.txt", "good.txt"))
    assert (st.files, st.documents, st.empty_skipped) == (2, 1, 1)
    for names, msg in [(("empty.txt",), "no non-empty document"), (("only_empty",), "no non-empty document"),
                       (("all_bad.jsonl",), "no non-empty document"), (("empty_dir",), "contains no file"),
                       (("missing",), "does not exist")]:
        with pytest.raises(data_lib.DataError, match=msg):
            data_lib.load_documents(cfg(*names))


def _data_cli(sources, steps=2, *extra):
    return cli(f"--gin.TRAIN_STEPS={steps}", "--gin.train.train.checkpoint_every=0",
               f"--gin.train/train.DataConfig.sources={tuple(sources)!r}",
               "--gin.train/train.DataConfig.byte_range=(0.0, 1.0)", *extra)


DATA_ERRORS = {  # input -> message expected after 'data error: '
    "missing": "does not exist",
    "empty_dir": "contains no file",
    "only_empty": "no non-empty document",
    "empty.txt": "no non-empty document",
    "all_bad.jsonl": "no non-empty document",
    "tiny.txt": "too short for one window",
}


def test_cli_counts_and_skips_every_bad_input_and_trains(bad_inputs, cli_env, tmp_path):
    names = ["invalid_utf8.txt", "empty.txt", "nul.txt", "binary.bin", "records.jsonl", "good.txt"]
    _, n_good_json, n_bad_json, n_empty_json, n_surrogate = _jsonl_records()
    wd = tmp_path / "mixed"
    p = subprocess.run([*_data_cli([bad_inputs[n] for n in names], 3), f"--workdir={wd}"], cwd=REPO_ROOT,
                       env=cli_env, capture_output=True, text=True, timeout=900)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    docs = 4 + n_good_json  # invalid_utf8, nul, binary, good + the good JSON records
    line = [ln for ln in out.splitlines() if "train data:" in ln]
    assert line, out[-3000:]
    assert (f"train data: {docs} docs" in line[0] and "from 6 files" in line[0]
            and f"skipped {1 + n_empty_json} empty docs, {n_bad_json} bad JSON records" in line[0]
            and f"{2 + n_surrogate} docs with invalid UTF-8 kept as bytes" in line[0]), line[0]
    hist = load_results(str(wd))["history"]
    assert [h["step"] for h in hist] == [1, 2, 3] and all(np.isfinite(h["loss"]) for h in hist)


@pytest.fixture(scope="module")
def data_error_runs(bad_inputs, cli_env, tmp_path_factory):
    """All failing CLI runs start together (each only imports, parses and reads data)."""
    root = tmp_path_factory.mktemp("data_errors")
    procs = {n: subprocess.Popen([*_data_cli([bad_inputs[n]]), f"--workdir={root / n.replace('.', '_')}"],
                                 cwd=REPO_ROOT, env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for n in DATA_ERRORS}
    yield root, procs
    for p in procs.values():
        if p.poll() is None:
            p.kill()


@pytest.mark.parametrize("name", sorted(DATA_ERRORS))
def test_cli_unusable_input_is_a_data_error_before_compiling(data_error_runs, bad_inputs, name):
    root, procs = data_error_runs
    out, err = procs[name].communicate(timeout=600)
    assert procs[name].returncode == 2, (out + err)[-3000:]
    assert "data error: " in err and DATA_ERRORS[name] in err, err[-2000:]
    assert "Traceback" not in err and "first step" not in out + err
    assert not os.path.exists(root / name.replace(".", "_") / "checkpoints")


@pytest.mark.shared_data
@pytest.mark.slow
def test_cli_50mb_single_line_file(cli_env, tmp_path):
    from train.sources import shared_path

    src = shared_path("english", "world192.txt")
    text = open(src, "rb").read() if os.path.isfile(src) else "".join(
        pydoc_text(k) for k in sorted(__import__("pydoc_data.topics").topics.topics)).encode()
    line = text.replace(b"\n", b" ").replace(b"\r", b" ")
    big = tmp_path / "big.txt"
    with open(big, "wb") as f:
        n = 0
        while n < 50_000_000:
            f.write(line)
            n += len(line)
    size = os.path.getsize(big)
    wd = tmp_path / "run"
    p = subprocess.run([*_data_cli([str(big)], 2, "--gin.train/train.DataConfig.doc_split='line'"),
                        f"--workdir={wd}"], cwd=REPO_ROOT, env=cli_env, capture_output=True, text=True, timeout=900)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    assert f"train data: 1 docs, {size:,} bytes" in out
    assert all(np.isfinite(h["loss"]) for h in load_results(str(wd))["history"])


# ------------------------------------------------------------------------------------ numerical guards

TINY_CONFIGS = sorted(os.path.relpath(p, REPO_ROOT)
                      for p in glob.glob(os.path.join(REPO_ROOT, "configs", "*tiny*.gin")))
# default suite: these four (no router; H-Net's router and capacity; MAGNET's routed predictors; null slots), shrunk
# further (compiling the full tiny H-Net's gradient costs ~1 min on a busy CPU); every tiny config at its own
# size runs under -m slow
SHRUNK = {
    "configs/isotropic_tiny.gin": ["hnet.StackConfig.layout = 'T1'", "hnet.StackConfig.d_model = 32",
                                   "hnet.StackConfig.d_ff = 64", "hnet.StackConfig.num_heads = 2"],
    "configs/hnet_1stage_tiny.gin": ["models.HNetConfig.arch_layout = ['m1', ['T1'], 'm1']",
                                     "models.HNetConfig.d_model = [32, 64]", "models.HNetConfig.d_ff = [0, 128]",
                                     "models.HNetConfig.num_heads = [2, 2]", "models.HNetConfig.ssm_d_state = 16",
                                     "models.HNetConfig.ssm_headdim = 16", "models.HNetConfig.ssm_chunk_size = 16"],
    "configs/magnet_tiny.gin": ["models.DTPConfig.d_model = 32", "models.DTPConfig.d_ff = 64",
                                "models.DTPConfig.num_heads = 2", "models.DTPConfig.pre_layout = 'T1'",
                                "models.DTPConfig.inner_layout = 'T1'", "models.DTPConfig.post_layout = 'T1'",
                                "models.DTPConfig.predictor_hidden = 16"],
    # a null slot per document + a group per space: the all-spaces row needs 2L slots in eval mode
    "configs/dtp_whitespace_tiny.gin": [f"{s}/hnet.StackConfig.{k} = {v}" for s in ("local", "main")
                                        for k, v in (("layout", "'T1'"), ("d_model", 32), ("d_ff", 64),
                                                     ("num_heads", 2))],
}
GUARD_CASES = ([pytest.param(c, SHRUNK[c], id=f"{c}-shrunk") for c in sorted(SHRUNK)]
               + [pytest.param(c, [], id=c, marks=pytest.mark.slow) for c in TINY_CONFIGS])
GUARD_L = 64


def _saturating_batch(data_cfg):
    """Three rows, one per text: real English, all spaces (every rule-based splitter boundary), one repeated
    byte (no boundary at all), each framed and annotated like training data."""
    from train import data as data_lib

    texts = [pydoc_text("assignment").encode()[:4 * GUARD_L], b" " * (4 * GUARD_L), b"e" * (4 * GUARD_L)]
    texts = [data_lib.Document(t, "eng.txt") for t in texts]  # a language label for 'lang'-routed models
    rows = []
    for t in texts:
        src = data_lib.WindowSource([t], GUARD_L, pad_last=False, annotations=data_cfg.annotations)
        rows.append(src[1])  # a window inside the document (row 0 also has the BOS)
    rows[0] = data_lib.WindowSource([texts[0]], GUARD_L, pad_last=False, annotations=data_cfg.annotations)[0]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def _capacity_overrides(fraction: float) -> list[str]:
    """Bindings that set every bound ``capacity`` (scalar or per-stage list) to ``fraction``."""
    import gin

    out = []
    for (scope, selector), params in gin.config._CONFIG.items():  # noqa: SLF001
        if "capacity" in params:
            v = params["capacity"]
            new = [fraction] * len(v) if isinstance(v, (list, tuple)) else fraction
            out.append(f"{scope + '/' if scope else ''}{selector}.capacity = {new!r}")
    return out


def _loss_and_grads(model_file: str, extra_bindings=(), params_fns=(None,)):
    """Build the config's model; for each ``params_fn(params) -> params`` (None: as initialised) return
    (loss, metrics, grad global norm, number of non-finite gradient entries) on the saturating batch. The
    per-route ``bytes_per_chunk_<route>`` of a routed model is left out for routes with no byte in the
    batch: it is NaN by definition there (undefined, models/magnet.py)."""
    import gin
    import jax
    import jax.numpy as jnp

    from flax import nnx

    from hnet.sharding import make_mesh
    from models.magnet import route_key
    from train.config import parse
    from train.loop import build_state
    from train.optim import OptimizerConfig
    from train.step import cross_entropy_sums, eval_forward, loss_and_metrics

    parse([os.path.join(REPO_ROOT, model_file), os.path.join(REPO_ROOT, "configs/runs/default.gin")],
          list(extra_bindings))
    model_fn = gin.query_parameter("train.train.model").scoped_configurable_fn
    setup = build_state(model_fn, OptimizerConfig(), 10, make_mesh())
    data_cfg = setup.data_config(gin.query_parameter("train.train.train_data").scoped_configurable_fn())
    batch = {k: jnp.asarray(v) for k, v in _saturating_batch(data_cfg).items()}

    @jax.jit
    def f(params, rest, batch):
        (loss, (m, _)), g = jax.value_and_grad(loss_and_metrics, has_aux=True)(params, rest, setup.graphdef, batch)
        bad = sum(jnp.sum(~jnp.isfinite(x)) for x in jax.tree.leaves(g))
        ev = cross_entropy_sums(eval_forward(setup.graphdef, params, rest, batch), batch)  # eval mode
        m = dict(m, eval_n_masked_by_model=ev["n_masked_by_model"], eval_n_bytes=ev["n_bytes"])
        return loss, m, jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(g))), bad

    cfg = getattr(nnx.merge(setup.graphdef, setup.state.params, setup.state.rest), "config", None)
    undefined = set()
    if getattr(cfg, "routing", "single") != "single":
        present = np.unique(np.asarray(batch[route_key(cfg.routing, cfg.script_groups)])[batch["segment_ids"] > 0])
        undefined = {f"bytes_per_chunk_{n}" for i, n in enumerate(cfg.route_names) if i not in present}
    out = []
    for fn in params_fns:
        params = setup.state.params if fn is None else fn(setup.state.params)
        loss, m, gnorm, bad = jax.device_get(f(params, setup.state.rest, batch))
        out.append((float(loss), {k: float(v) for k, v in m.items() if k not in undefined}, float(gnorm), int(bad)))
    return out


def _assert_finite(loss, m, gnorm, bad, what):
    assert np.isfinite(loss) and np.isfinite(gnorm) and bad == 0, (what, loss, gnorm, bad)
    assert all(np.isfinite(v) for v in m.values()), (what, {k: v for k, v in m.items() if not np.isfinite(v)})


def _zero_qk(params):
    """H-Net router q/k projections zeroed: q = k = 0, the cosine's norm clamp, p = 0.5 exactly (strict
    threshold: no boundary)."""
    import jax
    import jax.numpy as jnp

    hit = lambda p: "q_proj" in jax.tree_util.keystr(p) or "k_proj" in jax.tree_util.keystr(p)  # noqa: E731
    return jax.tree_util.tree_map_with_path(lambda p, x: jnp.zeros_like(x) if hit(p) else x, params)


@pytest.mark.parametrize("model_file,shrink", GUARD_CASES)
def test_saturated_routing_and_capacity_overflow_stay_finite(model_file, shrink, gin_clean):
    """Every tiny model on all-spaces / one-repeated-byte / real text, at its capacity and at a capacity of
    5% of the bytes (overflow in training: the dropped targets are counted in n_masked_by_model, never NaN;
    evaluation scores every byte: no capacity overflow in eval mode); H-Nets also with zeroed router
    projections. The shrunk (default-suite) models with a capacity run at 5% only: one compilation."""
    import gin

    from train.config import parse

    is_hnet = os.path.basename(model_file).startswith("hnet_")
    fns, whats = ((None, _zero_qk), ("default", "zero q/k")) if is_hnet else ((None,), ("default",))
    parse([os.path.join(REPO_ROOT, model_file), os.path.join(REPO_ROOT, "configs/runs/default.gin")], list(shrink))
    overrides = _capacity_overrides(0.05)
    gin.clear_config()
    if not (shrink and overrides):
        for (loss, m, gnorm, bad), what in zip(_loss_and_grads(model_file, shrink, fns), whats):
            _assert_finite(loss, m, gnorm, bad, what)
        gin.clear_config()
    if overrides:
        for (loss, m, gnorm, bad), what in zip(_loss_and_grads(model_file, [*shrink, *overrides], fns), whats):
            _assert_finite(loss, m, gnorm, bad, f"{what}, capacity 0.05: {overrides}")
            if is_hnet and what == "default":
                assert m["n_masked_by_model"] > 0, m
            assert m["eval_n_masked_by_model"] == 0 and m["eval_n_bytes"] > 0, m


_HNET_TINY = [c for c in TINY_CONFIGS if os.path.basename(c).startswith("hnet_")]
HNET_CASES = ([pytest.param(c, SHRUNK[c], f, id=f"{c}-shrunk-{f}", marks=pytest.mark.slow)
               for c in sorted(SHRUNK) if c in _HNET_TINY for f in ("cos=+1", "cos=-1")]
              + [pytest.param(c, [], f, id=f"{c}-{f}", marks=pytest.mark.slow)
                 for c in _HNET_TINY for f in ("cos=+1", "cos=-1")])


@pytest.mark.parametrize("model_file,shrink,forced", HNET_CASES)
def test_hnet_forced_router_saturation_stays_finite(model_file, shrink, forced, gin_clean, monkeypatch):
    """H-Net router forced to no boundary except document starts (cos = +1: p = 0) or to a boundary at every
    byte (cos = -1: p = 1, which overflows capacity M = L/2), keeping the router's gradient path."""
    from models import hnet as hnet_mod

    cos = 1.0 if forced == "cos=+1" else -1.0
    orig = hnet_mod.Router.probs

    def probs(self, prev, cur):
        return orig(self, prev, cur) * 0.0 + (1.0 - cos) / 2.0

    monkeypatch.setattr(hnet_mod.Router, "probs", probs)
    (loss, m, gnorm, bad), = _loss_and_grads(model_file, shrink)
    _assert_finite(loss, m, gnorm, bad, forced)
    if forced == "cos=+1":  # only document starts are boundaries: long chunks
        assert m["bytes_per_chunk_s0"] > GUARD_L / 4, m
    else:  # every byte a boundary: more chunks than the capacity; the overflow is counted, not NaN
        assert m["n_masked_by_model"] > 0, m


# ------------------------------------------------------------------------------------- config errors


def test_cli_wrong_type_fails_before_compiling_naming_parameter_and_source(cli_env, tmp_path):
    wd = tmp_path / "run"
    p = subprocess.run([*cli("--gin.TRAIN_STEPS=2", "--gin.SEQ_LEN='abc'"), f"--workdir={wd}"], cwd=REPO_ROOT,
                       env=cli_env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 2, (p.stdout + p.stderr)[-3000:]
    assert "config error" in p.stderr and "train/train.DataConfig.seq_len = 'abc' (via macro %SEQ_LEN)" in p.stderr
    assert "expected int, got str" in p.stderr and "command-line binding --gin.SEQ_LEN='abc'" in p.stderr
    assert "Traceback" not in p.stderr and "first step" not in p.stdout + p.stderr and not wd.exists()


def _parse_error(files, bindings=()):
    from train.config import ConfigError, parse

    with pytest.raises(ConfigError) as e:
        parse([os.path.join(REPO_ROOT, f) if not os.path.isabs(f) else f for f in files], list(bindings))
    return str(e.value)


def test_wrong_types_in_a_gin_file_name_the_file_and_line(gin_clean, tmp_path):
    bad = tmp_path / "bad.gin"
    bad.write_text("# overrides\ntrain/train.DataConfig.max_windows = 2.5\ntrain.OptimizerConfig.warmup_steps = '10'\n"
                   "hnet.StackConfig.layout = 4\ntrain/train.DataConfig.sources = 'a.txt'\n")
    msg = _parse_error(["configs/isotropic_tiny.gin", "configs/runs/default.gin", str(bad)])
    assert f"train/train.DataConfig.max_windows = 2.5: expected int, got float; set in {bad}:2" in msg
    assert f"train.OptimizerConfig.warmup_steps = '10': expected int, got str; set in {bad}:3" in msg
    assert f"hnet.StackConfig.layout = 4: expected str, got int; set in {bad}:4" in msg
    assert f"train/train.DataConfig.sources = 'a.txt': expected tuple[str, ...], got str; set in {bad}:5" in msg


@pytest.mark.parametrize("binding,expect", [
    ("train.train.steps = 1.5", "train.train.steps = 1.5: expected int, got float"),
    ("hnet.StackConfig.d_model = 32.0", "hnet.StackConfig.d_model = 32.0: expected int, got float"),
    ("train/train.DataConfig.shuffle = 1", "train/train.DataConfig.shuffle = 1: expected bool, got int"),
    ("train.OptimizerConfig.learning_rate = 'x'", "learning_rate = 'x': expected float, got str"),
    ("train/train.DataConfig.byte_range = (0.0, 'x')", "byte_range = (0.0, 'x'): expected tuple[float, float]"),
])
def test_wrong_type_bindings(binding, expect, gin_clean):
    msg = _parse_error(["configs/isotropic_tiny.gin", "configs/runs/default.gin"], [binding])
    assert expect in msg and f"command-line binding --gin.{binding}" in msg, msg


def test_wrong_type_in_per_stage_list_of_hnet_config(gin_clean):
    msg = _parse_error(["configs/hnet_1stage_tiny.gin", "configs/runs/default.gin"],
                       ["models.HNetConfig.d_model = [128, 'x']"])
    assert "models.HNetConfig.d_model = [128, 'x']: expected Sequence[int]" in msg


def test_missing_model_is_a_config_error(gin_clean):
    msg = _parse_error(["configs/runs/default.gin"])
    assert "missing required value train.train.model" in msg and "configs/runs/default.gin" in msg


def test_int_for_float_and_lists_for_tuples_are_accepted(gin_clean):
    """An int for a float and a list for a tuple pass validation and build working objects."""
    import gin

    from train import data as data_lib
    from train.config import parse
    from train.optim import make_schedule

    parse([os.path.join(REPO_ROOT, "configs/isotropic_tiny.gin"), os.path.join(REPO_ROOT, "configs/runs/default.gin")],
          ["train.OptimizerConfig.learning_rate = 1", "train/train.DataConfig.sources = ['builtin:pydoc_topics']"])
    opt = gin.query_parameter("train.train.optimizer").scoped_configurable_fn()
    assert opt.learning_rate == 1 and float(make_schedule(opt, 100)(opt.warmup_steps)) == pytest.approx(1.0)
    data_cfg = gin.query_parameter("train.train.train_data").scoped_configurable_fn()
    assert list(data_cfg.sources) == ["builtin:pydoc_topics"]
    docs, stats = data_lib.load_documents(data_cfg)
    assert stats.documents == len(docs) > 50
