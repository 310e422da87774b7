"""Sweep runner: a gin file lists runs (model configs × variants × seeds); run them here one after another,
or print the launcher commands for a pod / cluster; then evaluate and collect one table and plots.

    python -m train.sweep --sweep=configs/sweeps/compare_tinyshakespeare.gin [--root=runs/sweeps]
        [--launcher="python -m launch.slurm --nodes 1 --partition gpu"] [--collect_only] [--dry_run]
        [--only=<run name prefix> ...] [--gin.sweep.Sweep.seeds=[0,1] ...]

A sweep file binds ``sweep.Sweep`` (see its fields; ``--gin.KEY=value`` overrides them). ``models`` entries may
be globs (``configs/*_tiny.gin``: every matching file, sorted), so a sweep discovers model families. Run
``<model stem>[-<variant>]-s<seed>`` lives in ``ROOT/<sweep name>/<run>/`` and is trained with
``python -m train.main --gin_file=<model> --gin_file=<run files...> --gin.train.train.seed=<seed>
--gin.<model's bindings> --gin.<variant bindings> --workdir=<dir>``, then evaluated with
``python -m train.evaluate --workdir=<dir> <eval_args>``. Re-running skips every finished
step: training when ``results.json`` reports ``final_step >= steps``, evaluation when ``eval/eval.json``
exists. ``--launcher`` prints ``<launcher> -- <train.main args>`` for unfinished runs instead of running
them (the evaluations run here once their checkpoints exist; re-run the sweep after the jobs finish).

Outputs in ``ROOT/<sweep name>/``: ``sweep.json`` (one row per run), ``sweep.md`` (the table) and the plots
``bpb_vs_flops.png``, ``bpb_vs_bytes_per_chunk.png``, ``chunk_rate_by_script.png``.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shlex
import subprocess
import sys
import tempfile

import gin
import numpy as np
from absl import app, flags

from train import storage

FLAGS = flags.FLAGS


def define_flags():
    """The CLI's flags, defined when it starts (entry points share flag names: importing defines none)."""
    flags.DEFINE_string("sweep", None, "sweep .gin file binding sweep.Sweep")
    flags.DEFINE_string("root", "runs/sweeps", "sweep workdirs go to ROOT/<sweep name>/")
    flags.DEFINE_string("launcher", None, "print '<launcher> -- <train args>' instead of training here")
    flags.DEFINE_bool("collect_only", False, "only rebuild the table and plots")
    flags.DEFINE_bool("dry_run", False, "print the commands of unfinished steps, run nothing")
    flags.DEFINE_multi_string("only", None, "run only the runs whose name starts with one of these (repeatable, e.g. a "
                              "model stem); the table still collects every finished run")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@gin.configurable(module="sweep")
@dataclasses.dataclass
class Sweep:
    name: str = gin.REQUIRED
    models: tuple[str, ...] = gin.REQUIRED  # model .gin files or globs of them (repo-relative or absolute)
    run_files: tuple[str, ...] = ()  # run .gin files composed after each model file
    variants: dict = dataclasses.field(default_factory=lambda: {"": ()})  # tag -> gin bindings 'KEY=value'
    model_bindings: dict = dataclasses.field(default_factory=dict)  # model file -> its own bindings (e.g. widths
    # that match FLOPs per byte); applied before the variant's bindings
    seeds: tuple[int, ...] = (0,)
    eval_args: tuple[str, ...] = ()  # extra train.evaluate flags (--corpus, --robustness_bytes, --ntrex_dir ...)


@dataclasses.dataclass
class Run:
    name: str
    model: str
    variant: str
    seed: int
    workdir: str
    train_args: list[str]
    eval_args: list[str]


def load_sweep(path: str, bindings: list[str] = ()) -> Sweep:
    """The ``sweep.Sweep`` bound by the gin file ``path`` and then ``bindings`` ('KEY=value')."""
    gin.parse_config_files_and_bindings([path], list(bindings), finalize_config=False)
    return Sweep()


def model_files(models: tuple[str, ...]) -> list[str]:
    """``Sweep.models`` with each glob replaced by the files it matches (sorted; a repo-relative pattern gives
    repo-relative paths), duplicates dropped."""
    files = []
    for m in models:
        if not any(c in m for c in "*?["):
            files.append(m)
            continue
        base = "" if os.path.isabs(m) else REPO_ROOT
        found = sorted(os.path.relpath(p, base) if base else p for p in glob.glob(os.path.join(base, m)))
        if not found:
            raise ValueError(f"sweep.Sweep.models: {m!r} matches no file")
        files += found
    return list(dict.fromkeys(files))


