"""The lock file (uv.lock) is the one source of truth for versions.

* pyproject.toml and uv.lock agree (`uv lock --check`), and the check fails when a dependency
  is added to pyproject.toml without relocking;
* the environment the tests run in is exactly the lock (scripts/setup_env.sh: `uv sync
  --frozen`): every locked package for this interpreter at its locked version, nothing else;
* the EMR bootstrap's pins are the lock's runtime subset for CPython 3.11 on x86_64 Linux
  (never "whatever the index serves today"), and each has a cp311 manylinux x86_64 wheel.
"""
from __future__ import annotations

import importlib.metadata as md
import os
import shutil
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import lockfile  # noqa: E402

UV = [sys.executable, "-m", "uv"]
#: seeded by `python -m venv` (pip bootstraps the locked uv); not part of the project's lock
VENV_SEED = {"pip", "setuptools"}


def _uv_lock_check(cwd: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "UV_PYTHON_DOWNLOADS": "never"}
    return subprocess.run([*UV, "lock", "--check", "--python", sys.executable, *extra],
                          cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


def test_lock_agrees_with_pyproject():
    r = _uv_lock_check(REPO, "--offline")
    assert r.returncode == 0, r.stdout + r.stderr


def _index_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
        return True
    except OSError:
        return False


def test_lock_check_fails_when_a_dependency_is_added_but_not_locked(tmp_path):
    if not _index_reachable():
        pytest.skip("the package index is unreachable: uv must resolve the new requirement")
    for name in ("pyproject.toml", "uv.lock"):
        shutil.copy(REPO / name, tmp_path / name)
    text = (tmp_path / "pyproject.toml").read_text()
    assert '    "pandas>=2.0,<3",\n' in text
    (tmp_path / "pyproject.toml").write_text(
        text.replace('    "pandas>=2.0,<3",\n', '    "pandas>=2.0,<3",\n    "scipy>=1.10",\n'))
    r = _uv_lock_check(tmp_path)
    assert r.returncode != 0
    assert "needs to be updated" in r.stderr, r.stderr


def _lock_for_this_interpreter() -> dict[str, str]:
    """name -> version of every package `uv export --all-extras` (dev group included) lists
    for this interpreter: what `uv sync --frozen --all-extras` installs."""
    out = subprocess.run(
        [*UV, "export", "--frozen", "--all-extras", "--no-emit-project", "--no-hashes",
         "--no-header", "--no-annotate"],
        cwd=REPO, check=True, capture_output=True, text=True).stdout
    env = default_environment()
    want = {}
    for line in filter(None, map(str.strip, out.splitlines())):
        spec, _, marker = line.partition(";")
        name, _, version = spec.strip().partition("==")
        from packaging.markers import Marker
        if marker.strip() and not Marker(marker.strip()).evaluate(env):
            continue
        want[canonicalize_name(name)] = version.strip()
    return want


def test_installed_environment_is_exactly_the_lock():
    want = _lock_for_this_interpreter()
    assert {"numpy", "pyspark", "moto", "matplotlib", "lenstronomy", "scikit-learn", "uv"} <= set(want)
    have = {canonicalize_name(d.metadata["Name"]): d.version for d in md.distributions()}
    project = canonicalize_name(tomllib.loads((REPO / "pyproject.toml").read_text())
                                ["project"]["name"])
    wrong = {n: (have.get(n), v) for n, v in want.items() if have.get(n) != v}
    assert not wrong, f"installed != uv.lock (installed, locked): {wrong}"
    extra = set(have) - set(want) - VENV_SEED - {project}
    assert not extra, f"installed but not in uv.lock: {sorted(extra)}"


def test_bootstrap_pins_are_the_locks_runtime_subset_for_emr():
    want = lockfile.runtime_pins()
    have = lockfile.bootstrap_pins()
    assert have == want, "run `bash scripts/lock.sh` (it rewrites the bootstrap's PINS)"
    names = {p.name for p in have}
    assert {"numpy", "astropy", "fitsio", "boto3", "pyarrow", "astropy-healpix", "pandas"} <= names
    assert not names & {"pyspark", "uv", "moto", "pytest", "tomli"}, "runtime subset only"
    # the same versions as this environment wherever the interpreter is EMR's (3.11)
    if sys.version_info[:2] == lockfile.EMR_PYTHON:
        for pin in have:
            assert md.version(pin.name) == pin.version, pin


def test_bootstrap_check_detects_a_drifted_pin(tmp_path, monkeypatch):
    script = tmp_path / "bootstrap.sh"
    text = lockfile.BOOTSTRAP.read_text()
    pin = lockfile.runtime_pins()[0]
    assert f'"{pin}"' in text
    script.write_text(text.replace(f'"{pin}"', f'"{pin.name}==0.0.1"'))
    drifted = lockfile.bootstrap_pins(script)
    assert drifted != lockfile.runtime_pins()
    assert lockfile.write_bootstrap(script) is True
    assert lockfile.bootstrap_pins(script) == lockfile.runtime_pins()
    assert script.read_text() == text


def test_every_runtime_pin_has_a_cp311_manylinux_x86_64_wheel():
    packages = lockfile.lock_packages()
    pins = lockfile.runtime_pins()
    assert lockfile.pins_without_emr_wheel(pins, packages) == []
    # the check can fail: a package recorded with only an aarch64 / cp312 wheel has none
    fake = [{"name": "fakepkg", "version": "1.0", "wheels": [
        {"url": "https://x/fakepkg-1.0-cp312-cp312-manylinux_2_28_x86_64.whl"},
        {"url": "https://x/fakepkg-1.0-cp311-cp311-manylinux_2_28_aarch64.whl"},
        {"url": "https://x/fakepkg-1.0-cp311-cp311-manylinux_2_39_x86_64.whl"}]}]
    bad = lockfile.Pin("fakepkg", "1.0")
    assert lockfile.pins_without_emr_wheel([bad], fake) == [bad]
    good = [{"name": "fakepkg", "version": "1.0", "wheels": [
        {"url": "https://x/fakepkg-1.0-py3-none-any.whl"}]}]
    assert lockfile.pins_without_emr_wheel([bad], good) == []


def test_setup_installs_the_locked_uv():
    lock_uv = [p for p in lockfile.lock_packages() if p["name"] == "uv"]
    assert len(lock_uv) == 1
    out = subprocess.run([*UV, "--version"], capture_output=True, text=True, check=True).stdout
    assert out.split()[1] == lock_uv[0]["version"]
    required = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["uv"]["required-version"]
    assert required == f"=={lock_uv[0]['version']}"
