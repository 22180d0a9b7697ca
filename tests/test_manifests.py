"""Stage 4a core (injection_pipeline.manifests): pure, fast, no Spark."""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from injection_pipeline import manifests as mf

SPLIT_NAMES = np.array(["train", "val", "test"])


# --------------------------------------------------------------------------- helpers
def make_targets(n: int, seed: int = 0, splits=("train", "val", "test")) -> dict:
    """Ranked target arrays as stage 4a's targets/ranked table (TARGET_COLUMNS)."""
    rng = np.random.default_rng(seed)
    brick = np.array([f"{1000 + i // 7:04d}p{100 + (i % 7):03d}" for i in range(n)])
    split = np.array(splits)[rng.integers(0, len(splits), n)]
    rank_split = np.zeros(n, np.int64)
    for s in splits:
        idx = np.flatnonzero(split == s)
        rank_split[idx] = rng.permutation(idx.size)
    return {"brickname": brick, "objid": np.arange(n, dtype=np.int64) % 50,
            "ra": rng.uniform(100, 101, n), "dec": rng.uniform(10, 11, n),
            "lens_mag_r": rng.uniform(18.5, 20.5, n),
            "healpix_cell": rng.integers(0, 1000, n), "split": split,
            "rank_global": rng.permutation(n).astype(np.int64), "rank_split": rank_split}


def counts_by_split(t: dict) -> dict:
    s, c = np.unique(t["split"], return_counts=True)
    return dict(zip(s.tolist(), c.tolist()))


@pytest.fixture(scope="module")
def cfg():
    """The shipped conf with the train tier on the independent model: these tests prove the
    fan-out mechanics and the independent priors' laws with exact counts; the conditioned
    model (acceptance) has its own tests in test_population.py."""
    return mf.load_config(overrides={"lens_model.train": "independent"})


def test_shipped_train_tier_is_conditioned_and_others_independent():
    shipped = mf.load_config()
    models = {e.tier: e.lens_model for e in shipped.experiments}
    assert models == {"debug": "independent", "grid": "independent", "train": "conditioned"}
    assert shipped.population is not None


def exp_of(cfg, tier: str, **changes) -> mf.Experiment:
    e = next(e for e in cfg.experiments if e.tier == tier and e.stamp_size == 64)
    return dataclasses.replace(e, **changes)


def expand(cfg, exp, t):
    return mf.expand_targets(t, exp, cfg, len(t["brickname"]), counts_by_split(t)).to_pandas()


# --------------------------------------------------------------------------- config
def test_default_config_six_experiments(cfg):
    ids = [e.experiment_id for e in cfg.experiments]
    assert sorted(ids) == sorted(f"{t}_stamp{s}_bandsgrz_gridgrid_{g}" for t, g in
                                 (("debug", "small"), ("grid", "medium"), ("train", "small"))
                                 for s in (64, 96))
    by = {e.experiment_id: e for e in cfg.experiments}
    assert "train_stamp64_bandsgrz_gridgrid_small" in by
    d, g, t = (by[f"{x}_stamp64_bandsgrz_gridgrid_{y}"]
               for x, y in (("debug", "small"), ("grid", "medium"), ("train", "small")))
    assert (d.n_per_config, g.n_per_config, t.n_total_per_split) == (5, 25, 200_000)
    assert (d.control_frac, g.control_frac, t.control_frac) == (0.0, 0.10, 0.50)
    assert d.replicates == g.replicates == 2 and cfg.split.split_seed == 13
    assert d.grid.n_points() == 48 and g.grid.n_points() == 360
    assert g.metrics_only and not t.metrics_only
    assert cfg.priors.offset_frac_max <= 0.5
    assert (cfg.priors.colour_gr.a, cfg.priors.colour_gr.b) == (1.15, 0.30)
    assert (cfg.priors.colour_rz.a, cfg.priors.colour_rz.b) == (0.85, 0.20)
    assert cfg.max_total_tasks == 50_000_000


