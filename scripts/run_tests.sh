#!/usr/bin/env bash
# Set up the environment (idempotent) and run the whole test suite.
#   bash scripts/run_tests.sh [pytest args]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
bash scripts/setup_env.sh
export PYTHONHASHSEED=0
exec .venv/bin/python -m pytest "$@"
