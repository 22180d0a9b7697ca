"""The conditioned lens model of stage 4a (injection_pipeline.population), without Spark.

theta_E against the SIS reference numbers (physics-conventions.md) and astropy's distances;
the stellar-mass and M*-sigma relations against hand computations; the SIE following the light;
the source colours; the acceptance rules and their counts (binomial tolerances), including the
cross-section weighting; determinism of the candidates on any batching.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from astropy.cosmology import Planck18

from injection_pipeline import manifests as mf
from injection_pipeline.population import acceptance as acc
from injection_pipeline.population.cosmology import (DistanceTable, einstein_radius_sis,
                                                     sis_einstein_radius_arcsec)
from injection_pipeline.population.deflector import (lens_redshift,
                                                     sie_from_light, sigma_from_mstar,
                                                     stellar_mass, velocity_dispersion)
from injection_pipeline.population.source import colours_from_uv_slope
from lensing.shapes import position_angle_difference, q_phi_to_tractor_e1e2

TRAIN = "train_stamp64_bandsgrz_gridgrid_small"


# --------------------------------------------------------------------------- distances, theta_E
def test_sis_einstein_radius_reference_number():
    # physics-conventions.md: sigma = 250 km/s, D_ls/D_s = 0.5 gives 0.9012"
    assert sis_einstein_radius_arcsec(250.0, 0.5) == pytest.approx(0.9012, abs=5e-5)
    assert sis_einstein_radius_arcsec(500.0, 0.5) == pytest.approx(4 * 0.90118, rel=1e-4)


def test_distances_match_astropy():
    table = DistanceTable.for_cosmology("Planck18")
    rng = np.random.default_rng(3)
    z1 = rng.uniform(0.02, 1.5, 500)
    z2 = z1 + rng.uniform(0.01, 3.0, 500)
    exact = Planck18.angular_diameter_distance(z1, z2).value
    assert np.max(np.abs(table.angular_diameter_between(z1, z2) / exact - 1)) < 1e-8
    assert np.max(np.abs(table.distance_modulus(z1) - Planck18.distmod(z1).value)) < 1e-8
    te = einstein_radius_sis(np.full(500, 250.0), z1, z2, table)
    ratio = exact / Planck18.angular_diameter_distance(z2).value
    assert np.max(np.abs(te / sis_einstein_radius_arcsec(250.0, ratio) - 1)) < 1e-8
    assert np.isnan(einstein_radius_sis(250.0, 1.0, 0.9, table))    # source in front
    with pytest.raises(ValueError, match="redshift"):
        table.comoving_transverse(np.array([np.nan]))


def test_unknown_cosmology_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown cosmology"):
        DistanceTable.for_cosmology("NotACosmology")


# --------------------------------------------------------------------------- deflector
MODEL = mf.load_config(experiments=[TRAIN]).population.deflector


def test_lens_redshift_prefers_spectroscopic_and_treats_minus99_as_missing():
    z, src = lens_redshift([0.31, np.nan, np.nan, -99.0], [0.4, 0.45, -99.0, 0.5], MODEL)
    np.testing.assert_array_equal(src, ["spectroscopic", "photometric", "none", "photometric"])
    np.testing.assert_allclose(z[[0, 1, 3]], [0.31, 0.45, 0.5])
    assert np.isnan(z[2])


def test_stellar_mass_by_hand():
    table = DistanceTable.for_cosmology("Planck18")
    zl, mr, mz = 0.45, 19.5, 18.5
    fr, fz = 10 ** (-0.4 * (mr - 22.5)), 10 ** (-0.4 * (mz - 22.5))
    logm, src = stellar_mass([fr], [fz], [1.0], [1.0], [zl], table, MODEL)
    dm = Planck18.distmod(zl).value
    slope = (mr - mz) / (2.5 * math.log10(9120 / 6420))
    lam_rest = 9120 / (1 + zl)
    # rest i (7480 A) lies redward of rest lambda_z = 6290 A: the old-population slope 1.9
    m_i = mz - dm + 2.5 * math.log10(1 + zl) - 2.5 * 1.9 * math.log10(7480 / lam_rest)
    assert logm[0] == pytest.approx(1.15 + 0.70 * 1.15 - 0.4 * m_i, abs=1e-8)
    assert src[0] == "mstar_rz"
    # z_l = 0.1: rest i lies inside the rest r..z range: the galaxy's own r-z slope interpolates
    logm_lo, _ = stellar_mass([fr], [fz], [1.0], [1.0], [0.1], table, MODEL)
    m_i_lo = (mz - Planck18.distmod(0.1).value + 2.5 * math.log10(1.1)
              - 2.5 * slope * math.log10(7480 * 1.1 / 9120))
    assert logm_lo[0] == pytest.approx(1.15 + 0.70 * 1.15 - 0.4 * m_i_lo, abs=1e-8)
    # extinction: transmission 0.9 in both bands brightens the light by -2.5 log10 0.9
    logm2, _ = stellar_mass([fr * 0.9], [fz * 0.9], [0.9], [0.9], [zl], table, MODEL)
    assert logm2[0] == pytest.approx(logm[0], abs=1e-10)
    # no usable z band: r alone with the default slope, provenance says so; no MW: _noext
    _, src3 = stellar_mass([fr], [np.nan], [np.nan], [np.nan], [zl], table, MODEL)
    assert src3[0] == "mstar_r_noext"


def test_zahid_relation_and_spectroscopic_priority():
    zero = np.array([0.0]), np.array([0.25])        # Box-Muller: cos(pi/2) = 0 -> no scatter
    assert sigma_from_mstar([10.26], *zero, MODEL)[0] == pytest.approx(10 ** 2.073, rel=1e-12)
    hi = sigma_from_mstar([11.26], *zero, MODEL)[0] / 10 ** 2.073
    lo = sigma_from_mstar([9.26], *zero, MODEL)[0] / 10 ** 2.073
    assert math.log10(hi) == pytest.approx(0.293, abs=1e-12)
    assert math.log10(lo) == pytest.approx(-0.403, abs=1e-12)
    # scatter: log10 sigma has sd sigma_scatter_dex over many uniforms
    rng = np.random.default_rng(0)
    u1, u2 = rng.random(200_000), rng.random(200_000)
    ls = np.log10(sigma_from_mstar(np.full(u1.size, 11.0), u1, u2, MODEL))
    assert np.std(ls) == pytest.approx(MODEL.sigma_scatter_dex, rel=0.01)
    s, src = velocity_dispersion([231.0, np.nan], [11.0, 11.0], ["mstar_rz"] * 2, [0.1, 0.1],
                                 [0.25, 0.25], MODEL)
    assert s[0] == 231.0 and src[0] == "spectroscopic" and src[1] == "zahid2016_mstar_rz"


def test_sie_follows_the_light():
    q_l = np.array([0.5, 0.7, 0.9])
    phi_l = np.array([0.3, 1.2, 2.9])
    e1, e2 = q_phi_to_tractor_e1e2(q_l, phi_l)
    zero = np.zeros(3)
    q, phi, ql, pl, src = sie_from_light(e1, e2, zero, zero, zero + 0.77, zero, MODEL)
    np.testing.assert_allclose(q, q_l, atol=1e-12)
    assert np.all(position_angle_difference(phi, phi_l) < 1e-12)
    assert list(src) == ["light"] * 3
    # no shape: the independent prior draws, recorded as "prior"
    q2, phi2, ql2, _, src2 = sie_from_light([np.nan], [0.1], [0.5], [0.5], [0.77], [1.1], MODEL)
    assert q2[0] == 0.77 and phi2[0] == 1.1 and src2[0] == "prior" and np.isnan(ql2[0])
    # Tractor PSF type (shape_r = 0, e = 0): no shape either; REX (shape_r > 0, e = 0): round
    *_, src3 = sie_from_light([0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.7, 0.7],
                              [0.0, 0.0], MODEL, shape_r=[0.0, 0.8])
    assert list(src3) == ["prior", "light"]
    # scatter: median misalignment of q_light = 0.6 lenses with 0.1 component scatter is small
    rng = np.random.default_rng(1)
    n = 20_000
    e1, e2 = q_phi_to_tractor_e1e2(np.full(n, 0.6), rng.uniform(0, np.pi, n))
    q, phi, _, pl, _ = sie_from_light(e1, e2, rng.standard_normal(n), rng.standard_normal(n),
                                      np.zeros(n), np.zeros(n), MODEL)
    mis = np.degrees(position_angle_difference(phi, pl))
    assert 5.0 < np.median(mis) < 15.0
    assert q.min() >= MODEL.mass_q_min - 1e-12


# --------------------------------------------------------------------------- source
def test_source_colours_from_uv_slope():
    lam = {"g": 4800.0, "r": 6420.0, "z": 9120.0}
    gr, rz = colours_from_uv_slope([-2.0, -1.0, -1.0], [2.0, 2.0, 1.2], lam, 0.3)
    assert gr[0] == pytest.approx(0.0) and rz[0] == pytest.approx(0.0)    # flat f_nu
    assert gr[1] == pytest.approx(2.5 * math.log10(6420 / 4800))
    assert rz[1] == pytest.approx(2.5 * math.log10(9120 / 6420))
    assert rz[2] == pytest.approx(rz[1] + 0.3)                            # Balmer break in z


def test_counts_and_lognormal_distributions():
    u = (np.arange(200_000) + 0.5) / 200_000
    d = mf.Dist("counts", 22.0, 26.5, 0.3)
    m = d.sample(u)
    hist, edges = np.histogram(m, bins=9, range=(22.0, 26.5))
    # p(m) ~ 10^(0.3 m): each 0.5-mag bin holds 10^0.15 times the previous one
    np.testing.assert_allclose(hist[1:] / hist[:-1], 10 ** 0.15, rtol=2e-3)
    ln = mf.Dist("lognormal", 0.3, 0.6, clip_low=0.03, clip_high=2.0)
    rng = np.random.default_rng(2)
    r = ln.sample(rng.random(200_000), rng.random(200_000))
    assert np.median(r) == pytest.approx(0.3, rel=0.01)
    assert r.min() >= 0.03 and r.max() <= 2.0
    assert np.std(np.log(r[(r > 0.031) & (r < 1.99)])) == pytest.approx(0.6, rel=0.03)


# --------------------------------------------------------------------------- acceptance
def test_mu_estimate_and_snr_estimate():
    np.testing.assert_allclose(acc.mu_estimate([1.0, 1.0, 1.0], [0.2, 0.05, 2.0], [0.1, 0.1, 0.1]),
                               [10.0, 20.0, 1.5])
    assert acc.snr_estimate(23.4 + 2.5 * math.log10(4.0), 4.0, 23.4) == pytest.approx(5.0)
    r = acc.rejection_reason([np.nan, 0.5, 0.5, 0.5, 0.5], [2, 0.55, 2, 2, 2], [9, 9, 4, 9, 9],
                             [20, 20, 20, 5, 20], dz_min=0.1, mu_min=5, snr_min=10)
    assert list(r) == ["no_lens_redshift", "source_not_behind_lens", "mu_floor", "snr_floor", None]


def _conditioned_cfg(**population_changes):
    cfg = mf.load_config(experiments=[TRAIN], overrides={"n_total_train_per_split": 4000})
    pop = cfg.population
    changes = dict(population_changes.pop("source", {}))
    if isinstance(changes.get("mag_r"), mf.Dist):    # a prior on the observed r has no M_UV:
        changes.setdefault("uv_slope", mf.Dist("normal", -1.6, 0.43))  # independent beta
    src = dataclasses.replace(pop.source, **changes)
    acc_ = dataclasses.replace(pop.acceptance, **population_changes.pop("acceptance", {}))
    pop = dataclasses.replace(pop, source=src, acceptance=acc_)
    return dataclasses.replace(cfg, population=pop)


def _targets(sigma, z_l, n_each, e1=0.0, e2=0.0):
    sigma = np.repeat(np.asarray(sigma, float), n_each)
    m = sigma.size
    return dict(
        brickname=np.array([f"{1000 + i // 7:04d}p000" for i in range(m)]),
        objid=np.arange(m), ra=np.zeros(m), dec=np.zeros(m), lens_mag_r=np.full(m, 19.5),
        healpix_cell=np.zeros(m, np.int64), split=np.array(["train"] * m),
        rank_global=np.arange(m), rank_split=np.arange(m), flux_r=np.full(m, 10 ** (0.4 * 3)),
        flux_z=np.full(m, 10 ** (0.4 * 4)), z=np.full(m, z_l), z_phot_median=np.full(m, np.nan),
        sigma=sigma, mw_transmission_r=np.ones(m), mw_transmission_z=np.ones(m),
        shape_r=np.full(m, 1.2), shape_e1=np.full(m, e1), shape_e2=np.full(m, e2))


def test_acceptance_counts_follow_the_cross_section():
    """Fixed z_s, bright sources, tiny r_e: only the mu floor acts, so a candidate is accepted
    iff beta <= 2 theta_E / mu_min, with beta uniform in area within beta_max: p = (2 theta_E /
    (mu_min beta_max))^2, i.e. accepted lenses are weighted by theta_E^2."""
    cfg = _conditioned_cfg(source={"z": mf.Dist("fixed", 2.0), "mag_r": mf.Dist("fixed", 18.0),
                                   "reff_arcsec": mf.Dist("fixed", 0.01)})
    exp = cfg.experiments[0]
    t = _targets([200.0, 300.0], 0.4, 1)
    tab = mf.expand_targets(t, exp, cfg, 2, {"train": 2}, include_rejected=True).to_pandas()
    cand = tab[tab.is_control == 0]
    assert len(cand) == exp.train_units_per_split()           # every unit is one candidate
    a = cfg.population.acceptance
    for sigma, g in cand.groupby("lens_sigma_kms"):
        te = g.theta_e_arcsec.iloc[0]
        p = min(1.0, (2 * te / (a.mu_min * a.beta_max_arcsec)) ** 2)
        k = g.reject_reason.isna().sum()
        assert abs(k - p * len(g)) < 4 * math.sqrt(len(g) * p * (1 - p)) + 1, (sigma, k, p)
        assert set(g.reject_reason.dropna()) <= {"mu_floor"}
        ok = g[g.reject_reason.isna()]
        assert (ok.accept_mu_est >= a.mu_min).all()
        assert np.allclose(np.hypot(ok.src_x_arcsec, ok.src_y_arcsec) <= 2 * te / a.mu_min, True)
    # manifest rows: accepted injections + their paired controls, nothing rejected
    man = mf.expand_targets(t, exp, cfg, 2, {"train": 2}).to_pandas()
    n_acc = cand.reject_reason.isna().sum()
    assert (man.is_control == 0).sum() == n_acc and (man.is_control == 1).sum() == n_acc
    assert set(man.pair_id.dropna()) == set(man.task_id[man.is_control == 0])
    mf.validate_manifest(mf.expand_targets(t, exp, cfg, 2, {"train": 2}))


def test_snr_floor_and_provenance_columns():
    cfg = _conditioned_cfg(source={"z": mf.Dist("fixed", 2.0), "mag_r": mf.Dist("uniform", 22, 27)})
    exp = cfg.experiments[0]
    tab = mf.expand_targets(_targets([280.0], 0.4, 1, e1=0.2), exp, cfg, 1, {"train": 1},
                            include_rejected=True).to_pandas()
    cand = tab[tab.is_control == 0]
    a = cfg.population.acceptance
    past_mu = (cand.reject_reason != "mu_floor").to_numpy()
    low = (cand.accept_snr_est < a.snr_min).to_numpy()
    assert past_mu.sum() > 50 and low[past_mu].any() and not low[past_mu].all()
    assert (low[past_mu] == (cand.reject_reason == "snr_floor").to_numpy()[past_mu]).all()
    ok = cand[cand.reject_reason.isna()]
    assert len(ok) > 0 and (ok.accept_snr_est >= a.snr_min).all()
    assert set(ok.lens_z_source) == {"spectroscopic"} and set(ok.lens_sigma_source) == {"spectroscopic"}
    assert set(ok.lens_shape_source) == {"light"} and set(ok.lens_model) == {"conditioned"}
    assert set(ok.brightness_mode) == {"population"}
    ctl = tab[tab.is_control == 1]
    assert ctl.lens_z.isna().all() and ctl.theta_e_arcsec.isna().all()


def test_unknown_values_are_null_not_nan():
    """No light shape and a spectroscopic sigma without redshift-free mass: nulls, valid."""
    cfg = _conditioned_cfg(source={"z": mf.Dist("fixed", 2.0), "mag_r": mf.Dist("fixed", 18.0)})
    exp = cfg.experiments[0]
    t = _targets([260.0], 0.4, 1)
    t["shape_r"] = np.zeros(1)              # PSF type: no shape
    t["flux_z"] = np.full(1, np.nan)
    tbl = mf.expand_targets(t, exp, cfg, 1, {"train": 1})
    mf.validate_manifest(tbl)
    df = tbl.to_pandas()
    inj = df[df.is_control == 0]
    assert len(inj) > 0 and inj.lens_light_q.isna().all() and set(inj.lens_shape_source) == {"prior"}


def test_no_redshift_rejects_and_independent_rows_have_null_conditioned_columns():
    cfg = _conditioned_cfg()
    exp = cfg.experiments[0]
    t = _targets([250.0], np.nan, 1)
    tab = mf.expand_targets(t, exp, cfg, 1, {"train": 1}, include_rejected=True).to_pandas()
    assert set(tab.reject_reason) == {"no_lens_redshift"}
    ind = dataclasses.replace(exp, lens_model="independent")
    man = mf.expand_targets(t, ind, cfg, 1, {"train": 1}).to_pandas()
    assert set(man.lens_model) == {"independent"} and man.lens_z.isna().all()
    assert man.lens_sigma_source.isna().all() and man.theta_e_arcsec.notna().any()


def test_conditioned_rows_independent_of_batching():
    cfg = _conditioned_cfg()
    exp = cfg.experiments[0]
    t = _targets(np.linspace(180, 320, 30), 0.45, 1, e1=0.15, e2=-0.05)
    m = len(t["objid"])
    whole = mf.expand_targets(t, exp, cfg, m, {"train": m}, include_rejected=True).to_pandas()
    parts = [mf.expand_targets({k: v[idx] for k, v in t.items()}, exp, cfg, m, {"train": m},
                               include_rejected=True).to_pandas()
             for idx in np.array_split(np.random.default_rng(5).permutation(m), 4)]
    import pandas as pd
    merged = pd.concat(parts).sort_values("task_id").reset_index(drop=True)
    whole = whole.sort_values("task_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(whole, merged)


def test_config_refuses_conditioned_grid_sampling_and_unknown_maskbits(tmp_path):
    with pytest.raises(mf.ConfigError, match="sampling = random"):
        dataclasses.replace(_conditioned_cfg().experiments[0], sampling="grid")
    with pytest.raises(mf.ConfigError, match="unknown DR10 bit"):
        mf.load_config(experiments=[TRAIN], overrides={"exclude_centre_maskbits": ["BRIGTH"]})


def test_population_conf_errors_name_the_file_and_key(tmp_path):
    from injection_pipeline.population.config import load_population

    text = (mf.DEFAULT_CONF_DIR / "population.toml").read_text()
    bad = tmp_path / "population.toml"
    bad.write_text(text.replace("zahid_alpha_high = 0.293\n", ""))
    with pytest.raises(mf.ConfigError, match=r"population\.toml \[deflector\].*missing.*zahid_alpha_high"):
        load_population(bad)
    bad.write_text(text.replace('name = "Planck18"', 'name = "Planck99"'))
    with pytest.raises(mf.ConfigError, match=r"\[cosmology\]\.name.*unknown cosmology"):
        load_population(bad)
    bad.write_text(text.replace("beta_max_arcsec = 1.3", "beta_max_arcsec = 0.0"))
    with pytest.raises(mf.ConfigError, match="beta_max_arcsec"):
        load_population(bad)


# ----------------------------------------------------------------- source UV luminosity function
def _uv_lf():
    from injection_pipeline.population.source import UVLuminosityFunction
    cfg = mf.load_config(experiments=[TRAIN])
    lf = cfg.population.source.mag_r
    assert isinstance(lf, UVLuminosityFunction)        # the shipped source magnitude model
    return lf


def test_uv_lf_samples_follow_the_schechter_function():
    """Inverse-CDF draws reproduce the Schechter CDF, integrated independently (scipy quad)."""
    from scipy.integrate import quad
    lf = _uv_lf()
    u = (np.arange(200_000) + 0.5) / 200_000
    m = lf.absolute_mag(u, np.full(u.size, 2.3)) - (-20.70)      # x = M - M*(2.3)
    assert np.isclose(lf.m_star_at(2.3), -20.70)

    def pdf(x):
        lum = 10 ** (-0.4 * x)
        return lum ** (lf.alpha + 1) * math.exp(-lum)
    norm = quad(pdf, lf.dm_bright, lf.dm_faint, limit=200)[0]
    for x in (-2.0, -1.0, 0.0, 1.0, 2.5, 3.5):
        ref = quad(pdf, lf.dm_bright, x, limit=200)[0] / norm
        assert abs(np.mean(m <= x) - ref) < 2e-4, x
    assert m.min() >= lf.dm_bright and m.max() <= lf.dm_faint


def test_uv_lf_m_star_interpolation_and_k_correction():
    lf = _uv_lf()
    np.testing.assert_allclose(lf.m_star_at([0.0, 1.0, 1.65, 3.05, 4.0]),
                               [-18.04, -20.04, -20.37, -20.97, -20.97], atol=1e-12)
    from injection_pipeline.population.cosmology import DistanceTable
    t = DistanceTable.for_cosmology("Planck18")
    z = np.array([1.0, 2.0, 3.0])
    u = np.array([0.3, 0.5, 0.7])
    dm = t.distance_modulus(z)
    flat = lf.apparent_r(u, z, np.full(3, -2.0), dm, 6420.0)      # f_nu flat: no colour term
    np.testing.assert_allclose(flat, lf.absolute_mag(u, z) + dm - 2.5 * np.log10(1 + z),
                               atol=1e-12)
    # a redder slope is brighter in r (rest lambda_r/(1+z) > 1500 A for z < 3.28)
    red = lf.apparent_r(u, z, np.full(3, -1.0), dm, 6420.0)
    np.testing.assert_allclose(flat - red, 2.5 * np.log10(6420.0 / ((1 + z) * 1500.0)),
                               atol=1e-12)


def test_uv_lf_config_errors_name_the_key(tmp_path):
    import shutil
    from pathlib import Path
    conf = tmp_path / "conf"
    shutil.copytree(Path(__file__).resolve().parents[1] / "conf", conf)
    p = conf / "population.toml"
    text = p.read_text()
    assert "dm_faint = 4.0" in text
    p.write_text(text.replace("dm_faint = 4.0", "dm_faint = -4.0"))
    with pytest.raises(mf.ConfigError, match=r"\[source\]\.mag_r.*dm_bright < dm_faint"):
        mf.load_config(conf, experiments=[TRAIN])


# --------------------------------------------------------------------------- IGM (Madau 1995)
def test_igm_optical_depth_is_madau_line_blanketing():
    from injection_pipeline.population.igm import optical_depth
    # 4500 A from z_s = 3: Ly-alpha (4500 < 1215.67 * 4) and Ly-beta (4500 > 1025.72 * 4 = 4103: no)
    assert optical_depth(4500.0, 3.0) == pytest.approx(0.0036 * (4500 / 1215.67) ** 3.46, rel=1e-12)
    # 4000 A: Ly-alpha, beta, gamma (3890) no, so alpha + beta
    assert optical_depth(4000.0, 3.0) == pytest.approx(
        0.0036 * (4000 / 1215.67) ** 3.46 + 0.0017 * (4000 / 1025.72) ** 3.46, rel=1e-12)
    assert optical_depth(5000.0, 3.0) == 0.0                 # redward of Ly-alpha at z_s = 3


def test_igm_band_attenuation_limits_and_monotonicity():
    from injection_pipeline.population.igm import attenuation_mag, optical_depth
    g = (3995.0, 5465.0)
    z = np.array([1.0, 2.0, 2.28, 2.4, 2.6, 2.8, 3.0])
    dm = attenuation_mag(z, -1.6, g)
    assert (dm[:3] == 0).all()                                # Ly-alpha below the band: nothing
    assert (np.diff(dm[2:]) > 0).all() and dm[-1] == pytest.approx(0.213, abs=0.005)
    assert (attenuation_mag(z, -1.6, (5680.0, 7160.0)) == 0).all()        # r untouched
    # a narrow band: -2.5 log10 exp(-tau) at its centre, whatever the slope
    narrow = attenuation_mag([2.9, 2.9], [-2.5, 0.0], (4499.5, 4500.5))
    np.testing.assert_allclose(narrow, 2.5 / np.log(10) * optical_depth(4500.0, 2.9), rtol=1e-6)
    # photon weighting: a redder continuum weights the unabsorbed red end more
    assert attenuation_mag([3.0], [0.0], g)[0] < attenuation_mag([3.0], [-2.5], g)[0]
    with pytest.raises(ValueError, match="Lyman limit"):
        attenuation_mag([3.5], [-1.6], g)


def test_igm_dims_the_conditioned_sources_g_band(tmp_path):
    """The 4a candidates carry the attenuation in src_mag_g / src_colour_gr, and only there."""
    import dataclasses
    from injection_pipeline.population.candidates import draw_candidates
    from injection_pipeline.population.igm import attenuation_mag
    pop = mf.load_config(experiments=[TRAIN]).population
    off = dataclasses.replace(pop, source=dataclasses.replace(pop.source, igm="none"))
    n, rng = 400, np.random.default_rng(3)
    u = rng.random((n, mf.N_UNIFORMS))
    t = {"flux_r": np.full(n, 10.0), "lens_mag_r": np.full(n, 20.0), "flux_z": np.full(n, 25.0),
         "z_phot_median": np.full(n, 0.5)}
    rest = (np.full(n, 0.8), np.zeros(n), (0.0, 0.05), np.zeros(n))
    on_c = draw_candidates(t, u, mf.DRAW_SLOTS, pop, *rest)
    off_c = draw_candidates(t, u, mf.DRAW_SLOTS, off, *rest)
    dg = attenuation_mag(on_c["src_z"], on_c["src_uv_slope"], pop.bandpasses["g"])
    assert (dg > 0.01).sum() > 20 and (dg == 0).sum() > 100
    np.testing.assert_allclose(on_c["src_mag_g"] - off_c["src_mag_g"], dg, atol=1e-12)
    np.testing.assert_allclose(on_c["src_colour_gr"] - off_c["src_colour_gr"], dg, atol=1e-12)
    np.testing.assert_array_equal(on_c["src_mag_r"], off_c["src_mag_r"])
    np.testing.assert_array_equal(on_c["src_mag_z"], off_c["src_mag_z"])


def test_igm_config_refuses_sources_beyond_its_validity(tmp_path):
    from injection_pipeline.population.config import load_population
    text = (mf.DEFAULT_CONF_DIR / "population.toml").read_text()
    bad = tmp_path / "population.toml"
    bad.write_text(text.replace('z = { dist = "uniform", low = 1.0, high = 3.0 }',
                                'z = { dist = "uniform", low = 1.0, high = 3.6 }'))
    with pytest.raises(mf.ConfigError, match=r"\[source\].z.*Lyman limit"):
        load_population(bad)
    bad.write_text(text.replace('igm = "madau1995"', 'igm = "inoue"'))
    with pytest.raises(mf.ConfigError, match=r"\[source\].igm"):
        load_population(bad)


# ------------------------------------------------------- UV slope: colour-magnitude relation
def _draw_uv(pop, n=2000, seed=7):
    from injection_pipeline.population.candidates import draw_candidates
    rng = np.random.default_rng(seed)
    u = rng.random((n, mf.N_UNIFORMS))
    t = {"flux_r": np.full(n, 10.0), "lens_mag_r": np.full(n, 20.0), "flux_z": np.full(n, 25.0),
         "z_phot_median": np.full(n, 0.5)}
    return u, draw_candidates(t, u, mf.DRAW_SLOTS, pop, np.full(n, 0.8), np.zeros(n),
                              (0.0, 0.05), np.zeros(n))


def _with_uv_slope(pop, model):
    return dataclasses.replace(pop, source=dataclasses.replace(pop.source, uv_slope=model))


def _m_uv(pop, c):
    """Absolute UV magnitude of each candidate from its frozen columns (IGM: none in r)."""
    t = DistanceTable.for_cosmology(pop.cosmology)
    z, beta = c["src_z"], c["src_uv_slope"]
    k = 2.5 * (beta + 2.0) * np.log10(pop.lambdas["r"] / ((1 + z) * pop.source.mag_r.lambda_uv_aa))
    return c["src_mag_r"] - t.distance_modulus(z) + 2.5 * np.log10(1 + z) + k


def test_uv_slope_follows_the_configured_colour_magnitude_relation():
    """The shipped relation, recovered by a linear fit of beta on M_UV over 20,000 candidates
    (M_UV rebuilt from the manifest columns): slope within 0.01 (3.5 standard errors), beta
    at m_ref within 0.02, residual sd within 0.01; the population median stays near
    Kurczynski et al.'s -1.83 (conf comments)."""
    from injection_pipeline.population.source import UVSlopeColourMagnitude
    pop = mf.load_config(experiments=[TRAIN]).population
    rel = pop.source.uv_slope
    assert isinstance(rel, UVSlopeColourMagnitude)                  # the shipped default
    assert (rel.beta_ref, rel.m_ref, rel.dbeta_dm, rel.scatter) == (-1.6, -19.5, -0.11, 0.42)
    _, c = _draw_uv(pop, n=20_000, seed=8)
    m = _m_uv(pop, c)
    np.testing.assert_allclose(m, pop.source.mag_r.absolute_mag(
        _draw_uv(pop, n=20_000, seed=8)[0][:, mf.DRAW_SLOTS["mag_r_abs"]], c["src_z"]),
        atol=1e-9)                                                   # the M_UV that was drawn
    slope, icpt = np.polyfit(m - rel.m_ref, c["src_uv_slope"], 1)
    assert slope == pytest.approx(rel.dbeta_dm, abs=0.01)
    assert icpt == pytest.approx(rel.beta_ref, abs=0.02)
    resid = c["src_uv_slope"] - (icpt + slope * (m - rel.m_ref))
    assert resid.std() == pytest.approx(rel.scatter, abs=0.01)
    assert np.median(c["src_uv_slope"]) == pytest.approx(-1.81, abs=0.02)
    assert c["src_uv_slope"].std() == pytest.approx(0.43, abs=0.01)
    # the observed r is that of the drawn M_UV and this beta (M_UV first, then beta, then r)
    bright = m < np.percentile(m, 10)
    assert c["src_uv_slope"][bright].mean() > c["src_uv_slope"][~bright].mean() + 0.15


