"""Launchers: exact dry-run commands (TPU pod, SLURM, local) and a real 2-process local job."""

from __future__ import annotations

import os
import shlex
import shutil
import stat
import subprocess
import sys
import tarfile
import textwrap
import time

import pytest

from launch import local, slurm, tpu_pod

REPO = local.REPO_ROOT
TRAIN_ARGS = ["--gin_file=configs/hnet_1stage_tiny.gin", "--gin_file=configs/runs/default.gin",
              "--gin.train.steps=10", "--gin.note='a b'"]


def _lines(capsys) -> list[str]:
    return capsys.readouterr().out.splitlines()


# --------------------------------------------------------------------------------------- TPU pod


def test_tpu_pod_dry_run_exact_commands(capsys):
    rc = tpu_pod.main(["--name", "pod1", "--zone", "us-east5-a", "--project", "proj",
                       "--workdir", "gs://bucket/runs/x", "--dry-run", "--", *TRAIN_ARGS])
    assert rc == 0
    lines = _lines(capsys)
    assert len(lines) == 4
    pack, scp, setup, run = (shlex.split(line) for line in lines)

    assert pack[:2] == ["bash", "-c"]
    assert pack[2] == (f"cd {REPO} && git ls-files -z --cached --others --exclude-standard"
                       " | tar --null --ignore-failed-read -czf /tmp/pod1-src.tar.gz -T -")
    assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "/tmp/pod1-src.tar.gz",
                   "pod1:/tmp/pod1-src.tar.gz", "--zone=us-east5-a", "--project=proj",
                   "--worker=all"]
    ssh = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod1", "--zone=us-east5-a",
           "--project=proj", "--worker=all", "--command"]
    assert setup[:-1] == ssh
    assert setup[-1] == (
        "mkdir -p hnet_bytelm && tar -xzf /tmp/pod1-src.tar.gz -C hnet_bytelm && cd hnet_bytelm"
        " && (test -x .venv/bin/python || python3.11 -m venv .venv)"
        " && .venv/bin/python -m pip install -q --upgrade pip"
        ' && .venv/bin/python -m pip install -q -e ".[tpu]"')
    assert run[:-1] == ssh
    assert run[-1] == ("cd hnet_bytelm && " + shlex.join(
        [".venv/bin/python", "-m", "train.main", *TRAIN_ARGS, "--workdir=gs://bucket/runs/x",
         "--distributed"]))
    # The remote shell sees exactly the train args we passed (quoting survives two shells).
    assert shlex.split(run[-1])[3:] == [".venv/bin/python", "-m", "train.main", *TRAIN_ARGS,
                                        "--workdir=gs://bucket/runs/x", "--distributed"]


def test_tpu_pod_dry_run_options(capsys):
    tpu_pod.main(["--name", "v4", "--zone", "z", "--skip_setup", "--internal_ip",
                  "--env", "TPU_STDERR_LOG_LEVEL=0", "--remote_dir", "src", "--no_distributed",
                  "--dry-run"])
    _, scp, setup, run = (shlex.split(line) for line in _lines(capsys))
    assert "--project" not in " ".join(scp) and "--internal-ip" in scp and "--worker=all" in scp
    assert setup[-1] == "mkdir -p src && tar -xzf /tmp/v4-src.tar.gz -C src"
    assert run[-1] == "cd src && env TPU_STDERR_LOG_LEVEL=0 .venv/bin/python -m train.main"


def test_tpu_pod_preflight_compiles_first_and_stops_the_launch(capsys, tmp_path, monkeypatch):
    args = ["--name", "pod1", "--zone", "z", "--preflight", "v5p:4x4x4", "--num_slices", "2"]
    tpu_pod.main([*args, "--dry-run", "--", *TRAIN_ARGS, "--compilation_cache_dir="])
    lines = [shlex.split(line) for line in _lines(capsys)]
    assert len(lines) == 5 and lines[1][:2] == ["bash", "-c"]  # preflight, then pack, copy, setup, run
    assert lines[0] == [sys.executable, "-m", "launch.aot", *TRAIN_ARGS, "--topology=v5p:4x4x4", "--num_slices=2"]
    # A preflight that fails (here: an unknown topology, config error 2) stops before anything is packed.
    monkeypatch.chdir(REPO)
    tarball = tmp_path / "src.tar.gz"
    rc = tpu_pod.main(["--name", "pod1", "--zone", "z", "--preflight", "v9z:1x1", "--tarball", str(tarball),
                       "--", *TRAIN_ARGS])
    assert rc == 2 and not tarball.exists()


