"""Which lens-source pairs make a findable lens: deterministic rejection on frozen draws.

A candidate's source centre is drawn uniform in area within ``beta_max`` arcsec of the lens
(a fixed area, so that the accepted fraction of a lens grows as its lensing cross-section,
~theta_E^2: the accepted lens population is cross-section weighted, as the lenses a survey
finds are).  A candidate is accepted when (reasons tested in this order; the first failure
is the rejection reason):

1. ``no_lens_redshift``: the lens has a redshift (spectroscopic or photometric);
2. ``source_not_behind_lens``: z_s >= z_l + dz_min;
3. ``mu_floor``: the estimated magnification mu_est >= mu_min (HOLISMOKES, Canameras et al.
   2024: mu >= 5).  mu_est is the SIS point magnification at the source centre with the
   offset floored at the source half-light radius: 2 theta_E / max(beta, r_e) for
   beta < theta_E, else 1 + theta_E/beta;
4. ``snr_floor``: the estimated arc S/N >= snr_min, with snr_est = 5 x 10^(-0.4 (m_arc -
   depth_r)), m_arc = m_src,r - 2.5 log10 mu_est and depth_r the 5-sigma galaxy depth in r.
   It is a total-flux S/N, optimistic for an extended arc (4c measures the real arc_snr).
"""
from __future__ import annotations

import numpy as np

REJECT_REASONS = ("no_lens_redshift", "source_not_behind_lens", "mu_floor", "snr_floor")


def mu_estimate(theta_e, beta, reff) -> np.ndarray:
    """SIS point magnification at the source centre, offset floored at r_e (see module)."""
    te = np.asarray(theta_e, np.float64)
    b = np.maximum(np.asarray(beta, np.float64), np.asarray(reff, np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b < te, 2.0 * te / b, 1.0 + te / b)


def snr_estimate(mag_src_r, mu_est, depth_r) -> np.ndarray:
    """Total-flux S/N of the lensed arc at a 5-sigma galaxy depth ``depth_r`` (AB)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        m_arc = np.asarray(mag_src_r, np.float64) - 2.5 * np.log10(mu_est)
    return 5.0 * np.power(10.0, -0.4 * (m_arc - np.asarray(depth_r, np.float64)))


def rejection_reason(z_l, z_s, mu_est, snr_est, *, dz_min: float, mu_min: float,
                     snr_min: float) -> np.ndarray:
    """Object array: None for accepted candidates, else the first failing REJECT_REASONS."""
    z_l = np.asarray(z_l, np.float64)
    with np.errstate(invalid="ignore"):
        tests = (("no_lens_redshift", ~np.isfinite(z_l)),
                 ("source_not_behind_lens", ~(np.asarray(z_s) >= z_l + dz_min)),
                 ("mu_floor", ~(np.asarray(mu_est) >= mu_min)),
                 ("snr_floor", ~(np.asarray(snr_est) >= snr_min)))
    out = np.full(z_l.shape, None, dtype=object)
    done = np.zeros(z_l.shape, bool)
    for name, bad in tests:
        hit = bad & ~done
        out[hit] = name
        done |= hit
    return out
