"""Source population: z_s ~ 1-3 star-forming galaxies (docs/population.md).

Colours come from a power-law rest-frame UV continuum f_lambda ~ lambda^beta (beta the UV
slope), i.e. f_nu ~ lambda^(beta + 2): between two observed bands of effective wavelengths
l1 < l2, m1 - m2 = 2.5 (beta + 2) log10(l2/l1).  When the z band samples the rest frame
redward of the Balmer break (lambda_z/(1+z_s) > 3650 A, z_s < ~1.5), ``balmer_break_mag``
is added to r - z.  Lyman-alpha forest absorption of g (z_s > ~2.9 for lambda_g = 4800 A) is
not modelled; the shipped z_s range ends at 3.0.  Magnitudes in AB, sizes in arcsec.
"""
from __future__ import annotations

import numpy as np

BALMER_BREAK_AA = 3650.0


def colours_from_uv_slope(beta, z_s, lam_aa: dict, balmer_break_mag: float):
    """(g - r, r - z) of a power-law UV continuum of slope ``beta`` at redshift ``z_s``."""
    beta = np.asarray(beta, np.float64)
    z_s = np.asarray(z_s, np.float64)
    gr = 2.5 * (beta + 2.0) * np.log10(lam_aa["r"] / lam_aa["g"])
    rz = 2.5 * (beta + 2.0) * np.log10(lam_aa["z"] / lam_aa["r"])
    rz = rz + np.where(lam_aa["z"] / (1.0 + z_s) > BALMER_BREAK_AA, balmer_break_mag, 0.0)
    return gr, rz
