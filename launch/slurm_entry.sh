#!/bin/bash
# Per-task entry point, started by `srun` in launch/slurm_gpu.sbatch (once per node).
# Runs: $PYTHON -m train.main "$@" --coordinator_address=$COORD_ADDRESS
#         --num_processes=$SLURM_NTASKS --process_id=$SLURM_PROCID
set -euo pipefail
: "${COORD_ADDRESS:?COORD_ADDRESS (host:port of the coordinator) must be set}"
: "${SLURM_NTASKS:?not running under srun}"
: "${SLURM_PROCID:?not running under srun}"
cd "${REPO_DIR:-.}"
exec "${PYTHON:-.venv/bin/python}" -m "${TRAIN_MODULE:-train.main}" "$@" \
    --coordinator_address="${COORD_ADDRESS}" \
    --num_processes="${SLURM_NTASKS}" \
    --process_id="${SLURM_PROCID}"
