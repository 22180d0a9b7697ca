"""Ray-shooting renderer of a lensed Sersic source, for several bands at once (pure NumPy).

Geometry: an N x N stamp of ``pixscale`` arcsec pixels whose pixel centres sit at
``(i - (N - 1)/2) * pixscale`` (i = 0..N-1) along x (columns) and y (rows).  The lens centre
(x0, y0) is any sub-pixel position in these coordinates; the source centre is given as an
offset (dx, dy) from the lens centre in the source plane.

Algorithm (achromatic lens, one ray-trace for all bands):

1. The rendering canvas is the stamp padded by the largest PSF kernel half-width, so light
   lensed just outside the stamp is scattered into it by the PSF.
2. Sub-pixel sampling (``supersample=None``, the default): every canvas pixel is first
   ray-shot at its centre and its 4 corners; its value is 2/3 centre + 1/3 corner mean
   (exact for quadratics).  Pixels whose source-plane footprint (radius rho, from the
   corner rays) may reach within ``REFINE_RADIUS_RE`` = 4 half-light radii of the source
   centre (``d_centre - 1.5 rho < 4 r_e``) are integrated by error-controlled quadtree
   quadrature (:func:`_integrate_cells_adaptive`): a cell is split 2 x 2 until the change
   of its estimate is below ``CELL_TOLERANCE`` = 1e-6 of the source's total flux (at least
   ``MIN_LEVEL`` = 1 split, and never before the cell's source-plane footprint, rho / 2^level,
   is within the source's minor-axis half-light radius r_e q, so that the error test cannot be
   fooled by a source smaller than the sample spacing; at most ``MAX_LEVEL`` = 10, i.e. 1/2048
   pixel), with a Richardson step on acceptance (replaced by the children's mean where it
   would be negative: the brightness is >= 0).  This resolves the central cusp of compact n > 1 Sersic
   profiles, which a fixed sub-pixel grid does not (16x uniform sampling still misses the
   flux of an r_e = 0.1", n = 4 source by up to 35 % at unlucky positions).
   Measured (tests/test_render_accuracy.py): integrated lensed flux within 0.1 % of a uniform
   16x reference for n <= 1, and of the analytic flux (theta_E = 0) for n up to 4.
   ``supersample=s`` (int) instead samples every pixel uniformly s x s (used for
   references and the lenstronomy comparison).
3. The unlensed source is normalised analytically (``sersic_unit_total_flux``) to its
   catalogue flux per band (nanomaggies from AB magnitudes); the lensed image is never
   renormalised, so it carries the magnification.
4. Each band is convolved with its own PSF kernel (``lensing.psf.build_psf``: a Gaussian of
   FWHM = psfsize, or a Moffat whose pixelised NEA equals that Gaussian's; shift-free FFT),
   then cropped to the stamp;
   pixels below ``ARC_FLOOR_REL`` = 1e-10 of the band's convolved peak (FFT round-off, either
   sign) are set to exactly 0 (the flux they carry is < 1e-10 x peak x N^2: negligible).

Magnifications returned: ``mu_total`` = (lensed flux on the canvas, before PSF) / (intrinsic
flux): the honest flux-ratio magnification of the extended source; ``mu_point_1p1``: the
signed point magnification 1/det(A) at 1.1 theta_E from the lens centre along the source's
direction (a labelled diagnostic only, never used as the magnification of the source).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from .mass_profiles import LensModel
from .photometry import DR10_PIXSCALE_ARCSEC, mag_to_nMgy
from .psf import PSF_MATCH, build_psf, fft_size
from .sersic import sersic_bn, sersic_unit_total_flux

REFINE_RADIUS_RE = 4.0
CELL_TOLERANCE = 1e-6
MIN_LEVEL = 1
MAX_LEVEL = 10
ARC_FLOOR_REL = 1e-10


@dataclass(frozen=True)
class SersicSource:
    """Elliptical Sersic source. Offsets and radii in arcsec, phi in radians.

    ``dx, dy``: source centre relative to the lens centre (source plane); ``r_e``: major-axis
    half-light radius; ``n``: Sersic index; ``q = b/a``; ``phi``: major-axis position angle;
    ``bn``: optional override of b_n (default: the exact solution of P(2n, b_n) = 1/2).
    """

    dx: float
    dy: float
    r_e: float
    n: float = 1.0
    q: float = 1.0
    phi: float = 0.0
    bn: float | None = None

    def __post_init__(self):
        if not (math.isfinite(self.r_e) and self.r_e > 0):
            raise ValueError(f"source r_e must be a positive number of arcsec, got {self.r_e}")
        if not (0 < self.q <= 1):
            raise ValueError(f"source axis ratio q must be in (0, 1], got {self.q}")
        if not (0.2 <= self.n <= 10):
            raise ValueError(f"source Sersic index n must be in [0.2, 10], got {self.n}")
        for name in ("dx", "dy", "phi"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"source {name} must be finite, got {getattr(self, name)}")

    @property
    def b_n(self) -> float:
        return sersic_bn(self.n) if self.bn is None else float(self.bn)


@dataclass
class LensedArc:
    """Result of :func:`render_lensed_arc`.

    ``images``: band -> (N, N) float64, PSF-convolved lensed source [nanomaggies / pixel].
    ``unit_image``: (N, N) lensed source before PSF for unit intrinsic flux [1 / pixel].
    ``mu_total``: flux-ratio magnification of the extended source (before PSF, on the canvas).
    ``mu_point_1p1``: diagnostic point magnification at 1.1 theta_E (signed).
    ``flux_nmgy``: band -> intrinsic (unlensed) source flux [nanomaggies].
    ``supersample``: (s, s) for uniform sampling, (0, 0) for the adaptive quadrature;
    ``n_refined_pixels``: canvas pixels integrated adaptively.  ``psf_fwhm``: band -> psfsize
    (Gaussian-equivalent FWHM) used [arcsec].  ``psf_match``: how the kernel honours it
    (``lensing.psf.PSF_MATCH``: "gaussian_fwhm" | "nea_pixelised").  ``psf_alpha``: band ->
    Moffat core radius alpha [arcsec] of the NEA-matched kernel (empty for the Gaussian).
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


