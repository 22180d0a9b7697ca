"""Stage 4c end to end on local[2] Spark over a synthetic DR10 survey, cache on moto S3 and local.

Survey: 5 small (400 px) bricks; brick 1 without maskbits and with NaN invvar blocks, brick 2
without psfsize maps, brick 3 with a corrupt invvar-g file, brick 4 absent from the cache.
The cache is built directly (the 10 files of each brick + a ``_SUCCESS`` JSON) on a local
directory and on moto S3.  The manifest is the debug experiment expanded with stage 4a's own
pure functions (paired controls at 50 %), written under ``manifests_filtered``.

Runs: A = S3 cache, 3 partitions (run_stage_4c); B = local cache, 1 partition; C = the CLI
(spark_phase4_pipeline.py 4c) with --metrics-only and the default --manifests-subdir.
"""
from __future__ import annotations

import json
import math
import os
import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from injection_pipeline import dr10, file_groups
from injection_pipeline import injection as inj
from injection_pipeline import manifests as mf
from injection_pipeline import stamps_io
from injection_pipeline import synthetic_survey as ss
from injection_pipeline.stages import stage_4c
from lensing import (MASKBITS_WISE, LensModel, SersicSource, mag_to_nMgy, render_lensed_arc,
                     stamp_metrics)

EXP = "debug_stamp64_bandsgrz_gridgrid_small"
VARIANT = "v1"
FAULTS = ["no_maskbits:1", "nan_invvar:1", "no_psfsize:2", "corrupt:3", "absent:4"]
TABLE_PSF = {2: {"g": 1.45, "r": 1.25, "z": 0.0}}     # brick index -> survey-bricks psfsize


# --------------------------------------------------------------------------- helpers
def build_manifest(desc, cfg: mf.ManifestConfig, exp: mf.Experiment) -> pa.Table:
    """The experiment's manifest from the synthetic catalogue (stage 4a's pure functions)."""
    bricks = dr10.read_survey_bricks(desc.survey_bricks)
    look = mf.brick_lookup(bricks, cfg.split)
    cls = mf.classify_targets(pd.read_parquet(desc.catalogue), look)
    valid = cls[cls["reason"].isna()].sort_values(["target_key", "brickname", "objid"])
    valid = valid.reset_index(drop=True)
    valid["rank_global"] = np.arange(len(valid))
    valid["rank_split"] = valid.groupby("split").cumcount()
    table = mf.expand_targets({k: valid[k].to_numpy() for k in mf.TARGET_COLUMNS}, exp, cfg,
                              len(valid), valid.groupby("split").size().to_dict())
    mf.validate_manifest(table)
    return table


def write_survey_bricks_with_psf(desc, path):
    """survey-bricks with psfsize_g/r/z columns (NaN except for the bricks of TABLE_PSF)."""
    from astropy.io import fits

    with fits.open(desc.survey_bricks) as h:
        cols = h[1].columns
        n = len(h[1].data)
        names = [r.strip() for r in h[1].data["BRICKNAME"]]
        extra = []
        for b in "grz":
            v = np.full(n, np.nan, np.float32)
            for idx, psf in TABLE_PSF.items():
                v[names.index(desc.bricks[idx].spec.brickname)] = psf[b]
            extra.append(fits.Column(f"PSFSIZE_{b.upper()}", "E", array=v))
        fits.BinTableHDU.from_columns(cols + fits.ColDefs(extra)).writeto(path)


def read_metrics(path) -> pd.DataFrame:
    return pq.ParquetDataset(path).read().to_pandas().sort_values("task_id").reset_index(drop=True)


