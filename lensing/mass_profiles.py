"""Lens mass profiles: SIS, SIE and external shear (pure NumPy).

Every profile answers the same two questions for the same arguments, as in lenstronomy:
``deflection_*`` -> (alpha_x, alpha_y) [arcsec] and ``hessian_*`` -> (f_xx, f_xy, f_yx, f_yy)
[dimensionless second derivatives of the lensing potential].  Positions (x, y) are arcsec on
the sky-plane grid of the stamp (x along +column, y along +row); angles are radians measured
from +x toward +y.

SIE convention (lenstronomy's; Kormann et al. 1994, Keeton & Kochanek 1998): in the frame
rotated by ``phi`` (major axis along x'), with ``f = sqrt(1 - q^2)`` and
``psi = sqrt(q^2 x'^2 + y'^2)``::

    alpha_x' = (theta_E sqrt(q) / f) arctan(f x' / psi)
    alpha_y' = (theta_E sqrt(q) / f) artanh(f y' / psi)
    kappa    = theta_E / (2 sqrt(q x'^2 + y'^2 / q))

so ``theta_E`` is the circularised Einstein radius: the critical curve
``q x'^2 + y'^2 / q = theta_E^2`` encloses an area pi theta_E^2.  (A prefactor
``theta_E / sqrt(1 - q^2)`` without sqrt(q) -- used by another public pipeline -- would make
"theta_E" sqrt(q)-dependent; tests pin this against lenstronomy.)  For ``1 - q < 1e-3`` the
arctan/artanh are replaced by their series so the SIE tends smoothly to the SIS at q = 1.

The singular centre: deflections there are 0 (the symmetric limit); Hessians, which diverge
as 1/r, are evaluated at a distance of 1e-9 arcsec along +x' instead (finite, huge).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

_CENTRE_SOFTENING_ARCSEC = 1e-9
_Q_SERIES_BELOW_F = 0.045  # f = sqrt(1-q^2) < 0.045  <=>  1 - q < ~1e-3


def _as_float_arrays(x, y):
    return np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)


def _rotate_into(dx, dy, phi):
    c, s = math.cos(phi), math.sin(phi)
    return dx * c + dy * s, -dx * s + dy * c


def _rotate_vector_out(ax, ay, phi, scale=1.0):
    """scale x (ax, ay) rotated from the lens frame back to the sky frame (the scale folded
    into the rotation: no extra pass over the arrays)."""
    c, s = math.cos(phi) * scale, math.sin(phi) * scale
    return ax * c - ay * s, ax * s + ay * c


def _rotate_hessian_out(hxx, hxy, hyy, phi):
    """Hessian components from the lens frame back to the sky frame: H = R H' R^T."""
    c, s = math.cos(phi), math.sin(phi)
    fxx = c * c * hxx - 2 * c * s * hxy + s * s * hyy
    fyy = s * s * hxx + 2 * c * s * hxy + c * c * hyy
    fxy = c * s * (hxx - hyy) + (c * c - s * s) * hxy
    return fxx, fxy, fxy, fyy


def _check_sie_args(theta_e, q):
    if not (0 < q <= 1):
        raise ValueError(f"SIE axis ratio q = b/a must be in (0, 1], got {q}")
    if not (theta_e >= 0) or not math.isfinite(theta_e):
        raise ValueError(f"Einstein radius theta_E must be finite and >= 0 arcsec, got {theta_e}")


# --------------------------------------------------------------------------------------- SIS
def deflection_sis(x, y, theta_e, x0=0.0, y0=0.0):
    """SIS deflection [arcsec]: alpha = theta_E (x, y) / r about (x0, y0); 0 at the centre."""
    x, y = _as_float_arrays(x, y)
    dx, dy = x - x0, y - y0
    r = np.hypot(dx, dy)
    safe_r = np.where(r > 0, r, 1.0)
    # theta_E * (dx / r): the unit vector first, so a subnormal r cannot overflow 1/r
    return theta_e * np.where(r > 0, dx / safe_r, 0.0), theta_e * np.where(r > 0, dy / safe_r, 0.0)


def hessian_sis(x, y, theta_e, x0=0.0, y0=0.0):
    """SIS Hessian (f_xx, f_xy, f_yx, f_yy): theta_E (y^2, -xy, -xy, x^2) / r^3."""
    x, y = _as_float_arrays(x, y)
    dx, dy = x - x0, y - y0
    at_centre = np.hypot(dx, dy) < _CENTRE_SOFTENING_ARCSEC
    dx = np.where(at_centre, _CENTRE_SOFTENING_ARCSEC, dx)
    dy = np.where(at_centre, 0.0, dy)
    r = np.hypot(dx, dy)
    pref = theta_e / r**3
    fxy = -pref * dx * dy
    return pref * dy * dy, fxy, fxy, pref * dx * dx


