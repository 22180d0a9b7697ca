"""Stage 4c issue 16: one pass per brick over several experiments, --resume, summary passes.

Survey: 3 small (400 px) bricks, brick 2 absent from the cache (its tasks fail as
missing_brick in every run).  Cache on moto S3: the moto server runs in this process, so
patching its S3 backend counts every GET the executors make (the brick opens are counted by
the GETs of each brick's ``_SUCCESS``, independently of the pipeline's own counters).
Experiments: the debug tier at 64 px and at 96 px (same targets, same bricks).

Runs (one chain, outputs under <out>/phase4c/<output variant>/):
  sep     each experiment alone (run_stage_4c), the reference; default file groups (1-deg
          cells: the three bricks 2020m097, 2023m097, 2025m097 share one group)
  multi   both (+ one with a malformed manifest) in one run_experiments pass, 0.5-deg cells
          (groups A = {2020m097, 2023m097}, B = {2025m097})
  multi   then a simulated driver kill (a stamps file of A deleted for one experiment, the
          marker of B for the other, both _SUCCESS removed, a dead attempt's temporary and a
          stray file left) and --resume
  multi   --resume with another config sha (redoes every group), and again (keeps all)
"""
from __future__ import annotations

import collections
import json
import os
import subprocess

import pandas as pd
import pyarrow.parquet as pq
import pytest

from injection_pipeline import dr10, file_groups, storage
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
CELL = 0.5                  # the multi runs' file_cell_deg (sep: the default, 1 deg)


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


def group_of(brick, cell=CELL) -> str:
    return file_groups.group_tag(brick, file_groups.cell_tenths(cell))


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
                                       file_cell_deg=CELL, **_kw(world, "multi"))
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
    # files and one marker per (experiment, file group): 0.5-deg cells here, 1 deg in sep
    root = _root(world, "multi")
    groups = sorted({group_of(b) for b in bricks})
    assert len(groups) == 2 and group_of(bricks[0]) == group_of(bricks[1])
    for eid in (E64, E96):
        assert res[eid]["pass"]["file_groups"] == 2
        assert res[eid]["pass"]["file_grouping"] == "cell 0.5 deg"
        assert sorted(os.listdir(os.path.join(root, "bricks", eid))) == \
            sorted(f"{g}.json" for g in groups)
        marker = json.load(open(os.path.join(root, "bricks", eid, f"{groups[0]}.json")))
        assert marker["bricks"] == {b: n for b, n in collections.Counter(
            world["manifests"][eid].column("brickname").to_pylist()).items()
            if group_of(b) == groups[0]}
        for kind in ("stamps", "metrics"):
            parts = sorted(os.path.basename(f) for d, _, fs in
                           os.walk(os.path.join(root, kind, eid)) for f in fs
                           if f.endswith(".parquet"))
            assert set(parts) == {f"part-{g}.zstd.parquet" for g in groups}, parts
        for kind in ("stamps", "metrics"):        # the sep run: one group of the 3 bricks
            names = {f for d, _, fs in os.walk(os.path.join(_root(world, "sep"), kind, eid))
                     for f in fs if f.endswith(".parquet")}
            assert names == {f"part-{group_of(bricks[0], 1.0)}.zstd.parquet"}
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
    """A killed run: E64 lost a stamps file of group A (marker left), E96 the marker of group
    B (files left), both _SUCCESS gone, a dead attempt's temporary, a stray part file."""
    root = _root(world, "multi")
    b0, b1, b2 = bricks_of(world, E64)
    ga, gb = group_of(b0), group_of(b2)
    split_of = dict(zip(world["manifests"][E64].column("brickname").to_pylist(),
                        world["manifests"][E64].column("split").to_pylist()))
    os.remove(os.path.join(root, "stamps", E64, f"split={split_of[b0]}",
                           f"part-{ga}.zstd.parquet"))
    os.remove(os.path.join(root, "bricks", E96, f"{gb}.json"))
    for eid in (E64, E96):
        for kind in ("stamps", "metrics"):
            os.remove(os.path.join(root, kind, eid, "_SUCCESS"))
    tmp = os.path.join(root, "stamps", E96, f"split={split_of[b2]}",
                       f".part-{gb}.zstd.parquet.inprogress-{_dead_pid()}-0123456789ab")
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
                                   file_cell_deg=CELL, **_kw(world, "multi"))
    return dict(res=res, opens=world["counter"].take(), b0=b0, b1=b1, b2=b2, tmp=tmp,
                stray=stray,
                snap={e: snapshot(world, "multi", e) for e in (E64, E96)})