def cfg4c(**kw):
    return inj.InjectionConfig(code_version="test", **kw)


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def world(tmp_path_factory, moto_s3):
    root = tmp_path_factory.mktemp("stage4c")
    desc = ss.generate_survey(root / "survey", n_bricks=5, size="small", seed=11, faults=FAULTS)
    mcfg = mf.load_config(experiments=[EXP], overrides={
        "replicates": 1, "n_per_config.debug": 2, "control_frac.debug": 0.5})
    exp = mcfg.experiment(EXP)
    manifest = build_manifest(desc, mcfg, exp)
    out = str(root / "results")
    mdir = os.path.join(out, "phase4a", VARIANT, "manifests_filtered", EXP)
    os.makedirs(mdir)
    pq.write_table(manifest, os.path.join(mdir, "part-0.parquet"))
    sb = str(root / "survey-bricks-dr10-south.fits.gz")
    write_survey_bricks_with_psf(desc, sb)
    local_cache = str(root / "cache")
    ss.cache_survey(desc, local_cache, label="test")
    bucket = "cache4c"
    moto_s3.client().create_bucket(Bucket=bucket)
    s3_cache = f"s3://{bucket}/dr10cache"
    ss.cache_survey(desc, s3_cache, label="test")
    return dict(desc=desc, manifest=manifest, out=out, sb=sb, local_cache=local_cache,
                s3_cache=s3_cache, exp=exp)


def _run_4c(spark, world, cache: str, partitions: int, output_variant: str) -> dict:
    s = stage_4c.run_stage_4c(spark, cfg4c(), experiment_id=EXP, out=world["out"],
                              variant=VARIANT, cache=cache, survey_bricks=world["sb"],
                              partitions=partitions, output_variant=output_variant)
    root = os.path.join(world["out"], "phase4c", output_variant)
    return dict(summary=s, metrics=read_metrics(os.path.join(root, "metrics", EXP)),
                stamps_path=os.path.join(root, "stamps", EXP), root=root)


@pytest.fixture(scope="module")
def run_a(spark, world):
    return _run_4c(spark, world, world["s3_cache"], partitions=3, output_variant="A")


@pytest.fixture(scope="module")
def run_b(spark, world, run_a):
    # a stale stamps file of an earlier run at the same output path must not survive
    stale = os.path.join(world["out"], "phase4c", "B", "stamps", EXP, "split=train")
    os.makedirs(stale, exist_ok=True)
    with open(os.path.join(stale, "part-0000zzz.zstd.parquet"), "wb") as f:
        f.write(b"not parquet: an earlier run's file")
    return _run_4c(spark, world, world["local_cache"], partitions=1, output_variant="B")


def brick_of(world, idx):
    return world["desc"].bricks[idx].spec.brickname


# --------------------------------------------------------------------------- tests
def test_accounting_statuses_and_error_threshold(world, run_a):
    s, m = run_a["summary"], run_a["metrics"]
    n = world["manifest"].num_rows
    assert s["accounting"] == {"tasks_in_manifest": n, "rows_written": n,
                               "distinct_task_ids_written": n,
                               "manifest_tasks_missing_from_output": 0,
                               "output_tasks_not_in_manifest": 0, "exact": True,
                               "stamps_rows_written": n, "stamps_distinct_task_ids": n,
                               "stamps_exact": True}
    # counts in the summary are those of the written parquet
    assert len(m) == n and m["task_id"].is_unique
    assert s["by_status"] == m["status"].value_counts().sort_index().to_dict()
    assert set(m["task_id"]) == set(world["manifest"].column("task_id").to_pylist())
    by_brick = m.groupby("brickname")["status"].agg(lambda x: set(x))
    assert by_brick[brick_of(world, 4)] == {"missing_brick"}
    assert by_brick[brick_of(world, 3)] == {"corrupt_file"}
    assert "_SUCCESS" in m[m.brickname == brick_of(world, 4)]["status_reason"].iloc[0]
    assert "invvar-g" in m[m.brickname == brick_of(world, 3)]["status_reason"].iloc[0]
    assert "ok" in by_brick[brick_of(world, 0)]
    # > 1 % failed (missing/corrupt bricks) -> non-zero exit with the top reasons
    assert s["error_fraction"] > 0.01 and s["exit_code"] == stage_4c.EXIT_TOO_MANY_ERRORS
    assert {r["status"] for r in s["top_failure_reasons"]} == {"missing_brick", "corrupt_file"}
    written = json.loads(open(os.path.join(run_a["root"], "summaries", f"{EXP}.json")).read())
    assert written["accounting"]["exact"] and written["by_status"] == s["by_status"]
    # off_brick (primary-edge galaxy: a 64 px stamp cannot fit in a 400 px brick) is tolerated
    edge = world["desc"].bricks[0].roles.get("primary_edge")
    sel = m[(m.brickname == brick_of(world, 0)) & (m.objid == edge)]
    if len(sel):
        assert set(sel["status"]) == {"off_brick"}
        assert "never shifted" in sel["status_reason"].iloc[0]


