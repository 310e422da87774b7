"""Evaluation entry point: one checkpoint or every checkpoint of a workdir -> JSON, Markdown, PNG plots and
TensorBoard scalars.

    python -m train.evaluate --workdir=runs/x [--step=N | --all] [--corpus=NAME=SOURCE@LO-HI ...]
        [--robustness_bytes=32768] [--ntrex_dir=shared:ntrex128/valid] [--gin_file=f.gin] [--gin.KEY=v]

Per corpus (default: the run's own eval split, named ``eval``; computed by ``train.eval``):
  bpb                  Σ NLL over real UTF-8 target bytes / (ln 2 · #bytes) (same number as training's eval)
  n_masked_by_model    real bytes the model did not score (0: evaluation runs at capacities that cannot
                       overflow, ``models.base.capacity_slots``; MrT5EncDec scores only its span bytes)
  bpb_by_script        the same sum split by the ``hnet.scripts`` group of the *target* byte (causal routes:
                       spaces and punctuation count with the script run they sit in)
  bytes_per_chunk      per boundary stage of the model (``out.boundaries``: s0, s1, ... / kept): real input
                       bytes (BOS/EOS excluded) / chunk starts among them
  chunk_rate_by_script chunk starts per input byte, per script group
  word_alignment       precision / recall / F1 of each stage's starts against the HAT splitter's word starts,
                       exact and (``skip_ws``) with starts on whitespace moved to the next non-space byte
                       (meaningful on English and other space-separated text)
  boundary_example     the first ``train.eval.EXAMPLE_BYTES`` bytes of the corpus with '|' before each chunk
                       start, per stage
On the first corpus, robustness: BPB of its first ``robustness_bytes`` bytes, clean and under each of
``train.metrics.PERTURBATIONS`` (``bpb_increase`` = perturbed − clean). With ``--ntrex_dir``: per-language
BPB and segmentation parity (``train.multilingual_eval``).

Outputs go to ``WORKDIR/eval/`` (or ``--out_dir``): ``eval.json``, ``eval.md`` and ``*.png``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile

import numpy as np
from absl import flags

from train import data as data_lib
from train import metrics as M
from train import storage
from train.eval import evaluate_checkpoint

FLAGS = flags.FLAGS


def define_flags():
    """The CLI's flags, defined when it starts (entry points share flag names: importing defines none)."""
    flags.DEFINE_string("workdir", None, "training workdir (operative_config.gin + checkpoints/)")
    flags.DEFINE_integer("step", None, "checkpoint step (default: latest)")
    flags.DEFINE_bool("all", False, "evaluate every checkpoint in the workdir")
    flags.DEFINE_multi_string("corpus", [], "NAME=SOURCE@LO-HI (e.g. world192=shared:english/world192.txt@0.9-1.0); "
                              "default: the run's eval split")
    flags.DEFINE_integer("robustness_bytes", 32768, "bytes of the first corpus used for the perturbations (0 = skip)")
    flags.DEFINE_string("ntrex_dir", None,
                        "parallel text dir (one <lang>.txt per language) for per-language BPB/parity")
    flags.DEFINE_integer("ntrex_lines", 0, "first lines of every language file (0 = all)")
    flags.DEFINE_integer("seed", 0, "perturbation seed")
    flags.DEFINE_multi_string("gin_file", [], "extra gin files applied after the operative config")
    flags.DEFINE_string("out_dir", None, "output directory (default WORKDIR/eval)")


def parse_corpus(spec: str) -> tuple[str, str, tuple[float, float]]:
    """'NAME=SOURCE@LO-HI' (or 'NAME=SOURCE' for the whole source) -> (name, source, (lo, hi))."""
    name, _, rest = spec.partition("=")
    if not rest:
        raise ValueError(f"--corpus {spec!r}: expected NAME=SOURCE[@LO-HI]")
    source, _, rng = rest.partition("@")
    lo, hi = (float(x) for x in rng.split("-")) if rng else (0.0, 1.0)
    return name, source, (lo, hi)


def flat_scalars(res: dict) -> dict[str, float]:
    """Nested results -> {'corpus/eval/bpb': x, ...} (TensorBoard tags and the sweep table)."""
    out = {}

    def walk(prefix, v):
        if isinstance(v, dict):
            for k, x in v.items():
                walk(f"{prefix}/{k}" if prefix else str(k), x)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[prefix] = float(v)

    walk("", res)
    return out


def markdown(results: dict) -> str:
    """One table row per (checkpoint, corpus); robustness and alignment columns when present."""
    lines = ["| step | corpus | BPB | masked bytes | bytes/chunk | word P / R (s0) | BPB by script | "
             "robustness Δ BPB (mean) |",
             "|---:|---|---:|---:|---|---|---|---:|"]
    for step, res in results["checkpoints"].items():
        rob = res.get("robustness", {})
        for name, c in res["corpora"].items():
            bpc = ", ".join(f"{k} {v:.2f}" for k, v in c["bytes_per_chunk"].items()) or "-"
            wa = c["word_alignment"].get("s0")
            align = f"{wa['precision']:.2f} / {wa['recall']:.2f}" if wa else "-"
            scripts = ", ".join(f"{k} {v:.3f}" for k, v in c["bpb_by_script"].items())
            r = f"{rob['mean_bpb_increase']:+.3f}" if rob and rob["corpus"] == name else ""
            lines.append(f"| {step} | {name} | {c['bpb']:.4f} | {c.get('n_masked_by_model', float('nan')):.0f} | {bpc} "
                         f"| {align} | {scripts} | {r} |")
    if any("robustness" in r for r in results["checkpoints"].values()):
        lines += ["", "| step | clean BPB | " + " | ".join(M.PERTURBATIONS) + " |",
                  "|---:|---:|" + "---:|" * len(M.PERTURBATIONS)]
        for step, res in results["checkpoints"].items():
            if "robustness" in res:
                rob = res["robustness"]
                lines.append(f"| {step} | {rob['clean_bpb']:.4f} | "
                             + " | ".join(f"{rob['perturbed'][k]['bpb']:.4f}" for k in M.PERTURBATIONS) + " |")
    last = results["checkpoints"][max(results["checkpoints"], key=int)]
    for name, c in last["corpora"].items():
        if c["boundary_example"]:
            lines += ["", f"Chunk starts ('|') on the first bytes of {name}:", "```"]
            lines += [f"[{stage}] {text}" for stage, text in c["boundary_example"].items()] + ["```"]
    return "\n".join(lines) + "\n"