def test_config_overrides_and_selection():
    c = mf.load_config(experiments=["train", "debug_stamp96_bandsgrz_gridgrid_small"],
                       overrides={"seed": 7, "healpix_nside": 64, "control_frac.train": 0.3,
                                  "n_total_train_per_split": 1000, "guard_band": True})
    assert sorted(e.experiment_id for e in c.experiments) == sorted(
        ["train_stamp64_bandsgrz_gridgrid_small", "train_stamp96_bandsgrz_gridgrid_small",
         "debug_stamp96_bandsgrz_gridgrid_small"])
    assert c.seed == 7 and c.split.nside == 64 and c.split.guard_band
    assert c.experiment("train_stamp64_bandsgrz_gridgrid_small").control_frac == 0.3
    with pytest.raises(mf.ConfigError, match="unknown experiment"):
        mf.load_config(experiments=["nope"])


def test_bad_config_files_name_the_file(tmp_path):
    import shutil
    for f in ("experiments.toml", "grids.toml", "priors.toml"):
        shutil.copy(mf.DEFAULT_CONF_DIR / f, tmp_path / f)
    text = (tmp_path / "grids.toml").read_text().replace("src_e = [0.0, 0.3]\n", "", 1)
    (tmp_path / "grids.toml").write_text(text)
    with pytest.raises(mf.ConfigError, match=r"grids.toml \[small\]: missing required key 'src_e'"):
        mf.load_config(tmp_path)
    with pytest.raises(mf.ConfigError, match="not found"):
        mf.load_config(tmp_path / "missing.toml")


def test_task_count_guard(cfg):
    est = mf.check_task_budget(cfg)
    assert est["grid_stamp64_bandsgrz_gridgrid_medium"] == pytest.approx(360 * 25 * 2 / 0.9)
    assert est["train_stamp64_bandsgrz_gridgrid_small"] == pytest.approx(3 * 200_000)
    with pytest.raises(mf.TaskCountExceeded, match=r"refusing to plan 1,240,960 tasks "
                       r"\(> --max-total-tasks 1,000,000\)"):
        mf.check_task_budget(cfg, max_total_tasks=1_000_000)
    big = mf.load_config(overrides={"n_total_train_per_split": 10_000_000})
    with pytest.raises(mf.TaskCountExceeded, match="train_stamp96_bandsgrz_gridgrid_small"):
        mf.check_task_budget(big)


# --------------------------------------------------------------------------- randomness
def test_philox_matches_numpy_generator_bit_for_bit():
    keys = np.concatenate([np.array([0, 1, 2**63 - 1, 2**63, 2**64 - 1], np.uint64),
                           np.random.default_rng(5).integers(0, 2**63, 40, np.int64)
                           .astype(np.uint64) * np.uint64(3)])
    u = mf.philox_uniforms(keys, 13)   # not a multiple of 4: crosses three Philox blocks
    for k, row in zip(keys.tolist(), u):
        assert np.array_equal(row, np.random.Generator(np.random.Philox(key=k)).random(13))
    signed = keys.view(np.int64)       # the int64 column gives the same stream
    assert np.array_equal(mf.philox_uniforms(signed, 13), u)


def test_seed64_golden_and_no_python_hash():
    s = mf.seed64(20260401, ["debug/0001p000/0/p0000r0|0.3"])
    # pinned: blake2b-64 little endian, independent of PYTHONHASHSEED / platform
    import hashlib
    ref = int.from_bytes(hashlib.blake2b(b"20260401|debug/0001p000/0/p0000r0|0.3",
                                         digest_size=8).digest(), "little")
    assert int(s[0].astype(np.uint64)) == ref
    assert s.dtype == np.int64


