#!/usr/bin/env bash
# Refresh the lock file: the one documented way to change a pinned version.
#   bash scripts/lock.sh              re-resolve pyproject.toml, keeping every version the lock
#                                     already has where it still satisfies pyproject.toml
#   bash scripts/lock.sh --upgrade    move every package to the newest version the index serves
#   bash scripts/lock.sh --upgrade-package numpy   one package (any `uv lock` flag passes through)
# Then it rewrites the EMR bootstrap's PINS from the lock (scripts/lockfile.py), checks that
# every runtime pin has a cp311 manylinux x86_64 wheel, and installs the new lock into .venv.
# Commit uv.lock and bootstrap_phase4_pipeline_install_deps.sh together.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
[ -x .venv/bin/python ] || bash scripts/setup_env.sh
UV_PYTHON_DOWNLOADS=never .venv/bin/python -m uv lock --python .venv/bin/python "$@"
.venv/bin/python scripts/lockfile.py write-bootstrap
bash scripts/setup_env.sh
git --no-pager diff --stat -- uv.lock bootstrap_phase4_pipeline_install_deps.sh
