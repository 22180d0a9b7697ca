"""Code provenance recorded in outputs (the cache's ``_SUCCESS``, 4c's ``code_version``)."""
from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess

#: modules whose source identifies the code of a run (hashed, so a --py-files zip on EMR,
#: without git or installed metadata, is still identified)
HASHED_MODULES = ("injection_pipeline.coadd_cache", "injection_pipeline.dr10",
                  "injection_pipeline.storage", "injection_pipeline.injection",
                  "injection_pipeline.psf_fallback", "lensing.render", "lensing.mass_profiles",
                  "lensing.sersic", "lensing.psf", "lensing.metrics", "lensing.photometry",
                  "lensing.sources", "lensing.clumps")


def code_version(repo_dir: str | None = None) -> str:
    """``dr10-lens-injection <version> src <blake2b of the pipeline code> [git <sha>[-dirty]]``."""
    try:
        from importlib.metadata import version
        v = f"dr10-lens-injection {version('dr10-lens-injection')}"
    except Exception:  # noqa: BLE001 - not installed (zip on EMR)
        v = "dr10-lens-injection (not installed)"
    h = hashlib.blake2b(digest_size=6)
    for mod in HASHED_MODULES:
        try:
            spec = importlib.util.find_spec(mod)
            h.update(spec.loader.get_data(spec.origin))  # works inside a zip too
        except Exception:  # noqa: BLE001 - a module that cannot be read: hash its name
            h.update(mod.encode())
    v += f" src {h.hexdigest()}"
    repo_dir = repo_dir or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.isdir(os.path.join(repo_dir, ".git")):
        try:
            sha = subprocess.run(["git", "-C", repo_dir, "rev-parse", "--short=12", "HEAD"],
                                 capture_output=True, text=True, timeout=5)
            if sha.returncode == 0 and sha.stdout.strip():
                dirty = subprocess.run(["git", "-C", repo_dir, "status", "--porcelain",
                                        "--untracked-files=no"],
                                       capture_output=True, text=True, timeout=10)
                v += f" git {sha.stdout.strip()}" + ("-dirty" if dirty.stdout.strip() else "")
        except Exception:  # noqa: BLE001 - no git: version and source hash only
            pass
    return v