def pixel_centres(n_pix: int, pixscale: float = DR10_PIXSCALE_ARCSEC) -> np.ndarray:
    """1-D pixel-centre coordinates [arcsec] of an n_pix stamp: (i - (n-1)/2) * pixscale."""
    return (np.arange(n_pix, dtype=np.float64) - 0.5 * (n_pix - 1)) * pixscale


def subpixel_offsets(s: int, pixscale: float) -> np.ndarray:
    """Offsets [arcsec] of the s sub-pixel centres of a pixel along one axis."""
    return ((np.arange(s, dtype=np.float64) + 0.5) / s - 0.5) * pixscale


class _SourceSampler:
    """Ray-shoots image-plane positions and evaluates the unit-I_e source brightness."""

    def __init__(self, lens: LensModel, source: SersicSource):
        self.lens = lens
        self.source = source
        self.b = source.b_n
        self.cx = lens.x0 + source.dx
        self.cy = lens.y0 + source.dy
        self.cos = math.cos(source.phi)
        self.sin = math.sin(source.phi)

    def offsets_from_source(self, x, y):
        """Source-plane offsets (dx, dy) [arcsec] of rays (x, y) from the source centre."""
        bx, by = self.lens.ray_shoot(x, y)
        return bx - self.cx, by - self.cy

    def brightness(self, dx, dy):
        """I / I_e at source-plane offsets (dx, dy) from the source centre."""
        xp = dx * self.cos + dy * self.sin
        yp = (dy * self.cos - dx * self.sin) / self.source.q
        r2 = (xp * xp + yp * yp) * (1.0 / (self.source.r_e * self.source.r_e))
        n = self.source.n
        if n == 1.0:
            scaled = np.sqrt(r2)
        elif n == 0.5:
            scaled = r2
        else:
            scaled = np.power(r2, 0.5 / n)
        return np.exp(-self.b * (scaled - 1.0))


