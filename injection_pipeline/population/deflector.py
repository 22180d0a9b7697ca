"""The deflector tied to the lens galaxy: redshift, velocity dispersion, SIE shape.

Inputs are the target's catalogue columns (DR10 names, docs/dr10.md): ``z`` (spectroscopic
redshift, optional), ``z_phot_median`` (DR10 photo-z), ``sigma`` (spectroscopic velocity
dispersion [km/s], optional), ``flux_r``, ``flux_z`` [nanomaggies], ``mw_transmission_r/z``,
``shape_e1``, ``shape_e2`` (Tractor).  Every choice between sources of a quantity is returned
as a provenance string array; nothing is defaulted silently.

Velocity dispersion without a spectrum (docs/population.md):

1. rest-frame absolute i magnitude of the lens light from the observed z band (and r band
   for the local SED slope): the observed AB magnitude at lambda_z samples the rest frame at
   lambda_z/(1+z), M(lambda_z/(1+z)) = m_z - DM(z) + 2.5 log10(1+z) (AB bandwidth term),
   then a power-law SED f_nu ~ lambda^s moves it to rest lambda_i = 7480 A.  Where rest i
   lies between the rest-frame r and z bands (z_l < ~0.22) s is the galaxy's own
   extinction-corrected r-z slope (an interpolation); redward of the observed z band
   (z_l > ~0.22) it is ``rest_red_sed_slope``, the slope of an old population between rest r
   and i.  The r-z slope would be wrong there: at z_l > 0.3 the observed r band lies at or
   below the rest-frame 4000 A break, so r-z is far steeper than the SED redward of rest
   6000 A, and extrapolating it overestimates the rest-i light (by ~0.25 mag at z_l = 0.5);
2. stellar mass from Taylor et al. 2011 (MNRAS 418, 1587, eq. 8):
   log10 M*/Msun = 1.15 + 0.70 (g-i)_rest - 0.4 M_i, with an assumed red-sequence (g-i)_rest;
3. sigma from the M*-sigma relation of quiescent galaxies of Zahid et al. 2016 (ApJ 832,
   203): sigma = sigma_b (M*/M_b)^alpha with alpha_1 below M_b and alpha_2 above, plus a
   log-normal scatter drawn from the task's frozen uniforms.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from injection_pipeline.population.cosmology import DistanceTable


@dataclass(frozen=True)
class DeflectorModel:
    """Numbers of ``[deflector]`` (and ``[bands]`` r, z) in conf/population.toml, each
    documented there with its source; no defaults here: the conf file is the one place."""

    taylor_const: float
    taylor_gi_coef: float
    rest_gi: float
    lambda_r_aa: float
    lambda_z_aa: float
    lambda_rest_i_aa: float
    default_sed_slope: float
    rest_red_sed_slope: float
    zahid_log_mb: float
    zahid_log_sigma_b: float
    zahid_alpha_low: float
    zahid_alpha_high: float
    sigma_scatter_dex: float
    mass_e_scatter: float
    mass_q_min: float
    z_min: float
    z_max: float


def _finite_positive(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return np.isfinite(x) & (x > 0)


def lens_redshift(z_spec, z_phot, model: DeflectorModel):
    """(z_l, source): spectroscopic ``z`` when in [z_min, z_max], else the photo-z, else NaN.

    source is "spectroscopic", "photometric" or "none" per row.  DR10 writes -99 for a
    missing value: anything outside [z_min, z_max] counts as missing.
    """
    zs, zp = np.asarray(z_spec, np.float64), np.asarray(z_phot, np.float64)
    with np.errstate(invalid="ignore"):
        ok_s = np.isfinite(zs) & (zs >= model.z_min) & (zs <= model.z_max)
        ok_p = np.isfinite(zp) & (zp >= model.z_min) & (zp <= model.z_max)
    z = np.where(ok_s, zs, np.where(ok_p, zp, np.nan))
    src = np.where(ok_s, "spectroscopic", np.where(ok_p, "photometric", "none"))
    return z, src


def stellar_mass(flux_r, flux_z, mw_r, mw_z, z_l, table: DistanceTable, model: DeflectorModel):
    """(log10 M*/Msun, source) from the lens light (module docstring), NaN where z_l is NaN.

    Fluxes in nanomaggies; ``mw_*`` Milky Way transmissions (NaN = not given: no correction,
    recorded in the source string).  source: "mstar_rz" (z band + r-z slope), "mstar_r" (r
    band + the default SED slope, when flux_z is not usable), suffixed "_noext" when the
    extinction correction was unavailable.  The slope that moves the sampled rest wavelength
    to rest i: the r-z slope when rest i lies within the rest-frame r..z range, else
    ``rest_red_sed_slope`` (the z band; module docstring); the r band alone always uses
    ``default_sed_slope``.
    """
    fr, fz = np.asarray(flux_r, np.float64), np.asarray(flux_z, np.float64)
    tr, tz = np.asarray(mw_r, np.float64), np.asarray(mw_z, np.float64)
    has_ext = _finite_positive(tr) & _finite_positive(tz)
    fr = np.where(has_ext, fr / np.where(has_ext, tr, 1.0), fr)
    fz = np.where(has_ext, fz / np.where(has_ext, tz, 1.0), fz)
    use_z = _finite_positive(fz) & _finite_positive(fr)
    with np.errstate(invalid="ignore", divide="ignore"):
        m_r = 22.5 - 2.5 * np.log10(np.where(_finite_positive(fr), fr, np.nan))
        m_z = 22.5 - 2.5 * np.log10(np.where(use_z, fz, np.nan))
        slope_rz = (m_r - m_z) / (2.5 * np.log10(model.lambda_z_aa / model.lambda_r_aa))
    lam_obs = np.where(use_z, model.lambda_z_aa, model.lambda_r_aa)
    m_obs = np.where(use_z, m_z, m_r)
    zl = np.asarray(z_l, np.float64)
    ok = np.isfinite(zl) & np.isfinite(m_obs)
    zc = np.where(ok, zl, 0.5)
    m_rest = m_obs - table.distance_modulus(zc) + 2.5 * np.log10(1.0 + zc)
    lam_rest = lam_obs / (1.0 + zc)
    # interpolation inside the rest r..z range uses the galaxy's colour; extrapolation redward
    # of the z band the old-population slope (the r-z slope straddles the 4000 A break there)
    slope_z = np.where(lam_rest >= model.lambda_rest_i_aa, slope_rz, model.rest_red_sed_slope)
    slope = np.where(use_z, slope_z, model.default_sed_slope)
    # f_nu ~ lambda^s  =>  M(lambda_i) = M(lambda_rest) - 2.5 s log10(lambda_i / lambda_rest)
    m_i = m_rest - 2.5 * slope * np.log10(model.lambda_rest_i_aa / lam_rest)
    logm = model.taylor_const + model.taylor_gi_coef * model.rest_gi - 0.4 * m_i
    src = np.where(use_z, "mstar_rz", "mstar_r")
    src = np.where(has_ext, src, np.char.add(src.astype(str), "_noext"))
    return np.where(ok, logm, np.nan), src


def sigma_from_mstar(log_mstar, u1, u2, model: DeflectorModel) -> np.ndarray:
    """Zahid et al. 2016 sigma [km/s] for log10 M*/Msun, with log-normal scatter.

    ``u1``, ``u2``: the task's frozen uniforms of the scatter draw (Box-Muller).
    """
    lm = np.asarray(log_mstar, np.float64)
    alpha = np.where(lm < model.zahid_log_mb, model.zahid_alpha_low, model.zahid_alpha_high)
    log_sigma = model.zahid_log_sigma_b + alpha * (lm - model.zahid_log_mb)
    gauss = np.sqrt(-2.0 * np.log1p(-np.asarray(u1, np.float64))) * np.cos(2.0 * np.pi * np.asarray(u2))
    return 10.0 ** (log_sigma + model.sigma_scatter_dex * gauss)


def velocity_dispersion(sigma_spec, log_mstar, mstar_source, u1, u2, model: DeflectorModel):
    """(sigma [km/s], source): the spectroscopic value when finite > 0, else the M*-sigma draw."""
    ss = np.asarray(sigma_spec, np.float64)
    ok = _finite_positive(ss)
    drawn = sigma_from_mstar(log_mstar, u1, u2, model)
    src = np.where(ok, "spectroscopic", np.char.add("zahid2016_", np.asarray(mstar_source).astype(str)))
    return np.where(ok, ss, drawn), src


def sie_from_light(e1, e2, g1, g2, prior_q, prior_phi, model: DeflectorModel, shape_r=None):
    """(q_mass, phi_mass, q_light, phi_light, source) of the SIE from the Tractor light shape.

    The light's ellipticity in this project's frame, (e cos 2phi, e sin 2phi) with
    e = (1-q)/(1+q) and phi from lensing.shapes (+x west, +y north), plus an independent
    Gaussian scatter of ``mass_e_scatter`` on each component (``g1``, ``g2``: standard normal
    draws), gives the mass ellipticity (SLSim's mass-follows-light model); q is floored at
    ``mass_q_min``.  Rows without a valid light shape take the independent prior draws
    (``prior_q``, ``prior_phi``): source "prior"; else "light".  A shape is valid when e1, e2
    are finite with |e| < 1 and ``shape_r`` [arcsec] is not <= 0: Tractor's PSF type (point
    sources, and DR10's forced-PSF sources inside BRIGHT/GALAXY/CLUSTER masks) has shape_r = 0
    and no shape (a NaN shape_r, e.g. no such column, does not invalidate e1/e2).
    """
    from lensing.shapes import tractor_e1e2_to_q_phi

    e1 = np.asarray(e1, np.float64)
    e2 = np.asarray(e2, np.float64)
    with np.errstate(invalid="ignore"):
        valid = np.isfinite(e1) & np.isfinite(e2) & (np.hypot(e1, e2) < 1.0)
        if shape_r is not None:          # shape_r = 0: PSF type; NaN: column not given
            valid &= ~(np.asarray(shape_r, np.float64) <= 0)
    q_l, phi_l = tractor_e1e2_to_q_phi(np.where(valid, e1, 0.0), np.where(valid, e2, 0.0))
    e_l = (1.0 - q_l) / (1.0 + q_l)
    c1 = e_l * np.cos(2.0 * phi_l) + model.mass_e_scatter * np.asarray(g1, np.float64)
    c2 = e_l * np.sin(2.0 * phi_l) + model.mass_e_scatter * np.asarray(g2, np.float64)
    e_max = (1.0 - model.mass_q_min) / (1.0 + model.mass_q_min)
    e_m = np.minimum(np.hypot(c1, c2), e_max)
    q_m = (1.0 - e_m) / (1.0 + e_m)
    phi_m = np.mod(0.5 * np.arctan2(c2, c1), np.pi)
    q = np.where(valid, q_m, np.asarray(prior_q, np.float64))
    phi = np.where(valid, phi_m, np.asarray(prior_phi, np.float64))
    return (q, phi, np.where(valid, q_l, np.nan), np.where(valid, phi_l, np.nan),
            np.where(valid, "light", "prior"))