def expand(sweep: Sweep, root: str) -> list[Run]:
    models = model_files(sweep.models)
    unknown = set(sweep.model_bindings) - set(models)
    if unknown:
        raise ValueError(f"sweep.Sweep.model_bindings names models not in sweep.Sweep.models: {sorted(unknown)}")
    runs = []
    for model in models:
        stem = os.path.splitext(os.path.basename(model))[0]
        for tag, bindings in sweep.variants.items():
            for seed in sweep.seeds:
                name = f"{stem}{'-' + tag if tag else ''}-s{seed}"
                wd = storage.join(storage.absolute(root), sweep.name, name)
                train_args = ([f"--gin_file={model}"] + [f"--gin_file={f}" for f in sweep.run_files]
                              + [f"--gin.train.train.seed={seed}"]
                              + [f"--gin.{b}" for b in (*sweep.model_bindings.get(model, ()), *bindings)]
                              + [f"--workdir={wd}"])
                runs.append(Run(name, stem, tag, seed, wd, train_args, [f"--workdir={wd}", *sweep.eval_args]))
    return runs


def trained(run: Run) -> bool:
    res = storage.read_json(storage.join(run.workdir, "results.json"))
    return bool(res) and res.get("final_step", -1) >= res.get("steps", float("inf"))


def evaluated(run: Run) -> bool:
    return storage.exists(storage.join(run.workdir, "eval", "eval.json"))


