"""Realism audit (injection_pipeline.analysis.realism): built-to-fail and built-to-pass sets
for the core-only classifier, exact percentiles, misalignment on rendered ellipses, grouped
folds, the JSON schema and the QA-step integration.  In-memory stamps, no Spark (< 30 s)."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from injection_pipeline import qa, stamps_io
from injection_pipeline.analysis import realism as ra

N = 64
BANDS = "grz"
CONF = ra.load_config()
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- builders
def _meta_row(task_id, pair_id, is_control, brick, objid, *, split="train", status="ok",
              theta_e=1.0, reff=0.3, lens_mag_r=19.0, lens_q=0.7, lens_phi=0.0,
              tx=32.0, ty=32.0):
    inj = not is_control
    nan = float("nan")
    return {"task_id": task_id, "pair_id": pair_id, "is_control": int(is_control),
            "brickname": brick, "objid": int(objid), "split": split, "tier": "train",
            "status": status, "stamp_size_px": N, "bands": BANDS,
            "theta_e_arcsec": theta_e if inj else nan, "src_reff_arcsec": reff if inj else nan,
            "lens_mag_r": lens_mag_r, "lens_q": lens_q if inj else nan,
            "lens_phi_rad": lens_phi if inj else nan,
            "target_x_pix": 1000.0 + tx, "target_y_pix": 2000.0 + ty,
            "stamp_x0": 1000, "stamp_y0": 2000}


def build_pairs(n_targets, passes, cutout_fn, arc_fn, rng, **meta_kw):
    """Injection + paired control per (target, pass): image = cutout + arc / cutout."""
    rows, images, arcs = [], [], []
    for t in range(n_targets):
        brick, objid = f"{1000 + t // 4:04d}p000", t % 4
        cut = cutout_fn(t, rng).astype(np.float32)
        for j in range(passes):
            tid = f"train_exp/{brick}/{objid}/t{j:06d}"
            arc = arc_fn(t, j, rng).astype(np.float32)
            kw = {k: (v(t, j) if callable(v) else v) for k, v in meta_kw.items()}
            rows.append(_meta_row(tid, tid, False, brick, objid, **kw))
            images.append(cut + arc)
            arcs.append(arc)
            rows.append(_meta_row(tid + "/ctl", tid, True, brick, objid, **kw))
            images.append(cut.copy())
            arcs.append(np.zeros_like(arc))
    return rows, np.stack(images), np.stack(arcs)


def to_stamps(rows, images, arcs):
    meta = pa.Table.from_pylist(rows)
    return stamps_io.Stamps(image=images, arc=arcs, meta=meta, bands=BANDS)


def noise_cutout(sigma=0.01):
    def f(t, rng):
        return rng.normal(0.0, sigma, (3, N, N))
    return f


def gaussian_blob(flux, sigma_px, x=31.5, y=31.5):
    j, i = np.mgrid[0:N, 0:N].astype(float)
    g = np.exp(-0.5 * ((i - x) ** 2 + (j - y) ** 2) / sigma_px ** 2)
    return flux * g / g.sum()


def lens_light(t, rng):
    """A lens galaxy (round Gaussian, flux varying per target) on sky noise."""
    flux = 20.0 + 30.0 * rng.random()
    return np.stack([gaussian_blob(flux * f, 3.0, 32.2, 31.8) for f in (0.3, 1.0, 1.6)]) + \
        rng.normal(0.0, 0.01, (3, N, N))


def ring_outside_core(flux=20.0, r_in=8.0, r_out=13.0):
    j, i = np.mgrid[0:N, 0:N].astype(float)
    r = np.hypot(i - 31.5, j - 31.5)
    ring = ((r >= r_in) & (r <= r_out)).astype(float)
    sl = ra.core_slice(N, 10)
    assert ring[sl, sl].sum() == 0                       # nothing inside the 10x10 core box
    return np.stack([ring * flux * f / ring.sum() for f in (0.8, 1.0, 1.2)])


def audit(stamps, splits=("train",)):
    red = ra.concat_reduced([ra.reduce_chunk(stamps, CONF, splits, "mem")], CONF, "mem")
    return ra.run_audit(red, CONF)


def check(report, metric):
    return next(c for c in report["checks"] if c["metric"] == metric)


# --------------------------------------------------------------------------- (a), (b)
def test_core_blob_shortcut_is_detected_and_fails_the_check():
    """(a) injections carry a bright compact blob on the core, controls do not."""
    rng = np.random.default_rng(1)
    blob = np.stack([gaussian_blob(f, 1.3) for f in (1.0, 1.5, 2.0)])
    rows, img, arc = build_pairs(30, 2, lens_light, lambda t, j, r: blob, rng)
    rep = audit(to_stamps(rows, img, arc)).report
    cl = rep["classifier"]
    assert cl["status"] == "measured" and cl["n_pairs"] == 60 and cl["n_features"] == 300
    assert cl["auc_mean"] > 0.9 and len(cl["auc_per_fold"]) == 5
    assert cl["auc_cross_target_mean"] > 0.9
    c = check(rep, "classifier.auc_cross_target_mean")
    assert c["status"] == "fail" and c["pass"] is False and c["value"] == cl["auc_cross_target_mean"]
    # nearly all the blob's flux is inside the core box
    assert rep["distributions"]["arc_core_fraction_r"]["p50"] > 0.9
    # the diagnostic by feature set is in the report and the table
    sets = cl["auc_by_feature_set"]
    assert list(sets) == [name for name, _ in CONF.classifier.diagnostic_feature_sets]
    assert sets["r"]["auc_cross_target_pooled"] > 0.9                # the blob is bright in r
    assert "cross-target pooled AUC by feature set" in ra.format_table(rep)


def test_arc_outside_the_core_gives_chance_auc_and_passes():
    """(b) bright arcs entirely outside the central 10x10 px, on noise: the core features of
    an injection and its paired control are identical, so the AUC is at chance."""
    rng = np.random.default_rng(2)
    ring = ring_outside_core()
    rows, img, arc = build_pairs(30, 2, noise_cutout(), lambda t, j, r: ring, rng)
    res = audit(to_stamps(rows, img, arc))
    cl = res.report["classifier"]
    assert cl["status"] == "measured"
    assert abs(cl["auc_mean"] - 0.5) < 0.05 and cl["auc_mean"] <= 0.65
    assert abs(cl["auc_cross_target_mean"] - 0.5) < 0.05
    assert check(res.report, "classifier.auc_cross_target_mean")["status"] == "pass"
    assert res.report["distributions"]["arc_core_fraction_r"]["p90"] == 0.0
    # the same arcs moved onto the core are found at once (the features are the core box)
    core = np.roll(ring, (-10, -10), axis=(1, 2))
    rows, img, arc = build_pairs(30, 2, noise_cutout(), lambda t, j, r: core, rng)
    assert audit(to_stamps(rows, img, arc)).report["classifier"]["auc_mean"] > 0.9


def test_cross_target_auc_ignores_same_target_pairs():
    """Few targets with many passes and a faint arc every classifier weight sees: the plain AUC
    rises above chance from same-target pairs alone, the cross-target AUC stays at chance;
    and the definition agrees with a brute-force count over pairs."""
    rng = np.random.default_rng(11)
    groups = np.repeat(np.arange(4), 20)            # 4 targets x (10 injections + 10 controls)
    y = np.tile(np.r_[np.ones(10), np.zeros(10)], 4).astype(np.int8)
    base = rng.normal(0, 1, 4)[groups]              # target offsets dominate the score
    score = base + 1e-3 * y                         # injection = own control + a faint excess
    from sklearn.metrics import roc_auc_score
    assert roc_auc_score(y, score) > 0.6
    assert ra.cross_target_auc(y, score, groups) == pytest.approx(0.5, abs=1e-12)
    s2 = rng.normal(0, 1, y.size)
    brute = [(1.0 if a > b else 0.5 if a == b else 0.0)
             for i, a in enumerate(s2) if y[i] for j, b in enumerate(s2)
             if not y[j] and groups[i] != groups[j]]
    assert ra.cross_target_auc(y, s2, groups) == pytest.approx(np.mean(brute), abs=1e-12)


def test_classifier_is_deterministic():
    rng = np.random.default_rng(3)
    blob = np.stack([gaussian_blob(f, 1.3) for f in (0.05, 0.08, 0.1)])
    rows, img, arc = build_pairs(20, 2, lens_light, lambda t, j, r: blob, rng)
    st = to_stamps(rows, img, arc)
    a = audit(st).report["classifier"]
    # same rows in another order: identical folds and AUCs (rows are sorted by task_id)
    perm = np.random.default_rng(0).permutation(len(rows))
    b = audit(to_stamps([rows[i] for i in perm], img[perm], arc[perm])).report["classifier"]
    assert a["auc_per_fold"] == b["auc_per_fold"] and a["auc_pooled"] == b["auc_pooled"]


# --------------------------------------------------------------------------- (c)
def test_distribution_percentiles_are_exact():
    """Arc planes with known sums: r magnitudes 20..24, g-r -0.2..0.6, theta_E 0.5..2.5",
    r_e 0.1..0.5", a quarter of the flux inside the core box; lens r = 20."""
    mags = [20.0, 21.0, 22.0, 23.0, 24.0]
    colours = [-0.2, 0.0, 0.2, 0.4, 0.6]
    theta = [0.5, 1.0, 1.5, 2.0, 2.5]
    reff = [0.1, 0.2, 0.3, 0.4, 0.5]

    def arc_fn(t, j, rng):
        fr = 10 ** (-0.4 * (mags[t] - 22.5))
        plane = np.zeros((N, N))
        plane[30:32, 30:32] = 0.25 * fr / 4          # inside the core box (27..36)
        plane[5:8, 50:53] = 0.75 * fr / 9            # outside
        return np.stack([plane * 10 ** (-0.4 * colours[t]), plane, plane * 0.5])

    rows, img, arc = build_pairs(5, 1, noise_cutout(), arc_fn, np.random.default_rng(4),
                                 theta_e=lambda t, j: theta[t], reff=lambda t, j: reff[t],
                                 lens_mag_r=20.0)
    # rows that must not count: a failed task and a val-split injection with extreme values
    bad = dict(rows[0], task_id="train_exp/x/9/t000009", pair_id=None, status="off_brick",
               theta_e_arcsec=99.0)
    val = dict(rows[0], task_id="train_exp/y/9/t000009", pair_id=None, split="val",
               theta_e_arcsec=99.0)
    rows += [bad, val]
    img = np.concatenate([img, img[:2]])
    arc = np.concatenate([arc, arc[:2]])
    d = audit(to_stamps(rows, img, arc)).report["distributions"]
    ex = pytest.approx
    assert d["theta_e_arcsec"]["n"] == 5
    assert (d["theta_e_arcsec"]["p10"], d["theta_e_arcsec"]["p50"], d["theta_e_arcsec"]["p90"]) \
        == (ex(0.7), ex(1.5), ex(2.3))
    assert (d["arc_mag_r"]["p10"], d["arc_mag_r"]["p50"], d["arc_mag_r"]["p90"]) == \
        (ex(20.4, abs=1e-5), ex(22.0, abs=1e-5), ex(23.6, abs=1e-5))
    # ratio = 10^(-0.4 (m - 20)): p50 at m = 22
    assert d["arc_lens_flux_ratio_r"]["p50"] == ex(10 ** -0.8, rel=1e-5)
    # sorted ratios 10^-1.6, 10^-1.2, ...: p10 at rank 0.4 (numpy linear interpolation)
    assert d["arc_lens_flux_ratio_r"]["p10"] == ex(0.6 * 10 ** -1.6 + 0.4 * 10 ** -1.2, rel=1e-5)
    assert (d["arc_colour_gr"]["p10"], d["arc_colour_gr"]["p50"], d["arc_colour_gr"]["p90"]) \
        == (ex(-0.12, abs=1e-5), ex(0.2, abs=1e-5), ex(0.52, abs=1e-5))
    assert d["src_reff_arcsec"]["p50"] == ex(0.3)
    for b in BANDS:
        assert d[f"arc_core_fraction_{b}"]["p10"] == ex(0.25, abs=1e-6)
        assert d[f"arc_core_fraction_{b}"]["p90"] == ex(0.25, abs=1e-6)
    assert d["theta_e_arcsec"]["reference"]["p50"] == 1.35
    assert "Collett 2015" in d["theta_e_arcsec"]["reference"]["citation"]


