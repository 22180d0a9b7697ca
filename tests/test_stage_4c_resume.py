"""Stage 4c issue 16: one pass per brick over several experiments, --resume, summary passes.

Survey: 3 small (400 px) bricks, brick 2 absent from the cache (its tasks fail as
missing_brick in every run).  Cache on moto S3: the moto server runs in this process, so
patching its S3 backend counts every GET the executors make (the brick opens are counted by
the GETs of each brick's ``_SUCCESS``, independently of the pipeline's own counters).
Experiments: the debug tier at 64 px and at 96 px (same targets, same bricks).

Runs (one chain, outputs under <out>/phase4c/<output variant>/):
  sep     each experiment alone (run_stage_4c), the reference
  multi   both (+ one with a malformed manifest) in one run_experiments pass
  multi   then a simulated driver kill (a stamps file deleted, a marker deleted, both
          _SUCCESS removed, a dead attempt's temporary and a stray file left) and --resume
  multi   --resume with another config sha (redoes every brick), and again (keeps all)
"""
from __future__ import annotations

import collections
import json
import os
import subprocess

import pandas as pd
import pyarrow.parquet as pq
import pytest

from injection_pipeline import dr10, storage
from injection_pipeline import injection as inj
from injection_pipeline import manifests as mf
from injection_pipeline import stamps_io
from injection_pipeline import synthetic_survey as ss
from injection_pipeline.stages import stage_4c
from test_stage_4c import build_manifest

E64 = "debug_stamp64_bandsgrz_gridgrid_small"
E96 = "debug_stamp96_bandsgrz_gridgrid_small"
BAD = "debug_bad_manifest"
VARIANT = "v1"


def cfg4c(**kw):
    return inj.InjectionConfig(code_version="test", **kw)


class GetCounter:
    """GETs (and HEADs) the moto server answers for ``<bucket>/.../_SUCCESS``, per key."""

    def __init__(self, monkeypatch_cls, bucket):
        from moto.s3.models import S3Backend

        self.counts = collections.Counter()
        orig = S3Backend.get_object
        counts = self.counts

        def get_object(backend, bucket_name, key_name, *a, **kw):
            if bucket_name == bucket and key_name.endswith("/_SUCCESS"):
                counts[key_name.rsplit("/", 2)[-2]] += 1
            return orig(backend, bucket_name, key_name, *a, **kw)
        monkeypatch_cls.setattr(S3Backend, "get_object", get_object)

    def take(self) -> dict:
        out = dict(self.counts)
        self.counts.clear()
        return out


@pytest.fixture(scope="module")
def world(tmp_path_factory, moto_s3):
    root = tmp_path_factory.mktemp("stage4c_resume")
    desc = ss.generate_survey(root / "survey", n_bricks=3, size="small", seed=5,
                              faults=["absent:2"])
    out = str(root / "results")
    manifests = {}
    for eid in (E64, E96):
        mcfg = mf.load_config(experiments=[eid], overrides={
            "replicates": 1, "n_per_config.debug": 1, "control_frac.debug": 0.5})
        manifests[eid] = build_manifest(desc, mcfg, mcfg.experiment(eid))
        mdir = os.path.join(out, "phase4a", VARIANT, "manifests_filtered", eid)
        os.makedirs(mdir)
        pq.write_table(manifests[eid], os.path.join(mdir, "part-0.parquet"))
    bad = os.path.join(out, "phase4a", VARIANT, "manifests_filtered", BAD)
    os.makedirs(bad)
    pq.write_table(manifests[E64].drop(["ra"]), os.path.join(bad, "part-0.parquet"))
    bucket = "cache4cresume"
    moto_s3.client().create_bucket(Bucket=bucket)
    cache = f"s3://{bucket}/dr10cache"
    ss.cache_survey(desc, cache, label="test")
    mp = pytest.MonkeyPatch()
    counter = GetCounter(mp, bucket)
    yield dict(desc=desc, out=out, cache=cache, manifests=manifests, counter=counter)
    mp.undo()


def _kw(world, variant, **extra):
    return dict(out=world["out"], variant=VARIANT, cache=world["cache"],
                output_variant=variant, error_threshold=1.0, off_brick_threshold=1.0, **extra)


def _root(world, variant):
    return os.path.join(world["out"], "phase4c", variant)