def test_outputs_layout_schema_and_frozen_manifest_columns(world, run_a):
    m = run_a["metrics"]
    root = run_a["root"]
    for kind in ("stamps", "metrics"):
        d = os.path.join(root, kind, EXP)
        assert any(x.startswith("split=") for x in os.listdir(d))
        f = next(os.path.join(dp, x) for dp, _, fs in os.walk(d) for x in fs
                 if x.endswith(".parquet"))
        rg = pq.ParquetFile(f).metadata.row_group(0)
        comp = {rg.column(i).path_in_schema: rg.column(i).compression
                for i in range(rg.num_columns)}
        assert comp["task_id"] == "SNAPPY"       # scalar_compression default
        assert all(comp[c] == "ZSTD" for c in inj.STAMP_COLUMN_NAMES if c in comp)
        assert (kind == "stamps") == any(c in comp for c in inj.STAMP_COLUMN_NAMES)
    assert list(m.columns[:len(mf.MANIFEST_COLUMN_NAMES)]) == \
        [c for c in mf.MANIFEST_COLUMN_NAMES if c != "split"] or "split" in m.columns
    assert set(stage_4c.metrics_columns()) == set(m.columns)
    # stamps: written by the Python workers, one file per (file group, split), named by the
    # group (1-deg sky cells by default, file_groups); a _SUCCESS with the row count; no
    # temporaries
    sdir = os.path.join(root, "stamps", EXP)
    files = sorted(os.path.relpath(os.path.join(dp, x), sdir) for dp, _, fs in os.walk(sdir)
                   for x in fs)
    parts = [f for f in files if f != "_SUCCESS"]
    assert "_SUCCESS" in files and all(re.fullmatch(
        r"split=(train|val|test)/part-c10r[0-9]{4}[pm][0-9]{3}\.zstd\.parquet", f) for f in parts), files
    groups = {file_groups.group_tag(b, 10) for b in m["brickname"]}
    assert {f.split("part-")[1].split(".")[0] for f in parts} == groups
    assert json.loads(open(os.path.join(sdir, "_SUCCESS")).read())["rows"] == len(m)
    # within each file, rows are in (brickname, task_id) order, so a paired control (task id
    # '<injection>/ctl') is stored right after its injection: zstd then stores their shared
    # cutout once (docs/performance.md: ~1.9x fewer stamp bytes than any other order)
    n_pairs = 0
    for f in parts:
        t = pq.read_table(os.path.join(sdir, f), columns=["brickname", "task_id", "pair_id",
                                                          "is_control"])
        bricks, ids, pair, ctl = (t.column(c).to_pylist() for c in (
            "brickname", "task_id", "pair_id", "is_control"))
        assert list(zip(bricks, ids)) == sorted(zip(bricks, ids)), f
        for k in range(len(ids)):
            if ctl[k] and pair[k] is not None:
                assert k > 0 and ids[k - 1] == pair[k] and ids[k] == pair[k] + "/ctl", (f, k)
                n_pairs += 1
    assert n_pairs == int(((m["is_control"] == 1) & m["pair_id"].notna()).sum()) > 0
    # the stamps rows carry exactly the metrics rows (every scalar column)
    sm = pq.ParquetDataset(sdir).read(columns=stage_4c.metrics_columns()).to_pandas()
    sm = sm.sort_values("task_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(sm[list(m.columns)].astype(object),
                                  m.astype(object), check_categorical=False)
    # requirement 5: every manifest column passes through unchanged (nothing re-drawn)
    man = world["manifest"].to_pandas().sort_values("task_id").reset_index(drop=True)
    for c in mf.MANIFEST_COLUMN_NAMES:
        a, b = man[c], m[c]
        if a.dtype.kind == "f":
            assert np.array_equal(a.to_numpy(), b.to_numpy(), equal_nan=True), c
        else:
            assert a.astype(object).where(a.notna(), None).tolist() == \
                b.astype(object).where(b.notna(), None).tolist(), c


