"""Local multi-process launcher: the single-machine stand-in for a TPU pod / GPU cluster.

Spawns N copies of ``python -m <module> <args>`` on this machine, each with its own
``--process_id`` and ``--devices_per_process`` simulated CPU devices, all joined to one
``jax.distributed`` coordinator on ``localhost:<free port>`` (gloo CPU collectives).

CLI::

    python -m launch.local --num_processes 2 --devices_per_process 4 [--dry-run] \\
        -- --gin_file=configs/<model>.gin --gin_file=configs/<run>.gin --workdir=/tmp/run

Python::

    from launch.local import run_local
    results = run_local(["--flag=1"], num_processes=2, devices_per_process=2,
                        module="tests.distributed_child", timeout=60)
    assert all(r.returncode == 0 for r in results)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import subprocess
import sys
import threading
import time
from typing import Mapping, Sequence, TextIO

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
_STDOUT = object()  # run_local default: whatever sys.stdout is at call time


@dataclasses.dataclass
class ProcessSpec:
    """One child process: argv plus the environment variables set on top of the parent's."""

    process_id: int
    argv: list[str]
    env: dict[str, str]

    def shell(self) -> str:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        return f"{env} {shlex.join(self.argv)}" if env else shlex.join(self.argv)


@dataclasses.dataclass
class LocalResult:
    """Outcome of one child (CompletedProcess-like)."""

    process_id: int
    args: list[str]
    returncode: int
    output: str  # stdout and stderr interleaved, without the [pI] prefixes
    timed_out: bool = False

    @property
    def stdout(self) -> str:  # CompletedProcess compatibility
        return self.output