def test_seeds_change_with_every_identity_component(cfg):
    t = make_targets(60)
    exp = exp_of(cfg, "debug")
    base = expand(cfg, exp, t).set_index("task_id")
    tid = base.index[0]
    row = base.loc[tid]
    # same task in another experiment / with another global seed
    other = expand(cfg, dataclasses.replace(exp, experiment_id="debug_other"), t)
    assert not set(other["task_seed64"]) & set(base["task_seed64"])
    reseeded = expand(dataclasses.replace(cfg, seed=cfg.seed + 1), exp, t).set_index("task_id")
    assert (reseeded.loc[tid, "task_seed64"] != row["task_seed64"])
    # same experiment: seeds differ across replicate, point, objid, brick -> all unique
    assert base["task_seed64"].is_unique and base.index.is_unique
    assert len(base) == 48 * 5 * 2
    # changing a grid value (same point index) changes the seed
    g2 = dataclasses.replace(exp.grid, axes=tuple(
        (a, tuple(v * 1.01 for v in vals)) if a == "theta_e_arcsec" else (a, vals)
        for a, vals in exp.grid.axes))
    moved = expand(cfg, dataclasses.replace(exp, grid=g2), t).set_index("task_id")
    assert (moved.loc[base.index, "task_seed64"] != base["task_seed64"]).all()
    # and the draws follow the seed: same seed -> same draws
    again = expand(cfg, exp, t).set_index("task_id")
    pd.testing.assert_frame_equal(again, base)


def test_rows_depend_only_on_their_target_not_the_batch(cfg):
    t = make_targets(200, seed=3)
    for tier in ("grid", "train"):
        exp = exp_of(cfg, tier, n_total_per_split=900, control_pairing="paired")
        whole = mf.expand_targets(t, exp, cfg, 200, counts_by_split(t)).to_pandas()
        order = np.random.default_rng(1).permutation(200)
        parts = [mf.expand_targets({k: v[idx] for k, v in t.items()}, exp, cfg, 200,
                                   counts_by_split(t)).to_pandas()
                 for idx in np.array_split(order, 7)]
        pieced = pd.concat(parts)
        key = lambda d: d.sort_values("task_id").reset_index(drop=True)  # noqa: E731
        pd.testing.assert_frame_equal(key(whole), key(pieced))


# --------------------------------------------------------------------------- fan-out
def test_grid_counts_points_and_paired_controls(cfg):
    t = make_targets(300, seed=1)
    exp = exp_of(cfg, "grid", n_per_config=7, replicates=3, control_frac=0.2)
    df = expand(cfg, exp, t)
    inj, ctl = df[df.is_control == 0], df[df.is_control == 1]
    assert len(inj) == 360 * 7 * 3
    per_point = inj[["point_index", "brickname", "objid"]].drop_duplicates() \
        .groupby("point_index").size()
    assert (per_point == 7).all() and len(per_point) == 360
    assert (inj.groupby(["point_index", "brickname", "objid"]).size() == 3).all()
    # grid values of each point
    pts = exp.grid.points()
    for a in mf.GRID_AXES:
        assert np.array_equal(inj[a].to_numpy(), pts[a][inj.point_index.to_numpy()])
    # paired controls: same cutout as their injection row, share pair_id, no injection columns
    p = exp.pair_prob
    n_units = len(inj)
    assert abs(len(ctl) - p * n_units) < 4 * np.sqrt(n_units * p * (1 - p))
    m = ctl.merge(inj, left_on="pair_id", right_on="task_id", suffixes=("", "_inj"))
    assert len(m) == len(ctl)
    for c in ("brickname", "objid", "ra", "dec", "split", "point_index", "replicate"):
        assert (m[c] == m[c + "_inj"]).all(), c
    assert (m["pair_id"] == m["pair_id_inj"]).all()
    assert ctl[["theta_e_arcsec", "src_x_arcsec", "src_mag_r", "lens_q", "shear"]].isna().all().all()
    assert inj.loc[inj.pair_id.notna(), "task_id"].isin(ctl.pair_id).all()


