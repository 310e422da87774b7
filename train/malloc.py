"""glibc malloc settings under which XLA:CPU reuses its step buffers; the CLIs re-execute themselves with them.

XLA:CPU allocates a compiled program's temporaries on every call (hnet_1stage_tiny's train step at L = 1024:
1.78 GB) from a runtime thread. With glibc's defaults that thread's arena serves anything above the mmap
threshold (at most 32 MiB) or beyond its 64 MiB heaps with a fresh ``mmap``, and ``free`` unmaps it, so
every step faults all its temporaries in again, page by page, zeroed by the kernel: 443k minor faults and
0.67 s of system time per H-Net step on the 2-core CPU, a third of the step's CPU time. With one arena (the
main heap, which grows without a size limit) and both thresholds at 4 GiB, freed buffers stay in the heap
and the next step reuses them: no faults. Measured on this machine (docs/benchmarks.md, session 12): a
Mamba-2 layer forward + backward 132 -> 64 ms; the H-Net step 1.25 -> 0.85 s; isotropic_tiny 590 -> 500 ms at
L = 1024.

What it costs: compiling takes longer, since XLA's compiler threads share the one arena (the H-Net train step
10.0 -> 12.5 s); and peak RSS can grow by about one step's temporaries, since the heap keeps a hole that the
next step's buffers no longer fit into (the H-Net step at L = 1024: 3.2 -> 4.8 GB, flat after the second
step; isotropic_tiny at L = 8192: unchanged, 1.2 GB). The test suite, which compiles far more than it runs,
does not use them.

The settings are tunables read when the process starts (``GLIBC_TUNABLES``), so they cannot be set from
Python once it runs: ``reexec()`` replaces the process (same PID, same arguments) with one that has them.
Keys already in ``GLIBC_TUNABLES`` are left as they are; ``HNET_MALLOC_TUNABLES=0`` turns this off. Hosts
with a GPU or TPU (their compiles would pay, their steps not gain) and other libcs (musl, macOS) are left
alone. For a process of your own (a notebook, a script)::

    export GLIBC_TUNABLES=$(.venv/bin/python -m train.malloc)
"""

from __future__ import annotations

import glob
import os
import platform
import sys

TUNABLES = {
    "glibc.malloc.arena_max": "1",  # every thread allocates from the main heap, which has no size limit
    "glibc.malloc.mmap_threshold": str(4 << 30),  # blocks below 4 GiB come from the heap, not from mmap
    "glibc.malloc.trim_threshold": str(4 << 30),  # free keeps up to 4 GiB at the heap's top instead of trimming
}
OPT_OUT = "HNET_MALLOC_TUNABLES"


def tunables(environ: dict[str, str]) -> str:
    """``environ``'s GLIBC_TUNABLES with every key of TUNABLES it lacks appended (its own values win)."""
    current = [kv for kv in environ.get("GLIBC_TUNABLES", "").split(":") if kv]
    have = {kv.split("=", 1)[0] for kv in current}
    return ":".join(current + [f"{k}={v}" for k, v in TUNABLES.items() if k not in have])


def runs_on_cpu(environ: dict[str, str], dev: str = "/dev") -> bool:
    """Whether JAX will run the program on this host's CPU: JAX_PLATFORMS starts with cpu, or it is unset and
    ``dev`` has no GPU or TPU device file (nvidia<n>, kfd, accel<n>, vfio/<n>). Elsewhere the step's buffers
    live on the accelerator, so the tunables would only cost compile time (and the host's data threads one
    shared arena)."""
    if environ.get("JAX_PLATFORMS"):
        return environ["JAX_PLATFORMS"].split(",")[0].strip() == "cpu"
    return not any(glob.glob(os.path.join(dev, p)) for p in ("nvidia[0-9]*", "kfd", "accel[0-9]*", "vfio/[0-9]*"))


def applies(environ: dict[str, str], dev: str = "/dev") -> bool:
    """Whether ``reexec`` would replace a process with this environment: Linux with glibc, not opted out, JAX on
    the CPU (``runs_on_cpu``), and some key of TUNABLES missing."""
    return (sys.platform == "linux" and platform.libc_ver()[0] == "glibc" and environ.get(OPT_OUT, "1") != "0"
            and runs_on_cpu(environ, dev) and tunables(environ) != environ.get("GLIBC_TUNABLES", ""))


def reexec() -> None:
    """Replaces this process with the same command under ``tunables(os.environ)``; returns when it needs none
    (see ``applies``). Call it first in a ``__main__`` block, before anything starts threads or allocates."""
    if not applies(os.environ):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]],
              dict(os.environ, GLIBC_TUNABLES=tunables(os.environ)))


if __name__ == "__main__":
    import argparse

    argparse.ArgumentParser(description="Prints the GLIBC_TUNABLES that a CLI started from this environment runs "
                                        "under.", epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
                            ).parse_args()
    print(tunables(os.environ) if applies(os.environ) else os.environ.get("GLIBC_TUNABLES", ""))
