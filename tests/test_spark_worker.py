"""The Python-worker glue of stage 4c: zip finders dropped from the importer cache.

The PySpark worker calls ``importlib.invalidate_caches()`` before every Spark task; on
Python 3.11 each cached ``zipimporter`` then re-reads its archive's directory (pyspark.zip,
py4j, the spark-core jar: ~0.1 CPU-s per task).  ``spark_session.drop_zip_importer_caches``
removes those finders; imports from the archives still work (the finder is made again).
"""
from __future__ import annotations

import importlib
import sys
import zipfile
import zipimport

from injection_pipeline.spark_session import drop_zip_importer_caches


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