# --------------------------------------------------------------------------- (d)
def ellipse(x0, y0, q, phi, flux=50.0, sigma_a=3.5):
    j, i = np.mgrid[0:N, 0:N].astype(float)
    u = (i - x0) * math.cos(phi) + (j - y0) * math.sin(phi)
    v = -(i - x0) * math.sin(phi) + (j - y0) * math.cos(phi)
    g = np.exp(-0.5 * (u * u / sigma_a ** 2 + v * v / (q * sigma_a) ** 2))
    return flux * g / g.sum()


def test_misalignment_on_rendered_ellipses_equals_the_known_offset():
    """(d) controls are elongated ellipses at the exact sub-pixel target position with known
    PA; the SIE PA of each injection is offset by a known angle (also across the 0/pi wrap).
    Round lenses (light q ~ 1) with a large offset must be left out of the q < 0.8 median."""
    light_phi = [0.3, 1.2, 2.0, 3.0, 0.05, 2.6]
    offsets_deg = [10.0, -20.0, 30.0, 40.0, -15.0, 25.0]      # |d| 10 15 20 25 30 40 -> 22.5
    pos = [(32.3, 31.7), (31.6, 32.4), (32.0, 32.0), (32.45, 31.55), (31.8, 32.1), (32.2, 32.2)]
    n_elong = len(light_phi)

    def cutout(t, rng):
        if t < n_elong:
            x, y = pos[t]
            img = ellipse(x, y, 0.5, light_phi[t])
        else:                                                 # round lens
            img = ellipse(32.1, 31.9, 1.0, 0.0)
        return np.stack([img * 0.4, img, img * 1.5])

    sie = lambda t, j: (light_phi[t] + math.radians(offsets_deg[t])) % math.pi \
        if t < n_elong else (0.2 + math.pi / 2)
    tx = lambda t, j: pos[t][0] if t < n_elong else 32.1
    ty = lambda t, j: pos[t][1] if t < n_elong else 31.9
    rows, img, arc = build_pairs(n_elong + 3, 1, cutout, lambda t, j, r: np.zeros((3, N, N)),
                                 np.random.default_rng(5), lens_phi=sie, tx=tx, ty=ty)
    m = audit(to_stamps(rows, img, arc)).report["misalignment"]
    assert m["status"] == "measured" and m["n_pairs"] == n_elong + 3
    assert m["n"] == n_elong and m["n_all"] == n_elong + 3
    assert m["median_deg"] == pytest.approx(22.5, abs=0.05)
    assert m["p10_deg"] == pytest.approx(12.5, abs=0.05)
    # measured light q of the elongated ones is < 0.8 (rounded by the weight only)
    assert m["light_q"]["p10"] < 0.8