def snapshot(world, variant, eid) -> dict:
    """Everything a user reads: metrics rows and every stamps plane, by task_id."""
    root = _root(world, variant)
    m = pq.ParquetDataset(os.path.join(root, "metrics", eid)).read().to_pandas()
    m = m.sort_values("task_id").reset_index(drop=True)
    m["split"] = m["split"].astype(str)
    st = stamps_io.load_stamps(os.path.join(root, "stamps", eid),
                               columns=stamps_io.STAMP_NAMES, status=None)
    planes = {p: getattr(st, p).tobytes() for p in stamps_io.STAMP_NAMES}
    return dict(metrics=m, stamp_meta=st.meta.to_pandas(), planes=planes)


def assert_same(a: dict, b: dict):
    pd.testing.assert_frame_equal(a["metrics"], b["metrics"])
    pd.testing.assert_frame_equal(a["stamp_meta"], b["stamp_meta"])
    for p in stamps_io.STAMP_NAMES:
        assert a["planes"][p] == b["planes"][p], p


def bricks_of(world, eid) -> list:
    return sorted(set(world["manifests"][eid].column("brickname").to_pylist()))


@pytest.fixture(scope="module")
def sep(spark, world):
    world["counter"].take()
    out = {}
    for eid in (E64, E96):
        s = stage_4c.run_stage_4c(spark, cfg4c(), experiment_id=eid, **_kw(world, "sep"))
        out[eid] = dict(summary=s, opens=world["counter"].take(),
                        snap=snapshot(world, "sep", eid))
    return out


DATAFRAME_ACTIONS = ("collect", "first", "head", "take", "count", "toPandas", "toLocalIterator",
                     "foreach", "foreachPartition", "show", "approxQuantile", "tail")


@pytest.fixture(scope="module")
def multi(spark, world, sep):
    """The multi-experiment run, its summary's Spark actions counted three ways: DataFrame
    action calls on the driver, SQL executions (one per action; Spark's SQL status store) and
    Spark jobs of the summary's job group (the status tracker; adaptive query execution runs
    each shuffle stage of an action as a job of its own)."""
    from pyspark.sql import DataFrame

    world["counter"].take()
    sc = spark.sparkContext
    store = spark._jsparkSession.sharedState().statusStore()
    seen = {"calls": [], "executions": None}
    orig = stage_4c.summarise_experiments
    mp = pytest.MonkeyPatch()

    def counted(*a, **kw):
        for name in DATAFRAME_ACTIONS:
            fn = getattr(DataFrame, name)

            def wrapper(self, *x, _fn=fn, _name=name, **y):
                seen["calls"].append(_name)
                return _fn(self, *x, **y)
            mp.setattr(DataFrame, name, wrapper)
        n0 = store.executionsCount()
        try:
            return orig(*a, **kw)
        finally:
            seen["executions"] = store.executionsCount() - n0
            mp.undo()
    before = set(sc.statusTracker().getJobIdsForGroup(stage_4c.SUMMARY_JOB_GROUP))
    with pytest.MonkeyPatch.context() as m2:
        m2.setattr(stage_4c, "summarise_experiments", counted)
        res = stage_4c.run_experiments(spark, cfg4c(), [E64, BAD, E96], partitions=2,
                                       **_kw(world, "multi"))
    jobs = set(sc.statusTracker().getJobIdsForGroup(stage_4c.SUMMARY_JOB_GROUP)) - before
    return dict(res=res, opens=world["counter"].take(), summary_jobs=jobs,
                summary_calls=seen["calls"], summary_executions=seen["executions"],
                snap={e: snapshot(world, "multi", e) for e in (E64, E96)})