def test_grid_unpaired_controls_and_relative_brightness(cfg):
    t = make_targets(100, seed=2)
    exp = exp_of(cfg, "grid", n_per_config=5, replicates=2, control_frac=0.1,
                 control_pairing="unpaired")
    df = expand(cfg, exp, t)
    inj, ctl = df[df.is_control == 0], df[df.is_control == 1]
    assert len(inj) == 360 * 5 * 2 and len(ctl) == round(3600 / 9)
    assert ctl.pair_id.isna().all() and ctl.point_index.isna().all()
    assert np.allclose(inj.src_mag_r, inj.lens_mag_r + inj.src_dmag)
    with pytest.raises(ValueError, match="only 3 valid targets"):
        expand(cfg, exp, make_targets(3))


def test_train_counts_and_control_fraction_within_binomial_error(cfg):
    t = make_targets(500, seed=4)
    n = 6000
    # unpaired: each row is a control with probability f (its own draw)
    exp = exp_of(cfg, "train", n_total_per_split=n, control_pairing="unpaired")
    df = expand(cfg, exp, t)
    assert (df.groupby("split").size() == n).all()
    for _, g in df.groupby("split"):
        f = g.is_control.mean()
        assert abs(f - 0.5) < 4 * np.sqrt(0.25 / n), f
    # paired, f = 0.5: every injection has one control on the same target
    exp = exp_of(cfg, "train", n_total_per_split=n, control_pairing="paired")
    df = expand(cfg, exp, t)
    assert (df.groupby("split").size() == n).all() and df.is_control.mean() == 0.5
    assert (df.groupby("pair_id").size() == 2).all()
    # paired, f = 0.3: Bernoulli(f / (1 - f)) per unit
    exp = exp_of(cfg, "train", n_total_per_split=n, control_frac=0.3)
    df = expand(cfg, exp, t)
    f = df.is_control.mean()
    assert abs(f - 0.3) < 4 * np.sqrt(0.3 * 0.7 / len(df)), f
    assert abs(len(df) - 3 * n) < 4 * np.sqrt(3 * n)
    # targets cycle: within a split, per-target counts differ by at most one unit
    inj = df[df.is_control == 0]
    c = inj.groupby(["split", "brickname", "objid"]).size()
    assert (c.groupby(level=0).max() - c.groupby(level=0).min() <= 1).all()