def test_misalignment_selects_elongated_lenses_by_the_catalogue_q_when_present():
    """With the manifest's lens_light_q (Tractor, PSF-deconvolved), the q < q_max selection
    uses it: a lens whose pixels look round to the moments but whose catalogue q is 0.6 is
    counted; a catalogue-round lens (q 0.95) is not, whatever its moments say."""
    def cutout(t, rng):
        return np.stack([ellipse(32.0, 32.0, 0.95 if t == 0 else 0.5, 0.4)] * 3)
    rows, img, arc = build_pairs(2, 1, cutout, lambda t, j, r: np.zeros((3, N, N)),
                                 np.random.default_rng(7), lens_phi=0.4, tx=32.0, ty=32.0)
    for r in rows:
        r["lens_light_q"] = 0.6 if r["objid"] == 0 else 0.95
    red = ra.concat_reduced([ra.reduce_chunk(to_stamps(rows, img, arc), CONF)], CONF)
    m, extra = ra.misalignment(red.table, CONF.misalignment)
    assert m["q_selection"] == {"catalogue_lens_light_q": 2, "measured_moments_q": 0}
    sel_objid = red.table.iloc[ra.pair_positions(red.table)[0]]["objid"].to_numpy()[extra["selected"]]
    assert list(sel_objid) == [0] and m["n"] == 1