def test_physics_requirements_on_written_stamps(world, run_a):
    m = run_a["metrics"]
    st = stamps_io.load_stamps(run_a["stamps_path"], columns=stamps_io.STAMP_NAMES)
    meta = st.meta.to_pandas()
    assert list(meta["task_id"]) == sorted(m[m.status == "ok"]["task_id"])
    assert st.image.shape[1:] == (3, 64, 64) and st.image.dtype == np.float32
    ok = m[m.status == "ok"].set_index("task_id")
    injs = np.flatnonzero(meta["is_control"].to_numpy() == 0)
    ctrls = np.flatnonzero(meta["is_control"].to_numpy() == 1)
    assert len(injs) > 20 and len(ctrls) > 20
    # 12: magnifications non-null on injections, null on controls; 1-2: flux = mu x source flux
    for i in injs:
        r = ok.loc[meta["task_id"][i]]
        assert r["mu_total"] > 1 and math.isfinite(r["mu_point"]) and r["n_images"] >= 1
        assert not r["arc_shot_noise"]          # debug tier: auto mode adds no shot noise
        for k, b in enumerate("grz"):
            expect = r["mu_total"] * mag_to_nMgy(r[f"src_mag_{b}"])
            assert st.arc[i, k].astype(np.float64).sum() == pytest.approx(expect, rel=3e-3)
    # controls: no arc; paired control pixels = injection's original (image - arc)
    for i in ctrls:
        assert not np.any(st.arc[i]) and ok.loc[meta["task_id"][i]]["mu_total"] != \
            ok.loc[meta["task_id"][i]]["mu_total"]
    pairs = meta[meta["pair_id"].notna()].groupby("pair_id").groups
    checked = 0
    for pid, idx in pairs.items():
        if len(idx) == 2:
            ci, ii = sorted(idx, key=lambda j: meta["is_control"][j], reverse=True)
            diff = st.image[ii].astype(np.float64) - st.image[ci] - st.arc[ii]
            bound = 0.5 * (np.spacing(np.abs(st.image[ii])) + np.spacing(np.abs(st.arc[ii])))
            assert np.all(np.abs(diff) <= bound)
            checked += 1
    assert checked > 10
    # 3, 4, 6: a direct lensing render of the manifest parameters gives the stored arc
    for i in injs[:4]:
        r = ok.loc[meta["task_id"][i]]
        lens = LensModel(r["theta_e_arcsec"], r["lens_q"], r["lens_phi_rad"], r["lens_x_arcsec"],
                         r["lens_y_arcsec"], r["shear"] * math.cos(2 * r["shear_phi_rad"]),
                         r["shear"] * math.sin(2 * r["shear_phi_rad"]))
        src = SersicSource(r["src_x_arcsec"], r["src_y_arcsec"], r["src_reff_arcsec"],
                           r["src_n"], r["src_q"], r["src_phi_rad"])
        d = render_lensed_arc(lens, src, {b: r[f"src_mag_{b}"] for b in "grz"},
                              {b: r[f"psf_fwhm_used_{b}"] for b in "grz"}, n_pix=64)
        for k, b in enumerate("grz"):
            assert np.array_equal(st.arc[i, k], d.images[b].astype(np.float32))
        assert len({r["psf_fwhm_used_g"], r["psf_fwhm_used_r"], r["psf_fwhm_used_z"]}) == 3
    # 8-10: metrics recomputed from the stored planes (maskbits, invvar, WISE, bad pixels)
    for i in np.concatenate([injs[:6], ctrls[:2]]):
        r = ok.loc[meta["task_id"][i]]
        if not r["maskbits_available"]:
            continue
        met = stamp_metrics(st.arc[i], st.invvar[i], st.maskbits[i])
        for k in ("arc_snr", "arc_snr_g", "bad_pixel_frac", "wise_brightmask_frac", "n_good_pix",
                  "arc_snr_region", "arc_snr_region_r"):
            assert r[k] == pytest.approx(met[k], rel=1e-5, abs=1e-12), k
        assert r["wise_brightmask_frac"] == pytest.approx(
            np.mean((st.maskbits[i] & MASKBITS_WISE) != 0))
    # 11: provenance
    assert ok["psf_model"].eq("gaussian").all() and ok["code_version"].eq("test").all()
    assert ok["injection_config_sha"].nunique() == 1 and ok["cache_marker_sha"].notna().all()