def _integrate_cells_adaptive(sampler, xc, yc, cell, tol, min_level, max_level):
    """Mean unit brightness over square cells of side ``cell`` [arcsec] centred on (xc, yc),
    by error-controlled quadtree quadrature.

    A cell of side h sampled at its centre (value v) is split into 2 x 2 children sampled at
    their centres (mean m).  The cell is accepted with m when |m - v| h^2 <= ``tol`` [flux of
    I_e = 1 x arcsec^2] and its level >= ``min_level`` (an int, or one int per cell) (or at
    ``max_level``); otherwise each child becomes a cell of the next level (reusing its sample
    as its centre value).  Levels run in vectorised batches; contributions are summed with bincount in a fixed order, so the
    result is deterministic.
    """
    n_cells = xc.size
    owner = np.arange(n_cells)
    min_level = np.broadcast_to(np.asarray(min_level, dtype=np.int64), (n_cells,))
    total = np.zeros(n_cells)
    x, y, size = xc, yc, float(cell)
    centre_value = sampler.brightness(*sampler.offsets_from_source(x, y))
    level = 0
    while owner.size:
        quarter = 0.25 * size
        cx = x[:, None] + np.array([-quarter, quarter, -quarter, quarter])
        cy = y[:, None] + np.array([-quarter, -quarter, quarter, quarter])
        values = sampler.brightness(*sampler.offsets_from_source(cx, cy))
        mean4 = values.mean(axis=1)
        area = size * size
        done = np.abs(mean4 - centre_value) * area <= tol
        done &= level >= min_level[owner]
        if level >= max_level:
            done[:] = True
        # Richardson step: the midpoint error scales as h^2, so (4 m - v) / 3 cancels it.
        # The brightness is >= 0, so is its cell mean: where the extrapolation would go
        # negative (a source far smaller than the cell, caught only by the centre sample),
        # the children's mean m (>= 0) is used instead.
        m_done, v_done = mean4[done], centre_value[done]
        accepted = m_done + (m_done - v_done) * (1.0 / 3.0)
        accepted = np.where(accepted >= 0.0, accepted, m_done)
        total += np.bincount(owner[done], weights=accepted * area, minlength=n_cells)
        keep = ~done
        x, y = cx[keep].ravel(), cy[keep].ravel()
        centre_value = values[keep].ravel()
        owner = np.repeat(owner[keep], 4)
        size *= 0.5
        level += 1
    return total / (cell * cell)


def _sample_canvas_uniform(sampler, centres, s, pixscale):
    """Uniform s x s sampling of the whole square canvas: mean brightness per pixel."""
    m = centres.size
    sub = (centres[:, None] + subpixel_offsets(s, pixscale)[None, :]).ravel()
    values = sampler.brightness(*sampler.offsets_from_source(sub[None, :], sub[:, None]))
    return values.reshape(m, s, m, s).mean(axis=(1, 3))


