"""Sharded training: 8 simulated CPU devices with mesh (data=2, fsdp=2, tensor=2) give the same losses as
one device (isotropic and H-Net 1-stage); 2 local processes x 4 devices (jax.distributed on localhost)
train, checkpoint, resume and match the single-process losses. Each runs in subprocesses, since the
device count must be fixed before JAX starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from launch.local import xla_flags
from tests.conftest import REPO_ROOT
from train import malloc

CHILD_8_DEVICES = textwrap.dedent("""
    import functools, json, sys
    import jax, numpy as np
    jax.config.update("jax_default_matmul_precision", "highest")
    from hnet import sharding
    from hnet.layers import StackConfig
    from models.isotropic import IsotropicLM
    from models.hnet import HNetConfig, HNetLM
    from train import data as data_lib
    from train.loop import build_state
    from train.optim import OptimizerConfig
    from train.step import make_train_step

    models = {
        "isotropic": functools.partial(IsotropicLM, StackConfig(layout="T2", d_model=32, d_ff=64, num_heads=2)),
        "hnet": functools.partial(HNetLM, HNetConfig(arch_layout=("m1", ("T1",), "m1"), d_model=(32, 48),
                                  d_ff=(0, 64), num_heads=(2, 2), ssm_d_state=8, ssm_headdim=16, ssm_chunk_size=16)),
    }
    cfg = data_lib.DataConfig(seq_len=32, batch_size=8)
    docs, _ = data_lib.load_documents(cfg)
    out = {}
    for name, model_fn in models.items():
        for label, devices, shape in (("1", jax.devices()[:1], {"data": 1}),
                                      ("8", jax.devices(), {"data": 2, "fsdp": 2, "tensor": 2})):
            mesh = sharding.make_mesh(shape, devices=devices)
            setup = build_state(model_fn, OptimizerConfig(learning_rate=3e-3, warmup_steps=1), 10, mesh)
            step = jax.jit(make_train_step(setup.graphdef, setup.tx, setup.schedule),
                           in_shardings=(setup.state_shardings, sharding.batch_sharding(mesh)),
                           out_shardings=(setup.state_shardings, None), donate_argnums=(0,))
            it = data_lib.make_train_iterator(cfg, docs)
            state, losses = setup.state, []
            with sharding.mesh_context(mesh):
                for _ in range(5):
                    state, m = step(state, sharding.global_batch_from_local(mesh, next(it)))
                    losses.append(float(m["loss"]))
            kernel = jax.tree.leaves(state.params)[-1]
            out[f"{name}/{label}"] = {"losses": losses, "n_shards": len(kernel.sharding.device_set),
                                      "spec": str(getattr(kernel.sharding, "spec", ""))}
    print("RESULT " + json.dumps(out))
