"""Sample bytes from a trained checkpoint (KV / SSM / chunker caches, temperature, top-p).

    python -m train.sample --workdir=runs/x --prompt "ROMEO:" [--prompt "..."] --max_bytes 200
"""

from __future__ import annotations

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "training workdir")
flags.DEFINE_integer("step", None, "checkpoint step (default: latest)")
flags.DEFINE_multi_string("prompt", ["The "], "prompt(s); several are sampled as one batch")
flags.DEFINE_integer("max_bytes", 200, "bytes to generate per prompt")
flags.DEFINE_float("temperature", 0.8, "0 = greedy")
flags.DEFINE_float("top_p", 0.95, "nucleus mass")
flags.DEFINE_integer("seed", 0, "sampling seed")


def main(argv):
    del argv
    from flax import nnx

    from hnet import sharding
    from train.generate import generate
    from train.restore import load_config, restore_setup

    load_config(FLAGS.workdir)
    setup, step = restore_setup(FLAGS.workdir, FLAGS.step)
    with sharding.mesh_context(setup.mesh):
        model = nnx.merge(setup.graphdef, setup.state.params, setup.state.rest)
        outs = generate(model, [p.encode() for p in FLAGS.prompt], max_new_bytes=FLAGS.max_bytes,
                        temperature=FLAGS.temperature, top_p=FLAGS.top_p, seed=FLAGS.seed)
    print(f"# checkpoint step {step}")
    for p, o in zip(FLAGS.prompt, outs):
        print(p + o)
        print("-" * 40)


if __name__ == "__main__":
    app.run(main)
