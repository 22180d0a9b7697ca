"""An independent, converged reference renderer for tests (not shipped; no code of
lensing.render or lensing.sources is used).

    image(x_i) = pixscale^2 * integral of I(beta(theta)) P(x_i - theta) d^2 theta

with the DR10/no_pixel semantics (the PSF already contains the pixel response, so it is
evaluated at the pixel centre, not integrated over the pixel a second time).

* Sersic: exact b_n = gammaincinv(2n, 1/2) (scipy) and the analytic total flux
  2 pi n q r_e^2 e^b Gamma(2n) / b^(2n) (scipy.special.gamma), major-axis r_e.
* Lens: ``LensModel.ray_shoot`` and ``LensModel.hessian`` (pinned to lenstronomy to 1e-10 by
  tests/test_lenstronomy_agreement.py).
* Integration: every canvas pixel is split uniformly into s0 x s0 (odd) base cells; every
  cell is point-sampled at its centre, and split 3 x 3 (recursively) while its source-plane
  footprint (radius rho = cell half-diagonal x the largest singular value of the lens
  Jacobian) is larger than ``eta`` x the local scale of the profile, min(r_e, the
  log-derivative length n r_e (R/r_e)^(1-1/n) / b_n at the footprint's nearest elliptical
  radius R), until rho < ``floor`` r_e q or ``max_depth`` splits: a graded mesh that resolves
  the n = 4 cusp (midpoint error ~ (rho / l)^2 / 24 per cell).  Cells whose nearest
  elliptical radius exceeds 10 r_e are never split.
* PSF: a circular Gaussian of FWHM = psfsize evaluated analytically (a normal density, no
  truncation, no sampled kernel) between every stamp pixel centre and every base-cell centre
  (each base cell's flux placed at its centre: error second order in cell / sigma, checked by
  comparing two s0), as two dense matrix products.
"""
from __future__ import annotations

import math

import numpy as np
from scipy.special import gamma as gamma_fn
from scipy.special import gammaincinv

FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))


def sersic_ref(n, r_e, q):
    b = float(gammaincinv(2.0 * n, 0.5))
    total = 2.0 * math.pi * n * q * r_e * r_e * math.exp(b) * gamma_fn(2.0 * n) / b ** (2.0 * n)
    return b, total


def _jacobian_smax(lens, x, y):
    fxx, fxy, fyx, fyy = lens.hessian(x, y)
    a11, a12, a21, a22 = 1.0 - fxx, -fxy, -fyx, 1.0 - fyy
    fro2 = a11 * a11 + a12 * a12 + a21 * a21 + a22 * a22
    det = a11 * a22 - a12 * a21
    return np.sqrt(0.5 * (fro2 + np.sqrt(np.maximum(fro2 * fro2 - 4.0 * det * det, 0.0))))


def reference_unit_base(lens, src, n_canvas, pixscale, s0=9, eta=0.1, floor=1e-4,
                        max_depth=12):
    """Unit-flux lensed source integrated over the (n_canvas s0)^2 base cells (flux per base
    cell).  ``src``: dict(dx, dy, r_e, n, q, phi) (offsets from the lens centre)."""
    n, r_e, q, phi = src["n"], src["r_e"], src["q"], src["phi"]
    b, total = sersic_ref(n, r_e, q)
    cx, cy = lens.x0 + src["dx"], lens.y0 + src["dy"]
    c, s = math.cos(phi), math.sin(phi)
    nb = n_canvas * s0
    h0 = pixscale / s0
    g = (np.arange(nb) - 0.5 * (nb - 1)) * h0
    xx, yy = np.meshgrid(g, g)
    x, y = xx.ravel(), yy.ravel()
    owner = np.arange(x.size)
    h = h0
    out = np.zeros(x.size)
    for depth in range(max_depth + 1):
        bx, by = lens.ray_shoot(x, y)
        dx, dy = bx - cx, by - cy
        xp = dx * c + dy * s
        yp = (dy * c - dx * s) / q
        radius = np.sqrt(xp * xp + yp * yp) / r_e                  # elliptical, r_e units
        value = np.exp(-b * (np.power(radius, 1.0 / n) - 1.0))
        rho = _jacobian_smax(lens, x, y) * h / math.sqrt(2.0)
        r_min = np.maximum(radius - rho / (q * r_e), 0.0)
        with np.errstate(divide="ignore"):
            local = np.minimum(n * r_e * np.power(r_min, 1.0 - 1.0 / n) / b, r_e)
        split = (rho > eta * q * local) & (rho > floor * r_e * q) & (r_min < 10.0)
        if depth == max_depth:
            split[:] = False
        done = ~split
        out += np.bincount(owner[done], weights=value[done] * h * h, minlength=out.size)
        if not split.any():
            break
        off = np.array([-1.0, 0.0, 1.0]) * (h / 3.0)
        x = (x[split][:, None, None] + off[None, None, :] + 0.0 * off[None, :, None]).ravel()
        y = (y[split][:, None, None] + off[None, :, None] + 0.0 * off[None, None, :]).ravel()
        owner = np.repeat(owner[split], 9)
        h /= 3.0
    return out.reshape(nb, nb) / total


def reference_image(lens, src, flux, fwhm, n_pix, pixscale, pad=14, s0=9, **kw):
    """Stamp [flux units per pixel] of the lensed Sersic convolved with an analytic Gaussian
    PSF of FWHM ``fwhm`` evaluated at the stamp's pixel centres."""
    n_canvas = n_pix + 2 * pad
    base = reference_unit_base(lens, src, n_canvas, pixscale, s0, **kw)
    nb = n_canvas * s0
    y_base = (np.arange(nb) - 0.5 * (nb - 1)) * (pixscale / s0)
    x_pix = (np.arange(n_pix) - 0.5 * (n_pix - 1)) * pixscale
    sigma = fwhm / FWHM_PER_SIGMA
    d = x_pix[:, None] - y_base[None, :]
    gm = np.exp(-0.5 * (d / sigma) ** 2) / (math.sqrt(2.0 * math.pi) * sigma)
    return flux * pixscale * pixscale * (gm @ base @ gm.T), float(base.sum())


def reference_images(lens, src, flux, fwhm, n_pix, pixscale, pad=14, s0=9, **kw):
    """:func:`reference_image` for several bands sharing one integration: ``flux`` and
    ``fwhm`` are dicts band -> value.  Returns ({band: stamp}, lensed unit flux on canvas)."""
    n_canvas = n_pix + 2 * pad
    base = reference_unit_base(lens, src, n_canvas, pixscale, s0, **kw)
    nb = n_canvas * s0
    y_base = (np.arange(nb) - 0.5 * (nb - 1)) * (pixscale / s0)
    x_pix = (np.arange(n_pix) - 0.5 * (n_pix - 1)) * pixscale
    out = {}
    for band, fw in fwhm.items():
        sigma = fw / FWHM_PER_SIGMA
        d = x_pix[:, None] - y_base[None, :]
        gm = np.exp(-0.5 * (d / sigma) ** 2) / (math.sqrt(2.0 * math.pi) * sigma)
        out[band] = flux[band] * pixscale * pixscale * (gm @ base @ gm.T)
    return out, float(base.sum())