""")


def _run_child(code: str, n_devices: int, timeout: int = 600) -> dict:
    env = dict(os.environ, XLA_FLAGS=xla_flags(n_devices, os.environ.get("XLA_FLAGS")), JAX_PLATFORMS="cpu", PYTHONPATH=REPO_ROOT)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, env=env,
                       timeout=timeout)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    assert p.returncode == 0 and lines, p.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT "):])


def test_8_devices_match_1_device():
    res = _run_child(CHILD_8_DEVICES, 8)
    for name in ("isotropic", "hnet"):
        one, eight = res[f"{name}/1"]["losses"], res[f"{name}/8"]["losses"]
        assert one[-1] < one[0], one  # it trains
        for a, b in zip(one, eight):
            assert abs(a - b) <= 1e-5 * abs(a), (name, one, eight)
        # parameters really are sharded on the 8-device mesh (lm_head kernel: embed->fsdp, vocab->tensor)
        assert res[f"{name}/8"]["n_shards"] == 8 and "fsdp" in res[f"{name}/8"]["spec"], res[f"{name}/8"]


TRAIN_ARGS = [
    "--gin_file=configs/isotropic_tiny.gin", "--gin_file=configs/runs/default.gin",
    "--gin.hnet.StackConfig.layout='T1'", "--gin.hnet.StackConfig.d_model=32", "--gin.hnet.StackConfig.d_ff=64",
    "--gin.hnet.StackConfig.num_heads=2", "--gin.SEQ_LEN=32", "--gin.BATCH=8", "--gin.TRAIN_STEPS=6",
    "--gin.train.train.log_every=1", "--gin.train.train.checkpoint_every=3", "--gin.train.train.eval_every=0",
    "--gin.train.train.sample_prompts=()", "--gin.eval/train.DataConfig.max_windows=8",
    "--gin.train.OptimizerConfig.warmup_steps=1",
]


def _losses(workdir: str) -> list[float]:
    with open(os.path.join(workdir, "results.json")) as f:
        return [h["loss"] for h in json.load(f)["history"]]


@pytest.mark.slow
def test_two_processes_train_checkpoint_resume_match_single_process(tmp_path):
    from launch.local import run_local

    single = str(tmp_path / "single")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO_ROOT,
               XLA_FLAGS=xla_flags(8, os.environ.get("XLA_FLAGS")))
    p = subprocess.run([sys.executable, "-m", "train.main", *TRAIN_ARGS, f"--workdir={single}"], cwd=REPO_ROOT,
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    ref = _losses(single)
    with open(os.path.join(single, "results.json")) as f:  # the CLI re-executed itself under train/malloc.py's tunables
        assert json.load(f)["glibc_tunables"] == (malloc.tunables(env) if malloc.applies(env) else
                                                  env.get("GLIBC_TUNABLES", ""))

    multi = str(tmp_path / "multi")
    mesh = "--gin.train.train.mesh_shape={'data': 4, 'fsdp': 2}"
    first = run_local([*TRAIN_ARGS, mesh, "--gin.train.train.stop_after=3", f"--workdir={multi}"],
                      num_processes=2, devices_per_process=4, timeout=600)
    assert all(r.returncode == 0 for r in first), [r.output[-2000:] for r in first]
    assert os.path.isdir(os.path.join(multi, "checkpoints", "3"))
    second = run_local([*TRAIN_ARGS, mesh, f"--workdir={multi}"], num_processes=2, devices_per_process=4,
                       timeout=600)
    assert all(r.returncode == 0 for r in second), [r.output[-2000:] for r in second]
    assert "resumed from step 3" in second[0].output
    resumed = _losses(multi)  # steps 4..6 after the restore
    assert len(resumed) == 3
    for a, b in zip(ref[3:], resumed):
        assert abs(a - b) <= 1e-5 * abs(a), (ref, resumed)


@pytest.mark.parametrize("shape,n,expect", [({"data": -1}, 8, (8, 1, 1)), ({"data": 2, "fsdp": -1}, 8, (2, 4, 1)),
                                            ({"data": 2, "fsdp": 2, "tensor": 2}, 8, (2, 2, 2))])
def test_mesh_fill(shape, n, expect):
    from hnet.sharding import resolve_mesh_shape

    assert resolve_mesh_shape(shape, n) == expect


def test_mesh_errors():
    from hnet.sharding import resolve_mesh_shape

    with pytest.raises(ValueError):
        resolve_mesh_shape({"data": -1, "fsdp": -1}, 8)
    with pytest.raises(ValueError):
        resolve_mesh_shape({"data": 3}, 8)


def test_batch_placement_comes_from_the_rules_table(monkeypatch):
    from jax.sharding import PartitionSpec as P

    from hnet import sharding

    mesh = sharding.make_mesh()
    assert sharding.batch_sharding(mesh, 3).spec == P(("data", "fsdp"), None, None)
    rules = tuple((name, "data" if name == "batch" else axes) for name, axes in sharding.LOGICAL_AXIS_RULES)
    monkeypatch.setattr(sharding, "LOGICAL_AXIS_RULES", rules)
    assert sharding.batch_sharding(mesh).spec == P("data", None)
    assert sharding.mesh_axes("batch", mesh) == ("data",)  # what the kernels' shard_maps split B over


def test_params_born_sharded_only_inside_mesh_context():
    from flax import nnx
    from jax.sharding import NamedSharding

    from hnet import sharding
    from hnet.layers import RMSNorm

    assert nnx.using_eager_sharding()  # flax's default: importing hnet flips no global flag
    assert not RMSNorm(8).scale.get_metadata()["eager_sharding"]  # no mesh: built unsharded, no error
    with sharding.mesh_context(sharding.make_mesh()):
        norm = RMSNorm(8)
    assert norm.scale.get_metadata()["eager_sharding"] and isinstance(norm.scale[...].sharding, NamedSharding)
