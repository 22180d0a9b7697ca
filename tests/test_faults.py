"""Transient faults are retried, never recorded as a task's result (issue 16).

* ``process_brick`` re-raises a transient storage fault (storage.is_transient) instead of
  writing ``error`` rows for every task of the brick; deterministic faults stay statuses.
* Local masters get task retries (``local[N]`` -> ``local[N,F]``): a Spark task that fails
  once (a killed worker, a transient fault) is retried and the output is exact.
"""
from __future__ import annotations

import os

import pytest

from injection_pipeline import injection as inj
from injection_pipeline import storage
from injection_pipeline.spark_session import LOCAL_TASK_MAX_FAILURES, local_master_with_retries


def test_local_masters_get_task_retries():
    f = LOCAL_TASK_MAX_FAILURES
    assert f >= 2
    assert local_master_with_retries("local") == f"local[1,{f}]"
    assert local_master_with_retries("local[*]") == f"local[*,{f}]"
    assert local_master_with_retries("local[2]", 3) == "local[2,3]"
    for unchanged in ("local[2,7]", "local[*,2]", "spark://127.0.0.1:7077", "yarn"):
        assert local_master_with_retries(unchanged) == unchanged
    assert local_master_with_retries("local[2]", 1) == "local[2]"


def _tasks(n=3):
    return [{"task_id": f"t{i}", "brickname": "1500p020"} for i in range(n)]


def _cfg():
    return inj.InjectionConfig()


def test_transient_fault_opening_a_brick_is_raised_not_recorded():
    def opener():
        raise storage.StorageTransient("download_to_temp s3://b/x: SlowDown 503", "s3://b/x")
    with pytest.raises(storage.StorageTransient):
        list(inj.process_brick(_tasks(), opener, _cfg()))

    def reset():
        raise ConnectionResetError("connection reset by peer")
    with pytest.raises(ConnectionResetError):
        list(inj.process_brick(_tasks(), reset, _cfg()))


def test_deterministic_faults_opening_a_brick_stay_statuses():
    def denied():
        raise storage.StorageError("download_to_temp s3://b/x: AccessDenied 403", "s3://b/x")
    rows = [r.row for r in inj.process_brick(_tasks(), denied, _cfg())]
    assert [r["task_id"] for r in rows] == ["t0", "t1", "t2"]
    assert {r["status"] for r in rows} == {"error"}
    assert all("AccessDenied" in r["status_reason"] for r in rows)

    def absent():
        raise inj.BrickUnavailable("missing_brick", "brick not in the cache")
    rows = [r.row for r in inj.process_brick(_tasks(), absent, _cfg())]
    assert {r["status"] for r in rows} == {"missing_brick"}


@pytest.mark.spark
def test_a_task_that_fails_once_is_retried_in_local_mode(spark, tmp_path):
    """The session fixture asks for local[2]; build_spark makes it local[2,F]."""
    master = spark.sparkContext.master
    assert master == f"local[2,{LOCAL_TASK_MAX_FAILURES}]", master
    flag = str(tmp_path / "failed-once")

    def fn(it):
        rows = list(it)
        if 3 in rows and not os.path.exists(flag):
            open(flag, "w").close()
            raise storage.StorageTransient("GET s3://b/k: SlowDown 503 (injected)", "s3://b/k")
        return rows
    out = spark.sparkContext.parallelize(range(8), 4).mapPartitions(fn).collect()
    assert os.path.exists(flag)                       # the first attempt did fail
    assert sorted(out) == list(range(8))              # every row exactly once


def test_relative_out_is_refused_on_a_cluster_master(tmp_path, monkeypatch):
    from injection_pipeline.spark_session import absolute_out
    monkeypatch.chdir(tmp_path)
    assert absolute_out("results", "local[*]") == str(tmp_path / "results")
    assert absolute_out("file:///data/out", "yarn") == "/data/out"
    assert absolute_out("s3://bkt/prefix", "yarn") == "s3://bkt/prefix"
    assert absolute_out("/shared/out", "spark://10.0.0.1:7077") == "/shared/out"
    for master in ("yarn", "spark://127.0.0.1:7077", "k8s://https://h:443"):
        with pytest.raises(ValueError, match=r"--out 'results' is a relative local path"):
            absolute_out("results", master)
    import spark_phase4_pipeline as drv                 # the driver refuses before any work
    assert drv.main(["4c", "--master", "spark://127.0.0.1:7077", "--out", "results",
                     "--experiment-id", "x"]) == 2
    assert not (tmp_path / "results").exists()


@pytest.mark.spark
def test_manifest_schema_checked_up_front_with_the_column_named(spark):
    from pyspark.sql.pandas.types import from_arrow_schema
    from pyspark.sql.types import StringType, StructField, StructType

    from injection_pipeline import manifests as mf
    from injection_pipeline.stages.stage_4c import check_manifest_schema

    good = from_arrow_schema(mf.manifest_schema())
    check_manifest_schema(good, "m")                               # the 4a schema passes
    extra = StructType(good.fields + [StructField("my_note", StringType())])
    check_manifest_schema(extra, "m")                              # extra columns: allowed
    fields = [StructField(f.name, StringType(), f.nullable) if f.name == "theta_e_arcsec"
              else f for f in good.fields if f.name != "src_n"]
    with pytest.raises(ValueError) as ei:
        check_manifest_schema(StructType(fields), "s3://b/manifests/exp")
    msg = str(ei.value)
    assert "s3://b/manifests/exp" in msg and "missing column(s) ['src_n']" in msg
    assert "theta_e_arcsec: string (expected double)" in msg


def test_off_brick_has_its_own_threshold():
    """A manifest whose stamps are all off their bricks no longer exits 0 (issue 16)."""
    from injection_pipeline.stages.stage_4c import EXIT_TOO_MANY_ERRORS, exit_code_for
    assert exit_code_for({"ok": 9990, "off_brick": 10}, 10000, 0.01, 0.001) == 0
    assert exit_code_for({"ok": 9989, "off_brick": 11}, 10000, 0.01, 0.001) == \
        EXIT_TOO_MANY_ERRORS
    assert exit_code_for({"off_brick": 500}, 500, 0.01, 0.001) == EXIT_TOO_MANY_ERRORS
    assert exit_code_for({"off_brick": 500}, 500, 0.01, 1.0) == 0
    assert exit_code_for({"ok": 98, "error": 2}, 100, 0.01, 0.001) == EXIT_TOO_MANY_ERRORS
    assert exit_code_for({"ok": 99, "corrupt_file": 1}, 100, 0.01, 0.001) == 0
    assert exit_code_for({}, 0, 0.01, 0.001) == 0