@pytest.mark.skipif(not os.path.exists(os.path.join(REPO, ".git")) or not shutil.which("git"),
                    reason="needs a git checkout")
def test_tpu_pod_pack_command_builds_tarball(tmp_path):
    tarball = str(tmp_path / "src.tar.gz")
    args, rest = tpu_pod.parse_args(["--name", "p", "--zone", "z", "--tarball", tarball])
    pack = tpu_pod.build_commands(args, rest)[0]
    subprocess.run(pack, check=True, capture_output=True)
    with tarfile.open(tarball) as tf:
        names = set(tf.getnames())
    assert {"launch/tpu_pod.py", "pyproject.toml", "tests/test_launchers.py"} <= names
    assert not any(n.startswith(".venv/") or "__pycache__" in n for n in names)


# ----------------------------------------------------------------------------------------- SLURM


def test_slurm_dry_run_exact_commands(capsys):
    rc = slurm.main(["--nodes", "2", "--partition", "gpu", "--time", "01:00:00",
                     "--nodelist", "gpu-a,gpu-b", "--dry-run", "--", *TRAIN_ARGS])
    assert rc == 0
    lines = _lines(capsys)
    assert shlex.split(lines[0]) == [
        "sbatch", "--job-name=hnet-bytelm", "--nodes=2", "--ntasks-per-node=1",
        "--gpus-per-node=8", "--partition=gpu", "--time=01:00:00", "--nodelist=gpu-a,gpu-b",
        f"--export=ALL,REPO_DIR={REPO},COORD_PORT=29500,TRAIN_MODULE=train.main",
        os.path.join(REPO, "launch", "slurm_gpu.sbatch"), *TRAIN_ARGS]
    assert lines[1:] == [
        "# rank 0 on gpu-a:",
        f"cd {shlex.quote(REPO)} && .venv/bin/python -m train.main {shlex.join(TRAIN_ARGS)}"
        " --coordinator_address=gpu-a:29500 --num_processes=2 --process_id=0",
        "# rank 1 on gpu-b:",
        f"cd {shlex.quote(REPO)} && .venv/bin/python -m train.main {shlex.join(TRAIN_ARGS)}"
        " --coordinator_address=gpu-a:29500 --num_processes=2 --process_id=1",
    ]


def test_slurm_dry_run_placeholder_hosts(capsys):
    slurm.main(["--nodes", "3", "--gpus_per_node", "4", "--dry-run"])
    lines = _lines(capsys)
    assert "--gpus-per-node=4" in shlex.split(lines[0])
    ranks = [line for line in lines[1:] if not line.startswith("#")]
    assert len(ranks) == 3
    assert all("--coordinator_address=NODE0:29500 --num_processes=3" in r for r in ranks)
    assert ranks[2].endswith("--process_id=2")


