"""The lock file (uv.lock) as the one source of truth for versions: read it, and write the EMR
bootstrap's pins from it.

    python scripts/lockfile.py write-bootstrap   # rewrite PINS=(...) of the bootstrap script
    python scripts/lockfile.py check-bootstrap   # exit 1 when the bootstrap disagrees
    python scripts/lockfile.py runtime           # print the EMR runtime pins

The EMR runtime subset is what `uv export` (frozen: from the lock, no resolution) lists for
the project's runtime dependencies (no extras, no dev group), with each environment marker
evaluated for the cluster's interpreter: CPython 3.11 on x86_64 Linux (EMR 7.x, Amazon Linux
2023, glibc 2.34).  The wheel check reads the wheel file names uv.lock records for each pin
and compares their tags with the tags pip accepts on that interpreter (packaging.tags): a
pin without a compatible wheel would make the bootstrap (`--only-binary=:all:`) fail on the
cluster.
"""
from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

from packaging.markers import Marker
from packaging.tags import Tag, compatible_tags, cpython_tags
from packaging.utils import canonicalize_name, parse_wheel_filename

REPO = Path(__file__).resolve().parent.parent
LOCK = REPO / "uv.lock"
BOOTSTRAP = REPO / "bootstrap_phase4_pipeline_install_deps.sh"
BEGIN = "# BEGIN PINS: generated from uv.lock by scripts/lock.sh; do not edit by hand"
END = "# END PINS"

#: The EMR 7.x interpreter Spark's executors run (conf/cluster.toml: python3.11).
EMR_PYTHON = (3, 11)
EMR_GLIBC = (2, 34)          # Amazon Linux 2023
EMR_MARKER_ENV = {
    "implementation_name": "cpython", "implementation_version": "3.11.0", "os_name": "posix",
    "platform_machine": "x86_64", "platform_python_implementation": "CPython",
    "platform_release": "", "platform_system": "Linux", "platform_version": "",
    "python_full_version": "3.11.0", "python_version": "3.11", "sys_platform": "linux",
}


@dataclass(frozen=True)
class Pin:
    name: str        # as the lock spells it (canonical, lower case)
    version: str

    def __str__(self) -> str:
        return f"{self.name}=={self.version}"


def _uv() -> list[str]:
    return [sys.executable, "-m", "uv"]


def export_runtime(lock_dir: Path = REPO) -> list[tuple[str, str, str]]:
    """(name, version, marker) of every runtime requirement in the lock, from `uv export`."""
    out = subprocess.run(
        [*_uv(), "export", "--frozen", "--no-dev", "--no-emit-project", "--no-hashes",
         "--no-header", "--no-annotate", "--format", "requirements-txt"],
        cwd=lock_dir, check=True, capture_output=True, text=True).stdout
    reqs = []
    for line in out.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        spec, _, marker = line.partition(";")
        name, _, version = spec.strip().partition("==")
        reqs.append((canonicalize_name(name), version.strip(), marker.strip()))
    return reqs


def runtime_pins(env: dict | None = None, lock_dir: Path = REPO) -> list[Pin]:
    """The runtime pins for one interpreter (default: EMR's), sorted by name."""
    env = EMR_MARKER_ENV if env is None else env
    pins = {}
    for name, version, marker in export_runtime(lock_dir):
        if marker and not Marker(marker).evaluate(env):
            continue
        if name in pins and pins[name].version != version:
            raise ValueError(f"uv.lock: two versions of {name} for one interpreter")
        pins[name] = Pin(name, version)
    return sorted(pins.values(), key=lambda p: p.name)


def lock_packages(lock: Path = LOCK) -> list[dict]:
    return tomllib.loads(lock.read_text())["package"]


def emr_tags() -> set[Tag]:
    """Every wheel tag pip accepts for CPython 3.11 on manylinux x86_64 with EMR's glibc."""
    plats = [f"manylinux_2_{m}_x86_64" for m in range(EMR_GLIBC[1], 4, -1)]
    plats += ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
    tags = set(cpython_tags(EMR_PYTHON, abis=["cp311", "abi3", "none"], platforms=plats))
    tags |= set(compatible_tags(EMR_PYTHON, "cp311", plats))
    return tags


def wheels_of(pin: Pin, packages: list[dict]) -> list[str]:
    """File names of the wheels uv.lock records for a pin."""
    for pkg in packages:
        if canonicalize_name(pkg["name"]) == pin.name and pkg["version"] == pin.version:
            return [w["url"].rsplit("/", 1)[1] for w in pkg.get("wheels", [])]
    raise KeyError(f"{pin} is not in uv.lock")


def pins_without_emr_wheel(pins: list[Pin], packages: list[dict]) -> list[Pin]:
    ok = emr_tags()
    missing = []
    for pin in pins:
        tags = set()
        for fname in wheels_of(pin, packages):
            tags |= set(parse_wheel_filename(fname)[3])
        if not tags & ok:
            missing.append(pin)
    return missing


def bootstrap_pins(path: Path = BOOTSTRAP) -> list[Pin]:
    """The pins of the bootstrap's generated PINS block."""
    text = path.read_text()
    block = re.search(rf"^{re.escape(BEGIN)}\n(.*?)^{re.escape(END)}$", text, re.S | re.M)
    if block is None:
        raise ValueError(f"{path}: no generated PINS block ({BEGIN!r} ... {END!r})")
    found = re.findall(r'"([^"=]+)==([^"]+)"', block.group(1))
    return [Pin(canonicalize_name(n), v) for n, v in found]


def pins_block(pins: list[Pin]) -> str:
    lines = [BEGIN,
             "# The runtime subset of uv.lock for CPython 3.11 on x86_64 Linux (EMR 7.x): every",
             "# package the runtime dependencies of pyproject.toml need there, at the lock's version.",
             "PINS=("]
    lines += [f'    "{p}"' for p in pins]
    lines += [")", END]
    return "\n".join(lines)


def write_bootstrap(path: Path = BOOTSTRAP) -> bool:
    """Rewrite the bootstrap's PINS block from the lock; True when the file changed."""
    text = path.read_text()
    pattern = re.compile(rf"^{re.escape(BEGIN)}\n.*?^{re.escape(END)}$", re.S | re.M)
    if not pattern.search(text):
        raise ValueError(f"{path}: no generated PINS block to replace")
    new = pattern.sub(lambda _m: pins_block(runtime_pins()), text)
    if new != text:
        path.write_text(new)
    return new != text


def main(argv: list[str]) -> int:
    cmd = argv[0] if argv else "runtime"
    if cmd == "runtime":
        print("\n".join(map(str, runtime_pins())))
        return 0
    if cmd == "write-bootstrap":
        changed = write_bootstrap()
        print(f"{BOOTSTRAP.name}: {'pins rewritten' if changed else 'already equal to the lock'}")
        missing = pins_without_emr_wheel(runtime_pins(), lock_packages())
        if missing:
            print("no cp311 manylinux x86_64 wheel in uv.lock for: " + ", ".join(map(str, missing)))
            return 1
        return 0
    if cmd == "check-bootstrap":
        want, have = runtime_pins(), bootstrap_pins()
        if want != have:
            print(f"{BOOTSTRAP.name} disagrees with uv.lock: run bash scripts/lock.sh")
            return 1
        return 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
