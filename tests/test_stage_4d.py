"""Stage 4d through Spark (spark_phase4_pipeline.py 4d) on a small dataset in 4c's metrics
layout (the exact 4c metrics schema, split-partitioned) and the baseline finder on a tiny
stamps dataset in 4c's stamps layout.

The Spark result must equal the pure API (analysis.completeness.compute) on the same rows:
every count, threshold, interval and AUC.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from injection_pipeline import injection as inj
from injection_pipeline.analysis import baseline_finder as bf
from injection_pipeline.analysis import completeness as cp

from test_completeness import make_metrics, theta_scores

EXP = "train_stamp64_bandsgrz_gridgrid_small"


def write_4c_metrics(frame: pd.DataFrame, uri: str) -> None:
    """frame -> <uri>/split=<s>/part-0.parquet with the full 4c metrics schema (columns the
    frame lacks are null)."""
    schema = inj.output_arrow_schema(False)
    cols = {}
    for f in schema:
        if f.name in frame.columns:
            cols[f.name] = pa.array(frame[f.name].tolist(), f.type, from_pandas=True)
        else:
            cols[f.name] = pa.nulls(len(frame), f.type)
    t = pa.table(cols, schema=schema)
    pq.write_to_dataset(t, uri, partition_cols=["split"])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage4d")
    m = make_metrics(n_per_split=300, seed=8)
    m["is_control"] = m["is_control"].astype(np.int8)
    sc = theta_scores(m, rng_seed=9)
    sc = sc[~sc.task_id.isin(m.task_id.iloc[[610, 611]])]            # two without score
    sc = pd.concat([sc, pd.DataFrame({"task_id": ["ghost/1"], "score": [0.5]})])
    sc.loc[sc.task_id == m.task_id.iloc[700], "score"] = np.nan      # one NaN score
    out = str(root / "results")
    write_4c_metrics(m, os.path.join(out, "phase4c", "v1", "metrics", EXP))
    scores = str(root / "scores.parquet")
    pq.write_table(pa.Table.from_pandas(sc.reset_index(drop=True), preserve_index=False),
                   scores)
    return dict(m=m, sc=sc.reset_index(drop=True), out=out, scores=scores)


def test_4d_cli_equals_pure_api(spark, data, capsys):
    import spark_phase4_pipeline as drv

    code = drv.main(["4d", "--master", "local[2]", "--out", data["out"], "--variant", "v1",
                     "--experiment-id", EXP, "--scores", data["scores"], "--splits",
                     "val,test", "--fpr", "0.01,0.1", "--threshold", "1.5"])
    assert code == 0
    d = os.path.join(data["out"], "phase4d", "v1", EXP)
    got = pd.read_parquet(os.path.join(d, "completeness.parquet"))
    with open(os.path.join(d, "summary.json")) as f:
        s = json.load(f)
    # the pure API on the metrics as written (read back with pandas)
    m = pq.ParquetDataset(os.path.join(data["out"], "phase4c", "v1", "metrics", EXP)).read() \
        .to_pandas()
    m["split"] = m["split"].astype(str)
    ref = cp.compute(m, data["sc"], splits=["val", "test"], fpr=[0.01, 0.1], threshold=[1.5])
    assert got.columns.tolist() == list(cp.TABLE_COLUMNS)
    key = ["variable", "variable2", "bin_lo", "bin2_lo", "threshold_name"]
    g = got.sort_values(key, na_position="first").reset_index(drop=True)
    r = ref.table.sort_values(key, na_position="first").reset_index(drop=True)
    pd.testing.assert_frame_equal(g, r, check_dtype=False)
    assert g["n_injections"].sum() > 0 and g["completeness"].notna().any()
    assert s["accounting"] == ref.summary["accounting"]
    assert s["accounting"]["exact"]
    assert s["accounting"]["scores_without_task"] == 1
    assert s["accounting"]["ok_tasks_without_score_in_counted_splits"] == 2
    assert s["accounting"]["ok_tasks_with_nonfinite_score_in_counted_splits"] == 1
    assert [t["threshold"] for t in s["thresholds"]] == \
        [t["threshold"] for t in ref.summary["thresholds"]]
    assert [t["n_controls_above"] for t in s["thresholds"]] == \
        [t["n_controls_above"] for t in ref.summary["thresholds"]]
    for sp, v in ref.summary["per_split"].items():
        assert s["per_split"][sp]["roc_auc"] == pytest.approx(v["roc_auc"], abs=1e-12)
        assert s["per_split"][sp]["n_controls"] == v["n_controls"]
    assert s["variables"] == json.loads(json.dumps(ref.summary["variables"]))
    for sp in ref.roc:
        assert s["roc"][sp]["tpr"] == pytest.approx(ref.roc[sp]["tpr"])
        assert s["roc"][sp]["fpr"] == pytest.approx(ref.roc[sp]["fpr"])
    assert {os.path.basename(p) for p in s["pngs"]} >= {"completeness_1d.png", "roc.png"}
    for p in s["pngs"]:
        assert os.path.getsize(p) > 1000
    assert "completeness plots:" in capsys.readouterr().out
    # train refused without --allow-train-split: exit 1, nothing raised
    assert drv.main(["4d", "--master", "local[2]", "--out", data["out"], "--variant", "v1",
                     "--experiment-id", EXP, "--scores", data["scores"], "--splits",
                     "train"]) == 1


# --------------------------------------------------------------------------- baseline finder
def test_ring_features_uniform_image():
    n = 32
    img = np.ones((2, 3, n, n), np.float32)
    e = [0.0, 3.0, 6.0, 10.0]
    f = bf.ring_features(img, "grz", e)
    M = bf.annulus_matrix(n, e)
    area = M.sum(axis=1)
    assert f.shape == (2, 3 * 3 + 2 * 3)
    np.testing.assert_allclose(f[0, :3], area / area.sum())        # g rel = annulus area frac
    np.testing.assert_allclose(f[0, 9:], 0.0, atol=1e-12)           # colours of equal fluxes


def _write_stamps(path, n_per_split=60, n=32, seed=2):
    """A stamps dataset in 4c's layout: a red Gaussian galaxy; injections add a blue ring."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:n, 0:n]
    r = np.hypot(xx - (n - 1) / 2, yy - (n - 1) / 2)
    gal = np.exp(-0.5 * (r / 2.0) ** 2)
    rows = []
    for sp in ("train", "val", "test"):
        for i in range(n_per_split):
            ctl = i % 2
            img = np.stack([0.5 * gal, gal, 1.5 * gal]) * rng.uniform(1, 3)
            if not ctl:
                ring = np.exp(-0.5 * ((r - 7.0) / 1.0) ** 2) * rng.uniform(0.2, 0.5)
                img = img + np.stack([ring, 0.8 * ring, 0.6 * ring])
            img = (img + rng.normal(0, 0.02, img.shape)).astype("<f4")
            rows.append(dict(task_id=f"{sp}/{i:04d}", split=sp, is_control=ctl, status="ok",
                             stamp_size_px=n, bands="grz", image=img.tobytes()))
    rows.append(dict(task_id="test/bad", split="test", is_control=0, status="off_brick",
                     stamp_size_px=n, bands="grz", image=None))
    pq.write_to_dataset(pa.Table.from_pylist(rows), path, partition_cols=["split"])
    from injection_pipeline.stamp_writer import FORMAT

    with open(os.path.join(path, "_SUCCESS"), "w") as f:      # 4c's completion marker
        json.dump({"format": FORMAT, "rows": len(rows)}, f)