def test_misalignment_uses_the_exact_target_position():
    """Two elongated galaxies 20 px apart: the light is measured about the target's position
    target_x_pix - stamp_x0 (sub-pixel); moving the target onto the neighbour measures it."""
    def cutout(t, rng):
        img = ellipse(32.4, 31.6, 0.4, 0.5) + ellipse(32.4 + 20.0, 31.6, 0.4, 2.0)
        return np.stack([img] * 3)
    rows, img, arc = build_pairs(1, 1, cutout, lambda t, j, r: np.zeros((3, N, N)),
                                 np.random.default_rng(6), lens_phi=0.5, tx=32.4, ty=31.6)
    red = ra.concat_reduced([ra.reduce_chunk(to_stamps(rows, img, arc), CONF)], CONF)
    ctl = red.table[red.table["is_control"] == 1].iloc[0]
    assert math.degrees(float(ra.position_angle_difference(ctl["light_phi_rad"], 0.5))) < 3.0
    # the same stamp with the target put on the neighbour measures the neighbour's PA
    rows2 = [dict(r, target_x_pix=r["target_x_pix"] + 20.0) for r in rows]
    red2 = ra.concat_reduced([ra.reduce_chunk(to_stamps(rows2, img, arc), CONF)], CONF)
    ctl2 = red2.table[red2.table["is_control"] == 1].iloc[0]
    assert math.degrees(float(ra.position_angle_difference(ctl2["light_phi_rad"], 2.0))) < 3.0


# --------------------------------------------------------------------------- (e)
def _fold_of(folds, n):
    fold = np.full(n, -1)
    for k, (_, test) in enumerate(folds):
        assert (fold[test] == -1).all()                       # each row tested once
        fold[test] = k
    assert (fold >= 0).all()
    return fold


