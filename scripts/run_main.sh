#!/usr/bin/env bash
# Set up the environment (idempotent) and run the main job on the embedded default.
# Until the stages land, the main job writes the embedded synthetic DR10 survey.
#   bash scripts/run_main.sh [output dir, default results/]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
bash scripts/setup_env.sh spark,local,qa
out="${1:-results}"
mkdir -p "$out"
exec .venv/bin/python -m injection_pipeline.synthetic_survey --root "$out/dr10_synthetic" --n-bricks 4 --size small --faults absent