def test_psf_fallbacks_maskbits_and_nan_edge_cases(world, run_a):
    m = run_a["metrics"]
    ok = m[m.status == "ok"]
    b1, b2 = brick_of(world, 1), brick_of(world, 2)
    # brick 2: no psfsize maps -> bricks table (g, r) and configured default (z: table has 0)
    r2 = ok[ok.brickname == b2]
    assert len(r2) and set(r2["psf_source_g"]) == {"bricks_table"}
    assert np.allclose(r2["psf_fwhm_used_g"], 1.45)
    assert set(r2["psf_source_z"]) == {"default"} and set(r2["psf_fwhm_used_z"]) == {1.2}
    assert r2["psfsize_centre_g"].isna().all() and r2["psf_note"].str.contains("absent").all()
    # elsewhere the centre value; 0 in the zero-coverage strip -> brick median
    r0 = ok[~ok.brickname.isin([b2])]
    assert (r0[["psf_source_g", "psf_source_r", "psf_source_z"]].isin(
        ["centre", "brick_median"])).all().all()
    zc = ok[(ok[[f"psf_source_{b}" for b in "grz"]] == "brick_median").any(axis=1)]
    for _, r in zc.iterrows():
        b = next(x for x in "grz" if r[f"psf_source_{x}"] == "brick_median")
        assert r[f"psfsize_centre_{b}"] == 0.0 and r[f"psf_fwhm_used_{b}"] > 0.5
    # brick 1: maskbits missing -> injected, mask metrics null, reason says why
    r1 = ok[ok.brickname == b1]
    assert len(r1) and (~r1["maskbits_available"]).all()
    assert r1["status_reason"].str.contains("maskbits unavailable").all()
    assert r1["arc_snr"].isna().all() and r1["bad_pixel_frac"].isna().all()
    assert r1["arc_snr_region"].isna().all() and r1["arc_region_npix_g"].isna().all()
    assert (r1[r1.is_control == 0]["mu_total"] > 1).all()
    # NaN invvar blocks of brick 1: counted exactly where stamps overlap them
    rec = world["desc"].bricks[1]
    for _, r in r1.iterrows():
        for blk in rec.nan_invvar:
            ox = max(0, min(r.stamp_x0 + 64, blk["x1"]) - max(r.stamp_x0, blk["x0"]))
            oy = max(0, min(r.stamp_y0 + 64, blk["y1"]) - max(r.stamp_y0, blk["y0"]))
            assert r[f"n_nonfinite_invvar_{blk['band']}"] == ox * oy
    st = stamps_io.load_stamps(run_a["stamps_path"], columns=["image", "arc", "invvar"],
                               filter=None)
    assert all(np.isfinite(getattr(st, p)).all() for p in ("image", "arc", "invvar"))


def test_bit_identical_across_partitioning_and_cache_backends(world, run_a, run_b):
    a, b = run_a["metrics"].copy(), run_b["metrics"].copy()
    assert not os.path.exists(os.path.join(run_b["stamps_path"], "split=train",
                                           "part-0000zzz.zstd.parquet"))   # stale file cleared
    for df, root in ((a, world["s3_cache"]), (b, world["local_cache"])):   # reasons name URIs
        df["status_reason"] = df["status_reason"].str.replace(root, "<cache>", regex=False)
    pd.testing.assert_frame_equal(a, b)
    sa = stamps_io.load_stamps(run_a["stamps_path"], columns=stamps_io.STAMP_NAMES, status=None)
    sb = stamps_io.load_stamps(run_b["stamps_path"], columns=stamps_io.STAMP_NAMES, status=None)
    assert sa.meta.column("task_id").to_pylist() == sb.meta.column("task_id").to_pylist()
    for p in stamps_io.STAMP_NAMES:
        x, y = getattr(sa, p), getattr(sb, p)
        assert x.tobytes() == y.tobytes(), p
    assert run_a["summary"]["partitions"] == 3 and run_b["summary"]["partitions"] == 1


