"""Ray-shooting renderer of a lensed source model, for several bands at once (pure NumPy).

Geometry: an N x N stamp of ``pixscale`` arcsec pixels whose pixel centres sit at
``(i - (N - 1)/2) * pixscale`` (i = 0..N-1) along x (columns) and y (rows).  The lens centre
(x0, y0) is any sub-pixel position in these coordinates; the source centre is given as an
offset (dx, dy) from the lens centre in the source plane.

Source models (:mod:`lensing.sources`): the renderer sees K components (a SersicSource is
one; a ClumpySource is a Sersic disc plus its clumps), each with a brightness, an analytic
total flux, a resolving scale and a refinement radius, and per-band flux fractions.  All
components are lensed with ONE ray trace (the lens is achromatic); each is integrated into
its own unit-flux image and a band's image is the linear combination with that band's
fractions, convolved with that band's PSF.

Pixel response, applied exactly once (issue 15/16).  DR10's psfsize is measured on the
pixelised images, so the PSF already contains the pixel response; the model value of a pixel
is (lensed surface brightness * PSF) evaluated at the pixel centre times the pixel area
(GalSim's ``no_pixel`` semantics for a pixelised PSF).  The renderer therefore:

1. integrates the lensed source over the f x f fine cells of every pixel (``psf_oversample``
   = f, a power of 2, default 4; conf/injection.toml ``psf_oversample``, CLI ``--psf-oversample``);
2. convolves these fine-cell fluxes with the PSF evaluated at the offsets between each
   *pixel centre* and each fine-cell centre (Gaussian: analytically, separably, the weights
   of :func:`lensing.psf.gaussian_fine_matrix` (:class:`lensing.psf.GaussianFineWeights`),
   as two small matrix products; Moffat:
   :func:`lensing.psf.moffat_fine_kernel` on the fine grid by FFT, sampled at the pixel
   centres); the result is per pixel already (the fine kernels carry the f^2 area ratio);
3. for the Gaussian, removes the fine cells' own box response (variance (pixscale/f)^2/12)
   from the PSF variance, so the one remaining pixel response is the one inside psfsize.  The
   Moffat keeps a residual box of pixscale/f (variance 1/(12 f^2) pixel^2: 0.3 % of the
   psfsize variance at 0.8", f = 4; documented, not corrected).  For the Gaussian the
   correction is exact for light spread uniformly over a fine cell; a point-like source is
   rendered sharper by that same 1/(12 f^2) pixel^2 (0.3 % of the variance at 0.8").

Measured (tests/test_render_reference.py, against an independent reference: nested uniform
ray-shooting, exact-b_n Sersic, a Gaussian PSF evaluated analytically at every sample;
compact r_e 0.05-0.18" and cuspy n 2-4 sources behind strong SIE + shear lenses, psfsize
0.8-1.3"), worst band of 10 held-out cases: f = 4 (default): 2.5e-4 in flux, 0.71 % of the
peak, 0.0044 px in centroid; f = 2: 2.9 % of the peak, 0.014 px; f = 1: 9.0 %, 0.063 px.
``psf_oversample = 1`` is the legacy scheme (pixel means
convolved with the kernel sampled at pixel centres: the pixel response twice, +1/12 px^2 of
variance, and compact structure snapped to pixel centres); it is kept, bit-identical to the
old renderer, only for comparisons (e.g. lenstronomy's ``supersampling_convolution=False``).

Integration over cells (the error control):

1. The rendering canvas is the stamp padded by the largest PSF kernel half-width, so light
   lensed just outside the stamp is scattered into it by the PSF.
2. Sub-pixel sampling (``supersample=None``, the default): every canvas pixel is first
   ray-shot at its centre and its 4 corners.  Pixels whose source-plane footprint (radius rho,
   from the corner rays) may reach within a component's refinement radius (Sersic:
   ``REFINE_RADIUS_RE`` = 4 half-light radii) of its centre (``d_centre - 1.5 rho < R``) have
   each of their fine cells integrated by error-controlled quadtree quadrature
   (:func:`_quadtree`, the one loop behind both the f = 1 pixel integration and the fine
   cells): a cell is split 2 x 2 until the change of its
   estimate is below ``CELL_TOLERANCE`` = 1e-6 of the source's total flux in each band, for
   every component (component k's tolerance in its own units is 1e-6 of its total flux
   divided by its largest band flux fraction: a clump carrying 5 % of the light is held to
   1e-6 of the source, as the disc is, not to 1e-6 of itself) (at least
   ``MIN_LEVEL`` = 1 split counted from the pixel, and never before the cell's own
   source-plane footprint (twice the largest offset of its children's rays from its centre
   ray) is within the scale (Sersic: minor-axis half-light radius r_e q) of every component
   whose zone it may reach, so that the error test cannot be fooled by a source smaller than
   the sample spacing; the test is per cell, so that near the lens centre, where a pixel's
   rays land arcseconds apart, only the cells mapping near a compact clump go to its scale,
   and no deeper than the level at which the pixel's corner footprint, shrunk linearly, is
   (cells containing the lens centre keep a footprint ~theta_E however small); at most
   ``MAX_LEVEL`` = 10 from the pixel, i.e. 1/2048 pixel), with a Richardson step on
   acceptance (replaced by the children's mean where it would be negative: the
   brightness is >= 0).  Since f is a power of two, the fine cells are exactly the quadtree's
   level-log2(f) cells, so the refined pixels cost what they did before the fix.  This
   resolves the central cusp of compact n > 1 Sersic profiles, which a fixed sub-pixel grid
   does not (16x uniform sampling still misses the flux of an r_e = 0.1", n = 4 source by up
   to 35 % at unlucky positions).  Other pixels: their fine-cell means come from the
   5-parameter model a + b u + c v + d u v + e (u^2 + v^2) through the 5 rays, whose pixel
   mean is 2/3 centre + 1/3 corner mean (exact for quadratics) and whose fine-cell means
   average exactly to it; pixels fainter than ``FINE_MODEL_FLOOR`` = 1e-6 of the canvas
   maximum keep flat cells (the pixel mean: an error < 1e-7 of the peak).  The fine cells
   are held sparsely (:class:`_FineCells`: pixel fluxes + the cells of the refined or
   modelled pixels, a few hundred); the Gaussian product is evaluated as flat part (pixel
   fluxes with the phase-summed weights) + detail (the non-flat cells' deviations, over
   their bounding box): the same sums as the dense product, and nothing of size
   (canvas f)^2 is built, so f = 4 costs about what f = 1 does (the Moffat's fine-grid FFT
   still builds the dense grid).
   Measured (tests/test_render_accuracy.py): integrated lensed flux within 0.1 % of a uniform
   16x reference for n <= 1, and of the analytic flux (theta_E = 0) for n up to 4.
   ``supersample=s`` (int, a multiple of f) instead samples every pixel uniformly s x s (used
   for references and the lenstronomy comparison).
3. Each component is normalised analytically (its ``unit_total``) to its share of the
   catalogue flux per band (nanomaggies from AB magnitudes); the lensed image is never
   renormalised, so it carries the magnification.
4. Each band is convolved with its own PSF (``lensing.psf.build_psf``: a Gaussian of FWHM =
   psfsize, or a Moffat whose pixelised NEA equals that Gaussian's), then cropped to the
   stamp; pixels below ``ARC_FLOOR_REL`` = 1e-10 of the band's convolved peak (round-off,
   either sign) are set to exactly 0 (the flux they carry is < 1e-10 x peak x N^2).

Magnifications returned: ``mu_total`` = (lensed flux on the canvas, before PSF) / (intrinsic
flux): the honest flux-ratio magnification of the extended source (per band in
``mu_total_band``); ``mu_point_1p1``: the signed point magnification 1/det(A) at 1.1 theta_E
from the lens centre along the source's direction (a labelled diagnostic only, never used as
the magnification of the source).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from .mass_profiles import LensModel
from .photometry import DR10_PIXSCALE_ARCSEC, mag_to_nMgy
from .psf import (PSF_MATCH, GaussianFineWeights, build_psf, fft_size, moffat_fine_kernel,
                  separable_banded)
from .sources import (SERSIC_REFINE_RADIUS_RE, SersicSource, as_source_model,  # noqa: F401
                      component_arrays)

REFINE_RADIUS_RE = SERSIC_REFINE_RADIUS_RE
CELL_TOLERANCE = 1e-6
MIN_LEVEL = 1
MAX_LEVEL = 10
ARC_FLOOR_REL = 1e-10
#: default oversampling of the convolution grid (fine cells per pixel along each axis);
#: conf/injection.toml [injection] psf_oversample, CLI --psf-oversample
PSF_OVERSAMPLE_DEFAULT = 4
PSF_OVERSAMPLE_ALLOWED = (1, 2, 4, 8)
#: pixels (outside the refinement zone) whose mean brightness is below this fraction of the
#: canvas maximum (every component) keep flat fine cells: their light is re-pixelised, an
#: error below FINE_MODEL_FLOOR x (1/12 px^2) / sigma_psf^2 < 1e-7 of the peak
FINE_MODEL_FLOOR = 1e-6


@dataclass
class LensedArc:
    """Result of :func:`render_lensed_arc`.

    ``images``: band -> (N, N) float64, PSF-convolved lensed source [nanomaggies / pixel].
    ``unit_image``: (N, N) lensed source before PSF (integrated over each pixel) for unit
    intrinsic flux [1 / pixel], in the first band of ``src_mag`` (band-independent for a
    one-component source; ``unit_images`` holds every band).
    ``mu_total``: flux-ratio magnification of the extended source (before PSF, on the canvas),
    in the first band (``mu_total_band``: per band; they differ only for a source whose
    components have different colours).
    ``mu_point_1p1``: diagnostic point magnification at 1.1 theta_E (signed).
    ``flux_nmgy``: band -> intrinsic (unlensed) source flux [nanomaggies].
    ``supersample``: (s, s) for uniform sampling, (0, 0) for the adaptive quadrature;
    ``n_refined_pixels``: canvas pixels integrated adaptively.  ``psf_fwhm``: band -> psfsize
    (Gaussian-equivalent FWHM) used [arcsec].  ``psf_match``: how the kernel honours it
    (``lensing.psf.PSF_MATCH``: "gaussian_fwhm" | "nea_pixelised").  ``psf_alpha``: band ->
    Moffat core radius alpha [arcsec] of the NEA-matched kernel (empty for the Gaussian).
    ``psf_oversample``: fine cells per pixel (per axis) of the convolution grid (1 = the
    legacy double pixel response, module docstring).  ``n_components``: components of the
    source model.
    """

    images: dict
    unit_image: np.ndarray
    mu_total: float
    mu_point_1p1: float
    flux_nmgy: dict
    supersample: tuple
    n_refined_pixels: int
    psf_fwhm: dict = field(default_factory=dict)
    psf_match: str = ""
    psf_alpha: dict = field(default_factory=dict)
    psf_oversample: int = 1
    mu_total_band: dict = field(default_factory=dict)
    unit_images: dict = field(default_factory=dict)
    n_components: int = 1


def pixel_centres(n_pix: int, pixscale: float = DR10_PIXSCALE_ARCSEC) -> np.ndarray:
    """1-D pixel-centre coordinates [arcsec] of an n_pix stamp: (i - (n-1)/2) * pixscale."""
    return (np.arange(n_pix, dtype=np.float64) - 0.5 * (n_pix - 1)) * pixscale


def subpixel_offsets(s: int, pixscale: float) -> np.ndarray:
    """Offsets [arcsec] of the s sub-pixel centres of a pixel along one axis."""
    return ((np.arange(s, dtype=np.float64) + 0.5) / s - 0.5) * pixscale


class _SourceSampler:
    """Ray-shoots image-plane positions (one trace for every component) and evaluates the
    components' brightness (each in its own I_e = 1 units): arrays of shape (K, ...)."""

    def __init__(self, lens: LensModel, source):
        self.lens = lens
        self.components = tuple(as_source_model(source).components())
        if not self.components:
            raise ValueError("source model has no components")
        const = component_arrays(self.components)
        self.cx = lens.x0 + const["dx"]
        self.cy = lens.y0 + const["dy"]
        self.unit_total = const["unit_total"]
        self.scale = const["scale"]
        self.refine_radius = const["refine_radius"]
        self.k = len(self.components)

    def offsets_from_source(self, x, y):
        """Source-plane offsets (K, ...) [arcsec] of rays (x, y) from each component centre."""
        return self.offsets_of(*self.lens.ray_shoot(x, y))

    def offsets_of(self, bx, by):
        """Offsets (K, ...) [arcsec] of source-plane positions (bx, by) from each component
        centre."""
        if self.k == 1:
            return (bx - self.cx[0])[None], (by - self.cy[0])[None]
        shape = (self.k,) + (1,) * np.ndim(bx)
        return bx[None] - self.cx.reshape(shape), by[None] - self.cy.reshape(shape)

    def brightness(self, dx, dy):
        """(K, ...) brightness of each component at its own offsets dx[k], dy[k]."""
        if self.k == 1:
            return self.components[0].brightness(dx[0], dy[0])[None]
        return np.stack([c.brightness(dx[i], dy[i]) for i, c in enumerate(self.components)])

    def brightness_at(self, x, y):
        return self.brightness(*self.offsets_from_source(x, y))