def test_multi_experiment_pass_is_bit_identical_and_opens_each_brick_once(world, sep, multi):
    res = multi["res"]
    assert isinstance(res[BAD], ValueError) and "ra" in str(res[BAD])   # fails alone
    for eid in (E64, E96):
        s = res[eid]
        assert s["accounting"]["exact"] and s["accounting"]["stamps_exact"]
        assert s["by_status"] == sep[eid]["summary"]["by_status"]
        assert s["quantiles_ok_injections"] == sep[eid]["summary"]["quantiles_ok_injections"]
        assert s["pass"]["experiments"] == [E64, E96]
        assert_same(multi["snap"][eid], sep[eid]["snap"])
        assert "missing_brick" in s["by_status"] and s["by_status"].get("ok", 0) > 0
    # the same bricks: each opened once by the pass, once per experiment by separate runs
    bricks = sorted(set(bricks_of(world, E64)) | set(bricks_of(world, E96)))
    assert bricks_of(world, E64) == bricks_of(world, E96) and len(bricks) == 3
    assert sorted(multi["opens"]) == bricks
    for b in bricks:
        assert multi["opens"][b] == sep[E64]["opens"][b] == sep[E96]["opens"][b] >= 1
    assert res[E64]["pass"]["brick_openings"] == 3     # the pipeline's own count agrees
    # range reads took every file's head from the bricks' _HEADS objects (4b's cache)
    assert res[E64]["pass"]["file_head_gets"] == 0
    cached = [b for b in bricks
              if storage.exists(storage.join_uri(world["cache"], b, dr10.SUCCESS_MARKER))]
    assert len(cached) == 2                           # the third is missing_brick
    assert res[E64]["pass"]["file_heads_from_index"] == 10 * len(cached)
    assert sep[E64]["summary"]["pass"]["brick_openings"] == 3
    # per-brick files, one marker per (experiment, brick)
    root = _root(world, "multi")
    for eid in (E64, E96):
        assert sorted(os.listdir(os.path.join(root, "bricks", eid))) == \
            sorted(f"{b}.json" for b in bricks)
        succ = json.load(open(os.path.join(root, "metrics", eid, "_SUCCESS")))
        assert succ["format"] == "phase4c-metrics/1"
        assert succ["rows"] == world["manifests"][eid].num_rows


def test_summary_takes_at_most_three_spark_passes(multi):
    """The summaries of all experiments of the run together: SUMMARY_ACTIONS (2) Spark
    actions over the written results, counted as DataFrame action calls and as SQL
    executions; the jobs they ran all belong to the summary's job group."""
    assert stage_4c.SUMMARY_ACTIONS == 2
    assert multi["summary_calls"] == ["collect", "collect"]
    assert multi["summary_executions"] == stage_4c.SUMMARY_ACTIONS
    assert multi["summary_jobs"]                       # tagged (AQE: a job per shuffle stage)
    assert multi["res"][E64]["pass"]["summary_spark_actions"] == 2


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


@pytest.fixture(scope="module")
def resumed(spark, world, multi):
    """A killed run: E64 lost one brick's stamps file (marker left), E96 one brick's marker
    (files left), both _SUCCESS gone, a dead attempt's temporary, a stray part file."""
    root = _root(world, "multi")
    b0, b1 = bricks_of(world, E64)[:2]
    split_of = dict(zip(world["manifests"][E64].column("brickname").to_pylist(),
                        world["manifests"][E64].column("split").to_pylist()))
    os.remove(os.path.join(root, "stamps", E64, f"split={split_of[b0]}",
                           f"part-{b0}.zstd.parquet"))
    os.remove(os.path.join(root, "bricks", E96, f"{b1}.json"))
    for eid in (E64, E96):
        for kind in ("stamps", "metrics"):
            os.remove(os.path.join(root, kind, eid, "_SUCCESS"))
    tmp = os.path.join(root, "stamps", E96, f"split={split_of[b1]}",
                       f".part-{b1}.zstd.parquet.inprogress-{_dead_pid()}-0123456789ab")
    with open(tmp, "wb") as f:
        f.write(b"PAR1 half a file")
    stray = os.path.join(root, "metrics", E64, "split=train", "part-9999p999.zstd.parquet")
    os.makedirs(os.path.dirname(stray), exist_ok=True)
    with open(stray, "wb") as f:
        f.write(b"a brick no longer in the manifest")
    with pytest.raises(stamps_io.IncompleteDataset):
        stamps_io.load_stamps(os.path.join(root, "stamps", E64))
    world["counter"].take()
    res = stage_4c.run_experiments(spark, cfg4c(), [E64, E96], resume=True, partitions=3,
                                   **_kw(world, "multi"))
    return dict(res=res, opens=world["counter"].take(), b0=b0, b1=b1, tmp=tmp, stray=stray,
                snap={e: snapshot(world, "multi", e) for e in (E64, E96)})