def test_cli_metrics_only_default_subdir_and_exit_code(spark, world, run_a, capsys):
    import spark_phase4_pipeline as drv

    code = drv.main(["4c", "--master", "local[2]", "--out", world["out"], "--variant", VARIANT,
                     "--experiment-id", EXP, "--cache", world["local_cache"],
                     "--survey-bricks", world["sb"], "--metrics-only"])
    assert code == stage_4c.EXIT_TOO_MANY_ERRORS                 # missing/corrupt bricks
    out = capsys.readouterr().out
    assert "task accounting EXACT" in out and "missing_brick" in out
    root = os.path.join(world["out"], "phase4c", VARIANT)
    assert not os.path.exists(os.path.join(root, "stamps", EXP))
    m = read_metrics(os.path.join(root, "metrics", EXP))
    cols = [c for c in m.columns if c not in ("code_version", "status_reason")]  # URIs differ
    ref = run_a["metrics"]
    pd.testing.assert_frame_equal(m[cols], ref[cols])            # same numbers, no stamps
    s = json.loads(open(os.path.join(root, "summaries", f"{EXP}.json")).read())
    assert s["manifest_path"].endswith(f"phase4a/{VARIANT}/manifests_filtered/{EXP}")
    assert s["stamps_stored"] is False
    # threshold high enough -> exit 0
    code = drv.main(["4c", "--master", "local[2]", "--out", world["out"], "--variant", VARIANT,
                     "--experiment-id", EXP, "--cache", world["local_cache"],
                     "--metrics-only", "--error-threshold", "0.9", "--off-brick-threshold", "1"])
    assert code == 0
    # several experiments: each succeeds or fails on its own (an absent manifest does not
    # stop the others), and the exit code says that one failed
    os.remove(os.path.join(root, "summaries", f"{EXP}.json"))
    code = drv.main(["4c", "--master", "local[2]", "--out", world["out"], "--variant", VARIANT,
                     "--experiment-id", f"no_such_experiment,{EXP}", "--cache",
                     world["local_cache"], "--metrics-only", "--error-threshold", "0.9",
                     "--off-brick-threshold", "1"])
    assert code == stage_4c.EXIT_FAILED
    assert os.path.exists(os.path.join(root, "summaries", f"{EXP}.json"))   # still ran
    assert not os.path.exists(os.path.join(root, "summaries", "no_such_experiment.json"))


def test_cache_default_is_the_one_4b_writes(tmp_path):
    """4c without --cache reads the cache 4b writes by default (<out>/coadd_cache)."""
    from spark_phase4_pipeline import build_parser
    from injection_pipeline.stages import stage_4b

    out = str(tmp_path / "res")
    a4c = build_parser().parse_args(["4c", "--experiment-id", EXP, "--out", out])
    a4b = build_parser().parse_args(["4b", "--out", out])
    assert stage_4c._cache_root(a4c) == stage_4b.settings_from_args(a4b)["cache"]
    explicit = build_parser().parse_args(["4c", "--experiment-id", EXP, "--out", out,
                                          "--cache", "s3://b/c"])
    assert stage_4c._cache_root(explicit) == "s3://b/c"


