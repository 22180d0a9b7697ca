#!/usr/bin/env bash
# Create (or update) the project's virtual environment in .venv with EXACTLY the versions of
# the committed lock file (uv.lock): no resolution at install time.
#   bash scripts/setup_env.sh [extras]      (extras default: all = spark,local,qa,test,bench)
#
# * uv.lock is the one source of truth for every version (laptop, CI and, through its runtime
#   subset, the EMR bootstrap).  It is written by `bash scripts/lock.sh`, never here.
# * The installer is locked too: the uv version pinned in uv.lock (dependency group `dev`) is
#   installed into .venv with pip, then `uv sync --frozen` installs the lock and removes
#   anything the lock does not list (exact sync), which keeps uv itself.
# * Both README commands call this with the default (every extra), so they share one
#   environment and never undo each other's installs.
# * Installs Java 17 (needed by Spark) and shellcheck (the bootstrap-script test) through apt
#   when they are not on PATH.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
extras="${1:-all}"
log() { printf '[setup] %s\n' "$*" >&2; }
if [ "$(id -u)" -eq 0 ]; then sudo_cmd=""; else sudo_cmd="sudo"; fi
apt_install() {
    $sudo_cmd apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "$@" >/dev/null
}

if ! command -v java >/dev/null 2>&1; then
    log "no java on PATH: installing openjdk-17-jre-headless with apt"
    apt_install openjdk-17-jre-headless
fi
if ! command -v shellcheck >/dev/null 2>&1; then
    log "no shellcheck on PATH: installing Debian's shellcheck (the bootstrap-script test uses it)"
    apt_install shellcheck
fi
java -version 2>&1 | head -1 | sed 's/^/[setup] java: /' >&2

[ -f uv.lock ] || { log "uv.lock is missing: it is committed with the project"; exit 1; }
# the uv version the lock pins (its [[package]] entry named "uv")
uv_version="$(awk '/^\[\[package\]\]/{p=0} /^name = "uv"$/{p=1} p && /^version = /{gsub(/"/,"",$3); print $3; exit}' uv.lock)"
[ -n "$uv_version" ] || { log "uv.lock pins no uv (dependency group dev)"; exit 1; }

py="${PYTHON:-python3}"
"$py" -c 'import sys; assert sys.version_info >= (3, 10), "Python >= 3.10 is required"'
if [ ! -x .venv/bin/python ]; then
    log "creating .venv with $("$py" --version)"
    "$py" -m venv .venv
fi
if [ "$(.venv/bin/python -m uv --version 2>/dev/null | awk '{print $2}')" != "$uv_version" ]; then
    log "installing uv==$uv_version (the version uv.lock pins) into .venv with pip"
    .venv/bin/python -m pip install -q --disable-pip-version-check "uv==$uv_version"
fi

sync_args=(--frozen --python .venv/bin/python)
if [ "$extras" = "all" ]; then
    sync_args+=(--all-extras)
else
    IFS=',' read -r -a wanted <<< "$extras"
    for extra in "${wanted[@]}"; do sync_args+=(--extra "$extra"); done
fi
log "installing uv.lock exactly (uv sync ${sync_args[*]})"
# the interpreter is the one of .venv (never a downloaded one); frozen: the lock is used as is
UV_PYTHON_DOWNLOADS=never UV_PROJECT_ENVIRONMENT="$here/.venv" \
    .venv/bin/python -m uv sync -q "${sync_args[@]}"
log "environment ready: $(.venv/bin/python --version), uv $uv_version, extras [$extras]"