def test_resume_redoes_only_the_missing_bricks_bit_identically(world, sep, resumed, capsys):
    res, b0, b1 = resumed["res"], resumed["b0"], resumed["b1"]
    r64, r96 = res[E64]["resume"], res[E96]["resume"]
    n = len(bricks_of(world, E64))
    assert (r64["bricks_redone"], r64["bricks_kept"]) == (1, n - 1)
    assert (r96["bricks_redone"], r96["bricks_kept"]) == (1, n - 1)
    assert r64["redone_bricks_sample"] == [b0] and r96["redone_bricks_sample"] == [b1]
    assert r64["tasks_redone"] + r64["tasks_kept"] == world["manifests"][E64].num_rows
    assert sorted(resumed["opens"]) == sorted([b0, b1])      # only the redone bricks opened
    for b in (b0, b1):                      # once each: the GETs of one opening
        assert resumed["opens"][b] == sep[E64]["opens"][b]
    assert res[E64]["pass"]["brick_openings"] == 2
    # exact accounting, loaders accept the result, and it is the clean run's, bit for bit
    for eid in (E64, E96):
        assert res[eid]["accounting"]["exact"] and res[eid]["accounting"]["stamps_exact"]
        assert_same(resumed["snap"][eid], sep[eid]["snap"])
    # the dead attempt's temporary and the stray file were removed by the run that succeeded
    assert not os.path.exists(resumed["tmp"]) and not os.path.exists(resumed["stray"])
    # the dead attempt's temporary sits beside a redone brick's file: the retried writer of
    # that file removes it (stamp_writer.sweep_dead_inprogress) before the driver's sweep
    # would count it; either way it is gone (asserted above) and nothing live was touched
    assert r96["dead_temporaries_removed"] in (0, 1) and r64["orphan_files_removed"] == 1
    s = json.load(open(os.path.join(_root(world, "multi"), "summaries", f"{E64}.json")))
    assert s["resume"]["bricks_redone"] == 1 and s["resume"]["enabled"] is True
    assert "1 done" in stage_4c.format_summary(s) and "[resume]" in stage_4c.format_summary(s)


def test_resume_with_another_config_sha_redoes_those_bricks(spark, world, resumed):
    n = len(bricks_of(world, E64))
    cfg = cfg4c(arc_region_k=0.5)
    assert cfg.config_sha() != cfg4c().config_sha()
    world["counter"].take()
    res = stage_4c.run_experiments(spark, cfg, [E64], resume=True, **_kw(world, "multi"))
    r = res[E64]["resume"]
    assert (r["bricks_redone"], r["bricks_kept"]) == (n, 0)
    assert sorted(world["counter"].take()) == bricks_of(world, E64)
    m = snapshot(world, "multi", E64)["metrics"]
    assert set(m["injection_config_sha"].dropna()) == {cfg.config_sha()}
    assert res[E64]["accounting"]["exact"]
    # the same config again: everything kept, no brick opened, the files untouched
    root = _root(world, "multi")
    mtimes = {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
              for d, _, fs in os.walk(os.path.join(root, "stamps", E64)) for f in fs
              if f.endswith(".parquet")}
    res2 = stage_4c.run_experiments(spark, cfg, [E64], resume=True, **_kw(world, "multi"))
    r2 = res2[E64]["resume"]
    assert (r2["bricks_redone"], r2["bricks_kept"]) == (0, n)
    assert world["counter"].take() == {} and res2[E64]["pass"]["brick_openings"] == 0
    assert {p: os.stat(p).st_mtime_ns for p in mtimes} == mtimes
    assert res2[E64]["accounting"]["exact"]
    # the E96 outputs (same config as before) were not touched by the E64-only runs
    assert_same(snapshot(world, "multi", E96), resumed["snap"][E96])


def test_marker_check_rejects_changed_rows_and_files(world, resumed):
    """brick_is_complete: a changed manifest row or a part file of another size -> redo."""
    root = _root(world, "multi")
    b = resumed["b1"]
    plan = stage_4c.ExperimentPlan(
        E96, cfg4c(), os.path.join(root, "stamps", E96), os.path.join(root, "metrics", E96),
        os.path.join(root, "bricks", E96), resume=True)
    t = world["manifests"][E96]
    tasks = [r for r in t.to_pylist() if r["brickname"] == b]
    tasks.sort(key=lambda r: r["task_id"])
    expect = stage_4c._marker_expect(plan, b, tasks)
    assert stage_4c.brick_is_complete(plan, b, expect)[0]
    changed = [dict(tasks[0], theta_e_arcsec=tasks[0]["theta_e_arcsec"] + 1e-9)] + tasks[1:]
    assert not stage_4c.brick_is_complete(plan, b, stage_4c._marker_expect(plan, b, changed))[0]
    doc = json.load(open(plan.marker_uri(b)))
    rel = next(iter(doc["files"]["stamps"]))
    path = os.path.join(plan.stamps_uri, rel)
    with open(path, "ab") as f:
        f.write(b"x")
    assert not stage_4c.brick_is_complete(plan, b, expect)[0]
