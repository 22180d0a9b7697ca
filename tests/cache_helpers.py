"""Test helper: put a synthetic survey's bricks into a coadd cache the way stage 4b leaves it.

The ``_SUCCESS`` marker is the real 4b document (coadd_cache.make_success) with sizes and
sha256 of the files actually present; files a fault removed upstream (no_psfsize,
no_maskbits) are still listed, as after a cache whose objects were later lost, so stage 4c's
fallbacks are exercised.  ``written_at`` is fixed so that markers (and the
``cache_marker_sha`` column) are identical across cache backends.
"""
from __future__ import annotations

import hashlib
import json
import os

from injection_pipeline import coadd_cache, dr10, storage


def cache_survey_brick(desc, rec, cache_root: str, psf_median: bool = True) -> None:
    """Copy one synthetic brick's files to ``<cache_root>/<brick>/`` and write ``_SUCCESS``.

    ``psf_median``: psfsize entries carry 4b's brick median (coadd_cache.psfsize_summary), as
    real 4b markers do; False writes markers without it (as from an older 4b: 4c computes).
    """
    brick = rec.spec.brickname
    files = {}
    for name in dr10.brick_filenames(brick):
        src = os.path.join(desc.root, rec.directory, name)
        if os.path.exists(src):
            storage.put_file(src, storage.join_uri(cache_root, brick, name))
            with open(src, "rb") as f:
                sha, size = hashlib.sha256(f.read()).hexdigest(), os.path.getsize(src)
        else:
            sha, size = "0" * 64, 1
        files[name] = {"size": size, "sha256": sha, "source_url": f"file://{src}"}
        if psf_median and "-psfsize-" in name and os.path.exists(src):
            files[name]["psf_median"] = coadd_cache.psfsize_summary(src)
    marker = coadd_cache.make_success(brick, files, code_version="test", stage="test",
                                      run_id="test", base_url=str(desc.root))
    marker["written_at"] = "2026-01-01T00:00:00+00:00"
    storage.put_bytes(storage.join_uri(cache_root, brick, dr10.SUCCESS_MARKER),
                      json.dumps(marker, sort_keys=True).encode())


def cache_survey(desc, cache_root: str) -> None:
    """Every brick present upstream (absent bricks skipped, as 4b blacklists them)."""
    for rec in desc.bricks:
        if "absent" not in rec.faults:
            cache_survey_brick(desc, rec, cache_root)