def _quadtree(sampler, x, y, size, tol, min_level, max_level, lf=0, footprint_cap=None):
    """Error-controlled quadtree quadrature of square cells of side ``size`` [arcsec] centred
    on (x, y): flux (K, n 4^lf) [I_e = 1 x arcsec^2] of each component in each start cell's
    2^lf x 2^lf sub-cells of level ``lf`` (in quadtree order: index = cell 4^lf + the
    children's quadrant digits, base 4, quadrant = x bit + 2 y bit; ``lf`` = 0: one value per
    cell).  The one loop behind :func:`_integrate_cells_adaptive` (lf = 0) and
    :func:`_integrate_pixels_to_fine` (lf = log2 f).

    A cell of side h sampled at its centre (value v) is split into 2 x 2 children sampled at
    their centres (mean m).  The cell is accepted with m when |m - v| h^2 <= ``tol[k]`` [flux
    of I_e = 1 x arcsec^2] for every component k, its level >= ``min_level`` (an int, or
    one int per cell; raised to lf - 1), and its source-plane footprint is resolved (or at
    ``max_level``); otherwise each child becomes a cell of the next level (reusing its
    sample and its ray as its centre value and ray).  The footprint test: the cell's
    footprint radius rho_c = 2 x the largest distance of its children's rays from its centre
    ray (the corners' distance for a locally linear lens map) must be <= the ``scale`` of
    every component whose refinement zone it may reach (distance of the centre ray from the
    component centre - 1.5 rho_c < ``refine_radius``), so that a source smaller than the
    sample spacing cannot fool the error test.  The test is the cell's own: near the lens
    centre, where a pixel's corner rays land arcseconds apart, only the sub-cells that map
    near a component are refined to its scale, not the whole pixel.  The footprint test
    applies below level ``footprint_cap`` (an int or one per start cell; None: max_level):
    a cell containing the lens centre keeps a footprint ~theta_E however small it is.  A
    cell accepted at a level >= lf adds to the level-lf sub-cell containing it; one accepted at level lf - 1
    (its children ARE the level-lf sub-cells) splits its flux among its children in
    proportion to their samples (equally if all are 0).  Levels run in vectorised batches;
    contributions are summed with bincount level by level in a fixed order, so the result is
    deterministic.
    """
    n0 = x.size
    k = sampler.k
    if max_level < lf:
        raise ValueError(f"max_level ({max_level}) must be >= lf ({lf})")
    tol = np.asarray(tol, dtype=np.float64).reshape(k, 1)
    min_level = np.broadcast_to(np.asarray(min_level, dtype=np.int64), (n0,))
    if lf:
        min_level = np.maximum(min_level, lf - 1)
    # one minimum level for every cell (the usual case): a scalar test, no gather per level
    min_all = int(min_level[0]) if n0 and np.all(min_level == min_level[0]) else None
    cap = np.broadcast_to(np.asarray(max_level if footprint_cap is None else footprint_cap,
                                     dtype=np.int64), (n0,))
    n_out = n0 * 4 ** lf
    total = np.zeros((k, n_out))
    tag = np.arange(n0)                 # start cell (x 4^level + quadrant digits below lf)
    quadrant = np.arange(4)
    bx, by = sampler.lens.ray_shoot(x, y)                         # centre rays, (n,)
    centre_value = sampler.brightness(*sampler.offsets_of(bx, by))    # (K, n)
    scale = np.asarray(sampler.scale, dtype=np.float64).reshape(k, 1)
    reach = np.asarray(sampler.refine_radius, dtype=np.float64).reshape(k, 1)
    comp_x = np.asarray(sampler.cx, dtype=np.float64).reshape(k, 1)
    comp_y = np.asarray(sampler.cy, dtype=np.float64).reshape(k, 1)
    level = 0
    # The (n, 4) children arrays are built, reduced and compacted column by column and with
    # integer takes: numpy's broadcasting, axis reductions and boolean row selection over a
    # length-4 last axis cost ~3-15x more per element.  The arithmetic (and so every bit of
    # the result) is that of the plain expressions in the comments.
    while tag.size:
        quarter = 0.25 * size
        cx = _children(x, (-quarter, quarter, -quarter, quarter))   # x[:, None] + offsets
        cy = _children(y, (-quarter, -quarter, quarter, quarter))
        sx, sy = sampler.lens.ray_shoot(cx, cy)                    # children's rays, (n, 4)
        values = sampler.brightness(*sampler.offsets_of(sx, sy))   # (K, n, 4)
        sum4 = _sum4(values)                                       # values.sum(axis=2)
        mean4 = sum4 * 0.25                                        # values.mean(axis=2)
        area = size * size
        err_ok = np.abs(mean4 - centre_value) * area <= tol
        done = err_ok[0] if k == 1 else np.all(err_ok, axis=0)
        below = level < lf
        owner = tag >> (2 * level) if below else (tag >> (2 * lf) if lf else tag)
        if min_all is None:
            done &= level >= min_level[owner]
        elif level < min_all:
            done[:] = False
        if level >= max_level:
            done[:] = True
        else:                  # the footprint test, on the cells that passed the others
            cand = np.flatnonzero(done)
            cand = cand[level < cap[owner[cand]]]
            bxc, byc = bx[cand], by[cand]
            d2 = None          # max over the 4 children of |child ray - centre ray|^2
            for j in range(4):
                ddx = sx[:, j].take(cand) - bxc
                ddy = sy[:, j].take(cand) - byc
                dj = ddx * ddx + ddy * ddy
                d2 = dj if d2 is None else np.maximum(d2, dj)
            rho = 2.0 * np.sqrt(np.maximum(d2, 0.0))             # np.max(..., initial=0)
            near = np.hypot(bxc - comp_x, byc - comp_y) - 1.5 * rho < reach
            done[cand[np.any(near & (rho > scale), axis=0)]] = False
        # Richardson step: the midpoint error scales as h^2, so (4 m - v) / 3 cancels it.
        # The brightness is >= 0, so is its cell mean: where the extrapolation would go
        # negative (a source far smaller than the cell, caught only by the centre sample),
        # the children's mean m (>= 0) is used instead.
        di = np.flatnonzero(done)
        m_done, v_done = mean4.take(di, axis=1), centre_value.take(di, axis=1)
        accepted = m_done + (m_done - v_done) * (1.0 / 3.0)
        accepted = np.where(accepted >= 0.0, accepted, m_done)
        if not below:
            idx, wts = tag[di], accepted * area
        else:                               # level lf - 1: the children are sub-cells
            vals = values.take(di, axis=1)
            s4 = sum4.take(di, axis=1)[:, :, None]
            share = np.where(s4 > 0, vals / np.where(s4 > 0, s4, 1.0), 0.25)
            idx = (tag[di][:, None] * 4 + quadrant).ravel()
            wts = (share * (accepted * area)[:, :, None]).reshape(k, -1)
        for i in range(k):
            total[i] += np.bincount(idx, weights=wts[i], minlength=n_out)
        ki = np.flatnonzero(~done)
        x, y = cx.take(ki, axis=0).ravel(), cy.take(ki, axis=0).ravel()
        bx, by = sx.take(ki, axis=0).ravel(), sy.take(ki, axis=0).ravel()
        centre_value = values.take(ki, axis=1).reshape(k, -1)
        tag = (tag[ki][:, None] * 4 + quadrant).ravel() if below else np.repeat(tag[ki], 4)
        size *= 0.5
        level += 1
    return total


