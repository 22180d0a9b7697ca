"""Stage 4a end to end on local[2] Spark (session `spark` fixture) over a synthetic sky patch.

The patch: 16 x 16 DR10-like bricks (synthetic_survey.grid_brick, full-size bounds, ~4 x 4 deg
around RA 125, Dec +10) written as a survey-bricks table, and a parent catalogue of 6 galaxies
per brick inside each brick's unique area, plus bad rows (NaN, out of footprint, unknown brick,
non-positive flux) and duplicated targets.  HEALPix nside 32 (1.8 deg cells) so the patch
spans several cells and all three splits.
"""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from injection_pipeline import manifests as mf
from injection_pipeline import synthetic_survey as ss
from injection_pipeline.stages import stage_4a

PER_BRICK = 6
N_TRAIN = 1500
EXPERIMENTS = ["debug_stamp64_bandsgrz_gridgrid_small", "grid_stamp96_bandsgrz_gridgrid_medium",
               "train_stamp64_bandsgrz_gridgrid_small"]
BAD_ROWS = {"nonfinite_radec": 2, "outside_brick_bounds": 2, "brick_not_in_bricks_table": 1,
            "bad_flux_r": 1, "duplicate_target": 3}


def make_patch(root: str, n: int = 16, seed: int = 0):
    """survey-bricks.fits.gz + cat.parquet (+ bad rows); returns (specs, catalogue DataFrame)."""
    specs = [ss.grid_brick(400 + i, 500 + j) for i in range(n) for j in range(n)]
    ss.write_survey_bricks(os.path.join(root, "survey-bricks.fits.gz"), specs)
    rng = np.random.default_rng(seed)
    rows = []
    for s in specs:
        w = (s.ra2 - s.ra1) % 360
        for k in range(PER_BRICK):
            rows.append((s.brickname, k, (s.ra1 + w * rng.uniform(0.01, 0.99)) % 360,
                         s.dec1 + (s.dec2 - s.dec1) * rng.uniform(0.01, 0.99),
                         10 ** ((22.5 - rng.uniform(18.5, 20.5)) / 2.5)))
    cat = pd.DataFrame(rows, columns=["brickname", "objid", "ra", "dec", "flux_r"])
    cat["type"] = "DEV"
    b0 = specs[0]
    bad = [(b0.brickname, 100, np.nan, b0.dec, 10.0), (b0.brickname, 101, b0.ra, np.inf, 10.0),
           (b0.brickname, 102, b0.ra + 1.0, b0.dec, 10.0),          # in another brick's area
           (b0.brickname, 103, b0.ra, b0.dec + 0.5, 10.0),
           ("0001p000", 0, 0.05, 0.05, 10.0),                        # not in survey-bricks
           (b0.brickname, 104, b0.ra, b0.dec, 0.0)]
    bad = pd.DataFrame(bad, columns=cat.columns[:5]).assign(type="DEV")
    dups = cat.iloc[[0, 1, 1]]                                      # 3 extra copies
    full = pd.concat([cat, bad, dups], ignore_index=True)
    full["objid"] = full["objid"].astype(np.int32)
    full["flux_r"] = full["flux_r"].astype(np.float32)
    pq.write_table(pa.Table.from_pandas(full.sample(frac=1.0, random_state=1),
                                        preserve_index=False),
                   os.path.join(root, "cat.parquet"))
    return specs, cat


def small_config(guard_band: bool = True, lens_model: str = "independent") -> mf.ManifestConfig:
    """The mechanics tests use the independent model (exact row counts per split); the
    conditioned model's accounting has its own tests (test_stage_4a_conditioned.py)."""
    return mf.load_config(experiments=EXPERIMENTS, overrides={
        "healpix_nside": 32, "guard_band": guard_band, "n_per_config.grid": 3,
        "n_total_train_per_split": N_TRAIN, "lens_model.train": lens_model})


@pytest.fixture(scope="module")
def patch(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("patch4a"))
    specs, cat = make_patch(root)
    return {"root": root, "specs": specs, "cat": cat,
            "catalogue": os.path.join(root, "cat.parquet"),
            "bricks": os.path.join(root, "survey-bricks.fits.gz")}


@pytest.fixture(scope="module")
def run_a(spark, patch):
    cfg = small_config()
    out = os.path.join(patch["root"], "out_a")
    summaries = stage_4a.run_stage_4a(spark, cfg, catalogue=patch["catalogue"],
                                      survey_bricks=patch["bricks"], out=out, variant="v1")
    root = os.path.join(out, "phase4a", "v1")
    man = {e: pd.read_parquet(os.path.join(root, "manifests", e)) for e in EXPERIMENTS}
    return {"cfg": cfg, "summaries": summaries, "root": root, "man": man}