def split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Splits ``launcher args -- forwarded args`` at the first ``--``."""
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def xla_flags(devices_per_process: int, base: str | None) -> str:
    """Keeps unrelated XLA flags from ``base``; replaces any existing device-count flag."""
    kept = [f for f in (base or "").split() if not f.startswith(DEVICE_COUNT_FLAG)]
    return " ".join([f"{DEVICE_COUNT_FLAG}={devices_per_process}", *kept])


def build_process_specs(
    module_args: Sequence[str],
    num_processes: int,
    devices_per_process: int,
    port: int,
    module: str = "train.main",
    python: str = sys.executable,
    base_env: Mapping[str, str] | None = None,
) -> list[ProcessSpec]:
    """The exact per-process command lines and env overrides (no side effects)."""
    if num_processes < 1 or devices_per_process < 1:
        raise ValueError("num_processes and devices_per_process must be >= 1")
    base_env = os.environ if base_env is None else base_env
    env = {
        "XLA_FLAGS": xla_flags(devices_per_process, base_env.get("XLA_FLAGS")),
        "JAX_PLATFORMS": "cpu",
    }
    specs = []
    for i in range(num_processes):
        argv = [
            python, "-m", module, *module_args,
            f"--coordinator_address=localhost:{port}",
            f"--num_processes={num_processes}",
            f"--process_id={i}",
        ]
        specs.append(ProcessSpec(process_id=i, argv=argv, env=dict(env)))
    return specs


def _pump(proc: subprocess.Popen, prefix: str, sink: list[str], out: TextIO | None,
          lock: threading.Lock) -> None:
    for line in proc.stdout:  # type: ignore[union-attr]
        sink.append(line)
        if out is not None:
            with lock:
                out.write(f"{prefix} {line}" if line.endswith("\n") else f"{prefix} {line}\n")
                out.flush()
    proc.stdout.close()  # type: ignore[union-attr]


def _kill(procs: Sequence[subprocess.Popen], grace_s: float = 3.0) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def run_local(
    module_args: Sequence[str],
    num_processes: int,
    devices_per_process: int,
    module: str = "train.main",
    timeout: float | None = None,
    port: int | None = None,
    cwd: str | None = REPO_ROOT,
    stream: TextIO | None | object = _STDOUT,
    extra_env: Mapping[str, str] | None = None,
) -> list[LocalResult]:
    """Runs ``num_processes`` children of ``python -m module`` and waits for all of them.

    Each child's output lines are echoed to ``stream`` (default sys.stdout; None: silent),
    prefixed with ``[pI]``. ``extra_env`` is added to every child's environment.
    If any child exits non-zero, the others are terminated. On ``timeout`` (seconds, whole
    job) all are terminated and marked ``timed_out``. Returns one result per process, in
    process-id order.
    """
    if stream is _STDOUT:
        stream = sys.stdout
    if port is None:
        import portpicker  # from the [test] extra; imported only when a port must be picked
        port = portpicker.pick_unused_port()
    specs = build_process_specs(module_args, num_processes, devices_per_process, port, module)
    base_env = dict(os.environ)
    if cwd:  # so `-m module` resolves to this checkout even without `pip install -e`
        base_env["PYTHONPATH"] = os.pathsep.join(
            p for p in (cwd, base_env.get("PYTHONPATH")) if p)
    base_env.update(extra_env or {})

    lock = threading.Lock()
    procs: list[subprocess.Popen] = []
    outputs: list[list[str]] = []
    pumps: list[threading.Thread] = []
    try:
        for spec in specs:
            proc = subprocess.Popen(
                spec.argv, cwd=cwd, env={**base_env, **spec.env}, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                errors="replace")
            procs.append(proc)
            sink: list[str] = []
            outputs.append(sink)
            t = threading.Thread(
                target=_pump, args=(proc, f"[p{spec.process_id}]", sink, stream, lock),
                daemon=True)
            t.start()
            pumps.append(t)

        deadline = None if timeout is None else time.monotonic() + timeout
        timed_out = False
        while True:
            codes = [p.poll() for p in procs]
            if all(c is not None for c in codes):
                break
            if any(c not in (None, 0) for c in codes):
                _kill(procs)  # one failed: the rest would hang in collectives
                break
            if deadline is not None and time.monotonic() > deadline:
                timed_out = True
                _kill(procs)
                break
            time.sleep(0.05)
    except BaseException:  # KeyboardInterrupt included: never leave orphans behind
        _kill(procs)
        raise
    for t in pumps:
        t.join(timeout=5)

    return [
        LocalResult(process_id=s.process_id, args=s.argv, returncode=p.returncode,
                    output="".join(o), timed_out=timed_out)
        for s, p, o in zip(specs, procs, outputs)
    ]


def main(argv: Sequence[str] | None = None) -> int:
    own, forwarded = split_argv(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(
        prog="python -m launch.local",
        description="Run N local processes of a module joined by jax.distributed "
                    "(arguments after -- go to the module).")
    ap.add_argument("--num_processes", "--num-processes", type=int, default=2)
    ap.add_argument("--devices_per_process", "--devices-per-process", type=int, default=4)
    ap.add_argument("--module", default="train.main")
    ap.add_argument("--port", type=int, default=None, help="coordinator port (default: free port)")
    ap.add_argument("--timeout", type=float, default=None, help="seconds for the whole job")
    ap.add_argument("--dry-run", "--dry_run", action="store_true",
                    help="print the per-process commands with their env, run nothing")
    args = ap.parse_args(own)

    if args.dry_run:
        if args.port is not None:
            port = args.port
        else:
            import portpicker
            port = portpicker.pick_unused_port()
        for spec in build_process_specs(forwarded, args.num_processes, args.devices_per_process,
                                        port, args.module):
            print(spec.shell())
        return 0

    results = run_local(forwarded, args.num_processes, args.devices_per_process,
                        module=args.module, timeout=args.timeout, port=args.port)
    bad = [r for r in results if r.returncode != 0]
    for r in bad:
        why = "timed out" if r.timed_out else f"exit code {r.returncode}"
        print(f"[launch.local] process {r.process_id}: {why}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