def test_grouped_folds_never_split_a_pair_or_a_target():
    """(e) several passes per target; rows k and k + P are an injection and its control."""
    rng = np.random.default_rng(7)
    blob = np.stack([gaussian_blob(1.0, 2.0)] * 3)
    rows, img, arc = build_pairs(23, 3, noise_cutout(), lambda t, j, r: blob, rng)
    red = ra.concat_reduced([ra.reduce_chunk(to_stamps(rows, img, arc), CONF)], CONF)
    X, y, groups, n_total = ra.classifier_inputs(red, CONF.classifier)
    P = n_total
    assert P == 69 and X.shape == (2 * P, 300) and y[:P].all() and not y[P:].any()
    tid = red.table["task_id"].to_numpy()
    inj, ctl = ra.pair_positions(red.table)
    assert all(tid[c] == tid[i] + "/ctl" for i, c in zip(inj, ctl))
    folds = ra.grouped_folds(y, groups, CONF.classifier.n_folds, CONF.classifier.random_state)
    fold = _fold_of(folds, len(y))
    assert (fold[:P] == fold[P:]).all()                      # pair never split
    for g in np.unique(groups):
        assert len(set(fold[groups == g])) == 1              # target never split
    assert len(set(fold)) == CONF.classifier.n_folds
    # the assertion has teeth: an ungrouped shuffled K-fold splits pairs
    from sklearn.model_selection import StratifiedKFold
    naive = list(StratifiedKFold(5, shuffle=True, random_state=0).split(X, y))
    assert (_fold_of(naive, len(y))[:P] != _fold_of(naive, len(y))[P:]).any()


def test_max_pairs_subsample_keeps_pairs_together():
    rng = np.random.default_rng(8)
    rows, img, arc = build_pairs(12, 2, noise_cutout(), lambda t, j, r: np.zeros((3, N, N)), rng)
    red = ra.concat_reduced([ra.reduce_chunk(to_stamps(rows, img, arc), CONF)], CONF)
    cc = dataclasses.replace(CONF.classifier, max_pairs=7)
    X, y, groups, n_total = ra.classifier_inputs(red, cc)
    assert n_total == 24 and y.sum() == 7 and len(y) == 14
    assert (groups[:7] == groups[7:]).all()


def test_too_few_targets_is_not_measured_not_a_crash():
    rows, img, arc = build_pairs(2, 1, noise_cutout(), lambda t, j, r: np.zeros((3, N, N)),
                                 np.random.default_rng(9))
    rep = audit(to_stamps(rows, img, arc)).report
    assert rep["classifier"]["status"] == "not_measured"
    assert check(rep, "classifier.auc_cross_target_mean")["status"] == "not_measured"
    empty = ra.run_audit(ra.concat_reduced([], CONF, "none"), CONF).report
    assert empty["summary"]["n_not_measured"] == len(CONF.checks)


# --------------------------------------------------------------------------- (f)
def _strict(s):
    return json.loads(s, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))


def test_json_schema_png_and_table(tmp_path):
    rng = np.random.default_rng(10)
    blob = np.stack([gaussian_blob(f, 1.3) for f in (0.2, 0.3, 0.4)])
    rows, img, arc = build_pairs(15, 2, lens_light, lambda t, j, r: blob, rng,
                                 theta_e=lambda t, j: 0.5 + 0.05 * t, lens_phi=0.3)
    rep = ra.audit_stamps("mem://set", str(tmp_path), stamps=to_stamps(rows, img, arc),
                          png=False)                  # the PNG: test_qa_step_runs_the_audit
    doc = _strict((tmp_path / ra.JSON_NAME).read_text())
    assert doc["schema"] == ra.SCHEMA == "realism_audit/1"
    assert set(doc) >= {"schema", "stamps", "config", "splits", "percentiles", "counts", "classifier",
                        "distributions", "misalignment", "checks", "summary", "json", "png"}
    assert doc["splits"] == ["train", "val", "test"] == list(CONF.splits)
    assert doc["counts"]["pairs_ok"] == 30
    assert set(doc["distributions"]) == set(CONF.distributions())
    for d in doc["distributions"].values():
        assert {"label", "unit", "definition", "n", "n_nonfinite", "mean", "p10", "p50", "p90",
                "reference"} <= set(d)
    for k in ("auc_per_fold", "auc_mean", "auc_std", "auc_pooled", "roc_curve", "n_groups"):
        assert k in doc["classifier"]
    assert len(doc["classifier"]["roc_curve"]["fpr"]) == len(doc["classifier"]["roc_curve"]["tpr"])
    assert len(doc["checks"]) == len(CONF.checks) == 8
    for c in doc["checks"]:
        assert set(c) == {"name", "metric", "op", "threshold", "value", "status", "pass"}
        assert c["status"] in ("pass", "fail", "not_measured")
        assert c["pass"] == (c["status"] == "pass")
    s = doc["summary"]
    assert s["n_pass"] + s["n_fail"] + s["n_not_measured"] == s["n_checks"] == 8
    # theta_E 0.5..1.2": the median check fails, the value is the measured median
    c = next(c for c in doc["checks"] if c["metric"] == "distributions.theta_e_arcsec.p50")
    assert c["status"] == "fail" and c["value"] == pytest.approx(0.85)
    assert c["threshold"] == 1.2 and c["op"] == ">="
    assert doc["png"] is None
    table = ra.format_table(rep)
    for ch in CONF.checks:
        assert ch.name[:48] in table
    assert "FAIL" in table and "ROC AUC mean" in table


