"""Injection parameters of lens-conditioned candidates, from frozen uniforms (one call per batch).

:func:`draw_candidates` turns each candidate's target columns and its uniforms into the
manifest's injection columns plus provenance and a rejection reason (None = accepted).  It is
pure NumPy: the fate of a candidate depends on its seed and its target only.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from injection_pipeline.population import acceptance as acc
from injection_pipeline.population.config import PopulationConfig
from injection_pipeline.population.cosmology import DistanceTable, einstein_radius_sis
from injection_pipeline.population.deflector import (lens_redshift, sie_from_light, stellar_mass,
                                                     velocity_dispersion)
from injection_pipeline.population.igm import attenuation_mag
from injection_pipeline.population.source import (UVLuminosityFunction, UVSlopeColourMagnitude,
                                                  colours_from_uv_slope)



def _col(t: Mapping[str, np.ndarray], name: str, n: int) -> np.ndarray:
    v = t.get(name)
    if v is None:
        return np.full(n, np.nan)
    return np.asarray(v, dtype=np.float64)


def draw_candidates(t: Mapping[str, np.ndarray], u: np.ndarray, slots: Mapping[str, int],
                    pop: PopulationConfig, prior_q, prior_phi, shear_range: tuple[float, float],
                    shear_phi) -> dict[str, np.ndarray]:
    """Injection columns of n candidates.

    ``t``: target columns already gathered per candidate (``flux_r``, ``lens_mag_r`` and
    ``manifests.LENS_CATALOGUE_COLUMNS``; missing keys count as null); ``u``: (n, N) frozen
    uniforms; ``slots``: column of each named draw in ``u``; ``prior_q``/``prior_phi``: the
    independent SIE priors' draws (used where the light has no shape); ``shear_range``:
    U(low, high) of the shear magnitude; ``shear_phi``: its angle draws.  Returns the manifest
    injection columns (``theta_e_arcsec`` ... ``shear_g2``), the conditioned-model columns
    (``lens_z`` ...) and ``reject_reason`` (object array, None = accepted).
    """
    n = u.shape[0]

    def uu(name: str, k: int = 0) -> np.ndarray:
        return u[:, slots[name] + k]

    def draw(name: str, dist) -> np.ndarray:
        return dist.sample(uu(name), uu(name, 1))

    d, s, a = pop.deflector, pop.source, pop.acceptance
    table = DistanceTable.for_cosmology(pop.cosmology)
    z_l, z_src = lens_redshift(_col(t, "z", n), _col(t, "z_phot_median", n), d)
    logm, m_src = stellar_mass(t["flux_r"], _col(t, "flux_z", n), _col(t, "mw_transmission_r", n),
                               _col(t, "mw_transmission_z", n), z_l, table, d)
    sigma, sigma_src = velocity_dispersion(_col(t, "sigma", n), logm, m_src,
                                           uu("sigma_scatter"), uu("sigma_scatter", 1), d)
    sigma_src = np.where(np.isfinite(z_l) | (sigma_src == "spectroscopic"), sigma_src, "none")

    def std_normal(name: str) -> np.ndarray:
        return np.sqrt(-2.0 * np.log1p(-uu(name))) * np.cos(2.0 * np.pi * uu(name, 1))

    q, phi, q_l, phi_l, shape_src = sie_from_light(
        _col(t, "shape_e1", n), _col(t, "shape_e2", n), std_normal("mass_g1"),
        std_normal("mass_g2"), prior_q, prior_phi, d, shape_r=_col(t, "shape_r", n))

    z_s = draw("src_z", s.z)
    with np.errstate(invalid="ignore"):
        theta_e = einstein_radius_sis(sigma, np.where(np.isfinite(z_l), z_l, 0.0),
                                      np.maximum(z_s, 0.0), table)
    theta_e = np.where(np.isfinite(z_l) & (z_s > np.nan_to_num(z_l, nan=np.inf)), theta_e, np.nan)

    beta = a.beta_max_arcsec * np.sqrt(uu("src_beta"))
    ang = 2.0 * np.pi * uu("src_beta", 1)
    reff = draw("src_reff", s.reff_arcsec)
    if isinstance(s.mag_r, UVLuminosityFunction):    # M_UV from the LF at z_s, then beta, r
        m_uv = s.mag_r.absolute_mag(uu("mag_r_abs"), z_s)
        if isinstance(s.uv_slope, UVSlopeColourMagnitude):   # beta from M_UV (same uniforms)
            uv = s.uv_slope.sample(m_uv, uu("uv_slope"), uu("uv_slope", 1))
        else:                                                # beta independent of M_UV
            uv = draw("uv_slope", s.uv_slope)
        mag_r = s.mag_r.apparent_r_from_absolute(m_uv, z_s, uv, table.distance_modulus(z_s),
                                                 pop.lambdas["r"])
    else:                                            # a direct prior on the observed r
        if isinstance(s.uv_slope, UVSlopeColourMagnitude):
            raise ValueError("population [source].uv_slope = colour_magnitude needs the "
                             "absolute UV magnitude of [source.mag_r] dist = 'uv_lf', not "
                             f"{s.mag_r.describe()}")
        uv = draw("uv_slope", s.uv_slope)
        mag_r = draw("mag_r_abs", s.mag_r)
    gr, rz = colours_from_uv_slope(uv, z_s, pop.lambdas, s.balmer_break_mag)
    if s.igm == "madau1995":                         # Lyman-alpha forest (population.igm)
        igm = {b: attenuation_mag(z_s, uv, pop.bandpasses[b]) for b in "grz"}
        mag_r = mag_r + igm["r"]
        gr, rz = gr + igm["g"] - igm["r"], rz + igm["r"] - igm["z"]
    mu = acc.mu_estimate(theta_e, beta, reff)
    snr = acc.snr_estimate(mag_r, mu, a.depth_r)
    reason = acc.rejection_reason(z_l, z_s, mu, snr, dz_min=a.dz_min, mu_min=a.mu_min,
                                  snr_min=a.snr_min)
    mags = {"g": mag_r + gr, "r": mag_r, "z": mag_r - rz}
    src_e = draw("src_e", s.e)
    lo, hi = shear_range
    shear = lo + (hi - lo) * uu("shear")
    shear_phi = np.asarray(shear_phi, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        offset_frac = beta / theta_e
    return {
        "theta_e_arcsec": theta_e, "src_dmag": mag_r - np.asarray(t["lens_mag_r"], np.float64),
        "src_reff_arcsec": reff, "src_e": src_e, "src_q": (1 - src_e) / (1 + src_e),
        "src_phi_rad": draw("src_phi", s.phi_rad), "src_n": draw("src_n", s.n),
        "src_offset_frac": offset_frac,
        "src_x_arcsec": beta * np.cos(ang), "src_y_arcsec": beta * np.sin(ang),
        "src_colour_gr": gr, "src_colour_rz": rz,
        **{f"src_mag_{b}": mags[b] for b in "grz"},
        **{f"src_flux_{b}": np.power(10.0, -0.4 * (mags[b] - 22.5)) for b in "grz"},
        "lens_q": q, "lens_e": (1 - q) / (1 + q), "lens_phi_rad": phi,
        "shear": shear, "shear_phi_rad": shear_phi,
        "shear_g1": shear * np.cos(2 * shear_phi), "shear_g2": shear * np.sin(2 * shear_phi),
        "lens_z": z_l, "lens_z_source": z_src, "lens_sigma_kms": sigma,
        "lens_sigma_source": sigma_src, "lens_logmstar": logm,
        "lens_light_q": q_l, "lens_light_phi_rad": phi_l, "lens_shape_source": shape_src,
        "src_z": z_s, "src_uv_slope": uv, "accept_mu_est": mu, "accept_snr_est": snr,
        "reject_reason": reason,
    }

