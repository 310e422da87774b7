"""Launch training on every host of a Cloud TPU VM (single host or pod slice) with gcloud.

Steps, each one command (``--dry-run`` prints them, shell-quoted, one per line):

0. with ``--preflight=TOPOLOGY`` (e.g. ``v5p:4x4x4``): ``python -m launch.aot`` compiles the train and eval
   steps of the same gin files for that topology here, and the launch stops unless they fit in HBM;
1. tar the checkout (``git ls-files``: tracked + untracked-but-not-ignored files) locally;
2. ``gcloud compute tpus tpu-vm scp`` the tarball to every worker (``--worker=all``);
3. on every worker: unpack into ``--remote_dir``, create a python3.11 venv, ``pip install -e .[tpu]``
   (skip with ``--skip_setup`` once done; the venv is reused if it already exists);
4. on every worker: ``.venv/bin/python -m train.main <args after --> --distributed``. On TPU VMs
   ``jax.distributed.initialize()`` needs no arguments; train.main's ``--distributed`` makes it
   call that (``--no_distributed`` leaves the flag out).

Example::

    python -m launch.tpu_pod --name my-v5p-64 --zone us-east5-a --project my-proj --preflight=v5p:4x4x4 \\
        --workdir gs://my-bucket/runs/hnet_xl --dry-run -- \\
        --gin_file=configs/hnet_1stage_XL.gin --gin_file=configs/runs/pretrain_8k.gin --gin.train.steps=1000
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from typing import Sequence

from launch.local import split_argv

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    own, train_args = split_argv(argv)
    ap = argparse.ArgumentParser(
        prog="python -m launch.tpu_pod",
        description="Copy this checkout to every TPU VM worker, set up a venv, run train.main "
                    "(arguments after -- go to train.main).")
    ap.add_argument("--name", required=True, help="TPU VM / pod slice name")
    ap.add_argument("--zone", required=True)
    ap.add_argument("--project", default=None)
    ap.add_argument("--workdir", default=None,
                    help="run directory (gs://...), passed to train.main as --workdir=")
    ap.add_argument("--remote_dir", "--remote-dir", default="hnet_bytelm",
                    help="checkout directory on each worker, relative to the ssh user's home")
    ap.add_argument("--python", default="python3.11", help="interpreter that creates the venv")
    ap.add_argument("--module", default="train.main")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                    help="environment variable set for train.main on every worker (repeatable)")
    ap.add_argument("--no_distributed", "--no-distributed", action="store_true",
                    help="do not append --distributed (train.main's auto-detected "
                         "jax.distributed.initialize()) to the train args")
    ap.add_argument("--skip_setup", "--skip-setup", action="store_true",
                    help="skip the venv / pip install step")
    ap.add_argument("--internal_ip", "--internal-ip", action="store_true",
                    help="pass --internal-ip to gcloud (when running inside the VPC)")
    ap.add_argument("--tarball", default=None,
                    help="local tarball path (default: /tmp/<name>-src.tar.gz)")
    ap.add_argument("--preflight", default=None, metavar="TOPOLOGY",
                    help="first compile the run for this TPU topology here (python -m launch.aot, e.g. "
                         "v5p:4x4x4) and stop unless it fits, before copying anything")
    ap.add_argument("--num_slices", "--num-slices", type=int, default=1, help="slices, for --preflight")
    ap.add_argument("--dry-run", "--dry_run", action="store_true",
                    help="print the commands, run nothing")
    args = ap.parse_args(own)
    for kv in args.env:
        if "=" not in kv:
            ap.error(f"--env expects KEY=VALUE, got {kv!r}")
    return args, train_args


def _gcloud(args: argparse.Namespace, verb: str, *positional: str) -> list[str]:
    cmd = ["gcloud", "compute", "tpus", "tpu-vm", verb, *positional, f"--zone={args.zone}"]
    if args.project:
        cmd.append(f"--project={args.project}")
    if args.internal_ip:
        cmd.append("--internal-ip")
    cmd.append("--worker=all")
    return cmd


def build_commands(args: argparse.Namespace, train_args: Sequence[str],
                   repo_root: str = REPO_ROOT) -> list[list[str]]:
    """The launch as a list of argv lists, run in order; no side effects."""
    tarball = args.tarball or f"/tmp/{args.name}-src.tar.gz"
    remote_tar = f"/tmp/{args.name}-src.tar.gz"
    rdir = shlex.quote(args.remote_dir)

    # 1. Pack the checkout. `--ignore-failed-read` tolerates tracked files deleted in the work tree.
    pack = [
        "bash", "-c",
        f"cd {shlex.quote(repo_root)} && git ls-files -z --cached --others --exclude-standard"
        f" | tar --null --ignore-failed-read -czf {shlex.quote(tarball)} -T -",
    ]
    # 2. Copy it to every worker.
    copy = _gcloud(args, "scp", tarball, f"{args.name}:{remote_tar}")
    # 3. Unpack (+ set up the environment).
    unpack = f"mkdir -p {rdir} && tar -xzf {shlex.quote(remote_tar)} -C {rdir}"
    setup_steps = [unpack]
    if not args.skip_setup:
        setup_steps += [
            f"cd {rdir}",
            f"(test -x .venv/bin/python || {shlex.quote(args.python)} -m venv .venv)",
            ".venv/bin/python -m pip install -q --upgrade pip",
            '.venv/bin/python -m pip install -q -e ".[tpu]"',
        ]
    setup = _gcloud(args, "ssh", args.name) + ["--command", " && ".join(setup_steps)]
    # 4. Train on every worker at once.
    forwarded = list(train_args)
    if args.workdir:
        forwarded.append(f"--workdir={args.workdir}")
    if not args.no_distributed:
        forwarded.append("--distributed")
    env = " ".join(shlex.quote(kv) for kv in args.env)
    run_cmd = shlex.join([".venv/bin/python", "-m", args.module, *forwarded])
    if env:
        run_cmd = f"env {env} {run_cmd}"
    run = _gcloud(args, "ssh", args.name) + ["--command", f"cd {rdir} && {run_cmd}"]
    if not args.preflight:
        return [pack, copy, setup, run]
    gin_args = [a for a in train_args if a.startswith(("--gin_file", "--gin.", "--gin_bindings"))]
    preflight = [sys.executable, "-m", "launch.aot", *gin_args, f"--topology={args.preflight}"]
    if args.num_slices > 1:
        preflight.append(f"--num_slices={args.num_slices}")
    return [preflight, pack, copy, setup, run]


def main(argv: Sequence[str] | None = None) -> int:
    args, train_args = parse_args(sys.argv[1:] if argv is None else argv)
    commands = build_commands(args, train_args)
    if args.dry_run:
        for cmd in commands:
            print(shlex.join(cmd))
        return 0
    for cmd in commands:
        print(f"[launch.tpu_pod] $ {shlex.join(cmd)}", flush=True)
        rc = subprocess.run(cmd).returncode  # inherits stdout/stderr: output streams live
        if rc != 0:
            print(f"[launch.tpu_pod] command failed with exit code {rc}", file=sys.stderr)
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