def test_train_draws_follow_their_declared_laws(cfg):
    """KS tests of every drawn column against its declared law (seeded, 30k rows)."""
    t = make_targets(400, seed=5)
    pri = dataclasses.replace(cfg.priors, src_n=mf.Dist("uniform", 0.5, 2.0),
                              offset_frac_min=0.1, offset_frac_max=0.5)
    c2 = dataclasses.replace(cfg, priors=pri)
    exp = exp_of(c2, "train", n_total_per_split=10_000, control_frac=0.0)
    df = expand(c2, exp, t)
    assert len(df) == 30_000 and (df.is_control == 0).all()
    g = exp.grid
    laws = {
        "theta_e_arcsec": stats.uniform(*_lw(g.range("theta_e_arcsec"))),
        "src_reff_arcsec": stats.uniform(*_lw(g.range("src_reff_arcsec"))),
        "src_e": stats.uniform(*_lw(g.range("src_e"))),
        "shear": stats.uniform(*_lw(g.range("shear"))),
        "src_phi_rad": stats.uniform(0, np.pi), "lens_phi_rad": stats.uniform(0, np.pi),
        "shear_phi_rad": stats.uniform(0, np.pi), "lens_q": stats.uniform(0.5, 0.5),
        "src_n": stats.uniform(0.5, 1.5), "src_mag_r": stats.uniform(22, 2),
        "src_colour_gr": stats.norm(1.15, 0.30), "src_colour_rz": stats.norm(0.85, 0.20),
    }
    for col, law in laws.items():
        p = stats.kstest(df[col], law.cdf).pvalue
        assert p > 1e-3, (col, p)
    # offset: uniform in AREA within [0.1, 0.5] theta_E  <=>  frac^2 ~ U(0.01, 0.25)
    assert stats.kstest(df.src_offset_frac ** 2, stats.uniform(0.01, 0.24).cdf).pvalue > 1e-3
    assert stats.kstest(df.src_offset_frac, stats.uniform(0.1, 0.4).cdf).pvalue < 1e-6  # power
    r = np.hypot(df.src_x_arcsec, df.src_y_arcsec)
    assert np.allclose(r, df.src_offset_frac * df.theta_e_arcsec)
    assert stats.kstest(np.arctan2(df.src_y_arcsec, df.src_x_arcsec),
                        stats.uniform(-np.pi, 2 * np.pi).cdf).pvalue > 1e-3
    # derived columns
    assert np.allclose(df.src_q, (1 - df.src_e) / (1 + df.src_e))
    assert np.allclose(df.lens_e, (1 - df.lens_q) / (1 + df.lens_q))
    assert np.allclose(df.src_mag_g - df.src_mag_r, df.src_colour_gr)
    assert np.allclose(df.src_mag_r - df.src_mag_z, df.src_colour_rz)
    assert np.allclose(df.src_flux_r, 10 ** (-0.4 * (df.src_mag_r - 22.5)))
    assert np.allclose(df.src_dmag, df.src_mag_r - df.lens_mag_r)
    from lensing import shear_components
    g1, g2 = shear_components(df.shear.to_numpy(), df.shear_phi_rad.to_numpy())
    assert np.allclose(df.shear_g1, g1) and np.allclose(df.shear_g2, g2)
    # draws are independent across quantities (no slot reuse): weak correlations only
    cc = np.corrcoef(df[["src_phi_rad", "lens_phi_rad", "shear_phi_rad", "lens_q", "src_n",
                         "theta_e_arcsec", "src_colour_gr", "src_colour_rz"]].to_numpy().T)
    assert np.abs(cc - np.eye(len(cc))).max() < 0.05


def _lw(lohi):
    return lohi[0], lohi[1] - lohi[0]


def test_manifest_schema_is_documented_and_validated(cfg):
    sch = mf.manifest_schema()
    assert sch.names == list(mf.MANIFEST_COLUMN_NAMES)
    for c in mf.MANIFEST_COLUMNS:
        assert c.description and c.distribution, c.name
    for need in ("task_id", "task_seed64", "src_x_arcsec", "src_y_arcsec", "src_phi_rad", "src_q",
                 "src_reff_arcsec", "src_n", "src_mag_g", "src_mag_r", "src_mag_z", "lens_e",
                 "lens_q", "lens_phi_rad", "shear", "shear_phi_rad", "theta_e_arcsec",
                 "brickname", "ra", "dec", "objid", "stamp_size_px", "experiment_id", "split",
                 "replicate", "is_control", "pair_id"):
        assert need in sch.names
    lens_e = next(c for c in mf.MANIFEST_COLUMNS if c.name == "lens_e")
    assert "(1-q)/(1+q)" in lens_e.description
    tbl = mf.expand_targets(make_targets(40), exp_of(cfg, "debug"), cfg, 40,
                            counts_by_split(make_targets(40)))
    mf.validate_manifest(tbl)
    bad = tbl.set_column(tbl.schema.get_field_index("ra"), "ra",
                         __import__("pyarrow").array([np.nan] * tbl.num_rows))
    with pytest.raises(ValueError, match="column ra"):
        mf.validate_manifest(bad.cast(tbl.schema))


# --------------------------------------------------------------------------- splits, targets
def _split_cfg(**kw):
    base = dict(split_seed=13, fractions=(("train", 0.7), ("val", 0.15), ("test", 0.15)),
                nside=16, guard_band=False, guard_nside=256)
    base.update(kw)
    return mf.SplitConfig(**base)


