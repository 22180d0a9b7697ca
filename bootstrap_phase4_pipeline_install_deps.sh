#!/usr/bin/env bash
# EMR bootstrap action of the DR10 lens-injection pipeline (runs on EVERY node, before YARN
# starts): installs the pinned runtime dependencies for the cluster's Python 3.11, the
# interpreter Spark uses (spark-env PYSPARK_PYTHON=python3.11, see conf/cluster.toml).
#
#   bootstrap_phase4_pipeline_install_deps.sh [--dry-run] [--force] [--index-url URL]
#
# * Pinned: exact versions, the runtime subset of the project's lock file (uv.lock) for
#   CPython 3.11 on x86_64 Linux, written into PINS below by `bash scripts/lock.sh` (never by
#   hand; tests/test_lock.py fails when they disagree).  Wheels only (--only-binary=:all:), so
#   every node gets the same bits and nothing is compiled on a node.  Every pin has a cp311
#   manylinux x86_64 wheel (checked from the lock's wheel list by scripts/lockfile.py); fitsio
#   has NO aarch64 wheel: use x86_64 instance types.
# * Never installs pyspark: EMR 7.x provides Spark 3.5 (its Python API lives in
#   /usr/lib/spark/python); a pip-installed pyspark would shadow it, so its presence is an error.
# * Idempotent: when every pin is already importable at the pinned version nothing is
#   installed (--force reinstalls the pins); dnf/pip are themselves idempotent.
# * Fails loudly (known pitfall: `|| true` once hid a missing boto3 and every task failed
#   silently): set -euo pipefail, no `|| true` on installs, and after installing every module
#   is imported and its version compared with the pin; any mismatch exits non-zero, which makes
#   EMR fail the cluster start instead of running tasks without their dependencies.
# * Logs every command and its output to stdout (EMR copies it to
#   <LogUri>/<cluster>/node/<instance>/bootstrap-actions/) and to $PHASE4_BOOTSTRAP_LOG.
#
# Environment (tests, debugging): PHASE4_BOOTSTRAP_DRY_RUN=1 (print, do not run),
# PHASE4_BOOTSTRAP_FORCE=1, PHASE4_PYTHON (default python3.11), PHASE4_BOOTSTRAP_LOG (default
# /tmp/phase4_bootstrap.log), PHASE4_BOOTSTRAP_SUDO (default "sudo" unless root; "" = none),
# PHASE4_PIP_INDEX_URL, PHASE4_BOOTSTRAP_ARCH (default `uname -m`).
set -euo pipefail

# ----------------------------------------------------------------------------- pins
# BEGIN PINS: generated from uv.lock by scripts/lock.sh; do not edit by hand
# The runtime subset of uv.lock for CPython 3.11 on x86_64 Linux (EMR 7.x): every
# package the runtime dependencies of pyproject.toml need there, at the lock's version.
PINS=(
    "astropy==8.0.2"
    "astropy-healpix==2.0.1"
    "astropy-iers-data==0.2026.11.2.0.34.55"
    "boto3==1.44.8"
    "botocore==1.44.8"
    "fitsio==1.4.2"
    "jmespath==1.1.0"
    "numpy==2.4.6"
    "packaging==26.4"
    "pandas==2.3.3"
    "pyarrow==26.0.1"
    "pyerfa==2.0.1.5"
    "python-dateutil==2.9.0.post0"
    "pytz==2026.6"
    "pyyaml==6.0.4"
    "s3transfer==0.19.3"
    "six==1.17.0"
    "tzdata==2026.6"
    "urllib3==2.8.0"
)
# END PINS
# import name : distribution name (verified after install: import + exact version)
CHECKS=(
    "numpy:numpy" "astropy:astropy" "fitsio:fitsio" "boto3:boto3" "pyarrow:pyarrow"
    "astropy_healpix:astropy-healpix" "pandas:pandas" "botocore:botocore"
    "s3transfer:s3transfer" "erfa:pyerfa" "yaml:pyyaml"
)

# ----------------------------------------------------------------------------- settings
PYTHON="${PHASE4_PYTHON:-python3.11}"
LOG_FILE="${PHASE4_BOOTSTRAP_LOG:-/tmp/phase4_bootstrap.log}"
DRY_RUN="${PHASE4_BOOTSTRAP_DRY_RUN:-0}"
FORCE="${PHASE4_BOOTSTRAP_FORCE:-0}"
INDEX_URL="${PHASE4_PIP_INDEX_URL:-}"
ARCH="${PHASE4_BOOTSTRAP_ARCH:-$(uname -m)}"
if [ "$(id -u)" -eq 0 ]; then sudo_default=""; else sudo_default="sudo"; fi
SUDO="${PHASE4_BOOTSTRAP_SUDO-$sudo_default}"

