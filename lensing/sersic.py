"""Sersic surface-brightness profiles (pure NumPy).

``I(R) = I_e exp(-b_n [(R / r_e)^(1/n) - 1])`` with the elliptical radius measured along the
**major axis**: in the frame rotated by the position angle ``phi`` (radians, from +x toward
+y), ``R = sqrt(x'^2 + (y'/q)^2)`` and ``r_e`` is the major-axis half-light radius (arcsec).
lenstronomy instead uses the product-average radius ``sqrt(q x'^2 + y'^2/q)``; the two agree
for ``R_sersic_lenstronomy = sqrt(q) * r_e``.

``b_n`` solves ``P(2n, b_n) = 1/2`` exactly (P: regularised lower incomplete gamma), so that
``r_e`` encloses half the light (Ciotti & Bertin 1999 give an asymptotic series; lenstronomy
uses the cruder ``1.9992 n - 0.3271``).  Every function accepts ``bn=`` to override it, e.g.
to compare with lenstronomy on equal terms.
"""
from __future__ import annotations

import math

import numpy as np

_lgamma = np.frompyfunc(math.lgamma, 1, 1)
_N_SERIES = 400  # terms of the incomplete-gamma series; enough for 2n <= 20 and x <= 40


def _log_gamma(a):
    return np.asarray(_lgamma(np.asarray(a, dtype=np.float64)), dtype=np.float64)


def regularized_lower_gamma(a, x):
    """P(a, x) = gamma(a, x) / Gamma(a) for a > 0, x >= 0 (vectorised power series).

    ``P = x^a e^-x / Gamma(a+1) * sum_k x^k / ((a+1)...(a+k))``: all terms are positive, so
    the sum has no cancellation; 400 terms converge to double precision for x <= ~200.
    """
    a, x = np.broadcast_arrays(np.asarray(a, dtype=np.float64), np.asarray(x, dtype=np.float64))
    k = np.arange(1, _N_SERIES + 1, dtype=np.float64)
    log_ratio = np.log(x[..., None] / (a[..., None] + k), where=x[..., None] > 0,
                       out=np.full(x.shape + k.shape, -np.inf))
    terms = np.exp(np.cumsum(log_ratio, axis=-1))
    series = 1.0 + terms.sum(axis=-1)
    with np.errstate(divide="ignore"):
        log_pref = a * np.log(x) - x - _log_gamma(a + 1.0)
    return np.where(x > 0, np.exp(log_pref) * series, 0.0)


def sersic_bn_ciotti_bertin(n):
    """Ciotti & Bertin (1999) asymptotic b_n (error 2.5e-5 at n=1, ~10% at n=0.2)."""
    n = np.asarray(n, dtype=np.float64)
    return (2 * n - 1 / 3 + 4 / (405 * n) + 46 / (25515 * n**2) + 131 / (1148175 * n**3)
            - 2194697 / (30690717750 * n**4))


def sersic_bn(n):
    """b_n with P(2n, b_n) = 1/2, solved by safeguarded Newton iteration (rel. error < 1e-12).

    Valid for 0.1 <= n <= 12 (the project uses 0.2 <= n <= 10).  Vectorised; scalar in ->
    float out.
    """
    n_arr = np.asarray(n, dtype=np.float64)
    if np.any(~np.isfinite(n_arr)) or np.any(n_arr < 0.1) or np.any(n_arr > 12):
        raise ValueError(f"sersic_bn: Sersic index must be within [0.1, 12], got {n!r}")
    a = 2.0 * n_arr
    lo = np.zeros_like(a)
    hi = a + 1.0  # the median of Gamma(a) lies below its mean a
    b = np.clip(sersic_bn_ciotti_bertin(n_arr), 1e-3 * hi, hi)
    log_gamma_a = _log_gamma(a)
    for _ in range(100):
        f = regularized_lower_gamma(a, b) - 0.5
        lo = np.where(f < 0, b, lo)
        hi = np.where(f > 0, b, hi)
        dfdb = np.exp((a - 1.0) * np.log(b) - b - log_gamma_a)
        step = f / dfdb
        newton = b - step
        inside = (newton > lo) & (newton < hi)
        b_next = np.where(inside, newton, 0.5 * (lo + hi))
        if np.all(np.abs(b_next - b) <= 1e-14 * np.abs(b)):
            b = b_next
            break
        b = b_next
    return float(b) if b.ndim == 0 else b


def sersic_unit_total_flux(n, r_e, q, bn=None):
    """Total flux of an elliptical Sersic with I_e = 1 and major-axis half-light radius r_e.

    ``F = 2 pi n q r_e^2 e^{b_n} Gamma(2n) / b_n^{2n}`` (flux units of I_e x arcsec^2).
    """
    b = sersic_bn(n) if bn is None else bn
    n = np.asarray(n, dtype=np.float64)
    log_f = (np.log(2 * np.pi * n * np.asarray(q, dtype=np.float64) * np.asarray(r_e, dtype=np.float64) ** 2)
             + b + _log_gamma(2 * n) - 2 * n * np.log(b))
    out = np.exp(log_f)
    return float(out) if np.ndim(out) == 0 else out


def sersic_elliptical_radius(x, y, q, phi, x0=0.0, y0=0.0):
    """Major-axis elliptical radius sqrt(x'^2 + (y'/q)^2) in the frame rotated by phi."""
    dx = np.asarray(x, dtype=np.float64) - x0
    dy = np.asarray(y, dtype=np.float64) - y0
    c, s = math.cos(phi), math.sin(phi)
    xp = dx * c + dy * s
    yp = (-dx * s + dy * c) / q
    return np.sqrt(xp * xp + yp * yp)


def sersic_profile_Ie1(x, y, n, r_e, q, phi, x0=0.0, y0=0.0, bn=None):
    """Sersic surface brightness with I_e = 1 (per arcsec^2) at positions (x, y) [arcsec].

    ``r_e``: major-axis half-light radius [arcsec]; ``q = b/a`` in (0, 1]; ``phi``: major-axis
    position angle [rad, from +x toward +y]; ``(x0, y0)``: centre [arcsec].
    """
    if not (0 < q <= 1) or not r_e > 0:
        raise ValueError(f"sersic_profile_Ie1: need 0 < q <= 1 and r_e > 0, got q={q}, r_e={r_e}")
    b = sersic_bn(n) if bn is None else bn
    radius = sersic_elliptical_radius(x, y, q, phi, x0, y0)
    return np.exp(-b * (np.power(radius / r_e, 1.0 / n) - 1.0))