def test_shipped_conf_thresholds_and_references():
    """conf/realism.toml holds the issue's thresholds and cited references."""
    by = {c.metric: (c.op, c.threshold) for c in CONF.checks}
    assert by["distributions.theta_e_arcsec.p50"] == (">=", 1.2)
    assert by["distributions.theta_e_arcsec.p10"] == (">=", 0.7)
    assert by["distributions.arc_mag_r.p50"] == ("in", (21.3, 23.3))
    assert by["distributions.arc_lens_flux_ratio_r.p50"] == ("in", (0.02, 0.2))
    assert by["distributions.arc_colour_gr.p50"] == ("in", (-0.3, 0.6))
    assert by["distributions.src_reff_arcsec.p50"] == ("in", (0.15, 0.5))
    assert by["classifier.auc_cross_target_mean"] == ("<=", 0.65)
    assert by["misalignment.median_deg"] == ("<=", 25.0)
    r = CONF.references
    assert (r["theta_e_arcsec"]["p10"], r["theta_e_arcsec"]["p50"], r["theta_e_arcsec"]["p90"]) \
        == (1.00, 1.35, 1.94)
    assert (r["arc_colour_gr"]["p10"], r["arc_colour_gr"]["p90"]) == (-0.18, 0.63)
    assert all("Collett 2015" in v["citation"] for v in r.values())


def test_bad_conf_is_refused_with_the_file_named(tmp_path):
    text = (REPO / "conf" / "realism.toml").read_text()
    bad = tmp_path / "realism.toml"
    bad.write_text(text.replace('metric = "classifier.auc_cross_target_mean"',
                                'metric = "classifier.auc_median"'))
    with pytest.raises(ValueError, match=r"realism\.toml.*unknown metric"):
        ra.load_config(bad)
    bad.write_text(text.replace("core_px = 10", "core_px = 0"))
    with pytest.raises(ValueError, match=r"realism\.toml: \[classifier\] core_px"):
        ra.load_config(tmp_path)
    with pytest.raises(FileNotFoundError):
        ra.load_config(tmp_path / "absent.toml")


# --------------------------------------------------------------------------- QA step
def _write_stamps(root: Path, rows, img, arc):
    """A 4c-like stamps directory (hive split=..., binary planes) for the QA step."""
    extra = {"arc_snr": 12.0, "mu_total": 5.0, "mu_point": 11.0, "lens_x_arcsec": 0.05,
             "lens_y_arcsec": -0.05, "psf_fwhm_used_g": 1.3, "psf_fwhm_used_r": 1.2,
             "psf_fwhm_used_z": 1.1, "psf_source_g": "centre", "psf_source_r": "centre",
             "psf_source_z": "centre"}
    recs = []
    for r, im, a in zip(rows, img, arc):
        rec = {k: v for k, v in r.items() if k != "split"}
        rec.update(extra, image=im.astype("<f4").tobytes(), arc=a.astype("<f4").tobytes())
        recs.append(rec)
    d = root / "split=train"
    d.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(recs), d / "part-0.parquet")
    (root / "_SUCCESS").write_text(json.dumps({"format": "phase4c-stamps/1", "rows": len(recs)}))


def test_qa_step_runs_the_audit_on_train_stamps(tmp_path, capsys):
    rng = np.random.default_rng(11)
    ring = ring_outside_core()
    rows, img, arc = build_pairs(12, 2, noise_cutout(), lambda t, j, r: ring, rng,
                                 tx=31.8, ty=32.2)
    stamps = tmp_path / "stamps"
    _write_stamps(stamps, rows, img, arc)
    # streamed from disk = in memory
    red = ra.load_reduced(str(stamps), CONF, ["train"], batch_rows=7)
    mem = ra.concat_reduced([ra.reduce_chunk(to_stamps(rows, img, arc), CONF)], CONF)
    assert list(red.table["task_id"]) == list(mem.table["task_id"])
    np.testing.assert_array_equal(red.features, mem.features)
    s = qa.run_qa(str(stamps), str(tmp_path / "qa"), n_gallery=1, realism="auto")
    r = s["realism"]
    assert r["status"] == "ran" and Path(r["json"]).is_file()
    png = Path(r["png"]).read_bytes()
    assert png[:8] == PNG_SIGNATURE and len(png) > 10_000
    doc = _strict(Path(r["json"]).read_text())
    assert doc["counts"]["pairs_ok"] == 24 and r["n_checks"] == 8
    assert "realism audit of" in capsys.readouterr().out
    # "no" skips it; "auto" skips a non-train tier, "yes" runs it anyway
    st = to_stamps(rows, img, arc)
    assert qa.realism_step(str(stamps), str(tmp_path / "q2"), st, "no")["status"] == "skipped"
    debug = to_stamps([dict(r, tier="debug") for r in rows], img, arc)
    assert qa.realism_step(str(stamps), str(tmp_path / "q3"), debug, "auto")["status"] == \
        "skipped"
    assert not (tmp_path / "q3" / ra.JSON_NAME).exists()
    with pytest.raises(ValueError, match="realism mode"):
        qa.realism_step(str(stamps), str(tmp_path / "q4"), st, "maybe")


