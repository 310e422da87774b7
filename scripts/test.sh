#!/usr/bin/env bash
# The test suite (what CI runs): set up the environment if needed, then run the default tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
exec .venv/bin/python -m pytest -q -n 2 -m "not slow" "$@"
