"""Stage 4c through Spark (local mode) under storage faults and a killed worker (issue 16).

* Flaky S3: a fault-injecting HTTP proxy (``local_services.FaultyS3Proxy``, 127.0.0.1,
  started and stopped here) in front of the session's moto server answers a deterministic
  share of the requests with 503 SlowDown, a TCP reset, a stall past the read timeout or a
  body cut half-way (``hashed_fault_schedule``: the first attempt of the chosen requests;
  the same requests whatever the timing).  The Python workers reach S3 through it
  (``AWS_ENDPOINT_URL`` in the SparkContext environment); a 4c run over it, with range reads
  and with whole downloads, has every manifest task exactly once and stamps and metrics
  bit-identical to a clean run.
* A Python worker killed mid-job (``injection.TEST_EXIT_ONCE_ENV``: the first worker to start
  its second brick exits with ``os._exit`` after writing part of its stamps file) is retried
  by Spark (``local[N,F]``); the job completes with exact accounting, stamps identical to the
  clean run, and no ``.inprogress`` temporary left.
"""
from __future__ import annotations

import os

import pandas as pd
import pyarrow.parquet as pq
import pytest

from injection_pipeline import injection as inj
from injection_pipeline import manifests as mf
from injection_pipeline import synthetic_survey as ss
from injection_pipeline.local_services import FaultyS3Proxy, hashed_fault_schedule
from injection_pipeline.spark_session import worker_environment as worker_env
from injection_pipeline.stages import stage_4c

EXP = "debug_stamp64_bandsgrz_gridgrid_small"
VARIANT = "faults"
RATES = {"slowdown": 0.10, "reset": 0.06, "timeout": 0.03, "cut": 0.05}


@pytest.fixture(scope="module")
def world(tmp_path_factory, moto_s3):
    from test_stage_4c import build_manifest

    root = tmp_path_factory.mktemp("faults4c")
    desc = ss.generate_survey(root / "survey", n_bricks=4, size="small", seed=23)
    mcfg = mf.load_config(experiments=[EXP], overrides={
        "replicates": 1, "n_per_config.debug": 2, "control_frac.debug": 0.5})
    manifest = build_manifest(desc, mcfg, mcfg.experiment(EXP))
    out = str(root / "results")
    mdir = os.path.join(out, "phase4a", VARIANT, "manifests_filtered", EXP)
    os.makedirs(mdir)
    pq.write_table(manifest, os.path.join(mdir, "part-0.parquet"))
    bucket = "faults4c"
    moto_s3.client().create_bucket(Bucket=bucket)
    cache = f"s3://{bucket}/dr10cache"
    ss.cache_survey(desc, cache, label="test")
    return dict(desc=desc, manifest=manifest, out=out, cache=cache,
                task_ids=sorted(manifest.column("task_id").to_pylist()))


def run(spark, world, name, **kw):
    s = stage_4c.run_stage_4c(spark, inj.InjectionConfig(code_version="test"),
                              experiment_id=EXP, out=world["out"], variant=VARIANT,
                              cache=world["cache"], output_variant=name, **kw)
    root = os.path.join(world["out"], "phase4c", name)
    stamps = pq.ParquetDataset(os.path.join(root, "stamps", EXP)).read()
    metrics = pq.ParquetDataset(os.path.join(root, "metrics", EXP)).read()
    return dict(summary=s, root=root, stamps=stamps.sort_by("task_id"),
                metrics=metrics.sort_by("task_id"))


@pytest.fixture(scope="module")
def clean(spark, world):
    return run(spark, world, "clean", partitions=2)


def assert_same_output(world, got, ref):
    a = got["summary"]["accounting"]
    assert a["exact"] and a["stamps_exact"], a
    ids = got["stamps"].column("task_id").to_pylist()
    assert ids == world["task_ids"]                       # every task exactly once
    assert got["metrics"].column("task_id").to_pylist() == world["task_ids"]
    assert got["summary"]["by_status"] == ref["summary"]["by_status"]
    assert got["stamps"].schema == ref["stamps"].schema
    for col in inj.STAMP_COLUMN_NAMES:                    # bit-identical stamp planes
        assert got["stamps"].column(col).equals(ref["stamps"].column(col)), col
    scalars = [c for c in got["stamps"].column_names if c not in inj.STAMP_COLUMN_NAMES]
    pd.testing.assert_frame_equal(got["stamps"].select(scalars).to_pandas(),  # NaN == NaN
                                  ref["stamps"].select(scalars).to_pandas(), check_exact=True)
    pd.testing.assert_frame_equal(got["metrics"].to_pandas(), ref["metrics"].to_pandas(),
                                  check_exact=True)


@pytest.mark.parametrize("fetch", ["range", "whole"])
def test_4c_over_flaky_s3_is_exact_and_bit_identical(spark, world, clean, moto_s3, fetch):
    assert clean["summary"]["by_status"].get("ok", 0) >= 50          # small bricks: some
    assert set(clean["summary"]["by_status"]) <= {"ok", "off_brick"}   # targets off_brick
    schedule = hashed_fault_schedule(RATES, seed=7 if fetch == "range" else 8)
    with FaultyS3Proxy(moto_s3.endpoint_url, schedule, stall_seconds=3.0) as proxy, \
            worker_env(spark, {"AWS_ENDPOINT_URL": proxy.endpoint_url,
                               "PHASE4_S3_READ_TIMEOUT": "1", "PHASE4_S3_CONNECT_TIMEOUT": "2"}):
        got = run(spark, world, f"flaky-{fetch}", partitions=2, fetch=fetch)
        injected, requests = proxy.injected, proxy.requests
    assert sum(injected.values()) >= 4 and len(injected) >= 3, (injected, requests)
    assert_same_output(world, got, clean)


def test_a_worker_killed_mid_job_is_retried(spark, world, clean, tmp_path):
    marker = str(tmp_path / "killed-once")
    with worker_env(spark, {inj.TEST_EXIT_ONCE_ENV: marker}):
        got = run(spark, world, "killed", partitions=2, out_batch_rows=2)
    assert os.path.exists(marker)                        # a worker did exit mid-job
    with open(marker) as f:
        dead = int(f.read())
    assert dead != os.getpid()
    assert_same_output(world, got, clean)
    left = [os.path.join(d, f) for d, _, fs in os.walk(got["root"]) for f in fs
            if ".inprogress" in f]
    assert left == []
    assert not [f for f in os.listdir("/dev/shm") if f.startswith((f"dl-{dead}-",
                                                                   f"4c-{dead}-"))]