def test_schema_exact(run_a):
    expected = mf.manifest_schema()
    for e in EXPERIMENTS:
        sch = pq.read_schema(next(
            os.path.join(run_a["root"], "manifests", e, f)
            for f in sorted(os.listdir(os.path.join(run_a["root"], "manifests", e)))
            if f.endswith(".parquet")))
        assert sch.names == expected.names
        assert [f.type for f in sch] == [f.type for f in expected], e
        mf.validate_manifest(pa.Table.from_pandas(run_a["man"][e], preserve_index=False)
                             .select(expected.names).cast(expected))


def test_counts_per_experiment_and_summary_from_parquet(run_a, patch):
    cfg = run_a["cfg"]
    s = run_a["summaries"]
    n_valid = s[EXPERIMENTS[0]]["input"]["valid_targets"]
    for e in EXPERIMENTS:
        df, exp, su = run_a["man"][e], cfg.experiment(e), s[e]
        inj, ctl = df[df.is_control == 0], df[df.is_control == 1]
        if exp.sampling == "grid":
            assert len(inj) == exp.n_per_config * exp.grid.n_points() * exp.replicates
        else:
            per_split = df.groupby("split").size()
            assert (per_split == N_TRAIN).all() and len(per_split) == 3
        assert su["rows_total"] == len(df) and su["controls"] == len(ctl)
        assert su["injections"] == len(inj) and su["bricks_touched"] == df.brickname.nunique()
        for sp, d in su["rows_by_split"].items():
            assert d["total"] == (df.split == sp).sum()
            assert d["controls"] == ((df.split == sp) & (df.is_control == 1)).sum()
        on_disk = json.load(open(os.path.join(run_a["root"], "summaries", f"{e}.json")))
        assert on_disk["rows_total"] == len(df) and on_disk["config_sha"] == df.config_sha.iloc[0]
        bricks = open(os.path.join(run_a["root"], "bricks", f"{e}.txt")).read().split()
        assert bricks == sorted(df.brickname.unique())
        assert df.task_id.is_unique and df.task_seed64.is_unique
    union = set().union(*(set(m.brickname) for m in run_a["man"].values()))
    assert open(os.path.join(run_a["root"], "bricks.txt")).read().split() == sorted(union)
    # input accounting: every catalogue row is either a valid target or excluded with a reason
    inp = s[EXPERIMENTS[0]]["input"]
    assert inp["rows_in"] == len(patch["cat"]) + sum(BAD_ROWS.values())
    assert inp["rows_in"] == n_valid + sum(inp["excluded_by_reason"].values())
    for reason, k in BAD_ROWS.items():
        assert inp["excluded_by_reason"][reason] == k, reason
    assert inp["excluded_by_reason"]["guard_band"] > 0
    assert n_valid == len(patch["cat"]) - inp["excluded_by_reason"]["guard_band"]


def test_dedup_one_target_per_objid_brick(run_a):
    for e in EXPERIMENTS:
        df = run_a["man"][e]
        # a duplicated catalogue row (objid 0/1 of the first brick) never doubles its tasks
        key = df.groupby(["brickname", "objid", "point_index", "replicate", "is_control"],
                         dropna=False).size()
        assert (key == 1).all(), e


def test_spatial_disjointness_and_guard_band(run_a, patch):
    cfg = run_a["cfg"]
    specs = patch["specs"]
    split = mf.assign_brick_splits(np.array([s.ra for s in specs]), np.array([s.dec for s in specs]),
                                   cfg.split)
    by_brick = dict(zip([s.brickname for s in specs], zip(split["split"], split["guard"])))
    allrows = pd.concat(run_a["man"].values())
    assert allrows.groupby("brickname").split.nunique().max() == 1
    assert allrows.groupby("healpix_cell").split.nunique().max() == 1
    assert set(allrows.split) == {"train", "val", "test"}
    assert all(by_brick[b][0] == s for b, s in
               allrows[["brickname", "split"]].drop_duplicates().itertuples(index=False))
    assert not any(by_brick[b][1] for b in allrows.brickname.unique())   # no guard-band brick


