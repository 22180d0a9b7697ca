#!/usr/bin/env bash
# Create (or update) the project's virtual environment in .venv and install what it needs.
#   bash scripts/setup_env.sh [extras]      (extras default: spark,local,test)
# Installs Java 17 (needed by Spark) through apt when no `java` is on PATH.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
extras="${1:-spark,local,test}"
log() { printf '[setup] %s\n' "$*" >&2; }

if ! command -v java >/dev/null 2>&1; then
    log "no java on PATH: installing openjdk-17-jre-headless with apt"
    if [ "$(id -u)" -eq 0 ]; then sudo_cmd=""; else sudo_cmd="sudo"; fi
    $sudo_cmd apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq openjdk-17-jre-headless >/dev/null
fi
if [[ ",$extras," == *",test,"* ]] && ! command -v shellcheck >/dev/null 2>&1; then
    log "no shellcheck on PATH: installing Debian's shellcheck (the bootstrap-script test uses it)"
    if [ "$(id -u)" -eq 0 ]; then sudo_cmd=""; else sudo_cmd="sudo"; fi
    $sudo_cmd apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq shellcheck >/dev/null
fi
java -version 2>&1 | head -1 | sed 's/^/[setup] java: /' >&2

py="${PYTHON:-python3}"
"$py" -c 'import sys; assert sys.version_info >= (3, 10), "Python >= 3.10 is required"' 
if [ ! -x .venv/bin/python ]; then
    log "creating .venv with $("$py" --version)"
    "$py" -m venv .venv
fi
if ! .venv/bin/python -m uv --version >/dev/null 2>&1; then
    .venv/bin/python -m pip install -q --upgrade pip uv
fi
log "installing the project with extras [$extras]"
.venv/bin/python -m uv pip install -q --python .venv/bin/python -e ".[${extras}]"
log "environment ready: $(.venv/bin/python --version)"
