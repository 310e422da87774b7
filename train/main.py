"""CLI: python -m train.main --gin_file=configs/<model>.gin --gin_file=configs/runs/<run>.gin
                              [--gin.KEY=value ...] --workdir=DIR
                              [--coordinator_address=H:P --num_processes=N --process_id=I | --distributed]
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

FLAGS = flags.FLAGS


def define_flags():
    """The CLI's flags, defined when it starts (importing this module defines none: train.evaluate and
    train.sample define some of the same names)."""
    flags.DEFINE_multi_string("gin_file", [], "gin files, composed in order (model file, then run file)")
    flags.DEFINE_multi_string("gin_bindings", [], "extra bindings (same as --gin.KEY=value)")
    flags.DEFINE_string("workdir", None, "output directory (checkpoints, TensorBoard, results)")
    flags.DEFINE_string("coordinator_address", None, "jax.distributed coordinator host:port")
    flags.DEFINE_integer("num_processes", None, "number of processes (multi-host)")
    flags.DEFINE_integer("process_id", None, "this process' index (multi-host)")
    flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() with auto-detection (TPU VMs, SLURM)")
    flags.DEFINE_string("compilation_cache_dir", os.path.join(os.path.expanduser("~"), ".cache", "hnet", "jax"),
                        "persistent XLA compilation cache: a restarted or repeated run loads its compiled steps "
                        "instead of compiling them again ('' disables)")


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

    train_from_config(FLAGS.gin_file, list(FLAGS.gin_bindings) + config.GIN_CLI_BINDINGS, FLAGS.workdir,
                      FLAGS.compilation_cache_dir, init_distributed=_init_distributed)


def train_from_config(gin_files: list[str], bindings: list[str], workdir: str, compilation_cache_dir: str = "",
                      init_distributed=None):
    """The CLI after its flags: parse the config, (``init_distributed()``), train, print the summary and return
    train's results; config, data and checkpoint errors exit with status 2 and one line."""
    from train import config

    try:
        config.parse(gin_files, bindings)
    except (config.ConfigError, OSError) as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
    if init_distributed is not None:
        init_distributed()
    import jax

    if compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", compilation_cache_dir)

    from train.checkpoint import CheckpointError
    from train.logger import log, setup_console
    from train.loop import train
    from train.sources import DataError
    from train.storage import StorageError, absolute

    setup_console()
    try:
        results = train(workdir=absolute(workdir))
    except DataError as e:
        print(f"data error: {e}", file=sys.stderr)
        sys.exit(2)
    except CheckpointError as e:
        print(f"checkpoint error: {e}", file=sys.stderr)
        sys.exit(2)
    except StorageError as e:
        print(f"storage error: {e}", file=sys.stderr)
        sys.exit(2)
    if jax.process_index() == 0:
        wd = absolute(workdir)
        print("\n" + "=" * 78)
        if "eval" in results:
            ev = results["eval"]
            masked = int(ev["n_masked_by_model"])
            print(f"validation: {ev['bpb']:.4f} bits per byte over {int(ev['n_bytes']):,} bytes"
                  + (f" ({masked:,} bytes not scored by the model)" if masked else ""))
        print(f"checkpoints : {wd}/checkpoints")
        print(f"tensorboard : {wd}/tb   ->  .venv/bin/tensorboard --logdir {wd}/tb")
        print(f"results     : {wd}/results.json   operative config: {wd}/operative_config.gin")
        for s in results.get("samples", []):
            print("sample      :", repr(s))
        log.info("done")
    return results


if __name__ == "__main__":
    from train import malloc

    malloc.reexec()  # before anything imports jax (train/malloc.py)
    from train.config import run_app

    run_app(main, sys.argv, define_flags)
