"""The main job end to end: ``spark_phase4_pipeline.py demo`` as a subprocess of the driver
(its own JVM, HTTP and moto servers), then an assertion on every output artefact.

Smaller than the default (conf/demo.toml) so it stays well under 90 s: 6 bricks of 400 px
(survey seed 2: present bricks in train, val and test cells; the last brick absent upstream),
debug (48 points x 2 targets) and train (1,000 candidate rows per split of the conditioned
lens model: a few % accepted) at stamp 64.
"""
from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest

from injection_pipeline import dr10, stamps_io
from injection_pipeline import injection as inj
from injection_pipeline.stages.stage_demo import port_is_open

REPO = Path(__file__).resolve().parents[1]
DEBUG = "debug_stamp64_bandsgrz_gridgrid_small"
TRAIN = "train_stamp64_bandsgrz_gridgrid_small"
EXPS = (DEBUG, TRAIN)
N_BRICKS, N_PER_CONFIG, REPLICATES, N_TRAIN = 6, 2, 1, 1000
VARIANT = "e2e"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

pytestmark = [pytest.mark.slow]


def _table(path, columns=None):
    return ds.dataset(str(path), format="parquet", partitioning="hive").to_table(columns=columns)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "results"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["PYTHONHASHSEED"] = "0"
    cmd = [sys.executable, str(REPO / "spark_phase4_pipeline.py"), "demo", "--out", str(out),
           "--master", "local[2]", "--variant", VARIANT, "--n-bricks", str(N_BRICKS),
           "--survey-seed", "2", "--n-per-config-debug", str(N_PER_CONFIG),
           "--replicates", str(REPLICATES), "--n-total-train-per-split", str(N_TRAIN),
           "--n-gallery", "4"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    seconds = time.perf_counter() - t0
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    run = json.loads((out / "demo_run.json").read_text())
    return {"out": out, "stdout": proc.stdout, "stderr": proc.stderr, "log": log, "run": run,
            "seconds": seconds}


@pytest.fixture(scope="module")
def layout(demo):
    """Bricks of the synthetic survey and those absent upstream (no directory: 404)."""
    out = demo["out"]
    root = out / "dr10_synthetic"
    bricks = sorted(str(b) for b in dr10.read_survey_bricks(root / "survey-bricks.fits.gz")
                    ["brickname"])
    present = sorted(b for b in bricks if (root / "south" / "coadd" / b[:3] / b).is_dir())
    absent = sorted(set(bricks) - set(present))
    p4a = out / "phase4a" / VARIANT
    return {"bricks": bricks, "present": present, "absent": absent, "p4a": p4a,
            "p4c": out / "phase4c" / VARIANT}


def test_run_record_logs_and_servers_stopped(demo):
    run, log = demo["run"], demo["log"]
    assert run["exit_code"] == 0 and run["error"] is None
    assert run["stage_exit_codes"] == {"4a": 0, "4b": 0, "4c": 0, "finder": 0, "4d": 0}
    assert all(run["checks"]["session_reused_by"].values())
    assert run["checks"]["executor_env_endpoint"] == run["servers"]["moto_s3"]["url"]
    for name in ("http", "moto_s3"):
        s = run["servers"][name]
        assert run["checks"]["servers_stopped"][name] is True
        assert not port_is_open(s["host"], s["port"]), f"{name} port {s['port']} still open"
    # readable logs: stage banners, progress with rates, the summary table, where things are
    for text in ("demo: 1/8 synthetic", "phase 4 stage 4a", "phase 4 stage 4b",
                 "phase 4 stage 4c", "4b progress:", "bricks/s", "tasks/s", "SUMMARY",
                 "demo finished in", "summary_json"):
        assert text in log, text
    assert "SUMMARY" in demo["stdout"] and "demo finished in" in demo["stdout"]
    # quiet Spark by default: no JVM INFO lines, only a few WARN lines at most
    jvm_lines = [ln for ln in log.splitlines()
                 if re.match(r"^\d\d/\d\d/\d\d \d\d:\d\d:\d\d (INFO|WARN) ", ln)]
    assert len(jvm_lines) <= 5, jvm_lines
    print(f"demo subprocess took {demo['seconds']:.1f} s; timings {run['timings_s']}")


def test_out_given_as_a_file_uri_is_that_local_folder(tmp_path):
    """``--out file:///abs/dir`` is the folder /abs/dir (not ./file:/abs/dir)."""
    import argparse

    from injection_pipeline.stages.stage_demo import _Chain

    conf = {"manifests": {"variant": "v", "experiments": []}}
    for given in (f"file://{tmp_path}", str(tmp_path), f"file:{tmp_path}"):
        assert _Chain(argparse.Namespace(out=given), conf).out == str(tmp_path), given


def test_survey_has_one_absent_brick(layout):
    assert len(layout["bricks"]) == N_BRICKS
    assert len(layout["absent"]) == 1


def test_manifests_have_expected_counts(layout):
    p4a = layout["p4a"]
    expected = {DEBUG: 48 * N_PER_CONFIG * REPLICATES, TRAIN: 3 * N_TRAIN}
    for eid in EXPS:
        t = _table(p4a / "manifests" / eid, ["task_id", "brickname", "split", "is_control"])
        s = json.loads((p4a / "summaries" / f"{eid}.json").read_text())
        assert s["rows_expected"] == expected[eid]
        if eid == TRAIN:     # conditioned: candidates = accepted + rejected, each accepted paired
            acc = s["acceptance"]
            rej = _table(p4a / "rejections" / eid, ["task_id"]).num_rows
            assert acc["candidates"] == 3 * N_TRAIN // 2 == acc["accepted"] + rej
            assert t.num_rows == 2 * acc["accepted"] and acc["rejected"] == rej
            ctl = t.column("is_control").to_numpy()
            assert ctl.sum() == acc["accepted"]     # paired controls at 50 %
        else:
            assert t.num_rows == expected[eid], eid
        assert s["rows_total"] == t.num_rows
        assert len(set(t.column("task_id").to_pylist())) == t.num_rows
        assert set(s["rows_by_split"]) == {"train", "val", "test"}
        assert sorted(set(t.column("split").to_pylist())) == ["test", "train", "val"]
        assert (p4a / "bricks" / f"{eid}.txt").read_text().split() == \
            sorted(set(t.column("brickname").to_pylist()))
    assert (p4a / "bricks.txt").read_text().split() == layout["bricks"]


def test_blacklist_is_exactly_the_absent_brick(layout):
    doc = json.loads((layout["p4a"] / "brick_blacklist.json").read_text())
    assert doc["format"] == "dr10-brick-blacklist/1"
    assert [b["brick"] for b in doc["bricks"]] == layout["absent"] and doc["count"] == 1
    assert "404" in doc["bricks"][0]["reason"]


def test_filtered_manifests_exclude_the_absent_brick(layout):
    p4a = layout["p4a"]
    fs = json.loads((p4a / "manifests_filtered_summary.json").read_text())["experiments"]
    for eid in EXPS:
        full = _table(p4a / "manifests" / eid).to_pandas()
        filt = _table(p4a / "manifests_filtered" / eid).to_pandas()
        keep = full[~full["brickname"].isin(layout["absent"])]
        assert not filt["brickname"].isin(layout["absent"]).any()
        assert sorted(filt["task_id"]) == sorted(keep["task_id"])
        assert len(filt) < len(full)
        assert fs[eid]["tasks_in"] == len(full) and fs[eid]["tasks_out"] == len(filt)
        assert fs[eid]["removed_by_brick"] == {layout["absent"][0]: len(full) - len(filt)}


def test_cache_listing_has_10_files_and_success_per_present_brick(demo, layout):
    listing = json.loads((demo["out"] / "cache_listing.json").read_text())
    assert sorted(listing["bricks"]) == layout["present"]
    for brick, d in listing["bricks"].items():
        assert sorted(d["files"]) == sorted(dr10.brick_filenames(brick) +
                                            ["_HEADS", "_SUCCESS"]), brick
        assert all(size > 0 for size in d["files"].values())
        assert d["success"] and d["success_problems"] == [] and d["n_data_files"] == 10
    assert listing["n_objects"] == 12 * len(layout["present"])
    txt = (demo["out"] / "cache_listing.txt").read_text().splitlines()
    assert len([ln for ln in txt if not ln.startswith("#")]) == listing["n_objects"]
    assert listing["cache"] == "s3://dr10-demo/coadd"


def test_metrics_task_accounting_is_exact(layout):
    for eid in EXPS:
        man = _table(layout["p4a"] / "manifests_filtered" / eid, ["task_id", "split"]).to_pandas()
        m = _table(layout["p4c"] / "metrics" / eid).to_pandas()
        assert len(m) == len(man) and m["task_id"].is_unique
        assert set(m["task_id"]) == set(man["task_id"])
        merged = m[["task_id", "split"]].merge(man, on="task_id", suffixes=("", "_man"))
        assert (merged["split"].astype(str) == merged["split_man"]).all()
        assert set(m["status"]) <= set(inj.TOLERATED_STATUSES), m["status"].value_counts()
        assert (m["status"] == "ok").sum() > 0.5 * len(m)
        assert not m["brickname"].isin(layout["absent"]).any()
        s4c = json.loads((layout["p4c"] / "summaries" / f"{eid}.json").read_text())
        assert s4c["accounting"]["exact"] and s4c["exit_code"] == 0


def test_stamps_load_with_the_right_shapes(layout):
    for eid in EXPS:
        m = _table(layout["p4c"] / "metrics" / eid, ["status", "is_control"]).to_pandas()
        n_ok = int((m["status"] == "ok").sum())
        st = stamps_io.load_stamps(str(layout["p4c"] / "stamps" / eid),
                                   columns=("image", "arc", "invvar", "maskbits"))
        assert len(st) == n_ok and st.bands == "grz"
        for plane in ("image", "arc", "invvar"):
            a = getattr(st, plane)
            assert a.shape == (n_ok, 3, 64, 64) and a.dtype == np.float32, plane
            assert np.isfinite(a).all(), plane
        assert st.maskbits.shape == (n_ok, 64, 64) and st.maskbits.dtype == np.int32
        ctrl = st.meta.column("is_control").to_numpy() == 1
        assert (st.arc[ctrl] == 0).all()
        if (~ctrl).any():
            assert (st.arc[~ctrl].sum(axis=(1, 2, 3)) > 0).all()
        if eid == TRAIN:
            assert ctrl.any() and (~ctrl).any()


def test_summary_json_matches_the_parquet(demo, layout):
    s = json.loads((demo["out"] / "summary.json").read_text())
    assert s["accounting_exact"] is True
    tot = 0
    for eid in EXPS:
        e = s["experiments"][eid]
        m = _table(layout["p4c"] / "metrics" / eid).to_pandas()
        tot += len(m)
        assert e["accounting"]["exact"] and e["rows_written"] == len(m)
        assert e["by_status"] == m["status"].value_counts().to_dict()
        ctrl = m["is_control"] == 1
        assert e["by_role"]["controls"]["total"] == int(ctrl.sum())
        assert e["by_role"]["injections"]["total"] == int((~ctrl).sum())
        for split, g in m.groupby(m["split"].astype(str)):
            assert e["by_split"][split]["total"] == len(g)
            assert e["by_split"][split]["controls"] == int((g["is_control"] == 1).sum())
            assert e["by_split"][split]["by_status"] == g["status"].value_counts().to_dict()
        ok_inj = m[(m["status"] == "ok") & ~ctrl]
        assert e["ok_injections"] == len(ok_inj)
        for col in ("arc_snr", "arc_snr_region", "mu_total", "mu_point", "image1_mu", "n_images",
                    "image_sep_max_arcsec"):
            v = ok_inj[col].dropna().to_numpy(float)
            q = e["quantiles_ok_injections"][col]
            assert q["n"] == len(v)
            for p in (5, 25, 50, 75, 95):
                assert q[f"p{p}"] == pytest.approx(np.percentile(v, p), rel=1e-12)
        ok = m[m["status"] == "ok"]
        for b in "grz":
            assert e["psf_source_counts_ok_rows"][b] == \
                ok[f"psf_source_{b}"].value_counts().to_dict()
        # and with 4c's own (Spark) summary of the same parquet
        s4c = json.loads((layout["p4c"] / "summaries" / f"{eid}.json").read_text())
        assert s4c["by_status"] == e["by_status"]
        assert s4c["psf_source_counts_ok_rows"] == e["psf_source_counts_ok_rows"]
    assert s["totals"]["tasks"] == tot
    assert s["run"]["blacklist"] == layout["absent"]
    text = (demo["out"] / "summary.txt").read_text()
    for needle in (DEBUG, TRAIN, "EXACT", "arc_snr", "arc_snr_region", "mu_total", "PSF source",
                   "split val", "injections", "controls"):
        assert needle in text, needle


def test_qa_pngs_are_valid(demo):
    for eid in EXPS:
        qdir = demo["out"] / "qa" / eid
        for name in ("gallery.png", "histograms.png"):
            data = (qdir / name).read_bytes()
            assert len(data) > 1000 and data[:8] == PNG_SIGNATURE, name
            assert data[12:16] == b"IHDR"
            w, h = struct.unpack(">II", data[16:24])
            assert w > 100 and h > 100
            assert data.rstrip(b"\x00")[-8:-4] == b"IEND"
        q = json.loads((qdir / "qa_summary.json").read_text())
        assert q["rows_ok"] > 0 and len(q["pngs"]) == 2


def test_completeness_of_the_baseline_finders(demo):
    """The demo ran the baseline and core finders on the train experiment, then 4d: a
    completeness table per finder, exact accounting, plots printed."""
    from injection_pipeline.analysis import completeness as cp

    recs = demo["run"]["completeness"]
    assert set(recs) == {f"{TRAIN}:baseline", f"{TRAIN}:core"}
    for key, rec in recs.items():
        assert rec["finder_exit"] == 0 and rec["4d_exit"] == 0, rec
        d = Path(rec["dir"])
        s = json.loads((d / "summary.json").read_text())
        assert s["accounting"]["exact"] and s["splits"] == ["test"]
        assert s["accounting"]["scored_ok_injections_counted"] > 0
        t = _table(d / "completeness.parquet").to_pandas()
        assert t.columns.tolist() == list(cp.TABLE_COLUMNS)
        one = t[t.variable2.isna() & (t.variable == "theta_e_arcsec")]
        assert one.groupby("threshold_name").n_injections.sum().min() <= \
            s["accounting"]["scored_ok_injections_counted"]
        for png in ("completeness_1d.png", "roc.png"):
            assert (d / png).read_bytes()[:8] == PNG_SIGNATURE
        assert str(d) in demo["stdout"]
