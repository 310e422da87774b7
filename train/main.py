"""CLI: python -m train.main --gin_file=configs/<model>.gin --gin_file=configs/runs/<run>.gin
                              [--gin.KEY=value ...] --workdir=DIR
                              [--coordinator_address=H:P --num_processes=N --process_id=I | --distributed]
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("gin_file", [], "gin files, composed in order (model file, then run file)")
flags.DEFINE_multi_string("gin_bindings", [], "extra bindings (same as --gin.KEY=value)")
flags.DEFINE_string("workdir", None, "output directory (checkpoints, TensorBoard, results)")
flags.DEFINE_string("coordinator_address", None, "jax.distributed coordinator host:port")
flags.DEFINE_integer("num_processes", None, "number of processes (multi-host)")
flags.DEFINE_integer("process_id", None, "this process' index (multi-host)")
flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() with auto-detection (TPU VMs, SLURM)")
flags.DEFINE_string("compilation_cache_dir", os.path.join(os.path.expanduser("~"), ".cache", "hnet", "jax"),
                    "persistent XLA compilation cache: a restarted or repeated run loads its compiled steps instead "
                    "of compiling them again ('' disables)")

def _init_distributed():
    import jax

    if FLAGS.coordinator_address:
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    elif FLAGS.distributed:
        jax.distributed.initialize()


def main(argv):
    del argv
    if not FLAGS.workdir:
        raise app.UsageError("--workdir is required")
    if not FLAGS.gin_file:
        raise app.UsageError("give at least one --gin_file")
    from train import config

    try:
        config.parse(FLAGS.gin_file, list(FLAGS.gin_bindings) + config.GIN_CLI_BINDINGS)
    except (config.ConfigError, OSError) as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
    _init_distributed()
    import jax

    if FLAGS.compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", FLAGS.compilation_cache_dir)

    from train import data as data_lib
    from train.checkpoint import CheckpointError
    from train.logger import log, setup_console
    from train.loop import train
    from train.storage import StorageError, absolute

    setup_console()
    try:
        results = train(workdir=absolute(FLAGS.workdir))
    except data_lib.DataError as e:
        print(f"data error: {e}", file=sys.stderr)
        sys.exit(2)
    except CheckpointError as e:
        print(f"checkpoint error: {e}", file=sys.stderr)
        sys.exit(2)
    except StorageError as e:
        print(f"storage error: {e}", file=sys.stderr)
        sys.exit(2)
    if jax.process_index() == 0:
        wd = absolute(FLAGS.workdir)
        print("\n" + "=" * 78)
        if "eval" in results:
            print(f"validation: {results['eval']['bpb']:.4f} bits per byte over {int(results['eval']['n_bytes']):,} bytes")
        print(f"checkpoints : {wd}/checkpoints")
        print(f"tensorboard : {wd}/tb   ->  .venv/bin/tensorboard --logdir {wd}/tb")
        print(f"results     : {wd}/results.json   operative config: {wd}/operative_config.gin")
        for s in results.get("samples", []):
            print("sample      :", repr(s))
        log.info("done")


def run():
    from train.config import run_app

    run_app(main, sys.argv)


if __name__ == "__main__":
    run()