def test_independent_uv_slope_mode_reproduces_the_former_draws_bit_for_bit():
    from injection_pipeline.population.source import UVSlopeColourMagnitude
    pop = mf.load_config(experiments=[TRAIN]).population
    indep = _with_uv_slope(pop, mf.Dist("normal", -1.6, 0.43))
    u, c = _draw_uv(indep)
    # golden values of the code before the relation existed (commit b8ec424, same inputs)
    np.testing.assert_allclose(c["src_uv_slope"][:4], [-1.352132184279934, -1.3695937922401458,
                                                       -1.497898146506067, -1.9118711660556846],
                               rtol=1e-13)
    np.testing.assert_allclose(c["src_mag_r"][:4], [26.4171092786889, 27.114595294954086,
                                                    23.49261090308355, 27.232970839378766],
                               rtol=1e-13)
    assert sum(r is None for r in c["reject_reason"]) == 15
    # ... and bit for bit the former computation: beta from its slot, r from the LF and beta
    j = mf.DRAW_SLOTS["uv_slope"]
    beta = mf.Dist("normal", -1.6, 0.43).sample(u[:, j], u[:, j + 1])
    np.testing.assert_array_equal(c["src_uv_slope"], beta)
    lf = pop.source.mag_r
    r = lf.apparent_r(u[:, mf.DRAW_SLOTS["mag_r_abs"]], c["src_z"], beta,
                      DistanceTable.for_cosmology(pop.cosmology).distance_modulus(c["src_z"]),
                      pop.lambdas["r"])
    np.testing.assert_array_equal(c["src_mag_r"], r)
    # a flat relation is the independent draw, bit for bit
    _, flat = _draw_uv(_with_uv_slope(pop, UVSlopeColourMagnitude(-1.6, -19.5, 0.0, 0.43)))
    for k in c:
        np.testing.assert_array_equal(flat[k], c[k], err_msg=k)
    # the relation changes beta and what follows from it, no other draw
    _, rel = _draw_uv(pop)
    assert not np.array_equal(rel["src_uv_slope"], c["src_uv_slope"])
    follows = {"src_uv_slope", "src_colour_gr", "src_colour_rz", "src_dmag", "accept_snr_est",
               "reject_reason"} | {f"src_{q}_{b}" for q in ("mag", "flux") for b in "grz"}
    for k in set(c) - follows:
        np.testing.assert_array_equal(rel[k], c[k], err_msg=k)