def _children(c, offsets):
    """(n, 4) array c[:, None] + offsets, filled one column at a time."""
    out = np.empty((c.size, 4))
    for j, o in enumerate(offsets):
        np.add(c, o, out=out[:, j])
    return out


def _sum4(values):
    """values.sum(axis=-1) of a (..., 4) array, as numpy sums a length-4 axis: in order,
    ((v0 + v1) + v2) + v3."""
    return ((values[..., 0] + values[..., 1]) + values[..., 2]) + values[..., 3]


def _integrate_cells_adaptive(sampler, xc, yc, cell, tol, min_level, max_level,
                              footprint_cap=None):
    """Mean brightness (K, n_cells) of each component over square cells of side ``cell``
    [arcsec] centred on (xc, yc), by the error-controlled quadtree quadrature of
    :func:`_quadtree` (tolerance ``tol[k]`` [flux of I_e = 1 x arcsec^2], levels
    ``min_level`` (an int, or one per cell) to ``max_level``)."""
    return _quadtree(sampler, xc, yc, float(cell), tol, min_level, max_level,
                     footprint_cap=footprint_cap) / (cell * cell)


def _quadrant_order(lf):
    """Row-major position (sub-row f + sub-col, f = 2^lf) of each quadtree-order sub-cell."""
    code = np.arange(4 ** lf)
    su = np.zeros_like(code)
    sv = np.zeros_like(code)
    for j in range(lf):                       # digit j (from the pixel down) -> bit lf-1-j
        q = (code >> (2 * (lf - 1 - j))) & 3
        su |= (q & 1) << (lf - 1 - j)
        sv |= (q >> 1) << (lf - 1 - j)
    return sv * (1 << lf) + su


