"""Process set-up of the PySpark Python worker (injection_pipeline.python_worker).

* zip finders dropped from the importer cache: the PySpark worker calls
  ``importlib.invalidate_caches()`` before every Spark task and on Python 3.11 each cached
  ``zipimporter`` re-reads its archive; imports from the archives must still work.
* glibc malloc thresholds: applied through ``mallopt`` (checked by their effect on page
  faults, in a fresh interpreter), validated with the setting named, read from conf.
"""
from __future__ import annotations

import importlib
import json
import subprocess
import sys
import textwrap
import zipfile
import zipimport

import pytest

from injection_pipeline import python_worker
from injection_pipeline.python_worker import check_malloc_mb, drop_zip_importer_caches


def test_zip_finders_dropped_and_imports_still_work(tmp_path, monkeypatch):
    archive = tmp_path / "pkgs.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("zpkg_phase4/__init__.py", "")
        z.writestr("zpkg_phase4/a.py", "VALUE = 'a'\n")
        z.writestr("zpkg_phase4/b.py", "VALUE = 'b'\n")
    monkeypatch.syspath_prepend(str(archive))
    for m in ("zpkg_phase4", "zpkg_phase4.a", "zpkg_phase4.b"):
        monkeypatch.delitem(sys.modules, m, raising=False)
    try:
        assert importlib.import_module("zpkg_phase4.a").VALUE == "a"
        zips = [k for k, f in sys.path_importer_cache.items()
                if isinstance(f, zipimport.zipimporter)]
        assert str(archive) in zips
        n = drop_zip_importer_caches()
        assert n >= len(zips) >= 1
        assert not any(isinstance(f, zipimport.zipimporter)
                       for f in sys.path_importer_cache.values())
        importlib.invalidate_caches()          # what the worker does before each task
        assert importlib.import_module("zpkg_phase4.b").VALUE == "b"   # finder made again
        assert drop_zip_importer_caches() >= 1
    finally:
        for m in ("zpkg_phase4", "zpkg_phase4.a", "zpkg_phase4.b"):
            sys.modules.pop(m, None)


@pytest.mark.parametrize("values, bad", [
    ((64, 256, 64), "mmap_threshold_mb = 64"),        # above glibc's 32 MB maximum
    ((32, -1, 64), "trim_threshold_mb = -1"),
    ((32, 256, "64"), "top_pad_mb = '64'"),
    ((True, 256, 64), "mmap_threshold_mb = True"),
])
def test_malloc_settings_validated_with_the_setting_named(values, bad):
    with pytest.raises(ValueError, match=r"\[job\] malloc_" + bad.replace("(", r"\(")):
        check_malloc_mb(*values, where="[job] malloc_")
    assert check_malloc_mb(32, 256.0, 0) == (32.0, 256.0, 0.0)


def test_malloc_settings_from_conf(tmp_path):
    """The shipped [job] values reach run_experiments; a bad one fails before Spark starts,
    naming the conf key."""
    from spark_phase4_pipeline import build_parser
    from injection_pipeline.stages import stage_4c

    args = build_parser().parse_args(["4c", "--experiment-id", "x", "--out", str(tmp_path)])
    conf = stage_4c.load_conf(None)
    job = conf["job"]
    assert stage_4c.settings_from_args(args, conf)["malloc_mb"] == (
        float(job["malloc_mmap_threshold_mb"]), float(job["malloc_trim_threshold_mb"]),
        float(job["malloc_top_pad_mb"]))
    bad = dict(conf, job=dict(job, malloc_top_pad_mb=[1]))
    with pytest.raises(ValueError, match=r"\[job\] malloc_top_pad_mb = \[1\]"):
        stage_4c.settings_from_args(args, bad)


_FAULTS = textwrap.dedent("""
    import json, resource, sys
    import numpy as np
    from injection_pipeline import python_worker
    applied = python_worker.tune_malloc(*json.loads(sys.argv[1]))
    again = python_worker.tune_malloc(*json.loads(sys.argv[1]))
    # a task's pattern: arrays of a few MB made, filled and freed, over and over
    for _ in range(3):
        a = np.ones(2_500_000); b = np.ones(1_200_000); del a, b
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(40):
        a = np.ones(2_500_000); b = np.ones(1_200_000); del a, b
    print(json.dumps({"applied": applied, "again": again, "faults": (
        resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 40}))
""")


def _faults(values):
    out = subprocess.run([sys.executable, "-c", _FAULTS, json.dumps(values)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@pytest.mark.skipif(python_worker._glibc() is None, reason="mallopt is glibc's")
def test_malloc_thresholds_are_applied():
    """Through mallopt, in a fresh interpreter: with tiny thresholds every 20 MB + 9.6 MB pair
    of arrays is a fresh mmap, faulted in again each time (~1,100 faults here: numpy asks for
    huge pages on large arrays, so fewer than the 7,227 4-kB pages); with the shipped ones the
    freed heap is kept and refilled with no new faults."""
    tiny = _faults([0.0625, 0.0625, 0.001])
    shipped = _faults([32, 256, 64])
    assert tiny["applied"] == {"M_MMAP_THRESHOLD": 65536, "M_TRIM_THRESHOLD": 65536,
                               "M_TOP_PAD": 1048}
    assert shipped["applied"] == {"M_MMAP_THRESHOLD": 32 << 20, "M_TRIM_THRESHOLD": 256 << 20,
                                  "M_TOP_PAD": 64 << 20}
    assert shipped["again"] == shipped["applied"]
    assert tiny["faults"] > 200
    assert shipped["faults"] < 0.01 * tiny["faults"]
    assert _faults([0, 0, 0])["applied"] == {}           # 0 = glibc's defaults, nothing set