def test_paired_controls_share_the_cutout(run_a):
    for e in ("grid_stamp96_bandsgrz_gridgrid_medium", "train_stamp64_bandsgrz_gridgrid_small"):
        df = run_a["man"][e]
        ctl, inj = df[df.is_control == 1], df[df.is_control == 0]
        assert len(ctl) > 0 and ctl.pair_id.notna().all()
        m = ctl.merge(inj, left_on="pair_id", right_on="task_id", suffixes=("", "_i"))
        assert len(m) == len(ctl)
        for c in ("brickname", "objid", "ra", "dec", "stamp_size_px", "split"):
            assert (m[c] == m[c + "_i"]).all()
        assert ctl.theta_e_arcsec.isna().all() and inj.theta_e_arcsec.notna().all()
    tr = run_a["man"]["train_stamp64_bandsgrz_gridgrid_small"]
    n = len(tr)
    assert abs(tr.is_control.mean() - 0.5) <= 3 * np.sqrt(0.25 / n)


def test_frozen_columns_bit_identical_across_partitionings(spark, run_a, patch, tmp_path):
    """Same config, catalogue split into 7 files in another order, other shuffle partitions,
    tiny output files: every column of every row is bit-identical."""
    cat = pd.read_parquet(patch["catalogue"]).sample(frac=1.0, random_state=99)
    cdir = tmp_path / "cat7"
    cdir.mkdir()
    for i, part in enumerate(np.array_split(cat, 7)):
        pq.write_table(pa.Table.from_pandas(part, preserve_index=False), cdir / f"p{i}.parquet")
    old = spark.conf.get("spark.sql.shuffle.partitions")
    spark.conf.set("spark.sql.shuffle.partitions", "7")
    try:
        stage_4a.run_stage_4a(spark, run_a["cfg"], catalogue=str(cdir),
                              survey_bricks=patch["bricks"], out=str(tmp_path / "out_b"),
                              variant="v1", rows_per_file=1000)
    finally:
        spark.conf.set("spark.sql.shuffle.partitions", old)
    for e in EXPERIMENTS:
        path_b = tmp_path / "out_b" / "phase4a" / "v1" / "manifests" / e
        assert len([f for f in os.listdir(path_b) if f.endswith(".parquet")]) > 1 or \
            e.startswith("debug")
        a = run_a["man"][e].sort_values("task_id").reset_index(drop=True)
        b = pd.read_parquet(path_b).sort_values("task_id").reset_index(drop=True)
        pd.testing.assert_frame_equal(a, b, check_exact=True)
        # files hold whole bricks, sorted by brick
        per_file = [pd.read_parquet(path_b / f, columns=["brickname"]).brickname
                    for f in sorted(os.listdir(path_b)) if f.endswith(".parquet")]
        seen: set = set()
        for bn in per_file:
            assert bn.is_monotonic_increasing and not (set(bn) & seen)
            seen |= set(bn)


def test_missing_column_and_task_guard(spark, patch, tmp_path):
    cat = pd.read_parquet(patch["catalogue"]).drop(columns=["flux_r"])
    bad = tmp_path / "nofluxr.parquet"
    cat.to_parquet(bad)
    with pytest.raises(ValueError, match=r"nofluxr\.parquet: parent catalogue lacks required "
                                         r"column\(s\) \['flux_r'\]"):
        stage_4a.run_stage_4a(spark, small_config(), catalogue=str(bad),
                              survey_bricks=patch["bricks"], out=str(tmp_path / "o"))
    cfg = dataclasses.replace(small_config(), max_total_tasks=1000)
    with pytest.raises(mf.TaskCountExceeded, match="--max-total-tasks 1,000"):
        stage_4a.run_stage_4a(spark, cfg, catalogue=patch["catalogue"],
                              survey_bricks=patch["bricks"], out=str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()      # refused before writing anything


def test_cli_help_and_dispatch(capsys):
    import spark_phase4_pipeline as drv

    with pytest.raises(SystemExit) as exc:
        drv.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ("4a", "--master", "--out", "--config", "--verbose", "--catalogue",
                 "--survey-bricks", "--max-total-tasks", "--split-seed", "--replicates",
                 "--control-pairing", "--n-total-train-per-split", "(default: local[*])",
                 "--rows-per-file", "rows_per_file)"):
        assert flag in text, flag
    assert mf.load_config().rows_per_file == 500_000, "conf/experiments.toml default"
    args = drv.build_parser().parse_args(["4a", "--catalogue", "c", "--survey-bricks", "b",
                                          "--max-total-tasks", "10"])
    assert args._stage_module == "injection_pipeline.stages.stage_4a"
    with pytest.raises(mf.TaskCountExceeded):   # refuses before starting Spark
        stage_4a.run(args)