def test_uv_slope_relation_config_errors(tmp_path):
    from injection_pipeline.population.config import load_population
    text = (mf.DEFAULT_CONF_DIR / "population.toml").read_text()
    block = 'dist = "colour_magnitude"\nbeta_ref = -1.60\nm_ref = -19.5\ndbeta_dm = -0.11\nscatter = 0.42\n'
    assert block in text
    bad = tmp_path / "population.toml"
    for repl, msg in (
            (block.replace("scatter = 0.42", "scatter = -0.1"), r"uv_slope.*scatter >= 0"),
            (block.replace("scatter = 0.42\n", ""), r"uv_slope.*missing key\(s\) \['scatter'\]"),
            (block + "slope = 1.0\n", r"uv_slope.*unknown key\(s\) \['slope'\]"),
            (block.replace("m_ref = -19.5", 'm_ref = "bright"'), r"uv_slope.*m_ref.*number"),
            ('dist = "normal"\nmean = -1.6\n', r"uv_slope.*lacks key 'sd'")):
        bad.write_text(text.replace(block, repl))
        with pytest.raises(mf.ConfigError, match=msg):
            load_population(bad)
    # the relation needs the source's absolute UV magnitude: not with a prior on observed r
    lf_start = text.index("\n[source.mag_r]\n") + 1
    lf_end = text.index("\n\n", lf_start)
    bad.write_text(text[:lf_start] + '[source.mag_r]\ndist = "counts"\nlow = 22.0\nhigh = 26.5\n'
                   'slope = 0.3' + text[lf_end:])
    with pytest.raises(mf.ConfigError, match=r"uv_slope.*needs .*dist = 'uv_lf'"):
        load_population(bad)
    # the independent mode loads
    bad.write_text(text.replace(block, 'dist = "normal"\nmean = -1.6\nsd = 0.43\n'))
    assert load_population(bad).source.uv_slope == mf.Dist("normal", -1.6, 0.43)