def _integrate_pixels_to_fine(sampler, rows, cols, centres, pixscale, tol, min_level, f,
                              max_level=MAX_LEVEL, footprint_cap=None):
    """Flux (K, P, f, f) [I_e = 1 x arcsec^2 per fine cell; P = len(rows), (sub-row, sub-col)]
    of the refined pixels (rows, cols) of a canvas with pixel centres ``centres``: the
    quadtree quadrature of :func:`_quadtree` started at the pixels, attributed to the f x f
    fine cells (f = 2^lf, the quadtree's level-lf cells; ``min_level`` raised to lf - 1 so no
    coarser cell is accepted).  The error control is the same as for f = 1 (same tolerance,
    same tests), only the book-keeping differs."""
    lf = int(round(math.log2(f)))
    total = _quadtree(sampler, centres[cols], centres[rows], float(pixscale), tol, min_level,
                      max_level, lf, footprint_cap)
    k, n0 = total.shape[0], rows.size
    out = np.empty((k, n0, f * f))
    out[:, :, _quadrant_order(lf)] = total.reshape(k, n0, f * f)
    return out.reshape(k, n0, f, f)


def _sample_canvas_uniform(sampler, centres, s, pixscale, f=1):
    """Uniform s x s sampling of every pixel (s a multiple of f): mean brightness per fine
    cell, (K, m f, m f)."""
    m = centres.size
    sub = (centres[:, None] + subpixel_offsets(s, pixscale)[None, :]).ravel()
    values = sampler.brightness_at(sub[None, :], sub[:, None])
    g = s // f
    return values.reshape(sampler.k, m * f, g, m * f, g).mean(axis=(2, 4))


