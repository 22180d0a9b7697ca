"""Galaxy shapes: Tractor ellipticities <-> (axis ratio, position angle), and shapes measured
on pixels (second moments).  Pure NumPy.

Conventions (docs/conventions.md): stamp/brick pixels with x along +column and y along +row;
DR10 coadds are north up, east left, so **+x points west** (decreasing RA) and **+y north**.
Angles ``phi`` are radians from +x toward +y, defined modulo pi for an ellipse's major axis.

Tractor (DR10 ``shape_e1``, ``shape_e2``; tractor ``EllipseE``): e = hypot(e1, e2) with
e = (1 - q)/(1 + q), i.e. q = b/a = (1 - e)/(1 + e), and theta = atan2(e2, e1)/2.  Tractor's
``getRaDecBasis`` maps the unit major axis to (dRA, dDec) = r (sin theta, cos theta), so
theta is the astronomical position angle of the major axis, **east of north**.  East is -x
and north +y, so the major axis points along (-sin theta, cos theta) in pixels:
phi = theta + pi/2 (mod pi), and back: e1 = -e cos(2 phi), e2 = -e sin(2 phi).
(Proved on pixels by tests/test_shapes.py: the synthetic survey renders each galaxy from its
catalogue e1/e2 and the image moments recover phi.)
"""
from __future__ import annotations

import numpy as np


def tractor_e1e2_to_q_phi(e1, e2):
    """(q, phi): axis ratio b/a in (0, 1] and major-axis angle in [0, pi) from +x toward +y.

    ``e1``, ``e2``: Tractor ellipticity components (|e| < 1).  A round shape (e = 0) gets
    phi = pi/2 (north), by the formula; its phi carries no information.
    """
    e1 = np.asarray(e1, dtype=np.float64)
    e2 = np.asarray(e2, dtype=np.float64)
    e = np.hypot(e1, e2)
    if np.any(~np.isfinite(e)) or np.any(e >= 1.0):
        raise ValueError("Tractor ellipticity must be finite with |e| = hypot(e1, e2) < 1")
    q = (1.0 - e) / (1.0 + e)
    phi = np.mod(0.5 * np.arctan2(e2, e1) + 0.5 * np.pi, np.pi)
    return q, phi


def q_phi_to_tractor_e1e2(q, phi):
    """Inverse of :func:`tractor_e1e2_to_q_phi`: (e1, e2) for axis ratio q and angle phi."""
    q = np.asarray(q, dtype=np.float64)
    phi = np.asarray(phi, dtype=np.float64)
    if np.any(~(q > 0) | (q > 1)):
        raise ValueError("axis ratio q must be in (0, 1]")
    e = (1.0 - q) / (1.0 + q)
    return -e * np.cos(2.0 * phi), -e * np.sin(2.0 * phi)


def position_angle_difference(phi_a, phi_b):
    """|phi_a - phi_b| folded onto [0, pi/2] (axes are defined modulo pi)."""
    d = np.mod(np.asarray(phi_a, np.float64) - np.asarray(phi_b, np.float64), np.pi)
    return np.minimum(d, np.pi - d)


def moments_shape(image, x0: float, y0: float, sigma_w_px: float):
    """Shape of the light around (x0, y0) from Gaussian-weighted second moments.

    ``image``: 2-D array (rows = y, columns = x), any units; ``(x0, y0)``: centre in 0-based
    pixel coordinates (column, row); ``sigma_w_px``: width of the circular Gaussian weight in
    pixels (a circular weight does not bias the orientation).  Returns
    ``(q_moments, phi)``: the axis ratio of the weighted moments ellipse (biased toward 1 by
    the PSF and the weight, so compare it only between images of one kind) and the major-axis
    angle in [0, pi) from +x toward +y.  Pixels that are not finite carry no weight.
    """
    img = np.asarray(image, dtype=np.float64)
    if img.ndim != 2 or not sigma_w_px > 0:
        raise ValueError("moments_shape needs a 2-D image and sigma_w_px > 0")
    ny, nx = img.shape
    dx = np.arange(nx, dtype=np.float64)[None, :] - x0
    dy = np.arange(ny, dtype=np.float64)[:, None] - y0
    w = np.exp(-0.5 * (dx * dx + dy * dy) / sigma_w_px ** 2) * np.where(np.isfinite(img), img, 0.0)
    norm = w.sum()
    if not norm > 0:
        raise ValueError("moments_shape: no positive weighted flux around the centre")
    mxx = (w * dx * dx).sum() / norm
    myy = (w * dy * dy).sum() / norm
    mxy = (w * dx * dy).sum() / norm
    tr = mxx + myy
    diff = np.hypot(mxx - myy, 2.0 * mxy)
    lam1, lam2 = 0.5 * (tr + diff), 0.5 * (tr - diff)
    q = float(np.sqrt(max(lam2, 0.0) / lam1)) if lam1 > 0 else 1.0
    phi = float(np.mod(0.5 * np.arctan2(2.0 * mxy, mxx - myy), np.pi))
    return q, phi
