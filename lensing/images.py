"""Critical curve, point magnification outside it, and point-source images (pure NumPy).

For the lenses of :class:`lensing.mass_profiles.LensModel` (SIE, SIS when q = 1, plus a
uniform external shear about the lens centre) along a ray from the lens centre at angle t
(radians from +x toward +y), theta = (x0, y0) + r e(t), e(t) = (cos t, sin t):

* The isothermal part is homogeneous: its deflection a(t) does not depend on r and its
  Hessian is H1(t) / r, with H1 the Hessian at unit distance.  H1 has rank one
  (f_xx f_yy = f_xy^2 for the SIE, module docstring of mass_profiles), so with the shear
  matrix G = [[g1, g2], [g2, -g1]] and M = I - G::

      det A(r) = det(I - H1/r - G) = det M - c(t) / r,   c(t) = tr(adj(M) H1(t)),
      det M = 1 - gamma^2.

  H1 is positive semi-definite (f_xx, f_yy >= 0) and non-zero for theta_E > 0, so for
  gamma < 1 (adj(M) positive definite) c(t) > 0 and every ray crosses exactly ONE critical
  curve, the tangential one, at ``r_t(t) = c(t) / (1 - gamma^2)`` (closed form, no root
  search; the singular isothermal profile has no radial critical curve: it degenerates to
  the centre).  det A < 0 for 0 < r < r_t and det A > 0 beyond: the sign structure is exact.
  For gamma >= 1, det M <= 0 and det A < 0 along the whole ray: no tangential critical curve
  encloses the lens (an "open" curve), so :func:`tangential_critical_radius` returns NaN
  there, and for theta_E = 0 (no lens) too.  For zero shear r_t(t) = 2 kappa(e(t)) =
  theta_E / sqrt(q cos^2 t' + sin^2 t' / q) (t' = t - phi): the analytic SIE critical curve
  q x'^2 + y'^2/q = theta_E^2 (Kormann et al. 1994; lenstronomy's theta_E convention).

* Consequence (an identity, tested): at ``factor x r_t`` along any ray
  det A = (1 - gamma^2)(1 - 1/factor), so the point magnification there is
  ``factor / ((factor - 1)(1 - gamma^2))`` = 11 / (1 - gamma^2) at factor 1.1 for EVERY
  SIE + shear (and 11 for the SIS: mu = r / (r - theta_E) at 1.1 theta_E).  It is a
  well-defined, positive diagnostic (never inside the critical curve), but it carries no
  information beyond the shear: the magnifications of the source's actual images are given
  by :func:`solve_point_images`.

* Point images of a source at beta (relative to the lens centre): on the ray at angle t the
  lens equation reads r M e(t) = beta + a(t), so t must make M e(t) parallel to beta + a(t)::

      F(t) = cross(M e(t), beta + a(t)) = 0,   r = dot(M e, beta + a) / |M e|^2 > 0.

  :func:`solve_point_images` samples F on a uniform grid of ``n_angles`` angles, refines
  every local minimum of |F| that shows no sign change on a 64x finer sub-grid (image pairs
  about to merge at a fold caustic), narrows every sign change by three 32-sections
  (vectorised over all brackets), polishes the images by two Newton steps on the 2-D lens
  equation with the analytic Hessian (kept only where they reduce the residual), and keeps
  the roots with r > 0 (roots with
  r <= 0 are the antipodal solutions of the same collinearity condition, not images).  The
  singular centre is not an image (the isothermal profile has no central image).  Limits:
  two images closer than ~(2 pi / n_angles / 64) r (~1e-5 arcsec at the defaults) may be
  reported as none (their magnifications are then > ~1e4); sources exactly on a caustic
  have ill-defined counts.  A source exactly on a degenerate caustic (the SIS's point caustic:
  source on the lens centre, an Einstein ring) makes F vanish identically: more than 4
  "images" are found and :class:`DegenerateImagesError` is raised.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from .mass_profiles import (LensModel, deflection_sie, deflection_sis, hessian_sie,
                            hessian_sis)

N_ANGLES_DEFAULT = 4096
_REFINE = 64
_SECTION = 32
_SECTION_STEPS = 3       # bracket width dt / 32^3 (~5e-8 rad), then Newton polishing
_NEWTON_STEPS = 2
_MAX_IMAGES = 4         # SIE + external shear: at most 4 images (no central image)


class DegenerateImagesError(ValueError):
    """The source lies on a degenerate caustic (e.g. an SIS with the source on its centre:
    an Einstein ring): point images are not a finite set."""


def _unit_deflection(lens: LensModel, cos_t, sin_t):
    """Deflection a(t) [arcsec] of the isothermal part at unit distance along the angle(s) t
    whose cosines and sines are given."""
    x, y = lens.x0 + cos_t, lens.y0 + sin_t
    if lens.q == 1.0:
        return deflection_sis(x, y, lens.theta_e, lens.x0, lens.y0)
    return deflection_sie(x, y, lens.theta_e, lens.q, lens.phi, lens.x0, lens.y0)


def _unit_isothermal(lens: LensModel, t):
    """Deflection a(t) [arcsec] and Hessian H1(t) of the isothermal part at unit distance
    from the lens centre along angle(s) t (shear excluded)."""
    t = np.asarray(t, dtype=np.float64)
    x = lens.x0 + np.cos(t)
    y = lens.y0 + np.sin(t)
    if lens.q == 1.0:
        ax, ay = deflection_sis(x, y, lens.theta_e, lens.x0, lens.y0)
        hxx, hxy, _, hyy = hessian_sis(x, y, lens.theta_e, lens.x0, lens.y0)
    else:
        ax, ay = deflection_sie(x, y, lens.theta_e, lens.q, lens.phi, lens.x0, lens.y0)
        hxx, hxy, _, hyy = hessian_sie(x, y, lens.theta_e, lens.q, lens.phi, lens.x0, lens.y0)
    return (ax, ay), (hxx, hxy, hyy)


def tangential_critical_radius(lens: LensModel, angle):
    """Distance [arcsec] from the lens centre to the tangential critical curve along
    ``angle`` [rad] (array or scalar): ``c(t) / (1 - gamma^2)`` (module docstring).
    NaN where there is no such curve (theta_E = 0, or gamma >= 1)."""
    g1, g2 = lens.gamma1, lens.gamma2
    det_m = 1.0 - (g1 * g1 + g2 * g2)
    _, (hxx, hxy, hyy) = _unit_isothermal(lens, angle)
    # adj(M) = [[1 + g1, g2], [g2, 1 - g1]] for M = [[1 - g1, -g2], [-g2, 1 + g1]]
    c = (1.0 + g1) * hxx + 2.0 * g2 * hxy + (1.0 - g1) * hyy
    if not (det_m > 0) or lens.theta_e == 0:
        return np.full(np.shape(c), np.nan) if np.ndim(c) else float("nan")
    r = c / det_m
    return r if np.ndim(r) else float(r)


def source_direction(lens: LensModel, src_dx: float, src_dy: float) -> float:
    """Angle [rad] of the source from the lens centre (source-plane offset (dx, dy));
    the lens major axis ``lens.phi`` for a source exactly on the centre."""
    if src_dx == 0 and src_dy == 0:
        return float(lens.phi)
    return math.atan2(src_dy, src_dx)


@dataclass(frozen=True)
class PointMagnification:
    """``mu``: signed 1/det(A) at ``radius`` [arcsec] from the lens centre along ``angle``
    [rad]; ``critical_radius``: the tangential critical curve's distance on that ray
    (radius = factor x critical_radius).  All NaN when there is no critical curve."""

    mu: float
    radius: float
    critical_radius: float
    angle: float


def point_magnification_outside(lens: LensModel, angle: float, factor: float = 1.1
                                ) -> PointMagnification:
    """Point magnification at ``factor`` (> 1) x the tangential critical radius along
    ``angle``: always outside the critical curve (det A > 0).  For the SIS without shear this
    is the seed's "1.1 theta_E"."""
    if not (factor > 1 and math.isfinite(factor)):
        raise ValueError(f"factor must be finite and > 1, got {factor}")
    rc = tangential_critical_radius(lens, float(angle))
    if not math.isfinite(rc):
        return PointMagnification(float("nan"), float("nan"), float("nan"), float(angle))
    r = factor * rc
    mu = float(lens.magnification(lens.x0 + r * math.cos(angle), lens.y0 + r * math.sin(angle)))
    return PointMagnification(mu, float(r), float(rc), float(angle))