def _sample_canvas_coarse(sampler, centres, pixscale):
    """Coarse pixel means and a refinement mask from rays at pixel centres and corners.

    Pixel mean = 2/3 centre + 1/3 mean of the 4 corners (exact for any quadratic).  A pixel
    is flagged for refinement when its source-plane footprint (radius rho = largest
    centre-to-corner distance after ray-shooting) may reach within REFINE_RADIUS_RE
    major-axis half-light radii of the source centre: d_centre - 1.5 rho < R_cut r_e (the
    circle d < R_cut r_e contains the elliptical zone R < R_cut r_e).
    """
    corners = np.append(centres - 0.5 * pixscale, centres[-1] + 0.5 * pixscale)
    cdx, cdy = sampler.offsets_from_source(corners[None, :], corners[:, None])
    mdx, mdy = sampler.offsets_from_source(centres[None, :], centres[:, None])
    corner_b = sampler.brightness(cdx, cdy)
    centre_b = sampler.brightness(mdx, mdy)
    corner_mean = 0.25 * (corner_b[:-1, :-1] + corner_b[1:, :-1] + corner_b[:-1, 1:] + corner_b[1:, 1:])
    mean = (2.0 / 3.0) * centre_b + (1.0 / 3.0) * corner_mean
    rho2 = np.zeros_like(mdx)
    for sl_y, sl_x in ((slice(None, -1), slice(None, -1)), (slice(1, None), slice(None, -1)),
                       (slice(None, -1), slice(1, None)), (slice(1, None), slice(1, None))):
        ddx = cdx[sl_y, sl_x] - mdx
        ddy = cdy[sl_y, sl_x] - mdy
        np.maximum(rho2, ddx * ddx + ddy * ddy, out=rho2)
    d_centre = np.hypot(mdx, mdy)
    rho = np.sqrt(rho2)
    refine = d_centre - 1.5 * rho < REFINE_RADIUS_RE * sampler.source.r_e
    return mean, refine, rho


def resolving_level(rho, source: SersicSource) -> np.ndarray:
    """Smallest quadtree level (>= MIN_LEVEL, <= MAX_LEVEL) at which a pixel whose
    source-plane footprint has radius ``rho`` [arcsec] is split into cells of footprint
    rho / 2^level <= r_e q (the source's minor-axis half-light radius)."""
    scale = source.r_e * source.q
    with np.errstate(divide="ignore", invalid="ignore"):
        need = np.ceil(np.log2(np.maximum(np.asarray(rho, dtype=np.float64) / scale, 1.0)))
    need = np.where(np.isfinite(need), need, MAX_LEVEL)
    return np.clip(need, MIN_LEVEL, MAX_LEVEL).astype(np.int64)


def render_unit_lensed_source(lens: LensModel, source: SersicSource, n_pix: int,
                              pixscale: float = DR10_PIXSCALE_ARCSEC,
                              supersample: int | None = None):
    """Lensed source before PSF, normalised to unit intrinsic flux, on an n_pix square grid.

    Returns (image [1/pixel], (s, s) for uniform sampling or (0, 0) for the adaptive scheme,
    number of pixels integrated adaptively).  The image sum is the flux-ratio
    magnification captured by the grid.
    """
    if supersample is not None and int(supersample) < 1:
        raise ValueError(f"supersample must be >= 1, got {supersample}")
    centres = pixel_centres(n_pix, pixscale)
    sampler = _SourceSampler(lens, source)        # b_n solved once (sersic_bn: ~0.3 ms)
    unit_total = sersic_unit_total_flux(source.n, source.r_e, source.q, bn=sampler.b)
    norm = pixscale * pixscale / unit_total
    if supersample is not None:
        s = int(supersample)
        return _sample_canvas_uniform(sampler, centres, s, pixscale) * norm, (s, s), 0
    mean, refine, rho = _sample_canvas_coarse(sampler, centres, pixscale)
    rows, cols = np.nonzero(refine)
    tol = CELL_TOLERANCE * unit_total
    if rows.size:
        mean[rows, cols] = _integrate_cells_adaptive(sampler, centres[cols], centres[rows],
                                                     pixscale, tol,
                                                     resolving_level(rho[rows, cols], source),
                                                     MAX_LEVEL)
    return mean * norm, (0, 0), int(rows.size)


