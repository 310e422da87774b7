"""Standalone evaluation of one checkpoint or every checkpoint of a workdir -> JSON.

    python -m train.evaluate --workdir=runs/x [--step=N | --all] [--gin_file=override.gin] [--gin.KEY=v]

Uses the run's operative config (model + eval data); ``--gin_file``/``--gin.`` override it (e.g. point
``eval/train.DataConfig.sources`` at another corpus). Writes ``WORKDIR/eval.json`` (or ``--out``).
"""

from __future__ import annotations

import json
import os
import sys

from absl import flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "training workdir (operative_config.gin + checkpoints/)")
flags.DEFINE_integer("step", None, "checkpoint step (default: latest)")
flags.DEFINE_bool("all", False, "evaluate every checkpoint in the workdir")
flags.DEFINE_multi_string("gin_file", [], "extra gin files applied after the operative config")
flags.DEFINE_string("out", None, "output JSON (default WORKDIR/eval.json)")

def main(argv):
    del argv
    from train import data as data_lib
    from train.loop import evaluate
    from train.config import GIN_CLI_BINDINGS
    from train.restore import checkpointer, load_config, query, restore_setup

    load_config(FLAGS.workdir, FLAGS.gin_file, GIN_CLI_BINDINGS)
    eval_cfg = query("train.train.eval_data")
    docs, stats = data_lib.load_documents(eval_cfg)
    ckpt = checkpointer(FLAGS.workdir)
    steps = ckpt.all_steps() if FLAGS.all else [FLAGS.step]
    results = {"data": data_lib.describe(stats, "eval data"), "sources": list(eval_cfg.sources),
               "byte_range": list(eval_cfg.byte_range), "checkpoints": {}}
    for step in steps:
        setup, step = restore_setup(FLAGS.workdir, step, ckpt)
        results["checkpoints"][str(step)] = ev = evaluate(setup, eval_cfg, docs)
        print(f"step {step}: bpb {ev['bpb']:.4f} over {int(ev['n_bytes']):,} bytes", flush=True)
    out = FLAGS.out or os.path.join(FLAGS.workdir, "eval.json")
    with open(out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {out}")


def run():
    from train.config import run_app

    run_app(main, sys.argv)


if __name__ == "__main__":
    run()