def test_region_snr_settings_from_conf_and_cli(tmp_path):
    """[metrics] arc_region_k / arc_region_bands of conf/injection.toml, overridden by
    --arc-region-k / --arc-region-bands; invalid values are refused."""
    from spark_phase4_pipeline import build_parser

    base = ["4c", "--experiment-id", EXP, "--out", str(tmp_path)]
    conf = stage_4c.load_conf(None)
    assert conf["metrics"] == {"arc_region_k": 1.0, "arc_region_bands": "grz"}
    cfg = stage_4c.config_from_args(build_parser().parse_args(base), conf)
    assert (cfg.arc_region_k, cfg.arc_region_bands) == (1.0, "grz")
    cli = build_parser().parse_args(base + ["--arc-region-k", "0.5", "--arc-region-bands", "rz"])
    cfg2 = stage_4c.config_from_args(cli, conf)
    assert (cfg2.arc_region_k, cfg2.arc_region_bands) == (0.5, "rz")
    assert cfg2.config_sha() != cfg.config_sha()
    conf3 = dict(conf, metrics={"arc_region_k": 2})
    assert stage_4c.config_from_args(build_parser().parse_args(base), conf3).arc_region_k == 2.0
    for bad in (["--arc-region-k", "-1"], ["--arc-region-bands", "gx"]):
        with pytest.raises(ValueError):
            stage_4c.config_from_args(build_parser().parse_args(base + bad), conf)


def test_shot_noise_and_image_settings_from_conf_and_cli(tmp_path):
    """[shot_noise] / [images] of conf/injection.toml, --arc-shot-noise overrides the mode;
    every value reaches InjectionConfig and its hash."""
    from spark_phase4_pipeline import build_parser

    base = ["4c", "--experiment-id", EXP, "--out", str(tmp_path)]
    conf = stage_4c.load_conf(None)
    cfg = stage_4c.config_from_args(build_parser().parse_args(base), conf)
    assert cfg.shot_noise == "auto" and cfg.shot_noise_tiers == ("train",)
    assert dict(cfg.shot_zpt) == {"g": 25.001, "r": 25.209, "z": 24.875}
    assert dict(cfg.shot_exptime) == {"g": 90.0, "r": 90.0, "z": 90.0}
    assert dict(cfg.shot_nexp) == {"g": 3.0, "r": 3.0, "z": 3.0}
    assert (cfg.mu_point_factor, cfg.resolved_b_fac, cfg.resolved_r_fac) == (1.1, 2.0, 2.0)
    on = stage_4c.config_from_args(build_parser().parse_args(base + ["--arc-shot-noise", "on"]),
                                   conf)
    assert on.shot_noise == "on" and on.config_sha() != cfg.config_sha()
    conf2 = dict(conf, shot_noise=dict(conf["shot_noise"], nexp={"g": 8, "r": 8, "z": 8}))
    cfg2 = stage_4c.config_from_args(build_parser().parse_args(base), conf2)
    assert cfg2.shot_gain("r") == pytest.approx(8 / 3 * cfg.shot_gain("r"))
    assert cfg2.config_sha() != cfg.config_sha()
    with pytest.raises(SystemExit):
        build_parser().parse_args(base + ["--arc-shot-noise", "maybe"])


def test_bricks_psf_table_is_compact_and_exact():
    """The broadcast bricks_table level: every listed brick found, unknown ones None, NaN ->
    None, case and whitespace of names ignored, duplicates keep the first row."""
    import numpy as np

    from injection_pipeline.psf_fallback import BricksPSFTable
    names = ["1126p222", "0001m005", "3599p300", "1126P222 "]
    psf = [[1.4, 1.2, np.nan], [1.6, 1.3, 1.1], [0.0, 1.25, 1.05], [9.0, 9.0, 9.0]]
    t = BricksPSFTable(names, psf, ("g", "r", "z"))
    assert len(t) == 3
    assert t.get("1126p222") == {"g": pytest.approx(1.4), "r": pytest.approx(1.2), "z": None}
    assert t.get("0001M005") == {"g": pytest.approx(1.6), "r": pytest.approx(1.3),
                                 "z": pytest.approx(1.1)}
    assert t.get("3599p300")["g"] == 0.0          # 0 is passed on: resolve_fwhm rejects it
    assert t.get("9999p999") is None and t.get("") is None
    big = BricksPSFTable([f"{i:04d}p{i % 900:03d}" for i in range(350_000)],
                         np.full((350_000, 3), 1.3), ("g", "r", "z"))
    import pickle
    assert len(pickle.dumps(big)) < 12_000_000    # broadcastable: ~10 MB for DR10 South
    assert big.get("0123p123") == {"g": pytest.approx(1.3), "r": pytest.approx(1.3),
                                   "z": pytest.approx(1.3)}