def test_cell_splits_stable_fractions_and_seeded():
    sc = _split_cfg()
    cells = np.arange(12 * 16 * 16)
    s = mf.cell_splits(cells, sc)
    frac = np.bincount(s, minlength=3) / cells.size
    assert np.allclose(frac, [0.7, 0.15, 0.15], atol=4 * np.sqrt(0.7 * 0.3 / cells.size))
    sub = np.random.default_rng(0).choice(cells, 500, replace=False)
    assert np.array_equal(mf.cell_splits(sub, sc), s[sub])      # rows added/removed: stable
    assert not np.array_equal(mf.cell_splits(cells, _split_cfg(split_seed=14)), s)


def test_bricks_never_straddle_splits_and_guard_band():
    rng = np.random.default_rng(0)
    ra, dec = rng.uniform(100, 140, 4000), rng.uniform(-5, 25, 4000)
    plain = mf.assign_brick_splits(ra, dec, _split_cfg())
    assert not plain["guard"].any()
    assert np.array_equal(plain["cell"], mf.healpix_cells(ra, dec, 16))
    g = mf.assign_brick_splits(ra, dec, _split_cfg(guard_band=True))
    assert np.array_equal(g["split"], plain["split"]) and np.array_equal(g["cell"], plain["cell"])
    assert 0.02 < g["guard"].mean() < 0.5
    # a kept brick has no brick of another split within ~one fine cell; guarded ones do
    from astropy.coordinates import SkyCoord
    import astropy.units as u
    sky = SkyCoord(ra * u.deg, dec * u.deg)
    i1, i2, _, _ = sky.search_around_sky(sky, 0.1 * u.deg)
    cross = (plain["split"][i1] != plain["split"][i2])
    assert g["guard"][i1[cross]].all()    # any pair of differing-split bricks closer than 0.1 deg


def test_classify_targets_reasons_and_required_columns():
    bricks = {"brickname": np.array(["1000p100", "1001p100"]), "ra": np.array([100.0, 100.3]),
              "dec": np.array([10.0, 10.0]), "ra1": np.array([99.875, 100.175]),
              "ra2": np.array([100.125, 100.425]), "dec1": np.array([9.875, 9.875]),
              "dec2": np.array([10.125, 10.125])}
    look = mf.brick_lookup(bricks, _split_cfg())
    cat = pd.DataFrame({
        "brickname": ["1000p100", "1000p100", "1000p100", "9999p999", "1001p100", "1000p100",
                      "1001p100", None],
        "objid": [0, 1, 2, 3, 4, 5, 6, 7],
        "ra": [100.0, np.nan, 100.0, 100.0, 100.0, 400.0, 100.3, 100.0],
        "dec": [10.0, 10.0, 10.0, 10.0, 10.0, 10.0, 10.1, 10.0],
        "flux_r": [10.0, 10.0, -1.0, 10.0, 10.0, 10.0, np.nan, 10.0]})
    out = mf.classify_targets(cat, look)
    assert out.reason.tolist() == [None, "nonfinite_radec", "bad_flux_r",
                                   "brick_not_in_bricks_table", "outside_brick_bounds",
                                   "radec_out_of_range", "bad_flux_r", "missing_id"]
    assert out.lens_mag_r[0] == pytest.approx(20.0)
    assert out.split[0] in ("train", "val", "test") and out.healpix_cell[0] >= 0
    with pytest.raises(ValueError, match=r"cat\.parquet: parent catalogue lacks required "
                                         r"column\(s\) \['flux_r'\]"):
        mf.check_required_columns(["brickname", "objid", "ra", "dec"], "cat.parquet")


def test_docs_schema_table_is_up_to_date():
    text = (mf.DEFAULT_CONF_DIR.parent / "docs" / "manifests.md").read_text()
    assert mf.schema_markdown() in text