def test_cli_writes_json_and_exits_zero_on_failed_checks(tmp_path, capsys):
    rng = np.random.default_rng(12)
    blob = np.stack([gaussian_blob(f, 1.3) for f in (1.0, 1.5, 2.0)])
    rows, img, arc = build_pairs(10, 1, noise_cutout(), lambda t, j, r: blob, rng)
    out = tmp_path / "results"
    stamps = out / "phase4c" / "v1" / "stamps" / "train_x"
    _write_stamps(stamps, rows, img, arc)
    argv = ["--out", str(out), "--variant", "v1", "--experiment-id", "train_x", "--no-png"]
    assert ra.main(argv) == 0
    assert (out / "qa" / "train_x" / ra.JSON_NAME).is_file()
    assert "core-only classifier" in capsys.readouterr().out
    assert ra.main(argv + ["--fail-on-check"]) == 1


# --------------------------------------------------------------------------- AUC by bin
def test_binned_auc_compares_like_with_like():
    rng = np.random.default_rng(5)
    n = 200
    groups = np.array([f"t{i // 2}" for i in range(n)])           # 2 pairs per target
    y = np.r_[np.ones(n, np.int8), np.zeros(n, np.int8)]
    g2 = np.r_[groups, groups]
    bright = rng.normal(size=n // 2).repeat(2)                     # a target property
    # a score that only knows the target (no arc): chance in every bin, even a bin that
    # selects bright targets; against all controls that bin would look separable
    score = np.r_[bright, bright]
    out = ra.binned_auc(y, score, g2, bright, [-9.0, 0.0, 9.0])
    assert [b["n_pairs"] for b in out] == [(bright < 0).sum(), (bright >= 0).sum()]
    for b in out:
        assert abs(b["auc_cross_target"] - 0.5) < 0.08
    # a score that sees the arc: 1 in every bin
    perfect = ra.binned_auc(y, y + 0.01 * np.r_[bright, bright], g2, bright, [-9.0, 0.0, 9.0])
    assert [b["auc_cross_target"] for b in perfect] == [1.0, 1.0]
    # an empty bin is NaN with n 0, not an error
    empty = ra.binned_auc(y, score, g2, bright, [50.0, 60.0])[0]
    assert empty["n_pairs"] == 0 and np.isnan(empty["auc_cross_target"])
    with pytest.raises(ValueError, match="paired controls"):
        ra.binned_auc(y[::-1], score, g2, bright, [0.0, 1.0])


def test_diagnostic_bins_config_is_validated(tmp_path):
    text = ra.DEFAULT_CONF.read_text()
    bad = tmp_path / "realism.toml"
    bad.write_text(text.replace("theta_e_arcsec = [0.0, 1.2, 1.6, 2.2, 100.0]",
                                "theta_e = [0.0, 1.2]"))
    with pytest.raises(ValueError, match=r"diagnostic_bins\] theta_e: unknown distribution"):
        ra.load_config(bad)
    bad.write_text(text.replace("theta_e_arcsec = [0.0, 1.2, 1.6, 2.2, 100.0]",
                                "theta_e_arcsec = [0.0, 2.0, 1.0]"))
    with pytest.raises(ValueError, match="strictly increasing"):
        ra.load_config(bad)
    assert dict(CONF.classifier.diagnostic_bins)["theta_e_arcsec"] == (0.0, 1.2, 1.6, 2.2, 100.0)


# --------------------------------------------------------------------------- AUC by feature set
def _core_pairs(lens_flux, lens_colour, arc_flux, arc_colour, rng, colour_scatter=0.03,
                noise=1e-3, passes=2):
    """Core features (rows, 3 x 100) of injections then their paired controls: lens and arc
    share one core profile, so the pixels of a band carry only its brightness; ``lens_flux``,
    ``arc_flux``: one value per target / per pair (arrays)."""
    k = CONF.classifier.core_px
    j, i = np.mgrid[0:k, 0:k].astype(float)
    prof = np.exp(-0.5 * ((i - 4.5) ** 2 + (j - 4.5) ** 2) / 3.0 ** 2).ravel()
    prof /= prof.sum()
    n_t = lens_flux.size
    lens = lens_flux[:, None] * np.asarray(lens_colour)[None, :] * \
        (1.0 + colour_scatter * rng.normal(size=(n_t, 3)))            # per-target colour scatter
    lens = np.repeat(lens, passes, axis=0)                             # (pairs, 3)
    arc = arc_flux[:, None] * np.asarray(arc_colour)[None, :]
    ctl = lens[:, :, None] * prof + rng.normal(0.0, noise, (lens.shape[0], 3, k * k))
    inj = ctl + arc[:, :, None] * prof
    X = np.concatenate([inj, ctl]).reshape(2 * lens.shape[0], -1)
    groups = np.repeat([f"t{t}" for t in range(n_t)], passes)
    y = np.r_[np.ones(groups.size, np.int8), np.zeros(groups.size, np.int8)]
    return X.astype(np.float32), y, np.r_[groups, groups]


def test_feature_set_items_build_the_documented_columns():
    cc = CONF.classifier
    assert ra.parse_feature_item("g", cc.bands) == ("pixels", "g")
    assert ra.parse_feature_item("z/r", cc.bands) == ("ratio", "z", "r")
    for bad in ("i", "g/g", "g/i", "g/r/z", "gr"):
        with pytest.raises(ValueError, match="unknown feature item"):
            ra.parse_feature_item(bad, cc.bands)
    rng = np.random.default_rng(0)
    X = rng.random((6, 300)).astype(np.float32)
    M, n_undef = ra.feature_set_matrix(X, cc, ["z", "g/r"])
    assert M.shape == (6, 101) and n_undef == 0
    np.testing.assert_array_equal(M[:, :100], X[:, 200:].astype(np.float64))
    np.testing.assert_allclose(M[:, 100], X[:, :100].sum(1, dtype=np.float64)
                               / X[:, 100:200].sum(1, dtype=np.float64), rtol=1e-12)
    X[2, 100:200] = -1.0                                  # r core sum <= 0: ratio undefined
    M, n_undef = ra.feature_set_matrix(X, cc, ["g/r"])
    assert n_undef == 1 and M[2, 0] == np.median(np.delete(M[:, 0], 2))


def test_feature_sets_find_a_colour_only_signal():
    """Injections add a blue arc (g = r = z flux) of 10-20 % of a red lens's r flux
    (g : r : z = 0.4 : 1 : 1.6) whose brightness varies by e^1 between targets: the colours
    separate, no single band's brightness does."""
    rng = np.random.default_rng(11)
    n_t = 120
    lens_flux = np.exp(rng.normal(0.0, 1.0, n_t)) * 50.0
    arc_flux = np.repeat(lens_flux, 2) * rng.uniform(0.1, 0.2, 2 * n_t)
    X, y, groups = _core_pairs(lens_flux, (0.4, 1.0, 1.6), arc_flux, (1.0, 1.0, 1.0), rng)
    out = ra.feature_set_aucs(X, y, groups, CONF.classifier)
    assert set(out) == {"g", "r", "z", "gr", "rz", "core_colours"}
    auc = {k: v["auc_cross_target_pooled"] for k, v in out.items()}
    assert out["core_colours"]["n_features"] == 2 and out["g"]["n_features"] == 100
    assert auc["core_colours"] > 0.95, auc
    for b in "grz":
        assert auc[b] < 0.68, auc


def test_feature_sets_find_a_single_band_signal():
    """Injections add flux in z only, lenses of nearly one brightness: z carries it, g and r
    are at chance."""
    rng = np.random.default_rng(12)
    n_t = 120
    lens_flux = np.exp(rng.normal(0.0, 0.1, n_t)) * 20.0
    X, y, groups = _core_pairs(lens_flux, (0.4, 1.0, 1.6), np.full(2 * n_t, 16.0),
                               (0.0, 0.0, 1.0), rng)
    auc = {k: v["auc_cross_target_pooled"]
           for k, v in ra.feature_set_aucs(X, y, groups, CONF.classifier).items()}
    assert auc["z"] > 0.95 and auc["rz"] > 0.95, auc
    for name in ("g", "r", "gr"):
        assert abs(auc[name] - 0.5) < 0.12, auc


def test_diagnostic_feature_sets_config_is_validated(tmp_path):
    text = ra.DEFAULT_CONF.read_text()
    line = 'core_colours = ["g/r", "z/r"]'
    assert line in text
    bad = tmp_path / "realism.toml"
    for repl, msg in (('core_colours = ["g/i"]', r"core_colours.*unknown feature item 'g/i'"),
                      ('core_colours = ["g/g"]', "unknown feature item 'g/g'"),
                      ('core_colours = []', "non-empty list of strings"),
                      ('core_colours = ["g", "g"]', "listed twice"),
                      ('core_colours = "g/r"', "non-empty list of strings")):
        bad.write_text(text.replace(line, repl))
        with pytest.raises(ValueError, match=msg):
            ra.load_config(bad)
    assert dict(CONF.classifier.diagnostic_feature_sets)["core_colours"] == ("g/r", "z/r")
