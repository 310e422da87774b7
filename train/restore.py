"""Rebuild a trained model from a workdir: its operative gin config + a checkpoint."""

from __future__ import annotations

import tempfile

import gin

from hnet import sharding
from train import config as cfg_lib
from train import storage
from train.checkpoint import Checkpointer
from train.loop import Setup, build_state


def load_config(workdir: str, extra_files: list[str] = (), bindings: list[str] = ()) -> None:
    with tempfile.TemporaryDirectory() as tmp:  # gin reads local files
        operative = storage.local_copy(storage.join(workdir, "operative_config.gin"), tmp)
        cfg_lib.parse([operative, *extra_files], list(bindings))


def query(name: str):
    """A bound gin value with references and macros evaluated."""
    v = gin.query_parameter(name)
    while isinstance(v, gin.config.ConfigurableReference):
        v = v.scoped_configurable_fn() if v.evaluate else v.scoped_configurable_fn
    return v


def checkpointer(workdir: str) -> Checkpointer:
    return Checkpointer(storage.join(workdir, "checkpoints"), every_steps=0)


def restore_setup(workdir: str, step: int | None = None, ckpt: Checkpointer | None = None) -> tuple[Setup, int]:
    """(Setup with restored params, step); ``step`` None = latest. Needs load_config() first."""
    setup = build_state(query("train.train.model"), query("train.train.optimizer"), query("train.train.steps"),
                        sharding.make_mesh(), allocate=False)
    ckpt = ckpt or checkpointer(workdir)
    available = ckpt.all_steps()
    if not available:
        raise FileNotFoundError(f"no checkpoint in {ckpt.directory}")
    step = available[-1] if step is None else step
    with sharding.mesh_context(setup.mesh):
        setup.state = ckpt.restore(step, setup.state)
    return setup, step