@pytest.mark.parametrize("finder", ["baseline", "core"])
def test_finder_trains_on_train_only_and_scores_the_rest(tmp_path, finder):
    pytest.importorskip("sklearn")
    stamps = str(tmp_path / "stamps")
    _write_stamps(stamps)
    out = str(tmp_path / "scores.parquet")
    rep = bf.run_finder(stamps, out, finder)
    t = pq.read_table(out)
    s = t.to_pandas()
    assert set(s.split) == {"val", "test"} and len(s) == 120 and rep["n_train"] == 60
    assert "test/bad" not in set(s.task_id)
    assert json.loads(t.schema.metadata[b"baseline_finder"])["label"] == bf.LABEL
    assert s.score.between(0, 1).all()
    if finder == "baseline":   # the ring is separable: the baseline must find it
        auc = cp.roc_auc(s.score, s.task_id.str[-4:].astype(int) % 2 == 0)   # even = injection
        assert auc > 0.95
    # deterministic: same stamps -> identical scores
    bf.run_finder(stamps, out + "2", finder)
    assert pq.read_table(out + "2").column("score").equals(t.column("score"))


def test_finder_that_learned_nothing_says_so(tmp_path):
    """6 train rows cannot be split with min_samples_leaf = 5: constant scores, flagged."""
    pytest.importorskip("sklearn")
    stamps = str(tmp_path / "stamps")
    _write_stamps(stamps, n_per_split=6)
    rep = bf.run_finder(stamps, str(tmp_path / "s.parquet"), "baseline")
    assert rep["note"] is not None and "learned nothing" in rep["note"]
    s = pd.read_parquet(str(tmp_path / "s.parquet"))
    assert s.score.nunique() == 1


def test_finder_refuses_an_incomplete_stamps_dataset(tmp_path):
    from injection_pipeline import stamps_io

    stamps = str(tmp_path / "stamps")
    _write_stamps(stamps, n_per_split=6)
    os.remove(os.path.join(stamps, "_SUCCESS"))
    with pytest.raises(stamps_io.IncompleteDataset):
        bf.run_finder(stamps, str(tmp_path / "s.parquet"), "baseline")
    assert not os.path.exists(tmp_path / "s.parquet")
