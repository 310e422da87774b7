"""Kill-safe resume harness: run the training CLI as a subprocess, SIGKILL it at a chosen step or while an
async checkpoint is being written, restart the same command, and check the result against an
uninterrupted run of the same command.

What is checked (``verify_resumed_run``), and why it is sound:

* every restart resumes from the newest *committed* checkpoint present when it starts (orbax commits a
  step by renaming ``<step>.orbax-checkpoint-tmp*`` to ``<step>``; a half-written step is never used),
  and a run with committed checkpoints never starts from step 0;
* the losses of the final invocation (full precision, from its ``results.json``) equal the uninterrupted
  run's losses at the same steps bit for bit. The loss of step s is a function of the parameters after
  step s-1 and of the batch of step s, so bit equality at every step after the last restart shows the
  same batches in the same order, and (through the parameters) that every earlier restart was exact too;
* the final parameters / optimizer state / counters (the last checkpoint) equal the reference's bit for
  bit (this covers the last step, whose effect no logged loss shows);
* the grain iterator state of every checkpoint (``next_index``: batches consumed) equals the reference's
  at that step and equals the step: no window skipped or repeated at any checkpoint boundary;
* the killed invocations' progress lines (4 decimals) agree with the reference at every step they printed.

Usage::

    h = KillHarness(cmd_without_workdir, env=..., cwd=REPO_ROOT)
    ref = h.run(ref_dir)                                  # uninterrupted
    inv = [h.run(wd, kill_at_step=7), h.run(wd, kill_in_checkpoint_write=12), h.run(wd)]
    report = verify_resumed_run(ref_dir, wd, inv)
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import re
import signal
import subprocess
import threading
import time

STEP_RE = re.compile(r"step\s+(\d+)/(\d+) loss (\S+)")
RESUMED_RE = re.compile(r"resumed from step (\d+)")
TMP_MARK = "orbax-checkpoint-tmp"


def committed_steps(ckpt_dir: str) -> list[int]:
    """Steps whose orbax checkpoint directory is committed (renamed to the bare step number)."""
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit())


def pending_writes(ckpt_dir: str) -> list[str]:
    """Checkpoint directories still being written (or left half-written by a kill)."""
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(n for n in os.listdir(ckpt_dir) if TMP_MARK in n)


def data_state(ckpt_dir: str, step: int) -> dict:
    """The grain iterator state saved with a checkpoint (process 0)."""
    with open(os.path.join(ckpt_dir, str(step), "data", "process_0-of-1.json")) as f:
        return json.load(f)


@dataclasses.dataclass
class Invocation:
    workdir: str
    returncode: int | None
    killed: bool
    kill_mode: str  # '' | 'step' | 'checkpoint_write'
    kill_target: int | None
    last_step_seen: int | None  # newest progress line read before the kill
    caught_write: list[str]  # half-written checkpoint dirs present right after the kill
    committed_before: list[int]  # committed checkpoints when this invocation started
    committed_after: list[int]
    progress: dict[int, str]  # step -> loss as printed (4 decimals)
    resumed_from: int | None
    output: str
    seconds: float

    @property
    def expected_start(self) -> int:
        return max(self.committed_before, default=0)


class KillHarness:
    def __init__(self, cmd: list[str], *, env: dict | None = None, cwd: str | None = None, timeout: float = 600):
        self.cmd, self.env, self.cwd, self.timeout = list(cmd), env, cwd, timeout

    def run(self, workdir: str, *, kill_at_step: int | None = None, kill_in_checkpoint_write: int | None = None,
            write_grace_steps: int = 3) -> Invocation:
        """Run ``cmd --workdir=workdir`` to completion, or SIGKILL it:

        * ``kill_at_step=n``: as soon as a progress line for step >= n is read;
        * ``kill_in_checkpoint_write=n``: once step >= n is reached, at the first sight of a checkpoint
          directory being written (polled every ~1 ms); if none is seen within ``write_grace_steps``
          further steps, kill there anyway (``caught_write`` then tells whether a write was interrupted).
        """
        ckpt_dir = os.path.join(workdir, "checkpoints")
        before = committed_steps(ckpt_dir)
        tmp_before = set(pending_writes(ckpt_dir))
        t0 = time.time()
        p = subprocess.Popen([*self.cmd, f"--workdir={workdir}"], cwd=self.cwd, env=self.env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        lines: queue.Queue = queue.Queue()
        out: list[str] = []

        def reader():
            for line in p.stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=reader, daemon=True).start()
        mode = "step" if kill_at_step is not None else ("checkpoint_write" if kill_in_checkpoint_write is not None
                                                        else "")
        target = kill_at_step if kill_at_step is not None else kill_in_checkpoint_write
        last_step, killed, eof = None, False, False
        while not eof:
            if time.time() - t0 > self.timeout:
                p.kill()
                raise TimeoutError(f"{self.cmd} did not finish in {self.timeout} s:\n{''.join(out)[-3000:]}")
            try:
                line = lines.get(timeout=0.001 if mode == "checkpoint_write" else 0.05)
            except queue.Empty:
                line = ""
            if line is None:
                eof = True
                break
            if line:
                out.append(line)
                m = STEP_RE.search(line)
                if m:
                    last_step = int(m.group(1))
            if not mode or killed or last_step is None or last_step < target:
                continue
            if mode == "step" or (set(pending_writes(ckpt_dir)) - tmp_before) or \
                    last_step >= target + write_grace_steps:
                p.send_signal(signal.SIGKILL)
                killed = True
                break
        if killed:
            caught = sorted(set(pending_writes(ckpt_dir)) - tmp_before)
            p.wait()
            while True:  # drain what was already written to the pipe
                line = lines.get()
                if line is None:
                    break
                out.append(line)
        else:
            caught = []
            p.wait()
        text = "".join(out)
        progress = {int(m.group(1)): m.group(3) for m in STEP_RE.finditer(text)}
        r = RESUMED_RE.search(text)
        return Invocation(workdir=workdir, returncode=p.returncode, killed=killed, kill_mode=mode,
                          kill_target=target, last_step_seen=last_step, caught_write=caught,
                          committed_before=before, committed_after=committed_steps(ckpt_dir), progress=progress,
                          resumed_from=int(r.group(1)) if r else None, output=text, seconds=time.time() - t0)


def load_results(workdir: str) -> dict:
    with open(os.path.join(workdir, "results.json")) as f:
        return json.load(f)


def restore_raw_state(ckpt_dir: str, step: int):
    """The saved train state of one step as a pytree of numpy arrays (no target structure needed)."""
    import numpy as np
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as c:
        tree = c.restore(os.path.join(ckpt_dir, str(step), "state"))
    import jax

    return jax.tree.map(np.asarray, tree)


def verify_resumed_run(ref_dir: str, workdir: str, invocations: list[Invocation], *, compare_state: bool = True
                       ) -> dict:
    """Assert the interrupted-and-resumed run in ``workdir`` equals the uninterrupted one in ``ref_dir``
    (see the module docstring); returns a small report."""
    import numpy as np

    ref = load_results(ref_dir)
    ref_loss = {h["step"]: h["loss"] for h in ref["history"]}
    steps = ref["final_step"]
    assert sorted(ref_loss) == list(range(1, steps + 1)), "the reference must log every step (log_every=1)"
    final = invocations[-1]
    assert not final.killed and final.returncode == 0, final.output[-3000:]
    for i, inv in enumerate(invocations):
        if i == 0:
            assert not inv.committed_before, "the first invocation must start in an empty workdir"
        # every restart resumes from the newest committed checkpoint; never from scratch over checkpoints
        if inv.committed_before:
            assert inv.resumed_from == inv.expected_start, (i, inv.resumed_from, inv.committed_before,
                                                            inv.output[-2000:])
        else:
            assert inv.resumed_from is None, (i, inv.output[-2000:])
        if inv.killed:
            assert inv.returncode == -signal.SIGKILL, (i, inv.returncode)
        # printed losses (every invocation, 4 decimals) agree with the reference at the same steps
        for s, printed in inv.progress.items():
            assert printed == f"{ref_loss[s]:.4f}", (i, s, printed, ref_loss[s])
        if inv.progress:
            assert min(inv.progress) == inv.expected_start + 1, (i, sorted(inv.progress), inv.expected_start)
    res = load_results(workdir)
    assert res["final_step"] == steps and res["start_step"] == final.expected_start
    got = {h["step"]: h["loss"] for h in res["history"]}
    assert sorted(got) == list(range(final.expected_start + 1, steps + 1)), sorted(got)
    diff = {s: (got[s], ref_loss[s]) for s in got if got[s] != ref_loss[s]}
    assert not diff, f"losses after the restart differ from the uninterrupted run: {diff}"
    # data order: iterator state at every checkpoint == batches consumed == reference's
    ckpt, ref_ckpt = os.path.join(workdir, "checkpoints"), os.path.join(ref_dir, "checkpoints")
    common = sorted(set(committed_steps(ckpt)) & set(committed_steps(ref_ckpt)))
    assert steps in common, (committed_steps(ckpt), committed_steps(ref_ckpt))
    for s in common:
        assert data_state(ckpt, s) == data_state(ref_ckpt, s), (s, data_state(ckpt, s), data_state(ref_ckpt, s))
        if "next_index" in data_state(ckpt, s):
            assert data_state(ckpt, s)["next_index"] == s, (s, data_state(ckpt, s))
    if compare_state:
        a, b = restore_raw_state(ckpt, steps), restore_raw_state(ref_ckpt, steps)
        import jax

        la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
        assert [k for k, _ in la] == [k for k, _ in lb]
        for (k, x), (_, y) in zip(la, lb):
            np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(k))
    return {"invocations": len(invocations), "kills": sum(i.killed for i in invocations),
            "writes_interrupted": sum(bool(i.caught_write) for i in invocations),
            "resumed_from": [i.resumed_from for i in invocations[1:]], "steps_compared_bitexact": len(got),
            "checkpoints_compared": common}