def test_resume_redoes_only_the_missing_groups_bit_identically(world, sep, resumed, capsys):
    """Redone: E64 group A (b0, b1: a file of it lost), E96 group B (b2: its marker lost);
    each brick opened once, for the one experiment that redoes it."""
    res, b0, b1, b2 = resumed["res"], resumed["b0"], resumed["b1"], resumed["b2"]
    r64, r96 = res[E64]["resume"], res[E96]["resume"]
    assert (r64["bricks_redone"], r64["bricks_kept"]) == (2, 1)
    assert (r96["bricks_redone"], r96["bricks_kept"]) == (1, 2)
    assert (r64["groups_redone"], r64["groups_kept"]) == (1, 1)
    assert (r96["groups_redone"], r96["groups_kept"]) == (1, 1)
    assert r64["redone_bricks_sample"] == [b0, b1] and r96["redone_bricks_sample"] == [b2]
    n_b2 = world["manifests"][E96].column("brickname").to_pylist().count(b2)
    assert (r96["tasks_redone"], r96["tasks_kept"]) == (n_b2, world["manifests"][E96].num_rows
                                                        - n_b2)
    assert r64["tasks_redone"] + r64["tasks_kept"] == world["manifests"][E64].num_rows
    assert sorted(resumed["opens"]) == sorted([b0, b1, b2])
    for b in (b0, b1, b2):                  # once each: the GETs of one opening
        assert resumed["opens"][b] == sep[E64]["opens"][b]
    assert res[E64]["pass"]["brick_openings"] == 3
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
    assert s["resume"]["bricks_redone"] == 2 and s["resume"]["enabled"] is True
    text = stage_4c.format_summary(s)
    assert "2 done" in text and "[resume]" in text
    assert "file groups (cell 0.5 deg): 1 done, 1 kept" in text


def test_resume_with_another_config_sha_redoes_every_group(spark, world, resumed):
    n = len(bricks_of(world, E64))
    cfg = cfg4c(arc_region_k=0.5)
    assert cfg.config_sha() != cfg4c().config_sha()
    world["counter"].take()
    res = stage_4c.run_experiments(spark, cfg, [E64], resume=True, file_cell_deg=CELL,
                                   **_kw(world, "multi"))
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
    res2 = stage_4c.run_experiments(spark, cfg, [E64], resume=True, file_cell_deg=CELL,
                                    **_kw(world, "multi"))
    r2 = res2[E64]["resume"]
    assert (r2["bricks_redone"], r2["bricks_kept"]) == (0, n)
    assert world["counter"].take() == {} and res2[E64]["pass"]["brick_openings"] == 0
    assert {p: os.stat(p).st_mtime_ns for p in mtimes} == mtimes
    assert res2[E64]["accounting"]["exact"]
    # the E96 outputs (same config as before) were not touched by the E64-only runs
    assert_same(snapshot(world, "multi", E96), resumed["snap"][E96])


def test_marker_check_rejects_changed_rows_and_files(world, resumed):
    """group_is_complete: a changed manifest row, another grouping, a brick's rows moved or a
    part file of another size -> redo."""
    root = _root(world, "multi")
    ga = group_of(resumed["b0"])
    plan = stage_4c.ExperimentPlan(
        E96, cfg4c(), os.path.join(root, "stamps", E96), os.path.join(root, "metrics", E96),
        os.path.join(root, "bricks", E96), resume=True)
    t = world["manifests"][E96]
    items = []
    for b in (resumed["b0"], resumed["b1"]):
        tasks = sorted((r for r in t.to_pylist() if r["brickname"] == b),
                       key=lambda r: r["task_id"])
        items.append((b, tasks))
    tenths = file_groups.cell_tenths(CELL)
    expect = stage_4c._marker_expect(plan, ga, items, tenths)
    assert stage_4c.group_is_complete(plan, ga, expect)[0]
    (b, tasks), rest = items[0], items[1:]
    changed = [(b, [dict(tasks[0], theta_e_arcsec=tasks[0]["theta_e_arcsec"] + 1e-9)]
                + tasks[1:])] + rest
    assert not stage_4c.group_is_complete(
        plan, ga, stage_4c._marker_expect(plan, ga, changed, tenths))[0]
    assert not stage_4c.group_is_complete(
        plan, ga, stage_4c._marker_expect(plan, ga, items, 10))[0]          # 1-deg cells
    assert not stage_4c.group_is_complete(plan, ga, stage_4c._marker_expect(
        plan, ga, [(items[0][0], items[0][1] + items[1][1])], tenths))[0]   # rows moved
    doc = json.load(open(plan.marker_uri(ga)))
    rel = next(iter(doc["files"]["stamps"]))
    path = os.path.join(plan.stamps_uri, rel)
    with open(path, "ab") as f:
        f.write(b"x")
    assert not stage_4c.group_is_complete(plan, ga, expect)[0]