def _sample_canvas_coarse(sampler, centres, pixscale):
    """Coarse samples and a refinement mask from rays at pixel centres and corners.

    Returns (centre brightness (K, m, m), corner brightness (K, m+1, m+1), refine mask,
    footprint level cap).  Pixel mean = 2/3 centre + 1/3 mean of the 4 corners (exact for
    any quadratic).  A pixel is flagged for refinement when its source-plane footprint
    (radius rho = largest centre-to-corner distance after ray-shooting) may reach within a
    component's ``refine_radius`` of its centre: d_centre - 1.5 rho < refine_radius (Sersic:
    4 major-axis r_e; the circle contains the elliptical zone).  How deep each of its cells
    goes is decided cell by cell in :func:`_quadtree` (error and footprint tests); the
    footprint test stops at the pixel's cap, the largest :func:`resolving_level` of its
    corner footprint over the components whose zone it touches (the level at which that
    footprint, shrunk linearly, is resolved: cells containing the lens centre, whose
    footprint does not shrink, go no deeper for it).
    """
    corners = np.append(centres - 0.5 * pixscale, centres[-1] + 0.5 * pixscale)
    cdx, cdy = sampler.offsets_from_source(corners[None, :], corners[:, None])
    mdx, mdy = sampler.offsets_from_source(centres[None, :], centres[:, None])
    corner_b = sampler.brightness(cdx, cdy)
    centre_b = sampler.brightness(mdx, mdy)
    rho2 = np.zeros_like(mdx[0])
    for sl_y, sl_x in ((slice(None, -1), slice(None, -1)), (slice(1, None), slice(None, -1)),
                       (slice(None, -1), slice(1, None)), (slice(1, None), slice(1, None))):
        ddx = cdx[0][sl_y, sl_x] - mdx[0]
        ddy = cdy[0][sl_y, sl_x] - mdy[0]
        np.maximum(rho2, ddx * ddx + ddy * ddy, out=rho2)
    rho = np.sqrt(rho2)
    refine = np.zeros(rho.shape, dtype=bool)
    cap = np.full(rho.shape, MIN_LEVEL, dtype=np.int64)
    for i in range(sampler.k):
        near = np.hypot(mdx[i], mdy[i]) - 1.5 * rho < sampler.refine_radius[i]
        refine |= near
        cap = np.where(near, np.maximum(cap, resolving_level(rho, sampler.scale[i])), cap)
    return centre_b, corner_b, refine, cap


def _pixel_means(centre_b, corner_b):
    corner_mean = 0.25 * (corner_b[:, :-1, :-1] + corner_b[:, 1:, :-1] + corner_b[:, :-1, 1:]
                          + corner_b[:, 1:, 1:])
    return (2.0 / 3.0) * centre_b + (1.0 / 3.0) * corner_mean


def _fine_cell_means(centre_b, corner_b, f):
    """Means over the f x f fine cells of each pixel of the 5-parameter model
    a + b u + c v + d u v + e (u^2 + v^2) (u, v: pixel units from the pixel centre along x, y)
    through the centre and the 4 corner samples.  The f^2 cell means average exactly to the
    pixel mean 2/3 centre + 1/3 corner mean (flux is the same as with f = 1); where the model
    is negative in some cell, the pixel's cells are clipped at 0 and rescaled to that mean.
    The model is evaluated only where some component's pixel mean exceeds FINE_MODEL_FLOOR of
    its canvas maximum (elsewhere the light is < 1e-6 of the peak surface brightness: its
    sub-pixel distribution does not matter, the cells are flat).
    Returns (pixel means (K, m, m), rows and cols (P,) of the pixels whose cells are not flat,
    their cell means (K, P, f^2), row-major (sub-row v, sub-col u))."""
    a = centre_b
    e = 0.5 * (corner_b[:, :-1, :-1] + corner_b[:, :-1, 1:] + corner_b[:, 1:, :-1]
               + corner_b[:, 1:, 1:]) - 2.0 * a
    base = a + e * (1.0 / 6.0)                                    # the pixel mean
    peak = np.max(np.abs(base), axis=(1, 2), keepdims=True)
    active = np.any(np.abs(base) > FINE_MODEL_FLOOR * peak, axis=0)
    ar, ac = np.nonzero(active)
    if not ar.size:
        return base, ar, ac, np.zeros((a.shape[0], 0, f * f))
    k00, k10 = corner_b[:, ar, ac], corner_b[:, ar, ac + 1]       # (x-, y-), (x+, y-)
    k01, k11 = corner_b[:, ar + 1, ac], corner_b[:, ar + 1, ac + 1]   # (x-, y+), (x+, y+)
    coef = np.stack([a[:, ar, ac], 0.5 * ((k10 + k11) - (k00 + k01)),
                     0.5 * ((k01 + k11) - (k00 + k10)), (k11 + k00) - (k10 + k01),
                     e[:, ar, ac]], axis=-1)                       # (K, P, 5)
    u = (np.arange(f, dtype=np.float64) + 0.5) / f - 0.5          # fine-cell centres
    vv, uu = np.meshgrid(u, u, indexing="ij")                      # [sub-row v, sub-col u]
    # cell mean of u^2 is u_c^2 + w^2 / 12 with w = 1 / f
    basis = np.stack([np.ones_like(uu), uu, vv, uu * vv,
                      uu * uu + vv * vv + 2.0 / (12.0 * f * f)]).reshape(5, f * f)
    vals = coef @ basis                                            # (K, P, f^2)
    # the brightness is >= 0: where the model dips below 0 inside a pixel (steep gradients
    # next to a compact source), its cell means are clipped at 0 and rescaled to the pixel
    # mean (flux unchanged)
    neg = np.any(vals < 0.0, axis=-1)
    if neg.any():
        clipped = np.maximum(vals[neg], 0.0)
        tot = clipped.sum(axis=-1, keepdims=True)
        pix = np.maximum(base[:, ar, ac][neg], 0.0)[:, None] * (f * f)
        vals[neg] = np.where(tot > 0, clipped * (pix / np.where(tot > 0, tot, 1.0)),
                             pix / (f * f))
    return base, ar, ac, vals