def plot(results: dict, out_dir: str) -> list[str]:
    """PNG plots: BPB by script and robustness of the last checkpoint; BPB vs step when several."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    steps = sorted(results["checkpoints"], key=int)
    last = results["checkpoints"][steps[-1]]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, (name, c) in enumerate(last["corpora"].items()):
        keys = list(c["bpb_by_script"])
        ax.bar(np.arange(len(keys)) + 0.8 * i / len(last["corpora"]), [c["bpb_by_script"][k] for k in keys],
               width=0.8 / len(last["corpora"]), label=name)
        ax.set_xticks(np.arange(len(keys)), keys)
    ax.set_ylabel("bits per byte")
    ax.set_title(f"BPB by script (step {steps[-1]})")
    ax.legend()
    paths.append(os.path.join(out_dir, "bpb_by_script.png"))
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    if "robustness" in last:
        rob = last["robustness"]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.bar(["clean", *M.PERTURBATIONS], [rob["clean_bpb"], *(rob["perturbed"][k]["bpb"] for k in M.PERTURBATIONS)])
        ax.set_ylabel("bits per byte")
        ax.set_title(f"robustness on {rob['corpus']} (step {steps[-1]})")
        paths.append(os.path.join(out_dir, "robustness.png"))
        fig.tight_layout()
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    if len(steps) > 1:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for name in last["corpora"]:
            ax.plot([int(s) for s in steps], [results["checkpoints"][s]["corpora"][name]["bpb"] for s in steps],
                    marker="o", label=name)
        ax.set_xlabel("step")
        ax.set_ylabel("bits per byte")
        ax.legend()
        paths.append(os.path.join(out_dir, "bpb_vs_step.png"))
        fig.tight_layout()
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths


def main(argv):
    del argv
    from train.config import GIN_CLI_BINDINGS
    from train.logger import MetricWriter
    from train.restore import checkpointer, load_config, query, restore_setup

    load_config(FLAGS.workdir, FLAGS.gin_file, GIN_CLI_BINDINGS)
    eval_cfg = query("train.train.eval_data")
    specs = [parse_corpus(c) for c in FLAGS.corpus] or [("eval", None, None)]
    corpora = {}
    for name, source, rng in specs:
        cfg = eval_cfg if source is None else dataclasses.replace(eval_cfg, sources=(source,), byte_range=rng)
        docs, stats = data_lib.load_documents(cfg)
        print(data_lib.describe(stats, name), flush=True)
        corpora[name] = (cfg, docs)
    ckpt = checkpointer(FLAGS.workdir)
    steps = ckpt.all_steps() if FLAGS.all else [FLAGS.step]
    results = {"workdir": storage.absolute(FLAGS.workdir),
               "corpora": {n: {"sources": list(c.sources), "byte_range": list(c.byte_range)}
                           for n, (c, _) in corpora.items()}, "checkpoints": {}}
    out_dir = FLAGS.out_dir or storage.join(FLAGS.workdir, "eval")
    storage.make_dirs(out_dir)
    writer = MetricWriter(storage.join(FLAGS.workdir, "tb"))
    for step in steps:
        setup, step = restore_setup(FLAGS.workdir, step, ckpt)
        res = evaluate_checkpoint(setup, corpora, robustness_bytes=FLAGS.robustness_bytes, seed=FLAGS.seed,
                                  ntrex_dir=FLAGS.ntrex_dir, ntrex_lines=FLAGS.ntrex_lines)
        results["checkpoints"][str(step)] = res
        writer.scalars(step, flat_scalars(res), "eval_suite/")
        for name, c in res["corpora"].items():
            print(f"step {step} {name}: bpb {c['bpb']:.4f} over {int(c['n_bytes']):,} bytes; bytes/chunk "
                  f"{c['bytes_per_chunk']}", flush=True)
    writer.close()
    storage.write_text(storage.join(out_dir, "eval.json"), json.dumps(results, indent=1))
    storage.write_text(storage.join(out_dir, "eval.md"), markdown(results))
    with tempfile.TemporaryDirectory() as tmp:  # matplotlib writes local files
        storage.upload(plot(results, tmp), out_dir)
    print(markdown(results))
    print(f"wrote {out_dir}/eval.json, eval.md and plots")


if __name__ == "__main__":
    from train import malloc

    malloc.reexec()  # before anything imports jax (train/malloc.py)
    from train.config import run_app

    run_app(main, sys.argv, define_flags)
