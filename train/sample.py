"""Sample bytes from a trained checkpoint (KV / SSM / chunker caches, temperature, top-p).

    python -m train.sample --workdir=runs/x --prompt "ROMEO:" [--prompt "..."] --max_bytes 200 [--lang eng ...]
        [--gin_file=f.gin] [--gin.KEY=value]

The model is rebuilt from the workdir's operative config, then ``--gin_file`` / ``--gin.`` overrides.
"""

from __future__ import annotations

import sys

from absl import flags

FLAGS = flags.FLAGS


def define_flags():
    """The CLI's flags, defined when it starts (entry points share flag names: importing defines none)."""
    flags.DEFINE_string("workdir", None, "training workdir")
    flags.DEFINE_integer("step", None, "checkpoint step (default: latest)")
    flags.DEFINE_multi_string("prompt", ["The "], "prompt(s); several are sampled as one batch")
    flags.DEFINE_integer("max_bytes", 200, "bytes to generate per prompt")
    flags.DEFINE_float("temperature", 0.8, "0 = greedy")
    flags.DEFINE_float("top_p", 0.95, "nucleus mass")
    flags.DEFINE_integer("seed", 0, "sampling seed")
    flags.DEFINE_multi_string("lang", [], "the document language of each prompt (models routed by language, e.g. "
                              "configs/magnet_lang_tiny.gin: one per prompt, e.g. eng)")
    flags.DEFINE_multi_string("gin_file", [], "extra gin files applied after the operative config")


def main(argv):
    del argv
    from flax import nnx

    from hnet import sharding
    from train.config import GIN_CLI_BINDINGS
    from train.generate import generate
    from train.restore import load_config, restore_setup

    load_config(FLAGS.workdir, FLAGS.gin_file, GIN_CLI_BINDINGS)
    setup, step = restore_setup(FLAGS.workdir, FLAGS.step)
    if not setup.model.supports_decoding:
        print("error: this model does not decode bytes (supports_decoding = False)", file=sys.stderr)
        sys.exit(2)
    with sharding.mesh_context(setup.mesh):
        model = nnx.merge(setup.graphdef, setup.state.params, setup.state.rest)
        outs = generate(model, [p.encode() for p in FLAGS.prompt], max_new_bytes=FLAGS.max_bytes,
                        temperature=FLAGS.temperature, top_p=FLAGS.top_p, seed=FLAGS.seed,
                        langs=FLAGS.lang or None)
    print(f"# checkpoint step {step}")
    for p, o in zip(FLAGS.prompt, outs):
        print(p + o)
        print("-" * 40)


if __name__ == "__main__":
    from train import malloc

    malloc.reexec()  # before anything imports jax (train/malloc.py)
    from train.config import run_app

    run_app(main, sys.argv, define_flags)
