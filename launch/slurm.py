"""Submit ``launch/slurm_gpu.sbatch`` (multi-node GPU training) or show what it would run.

``--dry-run`` prints the exact ``sbatch`` command, then, for each rank, the command that
``srun`` + ``launch/slurm_entry.sh`` will run on that node (lines starting with ``#`` are comments).
Hosts come from ``--nodelist`` (comma-separated) when given, else placeholders
``NODE0``, ``NODE1``...;
the coordinator is the first host, as in the sbatch script.

Example::

    python -m launch.slurm --nodes 4 --partition gpu --time 12:00:00 --dry-run -- \\
        --gin_file=configs/hnet_1stage_XL.gin --gin_file=configs/runs/pretrain_8k.gin --workdir=/shared/runs/x
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
SBATCH_SCRIPT = os.path.join(REPO_ROOT, "launch", "slurm_gpu.sbatch")
DEFAULT_PORT = 29500
DEFAULT_PYTHON = ".venv/bin/python"  # relative to REPO_DIR, as in slurm_entry.sh


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    own, train_args = split_argv(argv)
    ap = argparse.ArgumentParser(
        prog="python -m launch.slurm",
        description="Submit multi-node GPU training with sbatch (arguments after -- go to "
                    "train.main).")
    ap.add_argument("--nodes", type=int, required=True)
    ap.add_argument("--gpus_per_node", "--gpus-per-node", type=int, default=8)
    ap.add_argument("--job_name", "--job-name", default="hnet-bytelm")
    ap.add_argument("--partition", default=None)
    ap.add_argument("--account", default=None)
    ap.add_argument("--time", default=None, help="wall-clock limit, e.g. 24:00:00")
    ap.add_argument("--nodelist", default=None, help="comma-separated hosts (also sent to sbatch)")
    ap.add_argument("--output", default=None, help="sbatch --output pattern")
    ap.add_argument("--port", type=int, default=DEFAULT_PORT, help="coordinator port")
    ap.add_argument("--python", default=None,
                    help=f"interpreter on the nodes (default: REPO_DIR/{DEFAULT_PYTHON})")
    ap.add_argument("--module", default="train.main")
    ap.add_argument("--repo_dir", "--repo-dir", default=REPO_ROOT,
                    help="checkout on the shared filesystem the nodes run from")
    ap.add_argument("--sbatch_arg", "--sbatch-arg", action="append", default=[],
                    help="extra raw sbatch option, e.g. --sbatch_arg=--qos=high (repeatable)")
    ap.add_argument("--dry-run", "--dry_run", action="store_true",
                    help="print the sbatch command and the per-rank commands, submit nothing")
    args = ap.parse_args(own)
    if args.nodes < 1:
        ap.error("--nodes must be >= 1")
    for name in ("repo_dir", "python", "module"):
        value = getattr(args, name)
        if value and "," in value:  # would break sbatch --export=A=x,B=y
            ap.error(f"--{name} must not contain a comma")
    return args, train_args


def sbatch_command(args: argparse.Namespace, train_args: Sequence[str]) -> list[str]:
    cmd = [
        "sbatch",
        f"--job-name={args.job_name}",
        f"--nodes={args.nodes}",
        "--ntasks-per-node=1",
        f"--gpus-per-node={args.gpus_per_node}",
    ]
    for flag in ("partition", "account", "time", "nodelist", "output"):
        value = getattr(args, flag)
        if value:
            cmd.append(f"--{flag}={value}")
    cmd += list(args.sbatch_arg)
    export = ["ALL", f"REPO_DIR={args.repo_dir}", f"COORD_PORT={args.port}",
              f"TRAIN_MODULE={args.module}"]
    if args.python:
        export.append(f"PYTHON={args.python}")
    cmd.append(f"--export={','.join(export)}")
    cmd.append(os.path.join(args.repo_dir, "launch", "slurm_gpu.sbatch"))
    return cmd + list(train_args)


def hostnames(args: argparse.Namespace) -> list[str]:
    if args.nodelist:
        hosts = [h for h in args.nodelist.split(",") if h]
        if len(hosts) != args.nodes:
            raise SystemExit(f"--nodelist has {len(hosts)} hosts but --nodes={args.nodes} "
                             "(use a plain comma-separated list)")
        return hosts
    return [f"NODE{i}" for i in range(args.nodes)]  # placeholders until allocation


def rank_commands(args: argparse.Namespace, train_args: Sequence[str]) -> list[tuple[str, str]]:
    """(host, shell command) per rank, as launch/slurm_entry.sh renders them."""
    hosts = hostnames(args)
    coord = f"{hosts[0]}:{args.port}"
    out = []
    for rank, host in enumerate(hosts):
        argv = [args.python or DEFAULT_PYTHON, "-m", args.module, *train_args,
                f"--coordinator_address={coord}", f"--num_processes={args.nodes}",
                f"--process_id={rank}"]
        out.append((host, f"cd {shlex.quote(args.repo_dir)} && {shlex.join(argv)}"))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args, train_args = parse_args(sys.argv[1:] if argv is None else argv)
    cmd = sbatch_command(args, train_args)
    if args.dry_run:
        print(shlex.join(cmd))
        for rank, (host, line) in enumerate(rank_commands(args, train_args)):
            print(f"# rank {rank} on {host}:")
            print(line)
        return 0
    print(f"[launch.slurm] $ {shlex.join(cmd)}", flush=True)
    return subprocess.run(cmd, cwd=args.repo_dir).returncode


if __name__ == "__main__":
    sys.exit(main())