def convergence_sis(x, y, theta_e, x0=0.0, y0=0.0):
    """SIS convergence kappa = theta_E / (2 r)."""
    fxx, _, _, fyy = hessian_sis(x, y, theta_e, x0, y0)
    return 0.5 * (fxx + fyy)


# --------------------------------------------------------------------------------------- SIE
def _arctan_over_f(u_over_f, f):
    """arctan(f t) / f, smooth as f -> 0 (t = u_over_f)."""
    if f < _Q_SERIES_BELOW_F:
        t2 = u_over_f * u_over_f
        f2 = f * f
        return u_over_f * (1 - f2 * t2 / 3 + f2 * f2 * t2 * t2 / 5 - f2**3 * t2**3 / 7)
    return np.arctan(f * u_over_f) / f


def _artanh_over_f(v_over_f, f):
    """artanh(f t) / f, smooth as f -> 0."""
    if f < _Q_SERIES_BELOW_F:
        t2 = v_over_f * v_over_f
        f2 = f * f
        return v_over_f * (1 + f2 * t2 / 3 + f2 * f2 * t2 * t2 / 5 + f2**3 * t2**3 / 7)
    return np.arctanh(f * v_over_f) / f


def deflection_sie(x, y, theta_e, q, phi, x0=0.0, y0=0.0):
    """SIE deflection [arcsec] in lenstronomy's theta_E convention (module docstring).

    ``q = b/a`` in (0, 1]; ``phi``: major-axis angle [rad]; ``(x0, y0)``: centre [arcsec].
    The ray-shooting hot path: one reciprocal of psi (0 at the centre, where the deflection
    is then 0), arctan/artanh in place, and the prefactor folded into the rotation out
    (:func:`_rotate_vector_out`).
    """
    _check_sie_args(theta_e, q)
    x, y = _as_float_arrays(x, y)
    xp, yp = _rotate_into(x - x0, y - y0, phi)
    f = math.sqrt(max(0.0, 1.0 - q * q))
    psi = np.sqrt((q * q) * (xp * xp) + yp * yp)
    pref = theta_e * math.sqrt(q)
    if f < _Q_SERIES_BELOW_F:
        inv = np.divide(1.0, psi, out=np.zeros_like(psi), where=psi > 0)
        ax = _arctan_over_f(xp * inv, f)        # t_x = x'/psi, |t_x| <= 1/q
        ay = _artanh_over_f(yp * inv, f)        # t_y = y'/psi, |t_y| <= 1
        return _rotate_vector_out(ax, ay, phi, pref)
    inv = np.divide(f, psi, out=np.zeros_like(psi), where=psi > 0)   # f / psi; 0 at centre
    u, v = xp * inv, yp * inv
    if np.ndim(u):                      # arrays: in place (scalars have no out=)
        np.arctan(u, out=u)
        np.arctanh(v, out=v)
    else:
        u, v = np.arctan(u), np.arctanh(v)
    return _rotate_vector_out(u, v, phi, pref / f)


def hessian_sie(x, y, theta_e, q, phi, x0=0.0, y0=0.0):
    """SIE Hessian (f_xx, f_xy, f_yx, f_yy).

    In the lens frame, with b' = theta_E sqrt(q) and psi = sqrt(q^2 x^2 + y^2):
    f_xx = b' y^2 / (psi r^2), f_yy = b' x^2 / (psi r^2), f_xy = -b' x y / (psi r^2), so
    kappa = b' / (2 psi) (no 1/sqrt(1-q^2): smooth at q = 1).
    """
    _check_sie_args(theta_e, q)
    x, y = _as_float_arrays(x, y)
    xp, yp = _rotate_into(x - x0, y - y0, phi)
    at_centre = np.hypot(xp, yp) < _CENTRE_SOFTENING_ARCSEC
    xp = np.where(at_centre, _CENTRE_SOFTENING_ARCSEC, xp)
    yp = np.where(at_centre, 0.0, yp)
    psi = np.sqrt(q * q * xp * xp + yp * yp)
    pref = theta_e * math.sqrt(q) / (psi * (xp * xp + yp * yp))
    return _rotate_hessian_out(pref * yp * yp, -pref * xp * yp, pref * xp * xp, phi)