def _module(name: str, args: list[str], log_path: str) -> int:
    """Run ``python -m name args``, its output appended to ``log_path`` (local, or uploaded to gs://)."""
    cmd = [sys.executable, "-m", name, *args]
    print("$", shlex.join(cmd), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        local = log_path
        if storage.is_remote(log_path):
            local = storage.local_copy(log_path, tmp) if storage.exists(log_path) else os.path.join(
                tmp, os.path.basename(log_path))
        else:
            os.makedirs(os.path.dirname(log_path), exist_ok=True)
        with open(local, "a") as log:
            rc = subprocess.run(cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
        if local != log_path:
            storage.upload([local], log_path.rsplit("/", 1)[0])
    return rc


def execute(runs: list[Run], launcher: str | None = None, dry_run: bool = False) -> dict[str, str]:
    """Train (or print launcher commands) and evaluate every unfinished run -> {run: status}."""
    status = {}
    for run in runs:
        if not trained(run):
            if launcher or dry_run:
                print(f"{launcher or 'python -m train.main'} {'-- ' if launcher else ''}{shlex.join(run.train_args)}")
                status[run.name] = "launch"
                continue
            rc = _module("train.main", run.train_args, storage.join(run.workdir, "train.log"))
            if rc != 0 or not trained(run):
                status[run.name] = f"train failed (rc {rc}; see {run.workdir}/train.log)"
                continue
        if evaluated(run):
            status[run.name] = status.get(run.name, "skipped (finished)")
            continue
        if dry_run:
            print(f"python -m train.evaluate {shlex.join(run.eval_args)}")
            status[run.name] = "evaluate"
            continue
        rc = _module("train.evaluate", run.eval_args, storage.join(run.workdir, "eval.log"))
        status[run.name] = "done" if rc == 0 and evaluated(run) else f"eval failed (rc {rc})"
    return status


def row(run: Run) -> dict | None:
    """One table row from a run's results.json and eval/eval.json (None until both exist)."""
    res = storage.read_json(storage.join(run.workdir, "results.json"))
    ev = storage.read_json(storage.join(run.workdir, "eval", "eval.json"))
    if not res or not ev:
        return None
    last = ev["checkpoints"][max(ev["checkpoints"], key=int)]
    corpus, c = next(iter(last["corpora"].items()))
    speeds = [h["bytes_per_s"] for h in res.get("history", []) if "bytes_per_s" in h]
    r = {"run": run.name, "model": run.model, "variant": run.variant, "seed": run.seed, "params": res["params"],
         "steps": res["final_step"], "train_bytes_per_s": float(np.median(speeds)) if speeds else float("nan"),
         "compile_s": res.get("compile_s"), "flops_per_byte": res.get("flops_per_byte", float("nan")),
         "corpus": corpus, "bpb": c["bpb"], "n_masked_by_model": c.get("n_masked_by_model", float("nan")),
         "bytes_per_chunk": c["bytes_per_chunk"],
         "chunk_rate_by_script": c["chunk_rate_by_script"], "bpb_by_script": c["bpb_by_script"],
         "word_f1": {k: v["f1"] for k, v in c["word_alignment"].items()},
         "word_f1_skip_ws": {k: v["skip_ws"]["f1"] for k, v in c["word_alignment"].items() if "skip_ws" in v},
         "boundary_example": c.get("boundary_example", {})}
    if "robustness" in last:
        r["robustness"] = {k: v["bpb_increase"] for k, v in last["robustness"]["perturbed"].items()}
        r["robustness_mean"] = last["robustness"]["mean_bpb_increase"]
    if "multilingual" in last:
        r["parity_max_over_min"] = last["multilingual"].get("parity_max_over_min")
    return r


def markdown(rows: list[dict]) -> str:
    lines = ["| run | params | FLOPs/byte | train bytes/s | BPB | masked bytes | bytes/chunk | "
             "word F1 (exact / skip-ws) | robustness Δ BPB |",
             "|---|---:|---:|---:|---:|---:|---|---|---:|"]
    for r in rows:
        bpc = ", ".join(f"{k} {v:.2f}" for k, v in r["bytes_per_chunk"].items()) or "1 (bytes)"
        ws = r.get("word_f1_skip_ws", {})
        f1 = ", ".join(f"{k} {v:.2f}" + (f" / {ws[k]:.2f}" if k in ws else "") for k, v in r["word_f1"].items()) or "-"
        rob = f"{r['robustness_mean']:+.3f}" if "robustness_mean" in r else "-"
        lines.append(f"| {r['run']} | {r['params'] / 1e6:.2f}M | {r['flops_per_byte'] / 1e6:.2f}M | "
                     f"{r['train_bytes_per_s']:,.0f} | {r['bpb']:.4f} | {r['n_masked_by_model']:.0f} | {bpc} | {f1} | "
                     f"{rob} |")
    robust = [r for r in rows if "robustness" in r]
    if robust:
        kinds = list(robust[0]["robustness"])
        lines += ["", "BPB increase under each perturbation:", "", "| run | " + " | ".join(kinds) + " |",
                  "|---|" + "---:|" * len(kinds)]
        lines += [f"| {r['run']} | " + " | ".join(f"{r['robustness'][k]:+.3f}" for k in kinds) + " |" for r in robust]
    for r in rows:
        if r.get("boundary_example"):
            lines += ["", f"{r['run']}: chunk starts ('|') on the first bytes of {r['corpus']}", "```"]
            lines += [f"[{k}] {v}" for k, v in r["boundary_example"].items()] + ["```"]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], out_dir: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def first_stage(r):
        return next(iter(r["bytes_per_chunk"].values()), 1.0)

    for fname, x, xlabel in (("bpb_vs_flops.png", lambda r: r["flops_per_byte"] / 1e6, "MFLOPs per byte (train step)"),
                             ("bpb_vs_bytes_per_chunk.png", first_stage, "bytes per chunk (first stage)")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in rows:
            ax.scatter(x(r), r["bpb"])
            ax.annotate(r["run"], (x(r), r["bpb"]), fontsize=7)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"validation BPB ({rows[0]['corpus']})")
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, fname), dpi=100)
        plt.close(fig)
    staged = [r for r in rows if r["chunk_rate_by_script"]]
    if staged:
        scripts = sorted({s for r in staged for rates in r["chunk_rate_by_script"].values() for s in rates})
        fig, ax = plt.subplots(figsize=(7, 4))
        w = 0.8 / len(staged)
        for i, r in enumerate(staged):
            rates = next(iter(r["chunk_rate_by_script"].values()))
            ax.bar(np.arange(len(scripts)) + i * w, [rates.get(s, 0.0) for s in scripts], width=w, label=r["run"])
        ax.set_xticks(np.arange(len(scripts)) + 0.4 - w / 2, scripts)
        ax.set_ylabel("chunk starts per byte (first stage)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "chunk_rate_by_script.png"), dpi=100)
        plt.close(fig)


def collect(runs: list[Run], out_dir: str) -> list[dict]:
    rows = [r for r in map(row, runs) if r is not None]
    storage.make_dirs(out_dir)
    storage.write_text(storage.join(out_dir, "sweep.json"), json.dumps(rows, indent=1))
    storage.write_text(storage.join(out_dir, "sweep.md"), markdown(rows))
    if rows:
        with tempfile.TemporaryDirectory() as tmp:  # matplotlib writes local files
            plot(rows, tmp)
            storage.upload(sorted(os.path.join(tmp, f) for f in os.listdir(tmp)), out_dir)
    return rows


def run_sweep(path: str, root: str = "runs/sweeps", *, launcher: str | None = None, collect_only: bool = False,
              dry_run: bool = False, only: list[str] = (), bindings: list[str] = ()) -> list[dict]:
    """What the CLI does (its flags are the arguments): load, expand, execute the runs whose name starts with one
    of ``only`` (all when empty; SystemExit when none does), then collect the table of every finished run."""
    sweep = load_sweep(path, bindings)
    runs = expand(sweep, root)
    if not collect_only:
        chosen = [r for r in runs if not only or r.name.startswith(tuple(only))]
        if not chosen:
            raise SystemExit(f"--only {list(only)} matches no run of {[r.name for r in runs]}")
        for name, st in execute(chosen, launcher, dry_run).items():
            print(f"{name}: {st}", flush=True)
    rows = collect(runs, storage.join(storage.absolute(root), sweep.name))
    print(markdown(rows))
    return rows


def main(argv):
    from train.config import GIN_CLI_BINDINGS

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]} (repeat --only for several prefixes)")
    if not FLAGS.sweep:
        raise app.UsageError("--sweep is required")
    run_sweep(FLAGS.sweep, FLAGS.root, launcher=FLAGS.launcher, collect_only=FLAGS.collect_only,
              dry_run=FLAGS.dry_run, only=FLAGS.only or (), bindings=GIN_CLI_BINDINGS)


if __name__ == "__main__":
    from train import malloc

    malloc.reexec()  # before anything imports jax (train/malloc.py)
    from train.config import run_app

    run_app(main, sys.argv, define_flags)
