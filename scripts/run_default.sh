#!/usr/bin/env bash
# The default job: set up the environment if needed, then train a small H-Net on the Python reference
# documentation shipped with CPython (no download), evaluate it, checkpoint, log to TensorBoard, sample.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
exec .venv/bin/python -m train.main \
  --gin_file=configs/hnet_1stage_tiny.gin --gin_file=configs/runs/default.gin \
  --workdir="${WORKDIR:-runs/default}" "$@"