def convergence_sie(x, y, theta_e, q, phi, x0=0.0, y0=0.0):
    """SIE convergence kappa = theta_E / (2 sqrt(q x'^2 + y'^2 / q))."""
    fxx, _, _, fyy = hessian_sie(x, y, theta_e, q, phi, x0, y0)
    return 0.5 * (fxx + fyy)


# ------------------------------------------------------------------------------------ shear
def shear_components(gamma, phi):
    """(gamma1, gamma2) = gamma (cos 2 phi, sin 2 phi); phi [rad] from +x toward +y."""
    gamma = np.asarray(gamma, dtype=np.float64)
    g1, g2 = gamma * np.cos(2 * np.asarray(phi)), gamma * np.sin(2 * np.asarray(phi))
    if g1.ndim == 0:
        return float(g1), float(g2)
    return g1, g2


def deflection_shear(x, y, gamma1, gamma2):
    """External-shear deflection about the origin [arcsec]: (g1 x + g2 y, g2 x - g1 y).

    Potential psi = (g1 (x^2 - y^2) + 2 g2 x y) / 2.  To shear about a lens centre, pass
    coordinates relative to it (as :class:`LensModel` does).
    """
    x, y = _as_float_arrays(x, y)
    return gamma1 * x + gamma2 * y, gamma2 * x - gamma1 * y


def hessian_shear(x, y, gamma1, gamma2):
    """External-shear Hessian: (g1, g2, g2, -g1), uniform."""
    x, y = _as_float_arrays(x, y)
    ones = np.ones(np.broadcast(x, y).shape)
    return gamma1 * ones, gamma2 * ones, gamma2 * ones, -gamma1 * ones


# ------------------------------------------------------------------------------- composite
@dataclass(frozen=True)
class LensModel:
    """SIE (SIS when q = 1) plus external shear, both centred on the lens (x0, y0).

    theta_e [arcsec, circularised, lenstronomy convention], q = b/a, phi [rad],
    x0/y0 [arcsec in stamp coordinates], gamma1/gamma2 (see :func:`shear_components`).
    theta_e = 0 means no lens (identity mapping, apart from the shear).
    """

    theta_e: float
    q: float = 1.0
    phi: float = 0.0
    x0: float = 0.0
    y0: float = 0.0
    gamma1: float = 0.0
    gamma2: float = 0.0

    def __post_init__(self):
        _check_sie_args(self.theta_e, self.q)
        for name in ("phi", "x0", "y0", "gamma1", "gamma2"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"LensModel.{name} must be finite, got {getattr(self, name)}")

    def deflection(self, x, y):
        """Total deflection (alpha_x, alpha_y) [arcsec]."""
        x, y = _as_float_arrays(x, y)
        if self.q == 1.0:
            ax, ay = deflection_sis(x, y, self.theta_e, self.x0, self.y0)
        else:
            ax, ay = deflection_sie(x, y, self.theta_e, self.q, self.phi, self.x0, self.y0)
        if self.gamma1 or self.gamma2:
            sx, sy = deflection_shear(x - self.x0, y - self.y0, self.gamma1, self.gamma2)
            ax, ay = ax + sx, ay + sy
        return ax, ay

    def hessian(self, x, y):
        """Total Hessian (f_xx, f_xy, f_yx, f_yy)."""
        if self.q == 1.0:
            h = hessian_sis(x, y, self.theta_e, self.x0, self.y0)
        else:
            h = hessian_sie(x, y, self.theta_e, self.q, self.phi, self.x0, self.y0)
        return h[0] + self.gamma1, h[1] + self.gamma2, h[2] + self.gamma2, h[3] - self.gamma1

    def ray_shoot(self, x, y):
        """Source-plane positions beta = theta - alpha(theta) [arcsec]."""
        ax, ay = self.deflection(x, y)
        return np.asarray(x) - ax, np.asarray(y) - ay

    def magnification(self, x, y):
        """Signed point magnification 1 / det(A), A = I - Hessian (0 where det is infinite)."""
        fxx, fxy, fyx, fyy = self.hessian(x, y)
        det = (1.0 - fxx) * (1.0 - fyy) - fxy * fyx
        with np.errstate(divide="ignore"):
            return 1.0 / det


def point_magnification(x, y, theta_e, q=1.0, phi=0.0, gamma1=0.0, gamma2=0.0, x0=0.0, y0=0.0):
    """Signed point magnification 1/det(A) of SIE(+SIS) + shear at image positions (x, y).

    Diverges on the critical curves: a diagnostic, not the magnification of an extended source.
    """
    return LensModel(theta_e, q, phi, x0, y0, gamma1, gamma2).magnification(x, y)