@dataclass
class _FineCells:
    """Fine-cell fluxes of an m x m canvas with f x f fine cells per pixel, held sparsely:
    ``pix`` (..., m, m), the flux per pixel; ``rows``, ``cols`` (P,), the pixels whose cells
    are not flat (row-major order), and ``cells`` (..., P, f, f), their cells' fluxes (summing
    to ``pix`` there); every other pixel's f^2 cells hold pix / f^2 each.  The leading axes
    are the components (K) or none (one band's combination)."""

    pix: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    cells: np.ndarray
    f: int

    @classmethod
    def from_dense(cls, fine, f):
        """From a dense (..., m f, m f) array (every pixel kept as detail)."""
        lead, m = fine.shape[:-2], fine.shape[-1] // f
        cells = np.moveaxis(fine.reshape(lead + (m, f, m, f)), -3, -2)
        rows, cols = np.nonzero(np.ones((m, m), dtype=bool))
        cells = cells.reshape(lead + (m * m, f, f))
        return cls(cells.sum(axis=(-2, -1)).reshape(lead + (m, m)), rows, cols, cells, f)

    def dense(self):
        """The dense (..., m f, m f) array of fine-cell fluxes."""
        f, m = self.f, self.pix.shape[-1]
        lead = self.pix.shape[:-2]
        if f == 1:
            return self.pix
        out = np.broadcast_to((self.pix * (1.0 / (f * f)))[..., :, None, :, None],
                              lead + (m, f, m, f)).copy()
        if self.rows.size:
            np.moveaxis(out, -3, -2)[..., self.rows, self.cols, :, :] = self.cells
        return out.reshape(lead + (m * f, m * f))

    def component(self, i):
        return _FineCells(self.pix[i], self.rows, self.cols, self.cells[i], self.f)

    def combine(self, w):
        """sum_k w[k] component k (one band's image of a multi-component source)."""
        return _FineCells(np.tensordot(w, self.pix, axes=1), self.rows, self.cols,
                          np.tensordot(w, self.cells, axes=1), self.f)

    def detail_box(self):
        """(r0, c0, D) for a 2-D image: D, the fine cells' deviations from pix / f^2 over the
        bounding box of the detail pixels, fine rows r0.. and columns c0.. (None if none)."""
        if not self.rows.size:
            return None
        f = self.f
        pr0, pr1 = int(self.rows.min()), int(self.rows.max()) + 1
        pc0, pc1 = int(self.cols.min()), int(self.cols.max()) + 1
        d = np.zeros((pr1 - pr0, f, pc1 - pc0, f))
        np.moveaxis(d, 1, 2)[self.rows - pr0, self.cols - pc0] = (
            self.cells - (self.pix[self.rows, self.cols] * (1.0 / (f * f)))[:, None, None])
        return f * pr0, f * pc0, d.reshape(f * (pr1 - pr0), f * (pc1 - pc0))


def resolving_level(rho, scale) -> np.ndarray:
    """Smallest quadtree level (>= MIN_LEVEL, <= MAX_LEVEL) at which a pixel whose
    source-plane footprint has radius ``rho`` [arcsec] is split into cells of footprint
    rho / 2^level <= ``scale`` [arcsec] (a component's ``scale``; a source model with a
    ``scale`` attribute, e.g. a SersicSource, r_e q, is accepted too)."""
    scale = float(getattr(scale, "scale", scale))
    with np.errstate(divide="ignore", invalid="ignore"):
        need = np.ceil(np.log2(np.maximum(np.asarray(rho, dtype=np.float64) / scale, 1.0)))
    need = np.where(np.isfinite(need), need, MAX_LEVEL)
    return np.clip(need, MIN_LEVEL, MAX_LEVEL).astype(np.int64)


def _check_oversample(f):
    if int(f) != f or int(f) not in PSF_OVERSAMPLE_ALLOWED:
        raise ValueError(f"psf_oversample must be one of {PSF_OVERSAMPLE_ALLOWED}, got {f!r}")
    return int(f)


def render_unit_components(lens: LensModel, source, n_pix: int,
                           pixscale: float = DR10_PIXSCALE_ARCSEC,
                           supersample: int | None = None, oversample: int = 1,
                           flux_share=None):
    """Lensed components before PSF, each normalised to unit intrinsic flux, integrated over
    the ``oversample`` x ``oversample`` fine cells of every pixel of an n_pix square grid.
    ``flux_share``: (K,) largest flux fraction of each component over the bands rendered
    (:func:`quadtree_tolerance`; None: 1 each, every component held to 1e-6 of itself).

    Returns (array (K, n_pix f, n_pix f) [unit flux per fine cell], (s, s) for uniform
    sampling or (0, 0) for the adaptive scheme, number of pixels integrated adaptively).
    The sum of component k is its flux-ratio magnification captured by the grid.
    """
    fine, ss, n_ref = _render_unit_fine_cells(lens, source, n_pix, pixscale, supersample,
                                              oversample, flux_share)
    return fine.dense(), ss, n_ref


def quadtree_tolerance(unit_total, flux_share=None) -> np.ndarray:
    """Per-component quadtree tolerance [flux of I_e = 1 x arcsec^2]: ``CELL_TOLERANCE`` of
    the source's total flux, in component k's own units unit_total[k] / flux_share[k]
    (``flux_share``: (K,) largest band flux fraction of each component; None: 1 each).  A
    component with no light in any band (share 0) gets an infinite tolerance: it is
    integrated at its minimum level only, and weighs 0 in every band."""
    unit_total = np.asarray(unit_total, dtype=np.float64)
    if flux_share is None:
        return CELL_TOLERANCE * unit_total
    share = np.asarray(flux_share, dtype=np.float64).reshape(unit_total.shape)
    if not np.all(np.isfinite(share) & (share >= 0.0)):
        raise ValueError(f"flux_share must be finite and >= 0, got {share}")
    return np.where(share > 0, CELL_TOLERANCE * unit_total / np.where(share > 0, share, 1.0),
                    np.inf)