def _point_magnification_diagnostic(lens: LensModel, source: SersicSource) -> float:
    """Signed 1/det(A) at 1.1 theta_E from the lens centre along the source direction."""
    if source.dx == 0 and source.dy == 0:
        angle = lens.phi
    else:
        angle = math.atan2(source.dy, source.dx)
    radius = 1.1 * lens.theta_e
    mu = lens.magnification(lens.x0 + radius * math.cos(angle), lens.y0 + radius * math.sin(angle))
    return float(mu)


def render_lensed_arc(lens: LensModel, source: SersicSource, src_mag: Mapping[str, float],
                      psf_fwhm: Mapping[str, float], n_pix: int = 64,
                      pixscale: float = DR10_PIXSCALE_ARCSEC, psf_model: str = "gaussian",
                      moffat_beta: float = 3.5, supersample: int | None = None) -> LensedArc:
    """Lensed, PSF-convolved image of one Sersic source behind SIE/SIS + shear, per band.

    ``src_mag``: band -> intrinsic AB magnitude of the source (converted with mag_to_nMgy);
    ``psf_fwhm``: band -> psfsize [arcsec], the DR10 Gaussian-equivalent FWHM (must hold every
    band of src_mag); ``n_pix``: stamp side [pixels]; ``pixscale``: [arcsec/pixel];
    ``psf_model``: "gaussian" (FWHM = psfsize) or "moffat" (index ``moffat_beta``, kernel NEA
    matched to the psfsize Gaussian's: ``lensing.psf.build_psf``);
    ``supersample``: None for the adaptive rule (module docstring) or a uniform factor.
    Returns a :class:`LensedArc` whose images are in nanomaggies per pixel.
    """
    if n_pix < 1:
        raise ValueError(f"n_pix must be >= 1, got {n_pix}")
    missing = [b for b in src_mag if b not in psf_fwhm]
    if missing:
        raise ValueError(f"render_lensed_arc: no PSF FWHM given for band(s) {missing}")
    psfs = {b: build_psf(psf_model, float(psf_fwhm[b]), pixscale, moffat_beta) for b in src_mag}
    kernels = {b: p.kernel for b, p in psfs.items()}
    margin = max((k.shape[0] // 2 for k in kernels.values()), default=0)
    canvas_n = n_pix + 2 * margin
    unit_canvas, ss, n_refined = render_unit_lensed_source(lens, source, canvas_n, pixscale,
                                                           supersample)
    flux = {b: float(mag_to_nMgy(m)) for b, m in src_mag.items()}
    for band, f in flux.items():
        if not math.isfinite(f):
            raise ValueError(f"source magnitude for band {band} is not finite: {src_mag[band]!r}")

    shape = (fft_size(canvas_n + 2 * margin),) * 2
    canvas_ft = np.fft.rfft2(unit_canvas, s=shape)
    images = {}
    for band, kernel in kernels.items():
        h = kernel.shape[0] // 2
        full = np.fft.irfft2(canvas_ft * np.fft.rfft2(kernel, s=shape), s=shape)
        start = h + margin
        stamp = full[start:start + n_pix, start:start + n_pix]
        # FFT round-off (~1e-16 of the peak, either sign) is set to exactly 0: far below any
        # measurable flux, and it would make the stored arc plane incompressible
        stamp = np.where(np.abs(stamp) < ARC_FLOOR_REL * np.abs(full).max(), 0.0, stamp)
        images[band] = stamp * flux[band]
    unit_stamp = unit_canvas[margin:margin + n_pix, margin:margin + n_pix]
    return LensedArc(
        images=images,
        unit_image=unit_stamp,
        mu_total=float(unit_canvas.sum()),
        mu_point_1p1=_point_magnification_diagnostic(lens, source),
        flux_nmgy=flux,
        supersample=ss,
        n_refined_pixels=n_refined,
        psf_fwhm={b: float(psf_fwhm[b]) for b in src_mag},
        psf_match=PSF_MATCH.get(psf_model, ""),
        psf_alpha={b: p.alpha for b, p in psfs.items() if p.alpha is not None},
    )
