"""Per-language / per-script evaluation on parallel text (NTREX-128 valid): BPB, bytes per chunk and
chunks per English-equivalent byte (MAGNET-style segmentation parity), as defined by
``train.eval.evaluate_languages``.

    python -m train.multilingual_eval --workdir=DIR [--gin_file=configs/runs/ntrex_multilingual.gin ...]
        [--gin.KEY=value ...] [--data_dir=shared:ntrex128/valid] [--max_lines=N] [--groups=ntrex] [--out=FILE]

restores the latest checkpoint of DIR with its operative config (``--gin_file`` / ``--gin.`` applied after
it: the eval split's seq_len and batch size, the unigram targets), evaluates every ``<lang>.txt`` of
``--data_dir`` and writes DIR/multilingual_eval.json (or ``--out``) and TensorBoard scalars.
"""

from __future__ import annotations

import json
import sys

from absl import flags

FLAGS = flags.FLAGS


def define_flags():
    """The CLI's flags, defined when it starts (entry points share flag names: importing defines none)."""
    from hnet.scripts import GROUPINGS

    flags.DEFINE_string("workdir", None, "training workdir (operative_config.gin + checkpoints/)")
    flags.DEFINE_multi_string("gin_file", [], "extra gin files applied after the operative config")
    flags.DEFINE_string("data_dir", "shared:ntrex128/valid", "directory of <lang>.txt files (parallel text)")
    flags.DEFINE_integer("max_lines", 0, "first lines of every file (0 = all)")
    flags.DEFINE_enum("groups", "ntrex", sorted(GROUPINGS), "script labels of languages")
    flags.DEFINE_string("out", None, "output JSON (default WORKDIR/multilingual_eval.json)")


def main(argv):
    del argv
    from train import storage
    from train.config import GIN_CLI_BINDINGS
    from train.eval import evaluate_languages
    from train.logger import MetricWriter
    from train.restore import load_config, query, restore_setup

    load_config(FLAGS.workdir, FLAGS.gin_file, GIN_CLI_BINDINGS)
    setup, step = restore_setup(FLAGS.workdir)
    res = {"workdir": FLAGS.workdir, "step": int(step),
           **evaluate_languages(setup, query("train.train.eval_data"), FLAGS.data_dir, max_lines=FLAGS.max_lines,
                                groups=FLAGS.groups)}
    path = FLAGS.out or storage.join(FLAGS.workdir, "multilingual_eval.json")
    storage.write_text(path, json.dumps(res, indent=1))
    w = MetricWriter(storage.join(FLAGS.workdir, "tb"))
    for lang, m in res["languages"].items():
        w.scalars(int(step), {k: v for k, v in m.items() if isinstance(v, float)}, f"multilingual/{lang}/")
    for script, m in res["scripts"].items():
        w.scalars(int(step), {k: v for k, v in m.items() if isinstance(v, float)}, f"multilingual/script_{script}/")
    w.scalars(int(step), {k: res[k] for k in ("parity_max_over_min", "parity_max_over_min_magnet9",
                                              "bpb_mean_over_languages") if k in res}, "multilingual/")
    w.close()
    print(json.dumps({k: v for k, v in res.items() if k != "languages"}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    from train import malloc

    malloc.reexec()  # before anything imports jax (train/malloc.py)
    from train.config import run_app

    run_app(main, sys.argv, define_flags)
