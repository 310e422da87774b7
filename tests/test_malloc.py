"""train/malloc.py: the CLIs re-execute themselves under glibc settings with which XLA:CPU reuses its buffers."""

import os
import platform
import subprocess
import sys

import pytest

from train import malloc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLIBC = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"
needs_glibc = pytest.mark.skipif(not GLIBC, reason="glibc tunables exist on Linux with glibc only")


def _run(code: str, *args: str, **env: str) -> list[str]:
    """stdout lines of ``python -c code args`` under os.environ less GLIBC_TUNABLES, with JAX on the CPU (also on
    a GPU or TPU host, where ``reexec`` would otherwise do nothing), plus ``env``."""
    base = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", malloc.OPT_OUT)}
    p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT,
                       env=dict(base, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", **env), timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout.splitlines()


def test_tunables_keep_the_users_values():
    assert malloc.tunables({}) == ":".join(f"{k}={v}" for k, v in malloc.TUNABLES.items())
    mine = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.cpu.hwcaps=-AVX2"}
    t = malloc.tunables(mine).split(":")
    assert t[:2] == ["glibc.malloc.arena_max=2", "glibc.cpu.hwcaps=-AVX2"]
    assert sorted(t[2:]) == sorted(f"{k}={v}" for k, v in malloc.TUNABLES.items() if k != "glibc.malloc.arena_max")
    assert not malloc.applies({"GLIBC_TUNABLES": malloc.tunables({})})  # nothing missing: no re-execution
    assert not malloc.applies({malloc.OPT_OUT: "0"})
    assert malloc.applies({}) == (GLIBC and malloc.runs_on_cpu({}))


def test_only_hosts_where_jax_runs_on_the_cpu(tmp_path):
    assert malloc.runs_on_cpu({"JAX_PLATFORMS": "cpu"}) and malloc.runs_on_cpu({"JAX_PLATFORMS": "cpu,tpu"})
    assert not malloc.runs_on_cpu({"JAX_PLATFORMS": "tpu"}) and not malloc.runs_on_cpu({"JAX_PLATFORMS": "cuda,cpu"})
    assert malloc.runs_on_cpu({}, dev=str(tmp_path))
    for device in ("nvidia0", "kfd", "accel0", "vfio/0"):  # GPUs (NVIDIA, AMD); TPUs (v4 and older, v5 and newer)
        dev = tmp_path / device.replace("/", "_")
        os.makedirs(os.path.dirname(dev / device), exist_ok=True)
        (dev / device).touch()
        assert not malloc.runs_on_cpu({}, dev=str(dev)), device
        assert not malloc.applies({}, dev=str(dev)) and malloc.applies({"JAX_PLATFORMS": "cpu"}, dev=str(dev)) == GLIBC


REEXEC = """
import os, sys
print("start", os.getpid(), os.environ.get("GLIBC_TUNABLES", ""), flush=True)
from train import malloc
malloc.reexec()
print("main", os.getpid(), os.environ.get("GLIBC_TUNABLES", ""), sys.argv[1:])
"""


@needs_glibc
def test_reexec_replaces_the_process_once_with_the_same_pid_and_arguments():
    lines = _run(REEXEC, "--flag=1", "x y")
    assert [ln.split()[0] for ln in lines] == ["start", "start", "main"]  # one re-execution, then main
    pid = lines[0].split()[1]
    assert all(ln.split()[1] == pid for ln in lines)
    assert lines[0].split()[2:] == [] and lines[2].split()[2] == malloc.tunables({})
    assert lines[2].endswith("['--flag=1', 'x y']")
    assert [ln.split()[0] for ln in _run(REEXEC, **{malloc.OPT_OUT: "0"})] == ["start", "main"]


FAULTS = """
import resource, sys
from train import malloc
if sys.argv[1] == "tuned":
    malloc.reexec()
import jax, jax.numpy as jnp
x = jnp.ones((8192, 1024)) / 1024  # every [8192, 1024] fp32 temporary is 32 MiB: above glibc's mmap threshold
f = jax.jit(jax.grad(lambda x: jnp.sum(jnp.tanh(jnp.tanh(x @ x.T[:, :1024]) @ x[:1024]))))
faults = []
for _ in range(20):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(min(faults[2:]))
"""


@needs_glibc
def test_the_tunables_stop_xla_cpu_from_faulting_its_buffers_in_every_call():
    """The property the settings exist for: a jitted function with > 32 MiB temporaries takes tens of thousands of
    minor page faults in every call under glibc's defaults (its buffers are mmapped and unmapped each call), and
    under the tunables none in most calls. Measured per call, three such processes on two cores: 27-42k in every
    call under the defaults; 0 in 15-17 of 20 calls under the tunables, 19-28k in the others (the heap grows now
    and then; in CI, beside the other test worker, the median call took 10k). So the test compares the call with
    the fewest faults of 18: >= 8192 (32 MiB) under the defaults, ~0 under the tunables."""
    default = float(_run(FAULTS, "default")[-1])
    tuned = float(_run(FAULTS, "tuned")[-1])
    assert default > 8192, default  # >= 32 MiB faulted in, even in the call with the fewest faults
    assert tuned < default / 20, (tuned, default)
