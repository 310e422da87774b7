"""Orbax checkpoints: train state (params, non-param variables, optimizer, counters) + grain iterator
state, async, keep-N. Restore falls back to the previous good step when the latest is unreadable."""

from __future__ import annotations

import logging

import grain
import jax
import orbax.checkpoint as ocp

from train import storage

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """Checkpoints exist but none of them can be read (the run must not silently start from scratch)."""


class Checkpointer:
    def __init__(self, directory: str, *, every_steps: int, keep: int = 3, async_save: bool = True):
        self.every_steps = every_steps
        self.mgr = ocp.CheckpointManager(
            storage.absolute(directory),  # orbax needs absolute paths (or URLs)
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                                 create=True),
        )
        self.unreadable: set[int] = set()  # steps restore_latest could not read (replaced when saved again)

    @property
    def directory(self) -> str:
        return str(self.mgr.directory)

    def all_steps(self) -> list[int]:
        self.mgr.reload()
        return sorted(self.mgr.all_steps())

    def save(self, step: int, state, data_iter=None, *, force: bool = False) -> bool:
        if not force and (self.every_steps <= 0 or step % self.every_steps):
            return False
        if step in self.unreadable:  # recomputed after a fallback: replace the unreadable copy
            log.warning("replacing unreadable checkpoint step %d in %s", step, self.directory)
            self.mgr.delete(step)
            self.unreadable.discard(step)
        if step in self.mgr.all_steps():
            return False
        items = {"state": ocp.args.StandardSave(state)}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        return self.mgr.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int, abstract_state):
        """The train state of one step (no data-iterator state)."""
        return self.mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))["state"]

    def restore_latest(self, abstract_state, data_iter=None):
        """(step, state) from the newest readable checkpoint, or (None, None) when there is none.
        An unreadable checkpoint is reported and skipped, never silently replaced by a fresh start."""
        steps = self.all_steps()
        for step in reversed(steps):
            items = {"state": ocp.args.StandardRestore(abstract_state)}
            if data_iter is not None:
                items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
            try:
                restored = self.mgr.restore(step, args=ocp.args.Composite(**items))
            except Exception as e:  # noqa: BLE001 - any read error means "this step is unusable"
                log.error("checkpoint step %d in %s is unreadable (%s: %s); falling back to the previous one",
                          step, self.directory, type(e).__name__, str(e)[:300])
                self.unreadable.add(step)
                continue
            return step, restored["state"]
        if steps:
            raise CheckpointError(f"no readable checkpoint among steps {steps} in {self.directory}; "
                                  "refusing to start from scratch over them (move the directory away to do so)")
        return None, None

    def wait(self):
        self.mgr.wait_until_finished()

    def close(self):
        self.mgr.wait_until_finished()
        self.mgr.close()


def abstract_like(tree, shardings):
    """ShapeDtypeStructs carrying the target shardings (restore produces already-sharded arrays)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)
