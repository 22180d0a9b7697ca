"""AB photometry in nanomaggies, and the DR10 pixel scale.

Conventions used everywhere in the project (written once, here and in docs/conventions.md):

* Fluxes are in **nanomaggies** (nMgy): 1 nMgy is AB magnitude 22.5, so
  ``m_AB = 22.5 - 2.5 log10(flux_nMgy)`` (legacysurvey.org DR10 "description").
* DR10 coadd images are in nanomaggies per pixel; invvar in 1/nanomaggy^2.
* The DR10 coadd pixel scale is 0.262 arcsec/pixel.
"""
from __future__ import annotations

import numpy as np

AB_ZP_NMGY: float = 22.5
"""AB magnitude of a 1-nanomaggy source (the DR10 zero point, MAGZERO)."""

DR10_PIXSCALE_ARCSEC: float = 0.262
"""DR10 coadd pixel scale, arcsec per pixel."""


def mag_to_nMgy(mag):
    """AB magnitude -> flux in nanomaggies: ``10**(-0.4 (mag - 22.5))``.

    Vectorised; returns a float for scalar input.  ``mag = +inf`` gives 0; NaN propagates.
    """
    mag = np.asarray(mag, dtype=np.float64)
    flux = np.power(10.0, -0.4 * (mag - AB_ZP_NMGY))
    return float(flux) if flux.ndim == 0 else flux


def nMgy_to_mag(flux, nonpositive: str = "nan"):
    """Flux in nanomaggies -> AB magnitude: ``22.5 - 2.5 log10(flux)``.

    A magnitude is undefined for flux <= 0 (or non-finite flux).  Documented choice: such
    entries become **NaN** (``nonpositive="nan"``, the default, no warning emitted) or raise
    ``ValueError`` naming how many entries are bad (``nonpositive="raise"``).  A silent
    finite number is never returned for them.
    """
    if nonpositive not in ("nan", "raise"):
        raise ValueError(f"nonpositive must be 'nan' or 'raise', got {nonpositive!r}")
    flux = np.asarray(flux, dtype=np.float64)
    valid = np.isfinite(flux) & (flux > 0)
    if nonpositive == "raise" and not np.all(valid):
        n_bad = int(np.size(flux) - np.count_nonzero(valid))
        raise ValueError(f"nMgy_to_mag: {n_bad} flux value(s) are <= 0 or non-finite; "
                         "a magnitude needs a positive finite flux in nanomaggies")
    mag = np.full(flux.shape, np.nan)
    np.log10(flux, out=mag, where=valid)
    mag = np.where(valid, AB_ZP_NMGY - 2.5 * mag, np.nan)
    return float(mag) if mag.ndim == 0 else mag