@dataclass(frozen=True)
class PointImages:
    """Images of a point source: ``x``, ``y`` [arcsec, same frame as the lens centre] and
    signed point magnifications ``mu`` (1/det A), sorted by |mu| descending; ``n``."""

    x: np.ndarray
    y: np.ndarray
    mu: np.ndarray

    @property
    def n(self) -> int:
        return int(self.x.size)

    def max_separation(self) -> float:
        """Largest distance between two images [arcsec] (0 for fewer than two)."""
        if self.n < 2:
            return 0.0
        d = np.hypot(self.x[:, None] - self.x[None, :], self.y[:, None] - self.y[None, :])
        return float(d.max())


def _collinearity(lens, beta_x, beta_y, t, cos_sin=None, with_r=True):
    """F(t), r(t) of the module docstring for source (beta_x, beta_y) relative to the lens
    (``cos_sin``: (cos t, sin t) if known; ``with_r=False``: r is not computed, None)."""
    if cos_sin is None:
        t = np.asarray(t, dtype=np.float64)
        cos_sin = np.cos(t), np.sin(t)
    c, s = cos_sin
    ax, ay = _unit_deflection(lens, c, s)
    g1, g2 = lens.gamma1, lens.gamma2
    mx, my = (1.0 - g1) * c - g2 * s, -g2 * c + (1.0 + g1) * s      # M e(t)
    px, py = beta_x + ax, beta_y + ay
    f = mx * py - my * px
    if not with_r:
        return f, None
    r = (mx * px + my * py) / (mx * mx + my * my)
    return f, r


