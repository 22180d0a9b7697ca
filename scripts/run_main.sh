#!/usr/bin/env bash
# The main job in one command: set up the environment (idempotent: .venv, the project with the
# spark, local and qa extras, Java 17 when missing), then run the whole chain on the embedded
# default (conf/demo.toml): synthetic DR10 survey -> local HTTP + moto S3 servers -> 4a -> 4b
# -> filtered manifests -> 4c -> summary + QA PNGs, in Spark local[*], results in results/.
#   bash scripts/run_main.sh [demo flags]       e.g. --out /tmp/res --verbose --n-bricks 6
#   (.venv/bin/python spark_phase4_pipeline.py demo --help lists every flag)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
bash scripts/setup_env.sh
export PYTHONHASHSEED=0
exec .venv/bin/python spark_phase4_pipeline.py demo "$@"