def _write_exe(path, body: str) -> None:
    path.write_text("#!/bin/bash\n" + textwrap.dedent(body))
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_slurm_sbatch_script_under_fake_slurm(tmp_path):
    """Runs the real sbatch + entry scripts with stub scontrol/srun/python; compares with the
    per-rank commands that `launch.slurm --dry-run` renders."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "log.txt"
    _write_exe(bin_dir / "scontrol", """\
        [ "$1 $2" = "show hostnames" ] || exit 9
        echo gpu-a; echo gpu-b
        """)
    # srun: record its own options, then run the task command once per rank.
    _write_exe(bin_dir / "srun", f"""\
        echo "srun $1 $2" >> {log}
        shift 2
        for r in $(seq 0 $((SLURM_NTASKS - 1))); do SLURM_PROCID=$r "$@" || exit $?; done
        """)
    fake_python = bin_dir / "fakepython"
    _write_exe(fake_python, f"""\
        printf 'cd %s && %s\\n' "$PWD" "$(printf '%q ' .venv/bin/python "$@")" >> {log}
        """)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_NTASKS": "2",
           "SLURM_JOB_NODELIST": "gpu-[a-b]", "SLURM_JOB_ID": "7", "REPO_DIR": REPO,
           "PYTHON": str(fake_python), "COORD_PORT": "29500"}
    proc = subprocess.run(["bash", os.path.join(REPO, "launch", "slurm_gpu.sbatch"), *TRAIN_ARGS],
                          env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "coordinator=gpu-a:29500" in proc.stdout
    got = log.read_text().splitlines()
    assert got[0] == "srun --ntasks-per-node=1 --kill-on-bad-exit=1"
    args, rest = slurm.parse_args(["--nodes", "2", "--nodelist", "gpu-a,gpu-b", "--", *TRAIN_ARGS])
    want = [cmd for _, cmd in slurm.rank_commands(args, rest)]
    assert [shlex.split(line) for line in got[1:]] == [shlex.split(w) for w in want]


# ----------------------------------------------------------------------------------------- local


def test_local_dry_run_exact_commands(capsys, monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    rc = local.main(["--num_processes", "2", "--devices_per_process", "4", "--port", "4321",
                     "--dry-run", "--", *TRAIN_ARGS])
    assert rc == 0
    py = shlex.quote(sys.executable)
    assert _lines(capsys) == [
        f"XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu {py} -m train.main "
        f"{shlex.join(TRAIN_ARGS)} --coordinator_address=localhost:4321 --num_processes=2 "
        f"--process_id={i}"
        for i in range(2)
    ]


def test_local_keeps_other_xla_flags():
    specs = local.build_process_specs(
        [], 2, 2, port=1, module="m",
        base_env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_foo=1"})
    assert specs[1].env == {"XLA_FLAGS": "--xla_force_host_platform_device_count=2 --xla_foo=1",
                            "JAX_PLATFORMS": "cpu"}
    assert specs[1].argv[-3:] == ["--coordinator_address=localhost:1", "--num_processes=2",
                                  "--process_id=1"]


def test_local_two_processes_global_sum():
    """2 processes x 2 CPU devices joined by jax.distributed; both see the same global sum."""
    results = local.run_local(["--rows_per_device=3"], num_processes=2, devices_per_process=2,
                              module="tests.distributed_child", timeout=120)
    for r in results:
        assert r.returncode == 0, r.output
    expected = float(sum(range(4 * 3)))
    for i, r in enumerate(results):
        assert (f"GLOBAL_SUM={expected} process={i} process_count=2 device_count=4"
                in r.output), r.output


def test_local_failure_kills_the_rest():
    t0 = time.monotonic()
    results = local.run_local(["--fail_on_process=1"], num_processes=2, devices_per_process=1,
                              module="tests.distributed_child", timeout=60, stream=None)
    assert time.monotonic() - t0 < 30  # process 0 would otherwise sleep 120 s
    assert results[1].returncode == 3
    assert results[0].returncode != 0 and not results[0].timed_out


def test_local_cli_prefixes_output_and_returns_nonzero():
    proc = subprocess.run(
        [sys.executable, "-m", "launch.local", "--num_processes", "2", "--devices_per_process",
         "1", "--module", "tests.distributed_child", "--timeout", "60", "--",
         "--fail_on_process=0"],
        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "[p0] process 0: failing on purpose" in proc.stdout
    assert "process 0: exit code 3" in proc.stderr


def test_local_timeout_marks_timed_out():
    results = local.run_local(["--fail_on_process=5"], num_processes=2, devices_per_process=1,
                              module="tests.distributed_child", timeout=1.0, stream=None)
    assert all(r.timed_out and r.returncode != 0 for r in results)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