@functools.lru_cache(maxsize=8)
def _angle_grid(n_angles: int):
    """(t, cos t, sin t) of the uniform grid t_k = k 2 pi / n_angles, k < n_angles (shared by
    every solve: read-only arrays)."""
    t = np.arange(n_angles) * (2 * math.pi / n_angles)
    out = (t, np.cos(t), np.sin(t))
    for a in out:
        a.setflags(write=False)
    return out


def solve_point_images(lens: LensModel, beta_x: float, beta_y: float,
                       n_angles: int = N_ANGLES_DEFAULT) -> PointImages:
    """Images of a point source at (beta_x, beta_y) [arcsec, the lens's frame: absolute
    source-plane position, i.e. lens centre + offset] (module docstring for the method).

    Requires theta_E > 0 and gamma < 1 (else ValueError).  Image positions are returned in
    the same frame as (x0, y0) of the lens."""
    g = math.hypot(lens.gamma1, lens.gamma2)
    if not (lens.theta_e > 0) or not (g < 1):
        raise ValueError(f"solve_point_images needs theta_E > 0 and shear < 1, got "
                         f"theta_E = {lens.theta_e}, gamma = {g}")
    if n_angles < 16:
        raise ValueError(f"n_angles must be >= 16, got {n_angles}")
    bx, by = float(beta_x) - lens.x0, float(beta_y) - lens.y0
    dt = 2 * math.pi / n_angles
    t, cos_t, sin_t = _angle_grid(n_angles)
    f, _ = _collinearity(lens, bx, by, t, (cos_t, sin_t), with_r=False)
    f_next = np.roll(f, -1)
    lo = [t[(f * f_next < 0)]]
    exact = [t[f == 0]]
    # |F| local minima without a sign change: a merging pair may hide between two samples
    af = np.abs(f)
    is_min = (af <= np.roll(af, 1)) & (af <= np.roll(af, -1)) & (f * f_next > 0) \
        & (f * np.roll(f, 1) > 0)
    if is_min.any():
        tm = t[is_min]
        sub = tm[:, None] + dt * (np.arange(-_REFINE, _REFINE + 1) / _REFINE)[None, :]
        fs, _ = _collinearity(lens, bx, by, sub, with_r=False)
        ch = fs[:, :-1] * fs[:, 1:] < 0
        lo.append(sub[:, :-1][ch])
        exact.append(sub[fs == 0])
    lo = np.concatenate(lo)
    # bracket widths: dt for the coarse grid, dt / _REFINE for the refined ones
    n_coarse = int((f * f_next < 0).sum())
    width = np.concatenate([np.full(n_coarse, dt), np.full(lo.size - n_coarse, dt / _REFINE)])
    # vectorised 32-section of every bracket (one F evaluation per step for all brackets)
    a, w = lo.copy(), width
    frac = np.arange(_SECTION + 1) / _SECTION
    rows = np.arange(a.size)
    for _ in range(_SECTION_STEPS):
        if not a.size:
            break
        grid = a[:, None] + w[:, None] * frac[None, :]
        fg, _ = _collinearity(lens, bx, by, grid, with_r=False)
        change = fg[:, :-1] * fg[:, 1:] <= 0        # the bracket's sign change (kept)
        first = np.argmax(change, axis=1)
        a = grid[rows, first]
        w = w / _SECTION
    roots = np.concatenate([a + 0.5 * w, *exact])
    _, r = _collinearity(lens, bx, by, roots)
    keep = r > 0
    roots, r = roots[keep], r[keep]
    x = lens.x0 + r * np.cos(roots)
    y = lens.y0 + r * np.sin(roots)
    # Newton polishing on the 2-D lens equation with the analytic Hessian (an update is kept
    # only where it reduces the residual)
    sx, sy = bx + lens.x0, by + lens.y0
    for _ in range(_NEWTON_STEPS):
        px, py = lens.ray_shoot(x, y)
        ex, ey = sx - px, sy - py
        fxx, fxy, _, fyy = lens.hessian(x, y)
        a11, a12, a22 = 1 - fxx, -fxy, 1 - fyy
        det = a11 * a22 - a12 * a12
        with np.errstate(all="ignore"):   # det = 0 only on a critical curve: update refused
            nx = x + (a22 * ex - a12 * ey) / det
            ny = y + (a11 * ey - a12 * ex) / det
            ok = np.isfinite(nx) & np.isfinite(ny)
            nx, ny = np.where(ok, nx, x), np.where(ok, ny, y)
            qx, qy = lens.ray_shoot(nx, ny)
            better = ok & (np.hypot(sx - qx, sy - qy) < np.hypot(ex, ey))
        x, y = np.where(better, nx, x), np.where(better, ny, y)
    # de-duplicate (a root on a grid point can be found twice)
    if x.size > 1:
        order = np.lexsort((y, x))
        x, y = x[order], y[order]
        d = np.hypot(np.diff(x), np.diff(y))
        first = np.concatenate([[True], d > 1e-9])
        x, y = x[first], y[first]
    if x.size > _MAX_IMAGES:
        raise DegenerateImagesError(f"{x.size} point images found (> {_MAX_IMAGES}): the source "
                                    "is on a degenerate caustic (Einstein ring)")
    mu = np.asarray(lens.magnification(x, y), dtype=np.float64)
    order = np.argsort(-np.abs(mu), kind="stable")
    return PointImages(x[order], y[order], mu[order])


def lensed_source_flags(n_images: int, theta_e: float, r_e: float, mu_total: float,
                        fwhm: float, b_fac: float = 2.0, r_fac: float = 2.0):
    """(``lens_resolved``, ``arc_like``) following LensPop's detectability tests (Collett
    2015, ApJ 811, 20; the LensPop code's ``SeeingTest`` and tangential ``resolved``):

    * resolved: ``n_images >= 2`` and ``b_fac theta_E^2 >= (r_fac r_e)^2 + fwhm^2``
      (b_fac = r_fac = 2 as in LensPop's runs: the Einstein ring is larger than the seeing-
      convolved source);
    * arc_like: resolved and ``mu_total r_e > fwhm`` (the tangential stretching of the source
      exceeds the seeing).

    theta_E, r_e (source half-light radius) and fwhm (PSF FWHM) in arcsec; mu_total: the
    extended-source flux magnification."""
    resolved = bool(n_images >= 2 and b_fac * theta_e ** 2 >= (r_fac * r_e) ** 2 + fwhm ** 2)
    arc_like = bool(resolved and mu_total * r_e > fwhm)
    return resolved, arc_like