def _render_unit_fine_cells(lens: LensModel, source, n_pix: int,
                            pixscale: float = DR10_PIXSCALE_ARCSEC,
                            supersample: int | None = None, oversample: int = 1,
                            flux_share=None):
    """:func:`render_unit_components` with the fine cells held sparsely (:class:`_FineCells`:
    pixel fluxes + the cells of the pixels that are refined or above FINE_MODEL_FLOOR; for
    f = 1 just the pixel fluxes), so nothing of size (n_pix f)^2 is built."""
    f = _check_oversample(oversample)
    if supersample is not None and int(supersample) < 1:
        raise ValueError(f"supersample must be >= 1, got {supersample}")
    centres = pixel_centres(n_pix, pixscale)
    sampler = _SourceSampler(lens, source)
    norm = (pixscale / f) ** 2 / sampler.unit_total
    norm = norm.reshape(-1, 1, 1)
    no_px = np.zeros(0, dtype=np.int64)
    if supersample is not None:
        s = int(supersample)
        if s % f:
            raise ValueError(f"supersample ({s}) must be a multiple of psf_oversample ({f})")
        dense = _sample_canvas_uniform(sampler, centres, s, pixscale, f) * norm
        if f == 1:
            return _FineCells(dense, no_px, no_px, np.zeros((sampler.k, 0, 1, 1)), 1), (s, s), 0
        return _FineCells.from_dense(dense, f), (s, s), 0
    centre_b, corner_b, refine, cap = _sample_canvas_coarse(sampler, centres, pixscale)
    rows, cols = np.nonzero(refine)
    tol = quadtree_tolerance(sampler.unit_total, flux_share)
    if f == 1:
        mean = _pixel_means(centre_b, corner_b)
        if rows.size:
            mean[:, rows, cols] = _integrate_cells_adaptive(
                sampler, centres[cols], centres[rows], pixscale, tol, MIN_LEVEL, MAX_LEVEL,
                cap[rows, cols])
        return (_FineCells(mean * norm, no_px, no_px, np.zeros((sampler.k, 0, 1, 1)), 1),
                (0, 0), int(rows.size))
    base, ar, ac, vals = _fine_cell_means(centre_b, corner_b, f)
    detail = refine.copy()
    detail[ar, ac] = True
    dr, dc = np.nonzero(detail)
    pos = np.zeros(detail.shape, dtype=np.int64)
    pos[dr, dc] = np.arange(dr.size)
    k = sampler.k
    cells = np.empty((k, dr.size, f * f))
    cells[:, pos[ar, ac]] = vals * norm
    cells = cells.reshape(k, dr.size, f, f)
    if rows.size:
        cells[:, pos[rows, cols]] = _integrate_pixels_to_fine(
            sampler, rows, cols, centres, pixscale, tol, MIN_LEVEL, f,
            footprint_cap=cap[rows, cols]) * (1.0 / sampler.unit_total).reshape(-1, 1, 1, 1)
    pix = base * (norm * (f * f))
    pix[:, dr, dc] = cells.sum(axis=(2, 3))
    return _FineCells(pix, dr, dc, cells, f), (0, 0), int(rows.size)


def render_unit_lensed_source(lens: LensModel, source, n_pix: int,
                              pixscale: float = DR10_PIXSCALE_ARCSEC,
                              supersample: int | None = None, band: str | None = None):
    """Lensed source before PSF, normalised to unit intrinsic flux, on an n_pix square grid
    (integrated over each pixel).

    Returns (image [1/pixel], (s, s) for uniform sampling or (0, 0) for the adaptive scheme,
    number of pixels integrated adaptively).  The image sum is the flux-ratio
    magnification captured by the grid.  A multi-component source needs ``band`` (its
    components' flux fractions differ per band).
    """
    units, ss, n_ref = render_unit_components(lens, source, n_pix, pixscale, supersample, 1)
    if units.shape[0] == 1:
        return units[0], ss, n_ref
    if band is None:
        raise ValueError("render_unit_lensed_source: a multi-component source needs band=")
    w = np.asarray(source.band_fractions(band), dtype=np.float64)
    return np.tensordot(w, units, axes=1), ss, n_ref


def _point_magnification_diagnostic(lens: LensModel, source) -> float:
    """Signed 1/det(A) at 1.1 theta_E from the lens centre along the source direction."""
    if source.dx == 0 and source.dy == 0:
        angle = lens.phi
    else:
        angle = math.atan2(source.dy, source.dx)
    radius = 1.1 * lens.theta_e
    mu = lens.magnification(lens.x0 + radius * math.cos(angle), lens.y0 + radius * math.sin(angle))
    return float(mu)


def _convolve_legacy(canvas, kernel, margin, n_pix, canvas_ft, shape):
    """f = 1: pixel-integrated canvas * kernel sampled at pixel centres (FFT), stamp crop."""
    h = kernel.shape[0] // 2
    full = np.fft.irfft2(canvas_ft * np.fft.rfft2(kernel, s=shape), s=shape)
    start = h + margin
    return full[start:start + n_pix, start:start + n_pix], float(np.abs(full).max())


