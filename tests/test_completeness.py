"""Stage-4d statistics (injection_pipeline.analysis.completeness), pure API, no Spark.

Synthetic metrics with score = theta_E (known outcome), Wilson intervals against an
independent scipy root-finding reference, FPR thresholds against numpy's inverted-CDF
quantile, exact exclusion accounting, train rows never counted, empty bins.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from injection_pipeline.analysis import completeness as cp

scipy_stats = pytest.importorskip("scipy.stats")
from scipy.optimize import brentq  # noqa: E402


def make_metrics(n_per_split=400, seed=3) -> pd.DataFrame:
    """Injections and controls in train/val/test; a few non-ok rows."""
    rng = np.random.default_rng(seed)
    rows = []
    for sp in ("train", "val", "test"):
        for i in range(n_per_split):
            ctl = i % 2
            rows.append(dict(task_id=f"{sp}/{i:05d}" + ("/ctl" if ctl else ""), split=sp,
                             status="ok", is_control=ctl,
                             theta_e_arcsec=np.nan if ctl else rng.uniform(0.1, 3.9),
                             arc_snr_region=np.nan if ctl else rng.uniform(0, 300),
                             arc_snr=np.nan if ctl else rng.uniform(0, 300),
                             src_mag_r=rng.uniform(18, 27), arc_flux_r=0.0 if ctl else
                             rng.uniform(0.05, 30), mu_total=rng.uniform(1, 40),
                             lens_mag_r=rng.uniform(15, 23), psf_fwhm_used_r=rng.uniform(
                                 0.7, 2.0)))
    m = pd.DataFrame(rows)
    m.loc[[5, 7, 413, 851, 853], "status"] = ["off_brick", "error", "off_brick",
                                              "missing_brick", "error"]
    return m


def theta_scores(m: pd.DataFrame, rng_seed=5) -> pd.DataFrame:
    """score = theta_E for injections; controls U(0, 4)."""
    rng = np.random.default_rng(rng_seed)
    s = m["theta_e_arcsec"].to_numpy().copy()
    ctl = m["is_control"].to_numpy() == 1
    s[ctl] = rng.uniform(0, 4, ctl.sum())
    return pd.DataFrame({"task_id": m["task_id"], "score": s})


def wilson_reference(k: int, n: int, conf: float) -> tuple[float, float]:
    """The Wilson interval by its definition: {p0 : |k/n - p0| <= z sqrt(p0 (1-p0) / n)},
    solved with brentq (scipy), z from scipy.stats.norm."""
    z = scipy_stats.norm.ppf(0.5 + conf / 2)
    ph = k / n

    def f(p0):
        return abs(ph - p0) - z * math.sqrt(p0 * (1 - p0) / n)

    eps = 1e-15
    lo = 0.0 if k == 0 else brentq(f, eps, min(ph, 1 - eps), xtol=1e-14)
    hi = 1.0 if k == n else brentq(f, max(ph, eps), 1 - eps, xtol=1e-14)
    return lo, hi


@pytest.mark.parametrize("conf", [0.68, 0.95, 0.997])
def test_wilson_matches_reference(conf):
    ks, ns = [], []
    for n in (1, 2, 5, 17, 100, 1000):
        for k in sorted({0, 1, n // 3, n // 2, n - 1, n}):
            if 0 <= k <= n:
                ks.append(k)
                ns.append(n)
    lo, hi = cp.wilson_interval(ks, ns, conf)
    for k, n, a, b in zip(ks, ns, lo, hi):
        ra, rb = wilson_reference(k, n, conf)
        assert a == pytest.approx(ra, abs=1e-10), (k, n)
        assert b == pytest.approx(rb, abs=1e-10), (k, n)
        assert a <= k / n <= b


def test_wilson_empty_is_nan():
    lo, hi = cp.wilson_interval([0, 3], [0, 5])
    assert np.isnan(lo[0]) and np.isnan(hi[0])
    assert np.isfinite(lo[1]) and np.isfinite(hi[1])


@pytest.mark.parametrize("n", [1, 7, 100, 1000, 1234])
@pytest.mark.parametrize("fpr", [0.5, 0.1, 0.01, 0.001])
def test_fpr_threshold_is_control_quantile(n, fpr):
    c = np.random.default_rng(n).normal(size=n)
    t = cp.fpr_threshold(c, fpr)
    assert t == np.quantile(c, 1 - fpr, method="inverted_cdf")
    k = int(np.sum(c > t))
    assert k == math.floor(fpr * n + 1e-9) and k / n <= fpr
    # the smallest such threshold: the next control below it would exceed the allowed count
    below = c[c < t]
    if below.size:
        assert np.sum(c > below.max()) / n > fpr


def test_fpr_threshold_ties_never_exceed_target():
    c = np.r_[np.zeros(90), np.ones(10)]      # 10 % tied at the top
    t = cp.fpr_threshold(c, 0.05)
    assert t == 1.0 and np.sum(c > t) == 0


def test_bin_index_half_open():
    e = [0.0, 1.0, 2.0]
    assert cp.bin_index([0.0, 0.999, 1.0, 1.999, 2.0, -0.1, np.nan], e).tolist() == \
        [0, 0, 1, 1, -1, -1, -2]


def test_roc_auc_matches_sklearn():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 500).astype(bool)
    s = np.round(rng.normal(size=500) + y, 1)       # many ties
    assert cp.roc_auc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_completeness_exact_with_score_theta_e():
    m = make_metrics()
    sc = theta_scores(m)
    cfg = cp.load_config()
    res = cp.compute(m, sc, cfg, splits=["test"], fpr=[0.1], threshold=[1.0, 2.5])
    t = res.table
    ok_test_inj = m[(m.status == "ok") & (m.split == "test") & (m.is_control == 0)]
    theta = ok_test_inj["theta_e_arcsec"].to_numpy()
    edges = cfg.variable("theta_e_arcsec").edges
    for tn, thr in (("fixed_1", 1.0), ("fixed_2.5", 2.5)):
        d = t[(t.variable == "theta_e_arcsec") & t.variable2.isna() & (t.threshold_name == tn)]
        assert len(d) == len(edges) - 1
        for r in d.itertuples():
            inb = (theta >= r.bin_lo) & (theta < r.bin_hi)
            assert r.n_injections == inb.sum()
            assert r.n_detected == np.sum(inb & (theta > thr))
            if r.n_injections:
                # score = theta_E: a bin wholly above the threshold is complete, below is 0
                if r.bin_lo >= thr:
                    assert r.completeness == 1.0
                if r.bin_hi <= thr:
                    assert r.completeness == 0.0
                lo, hi = wilson_reference(r.n_detected, r.n_injections, 0.95)
                assert r.ci_lo == pytest.approx(lo, abs=1e-10)
                assert r.ci_hi == pytest.approx(hi, abs=1e-10)
    # FPR threshold = the control-score quantile of the counted splits
    ctl = sc.merge(m, on="task_id")
    ctl = ctl[(ctl.status == "ok") & (ctl.split == "test") & (ctl.is_control == 1)]
    th = {x["name"]: x for x in res.summary["thresholds"]}
    assert th["fpr_0.1"]["threshold"] == np.quantile(ctl.score, 0.9, method="inverted_cdf")
    assert th["fpr_0.1"]["n_controls"] == len(ctl)
    assert th["fpr_0.1"]["achieved_fpr"] <= 0.1
    # every in-range injection is in exactly one theta bin
    d = t[(t.variable == "theta_e_arcsec") & t.variable2.isna() & (t.threshold_name == "fixed_1")]
    assert d.n_injections.sum() == len(ok_test_inj)


def test_train_rows_never_counted_and_refused():
    m = make_metrics()
    sc = theta_scores(m)
    with pytest.raises(cp.CompletenessError, match="train"):
        cp.compute(m, sc, splits=["train", "test"])
    # perturb every train score wildly: nothing in the table may change
    r1 = cp.compute(m, sc, splits=["val", "test"], fpr=[0.01], threshold=[1.0])
    sc2 = sc.copy()
    sc2.loc[m.split == "train", "score"] = -1e9 * np.arange((m.split == "train").sum())
    r2 = cp.compute(m, sc2, splits=["val", "test"], fpr=[0.01], threshold=[1.0])
    pd.testing.assert_frame_equal(r1.table, r2.table)
    n_counted = ((m.status == "ok") & m.split.isin(["val", "test"]) & (m.is_control == 0)).sum()
    d = r1.table[(r1.table.variable == "theta_e_arcsec") & r1.table.variable2.isna()
                 & (r1.table.threshold_name == "fixed_1")]
    assert d.n_injections.sum() == n_counted
    assert r1.summary["accounting"]["scored_ok_injections_counted"] == n_counted
    assert "train" not in r1.summary["splits"]
    assert r1.summary["per_split"]["train"]["counted"] is False


def test_excluded_counts_exact():
    m = make_metrics()
    sc = theta_scores(m)
    test_ok = m[(m.split == "test") & (m.status == "ok")]
    drop = test_ok.task_id.iloc[[0, 3, 10]].tolist()               # no score
    nan_ids = test_ok.task_id.iloc[[20, 21]].tolist()              # NaN score
    sc = sc[~sc.task_id.isin(drop)].copy()
    sc.loc[sc.task_id.isin(nan_ids), "score"] = np.nan
    extra = pd.DataFrame({"task_id": ["nope/1", "nope/2", "nope/3", "nope/4"],
                          "score": [1.0, 2.0, 3.0, 4.0]})
    sc = pd.concat([sc, extra], ignore_index=True)
    res = cp.compute(m, sc, splits=["test"], fpr=[0.01])
    a = res.summary["accounting"]
    assert a["metrics_rows"] == len(m) and a["score_rows"] == len(sc)
    assert a["scores_without_task"] == 4
    assert a["ok_tasks_without_score_in_counted_splits"] == 3
    assert a["ok_tasks_with_nonfinite_score_in_counted_splits"] == 2
    assert a["tasks_not_ok"] == 5
    assert a["tasks_not_ok_by_status"] == {"error": 2, "missing_brick": 1, "off_brick": 2}
    assert a["tasks_not_ok_in_counted_splits"] == 2            # rows 851, 853 are test
    assert a["scores_for_tasks_not_ok"] == 5
    assert a["ok_tasks_in_other_splits"] == int(((m.status == "ok") & (m.split != "test")).sum())
    assert a["exact"]
    assert (a["scored_ok_injections_counted"] + a["scored_ok_controls_counted"] + 3 + 2
            == a["ok_tasks_in_counted_splits"] == len(test_ok))
    with pytest.raises(cp.CompletenessError, match="duplicate"):
        cp.compute(m, pd.concat([sc, sc.iloc[:2]]), splits=["test"])


def test_empty_bins_written_with_nan():
    m = make_metrics()
    sc = theta_scores(m)
    res = cp.compute(m, sc, splits=["test"], fpr=[0.01])
    t = res.table
    # psf_fwhm_used_r was drawn in [0.7, 2.0): the bins [2.2, 3.0) and [0.6, 0.9) partly
    e = t[(t.variable == "psf_fwhm_used_r") & (t.bin_lo == 2.2)]
    assert len(e) == 1 and e.n_injections.iloc[0] == 0 and e.n_detected.iloc[0] == 0
    assert e[["completeness", "ci_lo", "ci_hi"]].isna().all(axis=None)
    assert t.columns.tolist() == list(cp.TABLE_COLUMNS)


def test_variables_fallback_derived_and_2d_layout():
    m = make_metrics()
    sc = theta_scores(m)
    res = cp.compute(m.drop(columns=["arc_snr_region"]), sc, splits=["test"], fpr=[0.01])
    v = res.summary["variables"]
    assert v["arc_snr"]["column"] == "arc_snr" and "fallback" in v["arc_snr"]["note"]
    assert set(res.table.variable) >= {"theta_e_arcsec", "arc_snr", "src_mag_r", "arc_mag_r",
                                       "mu_total", "lens_mag_r", "psf_fwhm_used_r"}
    # arc_mag_r = 22.5 - 2.5 log10(arc_flux_r), counted exactly
    inj = m[(m.status == "ok") & (m.split == "test") & (m.is_control == 0)]
    mag = 22.5 - 2.5 * np.log10(inj.arc_flux_r.to_numpy())
    r = res.table[(res.table.variable == "arc_mag_r") & (res.table.bin_lo == 21.0)].iloc[0]
    assert r.n_injections == np.sum((mag >= 21.0) & (mag < 22.0))
    # 2-D: variable = theta_E column, variable2 = the arc S/N column used
    two = res.table[res.table.variable2.notna()]
    cfg = cp.load_config()
    mp = cfg.maps[0]
    assert set(two.variable) == {"theta_e_arcsec"} and set(two.variable2) == {"arc_snr"}
    assert len(two) == (len(mp.x_edges) - 1) * (len(mp.y_edges) - 1)
    snr = inj.arc_snr.to_numpy()
    th = inj.theta_e_arcsec.to_numpy()
    c = two[(two.bin_lo == 1.0) & (two.bin2_lo == 10.0)].iloc[0]
    assert c.n_injections == np.sum((th >= 1) & (th < 1.5) & (snr >= 10) & (snr < 20))
    assert two.n_injections.sum() == np.sum((th < 4) & (snr < 1000))


def test_roc_auc_per_split_and_plots(tmp_path):
    pytest.importorskip("matplotlib")
    from sklearn.metrics import roc_auc_score

    m = make_metrics()
    sc = theta_scores(m)
    res = cp.compute(m, sc, splits=["val", "test"], fpr=[0.01, 0.001])
    j = m.merge(sc, on="task_id")
    for sp in ("val", "test"):
        d = j[(j.split == sp) & (j.status == "ok")]
        assert res.summary["per_split"][sp]["roc_auc"] == pytest.approx(
            roc_auc_score(d.is_control == 0, d.score), abs=1e-12)
    paths = cp.plot(res, str(tmp_path))
    assert any(p.endswith("completeness_1d.png") for p in paths)
    assert any("completeness_2d_" in p for p in paths) and any(p.endswith("roc.png")
                                                              for p in paths)
    for p in paths:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