while [ "$#" -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --force) FORCE=1 ;;
        --index-url) INDEX_URL="${2:?--index-url needs a URL}"; shift ;;
        --index-url=*) INDEX_URL="${1#--index-url=}" ;;
        *) printf 'unknown argument: %s\n' "$1" >&2; exit 2 ;;
    esac
    shift
done

mkdir -p "$(dirname "$LOG_FILE")"
log() { printf '%s [phase4-bootstrap] %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*" | tee -a "$LOG_FILE"; }
die() { log "ERROR: $*"; log "FAILED (see $LOG_FILE)"; exit 1; }
# run CMD...: log it; in dry-run mode only print it; otherwise run it, output to stdout + log.
run() {
    if [ "$DRY_RUN" = "1" ]; then
        log "DRY-RUN: $*"
        return 0
    fi
    log "+ $*"
    "$@" 2>&1 | tee -a "$LOG_FILE"
}
sudo_run() {
    if [ -n "$SUDO" ]; then run "$SUDO" "$@"; else run "$@"; fi
}

VERIFY_PY='
import importlib, importlib.metadata as md, sys
want = dict(p.split("==", 1) for p in sys.argv[1].split())
bad = []
for check in sys.argv[2:]:
    mod, dist = check.split(":")
    try:
        m = importlib.import_module(mod)
        have = md.version(dist)
    except Exception as exc:
        bad.append(f"{mod}: import failed: {exc!r}")
        continue
    pin = want.get(dist)
    status = "ok" if have == pin else f"VERSION MISMATCH (pinned {pin})"
    if have != pin:
        bad.append(f"{dist} {have} != {pin}")
    where = getattr(m, "__file__", "?")
    print(f"  {status:<8} {dist}=={have}  ({where})")
try:
    spark_dist = md.version("pyspark")
    bad.append(f"pyspark {spark_dist} is pip-installed for this python: it would shadow EMR Spark")
except md.PackageNotFoundError:
    pass
print(f"  python {sys.version.split()[0]} at {sys.executable}")
if bad:
    print("PROBLEMS: " + "; ".join(bad))
    sys.exit(1)
'
# verify [quiet]: import every checked module and compare versions with the pins.
verify() {
    if [ "${1:-}" = "quiet" ]; then
        "$PYTHON" -c "$VERIFY_PY" "${PINS[*]}" "${CHECKS[@]}" >/dev/null 2>&1
    else
        "$PYTHON" -c "$VERIFY_PY" "${PINS[*]}" "${CHECKS[@]}" 2>&1 | tee -a "$LOG_FILE"
    fi
}

# ----------------------------------------------------------------------------- main
log "start: host=$(hostname) arch=$ARCH user=$(id -un) python=$PYTHON dry_run=$DRY_RUN force=$FORCE log=$LOG_FILE"
for pin in "${PINS[@]}"; do
    case "$pin" in
        pyspark*|PySpark*) die "refusing to install $pin: EMR provides Spark (never pip-install pyspark)" ;;
        *==*) ;;
        *) die "unpinned requirement $pin: every requirement must be name==version" ;;
    esac
done
if [ "$ARCH" != "x86_64" ]; then
    die "architecture $ARCH: fitsio==1.4.2 publishes no manylinux $ARCH wheel; use x86_64 instance types (conf/cluster.toml)"
fi

if ! command -v "$PYTHON" >/dev/null 2>&1; then
    log "$PYTHON not found: installing python3.11 and python3.11-pip with dnf (Amazon Linux 2023)"
    sudo_run dnf install -y python3.11 python3.11-pip || die "dnf could not install python3.11"
elif ! "$PYTHON" -m pip --version >/dev/null 2>&1; then
    log "$PYTHON has no pip: installing python3.11-pip with dnf"
    sudo_run dnf install -y python3.11-pip || die "dnf could not install python3.11-pip"
fi

pip_cmd=("$PYTHON" -m pip install --no-cache-dir --no-input --disable-pip-version-check
         --progress-bar off --root-user-action=ignore --only-binary=:all:)
if [ -n "$INDEX_URL" ]; then pip_cmd+=(--index-url "$INDEX_URL"); fi
pip_cmd+=("${PINS[@]}")

if [ "$DRY_RUN" = "1" ]; then
    sudo_run "${pip_cmd[@]}"
    log "dry run: nothing installed, nothing verified"
    exit 0
fi

if [ "$FORCE" != "1" ] && verify quiet; then
    log "every pinned package is already installed for $PYTHON: nothing to install"
else
    log "installing ${#PINS[@]} pinned packages for $PYTHON ($("$PYTHON" --version 2>&1))"
    sudo_run "${pip_cmd[@]}" || die "pip install failed (exit status above)"
fi

log "verifying imports and versions with $PYTHON:"
verify || die "dependency verification failed: the pipeline would fail on this node"
log "OK: all pinned dependencies importable at their pinned versions"