def render_lensed_arc(lens: LensModel, source, src_mag: Mapping[str, float],
                      psf_fwhm: Mapping[str, float], n_pix: int = 64,
                      pixscale: float = DR10_PIXSCALE_ARCSEC, psf_model: str = "gaussian",
                      moffat_beta: float = 3.5, supersample: int | None = None,
                      psf_oversample: int = PSF_OVERSAMPLE_DEFAULT) -> LensedArc:
    """Lensed, PSF-convolved image of one source model behind SIE/SIS + shear, per band.

    ``source``: a source model (:mod:`lensing.sources`: SersicSource, ClumpySource, ...);
    ``src_mag``: band -> intrinsic AB magnitude of the whole source (converted with
    mag_to_nMgy; split among components by ``source.band_fractions``);
    ``psf_fwhm``: band -> psfsize [arcsec], the DR10 Gaussian-equivalent FWHM (must hold every
    band of src_mag); ``n_pix``: stamp side [pixels]; ``pixscale``: [arcsec/pixel];
    ``psf_model``: "gaussian" (FWHM = psfsize) or "moffat" (index ``moffat_beta``, kernel NEA
    matched to the psfsize Gaussian's: ``lensing.psf.build_psf``);
    ``supersample``: None for the adaptive rule (module docstring) or a uniform factor (a
    multiple of ``psf_oversample``); ``psf_oversample``: fine cells per pixel per axis of
    the convolution grid (module docstring; 1 = legacy double pixel response).
    Returns a :class:`LensedArc` whose images are in nanomaggies per pixel.
    """
    if n_pix < 1:
        raise ValueError(f"n_pix must be >= 1, got {n_pix}")
    f = _check_oversample(psf_oversample)
    missing = [b for b in src_mag if b not in psf_fwhm]
    if missing:
        raise ValueError(f"render_lensed_arc: no PSF FWHM given for band(s) {missing}")
    bands = list(src_mag)
    psfs = {b: build_psf(psf_model, float(psf_fwhm[b]), pixscale, moffat_beta) for b in bands}
    halves = {b: p.kernel.shape[0] // 2 for b, p in psfs.items()}
    margin = max(halves.values(), default=0)
    canvas_n = n_pix + 2 * margin
    flux = {b: float(mag_to_nMgy(m)) for b, m in src_mag.items()}
    for band, fl in flux.items():
        if not math.isfinite(fl):
            raise ValueError(f"source magnitude for band {band} is not finite: {src_mag[band]!r}")
    weights = {b: np.asarray(source.band_fractions(b), dtype=np.float64) for b in bands}
    fine_gauss = {}
    if f > 1 and psf_model == "gaussian":        # checked before the (costly) ray tracing
        fine_gauss = {b: GaussianFineWeights(n_pix, canvas_n, float(psf_fwhm[b]), pixscale, f)
                      for b in bands}
    n_comp = len(as_source_model(source).components())
    if any(w.shape != (n_comp,) for w in weights.values()):
        raise ValueError("source.band_fractions length differs from its number of components")
    # the quadtree holds each cell's error to CELL_TOLERANCE of the source's flux in every band
    share = np.max(np.stack(list(weights.values())), axis=0) if bands else None
    units, ss, n_refined = _render_unit_fine_cells(lens, source, canvas_n, pixscale,
                                                   supersample, f, share)
    comp_sums = units.pix.reshape(n_comp, -1).sum(axis=1)
    mu_band = {b: float(np.dot(weights[b], comp_sums)) for b in bands}
    single = units.component(0) if n_comp == 1 else None    # one object: FFT / bins reused
    combos = {b: (single if single is not None else units.combine(weights[b])) for b in bands}

    images = {}
    if f == 1:
        shape = (fft_size(canvas_n + 2 * margin),) * 2
        fts = {}
        for b in bands:
            key = id(combos[b])
            if key not in fts:
                fts[key] = np.fft.rfft2(combos[b].pix, s=shape)
            stamp, peak = _convolve_legacy(combos[b].pix, psfs[b].kernel, margin, n_pix,
                                           fts[key], shape)
            images[b] = (stamp, peak)
    elif psf_model == "gaussian":
        # F = flat part (each pixel's flux P spread evenly over its cells) + detail D (non-zero
        # only on the detail pixels): W F W^T = Wc P Wc^T / f^2 + W D W^T over D's bounding
        # box, Wc = W summed over each pixel's f columns; the same sums as the dense product,
        # and neither F nor W (n_pix x canvas_n f) is ever built
        boxes = {}
        for b in bands:
            w, img = fine_gauss[b], combos[b]
            stamp = separable_banded(w.pixel_sums(), img.pix) * (1.0 / (f * f))
            if id(img) not in boxes:
                boxes[id(img)] = img.detail_box()
            box = boxes[id(img)]
            if box is not None:
                r0, c0, d = box
                stamp += (w.columns(r0, r0 + d.shape[0]) @ d) @ w.columns(c0, c0 + d.shape[1]).T
            images[b] = (stamp, float(np.abs(stamp).max()))
    else:
        fine_n = canvas_n * f
        kernels = {b: moffat_fine_kernel(psfs[b].alpha, psfs[b].beta, pixscale, f, halves[b])
                   for b in bands}
        shape = (fft_size(fine_n + max(k.shape[0] for k in kernels.values())),) * 2
        fts = {}
        for b in bands:
            key = id(combos[b])
            if key not in fts:
                fts[key] = np.fft.rfft2(combos[b].dense(), s=shape)
            full = np.fft.irfft2(fts[key] * np.fft.rfft2(kernels[b], s=shape), s=shape)
            start = f * margin + (f - 1) // 2 + halves[b] * f
            stamp = full[start:start + f * n_pix:f, start:start + f * n_pix:f] * float(f * f)
            images[b] = (stamp, float(np.abs(full).max()) * f * f)
    out = {}
    for b, (stamp, peak) in images.items():
        # FFT round-off (~1e-16 of the peak, either sign) is set to exactly 0: far below any
        # measurable flux, and it would make the stored arc plane incompressible
        stamp = np.where(np.abs(stamp) < ARC_FLOOR_REL * peak, 0.0, stamp)
        out[b] = stamp * flux[b]
    unit_images, done_ids = {}, {}
    for b in bands:
        key = id(combos[b])
        if key not in done_ids:
            done_ids[key] = combos[b].pix[margin:margin + n_pix, margin:margin + n_pix]
        unit_images[b] = done_ids[key]
    first = bands[0] if bands else None
    return LensedArc(
        images=out,
        unit_image=unit_images[first] if first else np.zeros((n_pix, n_pix)),
        mu_total=mu_band[first] if first else float(units.pix.sum()),
        mu_point_1p1=_point_magnification_diagnostic(lens, source),
        flux_nmgy=flux,
        supersample=ss,
        n_refined_pixels=n_refined,
        psf_fwhm={b: float(psf_fwhm[b]) for b in src_mag},
        psf_match=PSF_MATCH.get(psf_model, ""),
        psf_alpha={b: p.alpha for b, p in psfs.items() if p.alpha is not None},
        psf_oversample=f,
        mu_total_band=mu_band,
        unit_images=unit_images,
        n_components=int(n_comp),
    )
