"""A synthetic DR10-South-like survey in the exact public layout, for tests and demos.

``generate_survey(root, n_bricks=4, size="small", seed=42, faults=())`` (or
``python -m injection_pipeline.synthetic_survey --root DIR --n-bricks 4 --size small --seed 42
[--faults absent no_psfsize truncated:1 ...]``) writes::

    <root>/survey-bricks.fits.gz                      BRICKNAME BRICKID BRICKQ BRICKROW BRICKCOL
                                                      RA DEC RA1 RA2 DEC1 DEC2 (HDU 1, as DR10)
    <root>/south/coadd/<AAA>/<brick>/legacysurvey-<brick>-<product>[-<band>].fits.fz
                                                      image/invvar/psfsize x g,r,z + maskbits
    <root>/parent_catalogue.parquet                   lens-candidate (LRG-like) galaxies

Everything is SYNTHETIC (headers carry ``SYNTHET = T``); the formats follow DR10
(:mod:`injection_pipeline.dr10`): data in HDU 1 (empty primary), 100x100 tiles; image RICE_1
with absolute quantisation 1e-4 nmgy and SUBTRACTIVE_DITHER_2; invvar RICE_1 q=16, NO_DITHER;
psfsize GZIP_1 lossless; maskbits int32 HCOMPRESS_1 lossless (HDU 2/3: uint8 WISEM1/WISEM2
masks, GZIP_1).  Headers: BUNIT, MAGZERO=22.5 (image, invvar), BAND, BRICKNAME, PRODTYPE and
the brick WCS (CTYPE, CRVAL, CRPIX, CD).  The dither seed is fixed from (seed, brickid, band), so
the same seed gives byte-identical decompressed arrays.

Geometry: brick centres on a DR10-like grid (Dec rows every 0.25 deg, ~0.25 deg in RA) in
the south footprint (Dec -10..+30, RA 100..260), names from the naming rule applied to the
centre.  ``size="full"`` = 3600x3600 with DR10 bounds (centre +-0.125 deg in Dec,
+-180/ncols in RA: the NPRIMARY border is ~82 px); ``size="small"`` = 400x400 (or an int)
with the same pixel scale and bounds shrunk so the NPRIMARY border is ~size*82/3600 px
(min 8).  NPRIMARY is set from the survey-bricks bounds through the WCS.

Content per brick (all vectorised numpy, float32):

* invvar: per-band depth (pixel sigma ~ g 0.005, r 0.007, z 0.017 nmgy) x a brick factor x
  an exposure-overlap pattern (2..5 "exposures") x a 0-5% per-pixel jitter;
* image: sources + Gaussian noise with variance (1 + model/sky)/invvar: the sky noise the
  invvar plane describes (DR10 invvar carries sky noise only) plus the sources' own photon
  noise, with sky the per-pixel sky of :data:`SKY_PIX_NMGY` (so the effective gain is sky x
  invvar e-/nMgy; a lens core of 0.3 nMgy/px in r doubles the variance); where invvar == 0 the image is a
  NON-zero "unweighted coadd" (sources + noise), as in DR10;
* psfsize: smooth maps (g ~1.5", r ~1.3", z ~1.2" +- ~10%, rounded to 0.001"), 0 wherever
  invvar == 0;
* galaxies at catalogue positions: Sersic profiles (DEV n=4 mostly; SER, EXP, REX), 4x4
  sub-pixel integrated, truncated at 8 R_e, convolved (FFT, zero-phase Gaussian transfer
  function) with a Gaussian of the local psfsize FWHM;
* stars (Gaussian core + power-law wing): G<13 -> BRIGHT+MEDIUM, G<16 -> MEDIUM, WISEM1/WISEM2
  halos; saturated cores + bleed trails -> SATUR_<band>, invvar 0, plateau image;
* ALLMASK_<band> patches (bad columns + blobs, invvar 0); one zero-coverage edge strip per
  brick in one band (g, r, z in turn; invvar 0, psfsize 0, image != 0); a SUB_BLOB
  rectangle; a GALAXY (SGA) disk in every second brick; a CLUSTER disk (mask only, no
  cluster light) in every fourth brick (index 2, 6, ...); NPRIMARY outside the bounds.

Catalogue (``parent_catalogue.parquet``; one row per galaxy, brick_primary only): the columns
of ``dr10.CATALOGUE_COLUMNS`` with their DR10 names, Arrow types and units (docs/dr10.md),
all present: brickname, objid, ra, dec, flux_r, release (10000), brickid, type, sersic,
shape_r, shape_e1/2, flux_g/z, ebv, mw_transmission_g/r/z, maskbits, the DR10.1 photo-z
columns z_phot_mean/median/std/l68/u68/l95/u95, z_spec, survey, training, and the user
columns z, sigma (null where unknown); plus the synthetic truth :data:`TRUTH_COLUMNS` (not
DR10 columns): bx, by (float64 0-based brick pixel of (ra, dec) via the WCS), z_true,
sigma_true.  As in DR10: fluxes are observed (not extinction-corrected), mw_transmission_b =
10^(-0.4 R_b ebv) with R = 3.214, 2.165, 1.211 (g, r, z); ``maskbits`` is the maskbits plane
at (rint(bx), rint(by)); a galaxy whose centre has BRIGHT, GALAXY or CLUSTER is catalogued as
Tractor forces it, ``type='PSF'`` with sersic, shape_r, shape_e1/2 = 0 (its pixels keep the
true galaxy; ``BrickRecord.forced_psf``); every other galaxy is rendered with exactly its
catalogue type/sersic/shape_e1/shape_e2 and flux_g/r/z, and with shape_r as its r-band
half-light radius: the g and z radii follow the colour gradient r_e ~ lambda^s, s ~ N(-0.28,
0.15) per galaxy (:data:`POP_RE_LAMBDA_SLOPE`; Tractor fits one shape to all bands).

Lens population (LRG-like, :func:`lrg_population`; own random stream per brick, so the
masks and positions do not change with it; flat LambdaCDM H0 = 70, Omega_m = 0.3):

* true redshift z_true from n(z) ~ dV/dz on [0.15, 0.85] times a Gaussian luminosity
  function M_r ~ N(-22.4, 0.45) (rest frame), kept where the dereddened r = M_r + DM(z) +
  K+e(z) < 20.7, K+e = 1.5 z + 0.625 z^2 - 1.2 z: median z ~0.47, 1-99 % ~0.17-0.74, r
  ~17-20.7 (brighter at low z);
* colours of the red sequence: g - r = 0.8 + 1.15 tanh(z/0.35), r - z = 0.45 + 1.45 z,
  each +- 0.08 mag; E(B-V) from a smooth synthetic sky (:func:`synthetic_ebv`, 0.01-0.10);
* type DEV 70 %, SER 15 % (n ~ U(2.5, 5.5)), EXP 5 %, REX 10 % (round, e = 0); axis ratio
  q = 0.5 + 0.5 Beta(2.8, 2.2) (mean 0.78, Tractor e = (1-q)/(1+q) <= 1/3), PA ~ U(0, 180)
  deg east of north;
* shape_r = 7 kpc x L^0.63 x 10^N(0, 0.12) at the angular-diameter distance (median
  1.4", 1-99 % ~0.6-3.6", clipped 0.3-6"); sigma_true = 240 km/s x L^0.25 x
  10^N(0, 0.06) (Faber-Jackson; ~170-370 km/s), L relative to M_r = -22.4;
* photo-z (:func:`photo_z_columns`): a lognormal PDF in 1 + z of width s = 0.02 (r <= 19) ..
  0.03 (r = 20.7) centred on ln(1 + z_true) + s N(0, 1): sigma_z ~ (0.02-0.03)(1 + z), no
  catastrophic outliers; the quantile columns are that PDF's 2.5/16/50/84/97.5 percentiles
  (ordered by construction), mean and std; z_spec (truth + 5e-5 (1+z) noise) for 20 %,
  survey BOSS/SDSS/DESI, training for 85 % of those; -99, '' and False otherwise;
* user columns for a random 30 %: z (truth + 5e-5 (1+z) noise) and sigma (sigma_true x
  10^N(0, 0.03)); null elsewhere.

Special roles per brick (see ``BrickRecord.roles``; they take the first catalogue rows): a
galaxy inside the zero-coverage strip; one inside the bright star's BRIGHT mask; one a few
pixels inside the primary boundary (cutouts there cross the image edge in the small size);
one inside a medium star's MEDIUM (not BRIGHT) mask; one inside the GALAXY disk
(``in_sga_galaxy``) and one inside the CLUSTER disk (``in_cluster``) where those exist.

Faults (``faults=``; each name goes to a distinct brick from the last one backwards, or use
``name:index``): ``absent`` (listed in survey-bricks and catalogue, no files: a 404
upstream), ``no_psfsize``, ``no_maskbits``, ``truncated`` (image-r cut to 60% of its
bytes), ``corrupt`` (first 2880 bytes of invvar-g overwritten: not FITS), ``nan_invvar``
(NaN blocks in invvar-g/r/z).  The returned :class:`SurveyDescription` records it all.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from injection_pipeline import dr10
from lensing.maskbits import MASKBITS
from lensing.sersic import sersic_bn

SMALL_SIZE = 400
FULL_SIZE = dr10.BRICK_SIZE
SURVEY_BRICKS_NAME = "survey-bricks.fits.gz"
CATALOGUE_NAME = "parent_catalogue.parquet"
FAULTS: tuple[str, ...] = ("absent", "no_psfsize", "no_maskbits", "truncated", "corrupt",
                           "nan_invvar")

#: typical per-pixel noise sigma of a DR10 South coadd, nanomaggy (ballpark)
SKY_SIGMA = {"g": 0.005, "r": 0.007, "z": 0.017}
#: sky per pixel [nMgy] behind that noise: DECam dark-sky brightness ~ g 22.0, r 21.1,
#: z 18.6 mag/arcsec^2 (DECam exposure-time-calculator values, to ~0.3 mag: ASSUMPTION) times
#: 0.262^2 arcsec^2.  A coadd's effective gain [e-/nMgy] is then sky x invvar (the sky is
#: Poisson-limited), and a source's photon variance is model / gain = model / (sky invvar).
SKY_PIX_NMGY = {b: 10 ** (-0.4 * (m - 22.5)) * 0.262 ** 2
                for b, m in (("g", 22.0), ("r", 21.1), ("z", 18.6))}
#: typical psfsize FWHM, arcsec
PSF_FWHM = {"g": 1.5, "r": 1.3, "z": 1.2}
#: synthetic per-pixel saturation level of the coadd, nanomaggy
SATURATION = {"g": 60.0, "r": 60.0, "z": 80.0}
#: star colours relative to G (m_band = G + offset), rough
STAR_COLOUR = {"g": 0.35, "r": -0.15, "z": -0.45}
#: bands with an ALLMASK bit, SATUR bit
_ALLMASK = {b: MASKBITS[f"ALLMASK_{b.upper()}"] for b in dr10.BANDS}
_SATUR = {b: MASKBITS[f"SATUR_{b.upper()}"] for b in dr10.BANDS}
_FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))
#: maskbits at a source's centre that make Tractor force TYPE=PSF (DR10 "description" page)
FORCED_PSF_BITS = MASKBITS["BRIGHT"] | MASKBITS["GALAXY"] | MASKBITS["CLUSTER"]
#: catalogue columns that are synthetic truth, not DR10 columns (bx, by: DR10 has them as
#: float32 in the Tractor catalogues, not in the sweeps)
TRUTH_COLUMNS: tuple[str, ...] = ("bx", "by", "z_true", "sigma_true")


# ----------------------------------------------------------------------------- descriptions
@dataclass
class BrickSpec:
    """One row of survey-bricks (centre and unique-area bounds in deg)."""

    brickname: str
    brickid: int
    brickrow: int
    brickcol: int
    ra: float
    dec: float
    ra1: float
    ra2: float
    dec1: float
    dec2: float


@dataclass
class BrickRecord:
    """What was written for one brick (and the truth behind it)."""

    spec: BrickSpec
    size: int
    directory: str                       # relative to root
    files: list[str]                     # file names written (after faults)
    faults: list[str]
    n_galaxies: int
    roles: dict[str, int]                # role -> objid
    stars: list[dict]                    # x, y, G, fluxes, radii (px), saturated bands
    allmask: list[dict]                  # band, x0, x1, y0, y1 (pixel slices)
    zero_coverage: list[dict]            # band, x0, x1, y0, y1
    nan_invvar: list[dict] = field(default_factory=list)
    other_masks: list[dict] = field(default_factory=list)   # SUB_BLOB / GALAXY / CLUSTER
    primary_margin_px: int = 0
    forced_psf: list[int] = field(default_factory=list)     # objids catalogued as type PSF


@dataclass
class SurveyDescription:
    root: str
    size: int
    seed: int
    survey_bricks: str
    catalogue: str
    bricks: list[BrickRecord]
    faults: dict[str, list[str]]         # brickname -> faults
    seconds: float = 0.0

    def brick(self, brickname: str) -> BrickRecord:
        for b in self.bricks:
            if b.spec.brickname == brickname:
                return b
        raise KeyError(brickname)

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- brick grid
_DEC_STEP = 0.25


def _grid_ncols(dec: np.ndarray) -> np.ndarray:
    return np.maximum(1, np.round(360.0 * np.cos(np.deg2rad(dec)) / _DEC_STEP)).astype(int)


_GRID_DEC = -90.0 + _DEC_STEP * np.arange(int(180 / _DEC_STEP) + 1)
_GRID_NCOLS = _grid_ncols(_GRID_DEC)
_GRID_FIRST_ID = 1 + np.concatenate([[0], np.cumsum(_GRID_NCOLS)[:-1]])


def grid_brick(row: int, col: int, size: int = FULL_SIZE) -> BrickSpec:
    """Brick ``col`` of Dec row ``row`` of the synthetic DR10-like grid, bounds for ``size``."""
    dec = float(_GRID_DEC[row])
    ncols = int(_GRID_NCOLS[row])
    col = col % ncols
    dra = 360.0 / ncols
    ra = (col + 0.5) * dra
    if size == FULL_SIZE:
        hdec, hra = _DEC_STEP / 2, dra / 2
    else:
        margin = primary_margin(size)
        hdec = (size / 2.0 - margin) * dr10.PIXSCALE_ARCSEC / 3600.0
        hra = hdec / max(math.cos(math.radians(dec)), 1e-6)
    return BrickSpec(brickname=dr10.brick_name_for(ra, dec), brickid=int(_GRID_FIRST_ID[row] + col),
                     brickrow=int(row), brickcol=int(col), ra=ra, dec=dec,
                     ra1=(ra - hra) % 360.0, ra2=(ra + hra) % 360.0 if ra + hra != 360 else 360.0,
                     dec1=dec - hdec, dec2=dec + hdec)


def primary_margin(size: int) -> int:
    """Approximate NPRIMARY border width in px: 82 for 3600 (0.25 deg of a 0.262 deg image)."""
    if size == FULL_SIZE:
        return int(round((FULL_SIZE - _DEC_STEP * 3600 / dr10.PIXSCALE_ARCSEC) / 2))
    return max(8, int(round(size * 82.0 / FULL_SIZE)))


LAYOUTS = ("contiguous", "spread")


def choose_bricks(n_bricks: int, seed: int, size: int, layout: str = "contiguous") -> list[BrickSpec]:
    """``n_bricks`` distinct grid bricks in the DR10-South-like band -10 < Dec < 30.

    ``layout="contiguous"``: neighbouring bricks (same Dec row, then the next rows), as one
    sky patch.  ``layout="spread"``: bricks scattered over the band, at least ~5 deg apart,
    so they fall in different HEALPix cells (train/val/test splits are then populated).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    rng = np.random.default_rng([int(seed), 0xB41C])
    rows = np.flatnonzero((_GRID_DEC >= -10) & (_GRID_DEC <= 30))
    out: list[BrickSpec] = []
    if layout == "spread":
        row_step = max(1, len(rows) // n_bricks)
        for i in range(n_bricks):
            row = int(rows[(i * row_step + int(rng.integers(0, row_step))) % len(rows)])
            ncols = int(_GRID_NCOLS[row])
            ra = 100.0 + (150.0 * (i + rng.uniform(0.2, 0.8)) / n_bricks)
            out.append(grid_brick(row, int(ra / 360.0 * ncols), size))
    else:
        row = int(rng.choice(rows))
        while len(out) < n_bricks:
            ncols = int(_GRID_NCOLS[row])
            col = int(rng.integers(int(100 / 360 * ncols), int(250 / 360 * ncols)))
            for c in range(col, col + min(6, n_bricks - len(out))):
                out.append(grid_brick(row, c, size))
            row += 1
    names = [b.brickname for b in out]
    assert len(set(names)) == len(names), names
    return out


# ----------------------------------------------------------------------------- rendering
def _in_primary(spec: BrickSpec, ra, dec) -> np.ndarray:
    width = (spec.ra2 - spec.ra1) % 360.0
    return (((np.asarray(ra) - spec.ra1) % 360.0) < width) & (np.asarray(dec) >= spec.dec1) & \
        (np.asarray(dec) < spec.dec2)


def _nprimary_mask(spec: BrickSpec, wcs, size: int, margin: int) -> np.ndarray:
    """True outside the brick's unique area; WCS evaluated only on an outer frame."""
    out = np.zeros((size, size), dtype=bool)
    w = min(size // 2, margin + 24)
    ys, xs = np.mgrid[0:size, 0:size] if size <= 600 else (None, None)
    if ys is not None:
        sel = np.ones((size, size), bool)
        sel[w:size - w, w:size - w] = False
        yy, xx = ys[sel], xs[sel]
    else:
        parts = []
        a = np.arange(size)
        for y0, y1 in ((0, w), (size - w, size)):
            yy_, xx_ = np.meshgrid(np.arange(y0, y1), a, indexing="ij")
            parts.append((yy_.ravel(), xx_.ravel()))
        for x0, x1 in ((0, w), (size - w, size)):
            yy_, xx_ = np.meshgrid(np.arange(w, size - w), np.arange(x0, x1), indexing="ij")
            parts.append((yy_.ravel(), xx_.ravel()))
        yy = np.concatenate([p[0] for p in parts])
        xx = np.concatenate([p[1] for p in parts])
    ra, dec = dr10.brick_pixel_to_radec(wcs, xx, yy)
    out[yy, xx] = ~_in_primary(spec, ra, dec)
    # the inner rectangle is assumed primary: check its boundary ring really is
    ring = np.r_[w:size - w]
    if size - 2 * w > 0:
        ra_r, dec_r = dr10.brick_pixel_to_radec(
            wcs, np.r_[ring, ring, np.full(ring.size, w), np.full(ring.size, size - w - 1)],
            np.r_[np.full(ring.size, w), np.full(ring.size, size - w - 1), ring, ring])
        if not _in_primary(spec, ra_r, dec_r).all():
            raise AssertionError("primary bounds reach inside the assumed interior")
    return out


def _smooth_field(rng, size: int, amp: float) -> np.ndarray:
    """1 + a smooth separable variation of relative amplitude ~amp (float32, size x size)."""
    u = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    a1, a2 = rng.normal(0, amp, 2)
    f1, f2, p1, p2 = rng.uniform(0.5, 1.5, 2).tolist() + rng.uniform(0, 2 * np.pi, 2).tolist()
    gx = (a1 * u + 0.5 * amp * np.sin(2 * np.pi * f1 * u + p1)).astype(np.float32)
    gy = (a2 * u + 0.5 * amp * np.cos(2 * np.pi * f2 * u + p2)).astype(np.float32)
    c = np.float32(rng.normal(0, amp * 0.5))
    return (1.0 + gy[:, None] + gx[None, :] + c * np.outer(np.sin(np.pi * u), np.cos(np.pi * u))
            ).astype(np.float32)


def _add_stamp(plane: np.ndarray, stamp: np.ndarray, x0: int, y0: int) -> None:
    """plane[y0:y0+h, x0:x0+w] += stamp, clipped to the plane."""
    h, w = stamp.shape
    ny, nx = plane.shape
    ya, yb, xa, xb = max(y0, 0), min(y0 + h, ny), max(x0, 0), min(x0 + w, nx)
    if ya < yb and xa < xb:
        plane[ya:yb, xa:xb] += stamp[ya - y0:yb - y0, xa - x0:xb - x0]


def render_galaxy(x: float, y: float, re_px, n: float, q: float, pa_deg: float,
                  fluxes: Mapping[str, float], sigmas_px: Mapping[str, float],
                  oversample: int = 4, trunc: float = 8.0):
    """Stamps of a Sersic galaxy convolved with per-band Gaussian PSFs.

    (x, y): 0-based brick pixel of the centre (sub-pixel exact); ``re_px`` major-axis
    half-light radius [px], one number for every band or a mapping band -> radius (a colour
    gradient: :data:`POP_RE_LAMBDA_SLOPE`); ``pa_deg`` east of north (east = -x, north = +y,
    as the DR10 WCS).  The profile is integrated over each pixel with ``oversample``^2
    sub-samples, truncated at ``trunc`` R_e, normalised to ``fluxes[band]`` and convolved by
    multiplying its FFT with the Gaussian's real, symmetric transfer function (zero phase: no
    shift).  Returns ``(x0, y0, {band: stamp})``.
    """
    radii = {b: float(re_px[b] if isinstance(re_px, Mapping) else re_px) for b in fluxes}
    smax = max(sigmas_px.values())
    half = int(math.ceil(min(trunc * max(radii.values()), 100.0) + 4 * smax + 2))
    ix, iy = int(math.floor(x + 0.5)), int(math.floor(y + 0.5))
    m = 2 * half + 1
    sub = (np.arange(oversample) + 0.5) / oversample - 0.5
    d = (np.arange(m)[:, None] - half + sub[None, :]).ravel()       # m*os offsets
    dx = d + (ix - x)
    dy = d + (iy - y)
    pa = math.radians(pa_deg)
    ux, uy = -math.sin(pa), math.cos(pa)        # major axis in pixel coordinates
    vx, vy = math.cos(pa), math.sin(pa)
    a0 = dx[None, :] * ux + dy[:, None] * uy
    b0 = (dx[None, :] * vx + dy[:, None] * vy) / q
    r0 = np.sqrt(a0 * a0 + b0 * b0)             # elliptical radius [px]
    ky = np.fft.fftfreq(m)[:, None]
    kx = np.fft.rfftfreq(m)[None, :]
    k2 = kx * kx + ky * ky
    bn = sersic_bn(n)
    profiles: dict = {}
    stamps = {}
    for band, flux in fluxes.items():
        ft = profiles.get(radii[band])
        if ft is None:
            r = r0 / radii[band]
            prof = np.exp(-bn * (r ** (1.0 / n) - 1.0))
            prof[r > trunc] = 0.0
            prof = prof.reshape(m, oversample, m, oversample).sum(axis=(1, 3))
            prof /= prof.sum()
            ft = profiles[radii[band]] = np.fft.rfft2(prof)
        s = sigmas_px[band]
        conv = np.fft.irfft2(ft * np.exp(-2 * np.pi ** 2 * s * s * k2), s=(m, m))
        stamps[band] = (flux * conv).astype(np.float32)
    return ix - half, iy - half, stamps


def pixel_noise_sigma(model: np.ndarray, invvar: np.ndarray, band: str,
                      sigma_uncovered: float) -> np.ndarray:
    """Per-pixel noise sigma [nMgy] of the synthetic image, float32.

    Sky noise (the invvar plane: DR10's coadd invvar carries sky noise only) plus the sources'
    own photon noise at the effective gain sky x invvar [e-/nMgy]:
    ``sigma^2 = (1 + max(model, 0) / sky) / invvar`` with ``sky = SKY_PIX_NMGY[band]``;
    ``sigma_uncovered`` where invvar == 0 (the unweighted coadd).
    """
    sigma = np.full(invvar.shape, np.float32(sigma_uncovered), dtype=np.float32)
    photon = 1.0 + np.maximum(model, 0.0) / np.float32(SKY_PIX_NMGY[band])
    np.divide(np.sqrt(photon, dtype=np.float32), np.sqrt(invvar), out=sigma, where=invvar > 0)
    return sigma


def band_radii(shape_r_arcsec: float, slope: float) -> dict[str, float]:
    """Half-light radius per band (in the unit of ``shape_r``) of a galaxy with a colour gradient.

    ``r_e(lambda) = shape_r (lambda / lambda_r)^slope`` with the DECam effective wavelengths
    :data:`BAND_LAMBDA_AA`: the catalogue's single Tractor ``shape_r`` (one shape fitted to
    all bands) is taken as the r-band radius.
    """
    return {b: float(shape_r_arcsec) * (BAND_LAMBDA_AA[b] / BAND_LAMBDA_AA["r"]) ** slope
            for b in dr10.BANDS}


def _star_stamp(x: float, y: float, flux: float, sigma: float, half: int,
                wing_frac: float = 0.05, beta: float = 1.5) -> tuple[int, int, np.ndarray]:
    """Gaussian core + normalised power-law wing, point-sampled (sigma >= ~1.9 px)."""
    ix, iy = int(math.floor(x + 0.5)), int(math.floor(y + 0.5))
    d = np.arange(-half, half + 1, dtype=np.float64)
    dx = d[None, :] + (ix - x)
    dy = d[:, None] + (iy - y)
    r2 = dx * dx + dy * dy
    core = np.exp(-0.5 * r2 / sigma ** 2) / (2 * np.pi * sigma ** 2)
    alpha = 2.0 * sigma
    wing = (beta - 1) / (np.pi * alpha ** 2) * (1 + r2 / alpha ** 2) ** (-beta)
    return ix - half, iy - half, (flux * ((1 - wing_frac) * core + wing_frac * wing)
                                  ).astype(np.float32)


def _disk(size: int, x: float, y: float, r: float):
    """(slice_y, slice_x, boolean disk) of radius r around (x, y) clipped to the plane."""
    y0, y1 = max(int(math.floor(y - r)), 0), min(int(math.ceil(y + r)) + 1, size)
    x0, x1 = max(int(math.floor(x - r)), 0), min(int(math.ceil(x + r)) + 1, size)
    if y1 <= y0 or x1 <= x0:
        return slice(0, 0), slice(0, 0), np.zeros((0, 0), bool)
    yy = np.arange(y0, y1)[:, None]
    xx = np.arange(x0, x1)[None, :]
    return slice(y0, y1), slice(x0, x1), (xx - x) ** 2 + (yy - y) ** 2 <= r * r


# ----------------------------------------------------------------------------- lens population
#: flat LambdaCDM of the population model: H0 [km/s/Mpc], Omega_m
H0_KMS_MPC, OMEGA_M = 70.0, 0.3
_C_KMS = 299792.458
_ZGRID = np.linspace(0.0, 2.0, 4001)
_INV_E = 1.0 / np.sqrt(OMEGA_M * (1 + _ZGRID) ** 3 + 1 - OMEGA_M)
#: comoving distance on _ZGRID, Mpc (trapezoid rule; < 1e-6 relative error)
_DC_MPC = _C_KMS / H0_KMS_MPC * np.concatenate(
    [[0.0], np.cumsum(0.5 * (_INV_E[1:] + _INV_E[:-1]) * np.diff(_ZGRID))])

#: parent redshift range (n(z) proportional to dV/dz inside it)
POP_Z_RANGE = (0.15, 0.85)
#: Gaussian luminosity function of the LRG-like lenses: rest-frame r absolute mag (H0 = 70)
POP_MR_MEAN, POP_MR_SD = -22.4, 0.45
#: selection: dereddened apparent r magnitude brighter than this
POP_R_LIMIT = 20.7
#: type mix (Tractor model) of the lenses
POP_TYPES, POP_TYPE_P = ("DEV", "SER", "EXP", "REX"), (0.7, 0.15, 0.05, 0.1)
#: size-luminosity: R_e = 7 kpc x L^0.63 (L relative to POP_MR_MEAN), 0.12 dex scatter
POP_RE_KPC, POP_RE_SLOPE, POP_RE_DEX = 7.0, 0.63, 0.12
#: Faber-Jackson: sigma = 240 km/s x L^0.25, 0.06 dex scatter
POP_SIGMA_KMS, POP_SIGMA_DEX = 240.0, 0.06
#: colour gradient of early-type galaxies as a wavelength dependence of the half-light radius,
#: r_e ~ lambda^slope: r_e decreases by ~35 % from g to K (La Barbera et al. 2010, MNRAS 408,
#: 1313, SPIDER II; 4770 -> 21900 A), i.e. slope = log10(0.65)/log10(21900/4770) = -0.28,
#: which is the -0.1 mag/dex g-r gradient of a -0.4 dex/decade metallicity gradient (La
#: Barbera & de Carvalho 2009, ApJ 699, L76).  The galaxy-to-galaxy spread of the gradient is
#: comparable to its mean (same references); sd 0.15 is this generator's ASSUMPTION.  Drawn
#: from a stream of its own (the other draws of a brick do not change with it).
POP_RE_LAMBDA_SLOPE, POP_RE_LAMBDA_SLOPE_SD = -0.28, 0.15
#: DECam effective wavelengths [Angstrom] (Dey et al. 2019, AJ 157, 168)
BAND_LAMBDA_AA = {"g": 4800.0, "r": 6420.0, "z": 9120.0}
#: photo-z PDF width in ln(1+z): 0.02 (r <= 19) .. 0.03 (r >= 20.7), i.e. sigma_z ~ s (1+z)
POP_PZ_WIDTH = (0.02, 0.03)
#: fractions with a DR10 photo-z truth-table z_spec, and with the user's z and sigma
POP_F_ZSPEC, POP_F_TRAINING, POP_F_USER = 0.2, 0.85, 0.3
_SPEC_SURVEYS, _SPEC_SURVEY_P = ("BOSS", "SDSS", "DESI"), (0.55, 0.25, 0.2)
_Z68, _Z95 = 0.9944578832097535, 1.959963984540054      # normal quantiles 84.13 %, 97.5 %


def cosmology_distances(z) -> tuple[np.ndarray, np.ndarray]:
    """(distance modulus [mag], angular-diameter distance [Mpc]) in the population's cosmology."""
    z = np.asarray(z, dtype=np.float64)
    dc = np.interp(z, _ZGRID, _DC_MPC)
    return 5.0 * np.log10(np.maximum(dc * (1 + z), 1e-10) * 1e5), dc / (1 + z)


def lrg_k_plus_e(z) -> np.ndarray:
    """r-band K-correction (1.5 z + 0.625 z^2) + passive evolution (-1.2 z), early type, mag."""
    z = np.asarray(z, dtype=np.float64)
    return 1.5 * z + 0.625 * z * z - 1.2 * z


def lrg_colours(z) -> tuple[np.ndarray, np.ndarray]:
    """Mean red-sequence (g - r, r - z) at redshift z, mag (dereddened)."""
    z = np.asarray(z, dtype=np.float64)
    return 0.8 + 1.15 * np.tanh(z / 0.35), 0.45 + 1.45 * z


def synthetic_ebv(ra, dec) -> np.ndarray:
    """A smooth synthetic Galactic E(B-V) sky, 0.01..0.10 mag, float32 (stands in for SFD98)."""
    ra = np.radians(np.asarray(ra, np.float64))
    dec = np.radians(np.asarray(dec, np.float64))
    v = 0.055 + 0.045 * np.sin(ra * 360.0 / 37.0 + 0.7) * np.cos(dec * 360.0 / 23.0 + 0.3)
    return v.astype(np.float32)


def lrg_population(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Draw ``n`` LRG-like lenses (see the module docstring); truth only, float64.

    Returns z (true redshift), M_r, r/g/z (dereddened AB mag), type, sersic, shape_r
    (arcsec), q (axis ratio), pa (deg east of north), sigma (km/s).
    """
    cdf = np.where((_ZGRID >= POP_Z_RANGE[0]) & (_ZGRID <= POP_Z_RANGE[1]),
                   _DC_MPC ** 2 * _INV_E, 0.0).cumsum()
    cdf /= cdf[-1]
    zs, ms = [np.zeros(0)], [np.zeros(0)]
    got = 0
    while got < n:                       # rejection sampling of the magnitude limit, in batches
        z = np.interp(rng.random(4 * n + 8), cdf, _ZGRID)
        m = rng.normal(POP_MR_MEAN, POP_MR_SD, z.size)
        keep = m + cosmology_distances(z)[0] + lrg_k_plus_e(z) < POP_R_LIMIT
        zs.append(z[keep])
        ms.append(m[keep])
        got += int(keep.sum())
    z, m_abs = np.concatenate(zs)[:n], np.concatenate(ms)[:n]
    dmod, d_a = cosmology_distances(z)
    rmag = m_abs + dmod + lrg_k_plus_e(z)
    gr, rz = lrg_colours(z)
    lum = 10.0 ** (-0.4 * (m_abs - POP_MR_MEAN))
    re_kpc = POP_RE_KPC * lum ** POP_RE_SLOPE * 10.0 ** rng.normal(0.0, POP_RE_DEX, n)
    types = rng.choice(np.array(POP_TYPES), n, p=POP_TYPE_P)
    q = np.where(types == "REX", 1.0, 0.5 + 0.5 * rng.beta(2.8, 2.2, n))
    return dict(
        z=z, M_r=m_abs, r=rmag, g=rmag + gr + rng.normal(0.0, 0.08, n),
        z_mag=rmag - rz - rng.normal(0.0, 0.08, n), type=types,
        sersic=np.where(types == "DEV", 4.0, np.where(types == "SER",
                                                      rng.uniform(2.5, 5.5, n), 1.0)),
        shape_r=np.clip(re_kpc / (d_a * 1e3) * (180 / np.pi) * 3600.0, 0.3, 6.0), q=q,
        pa=rng.uniform(0.0, 180.0, n),
        sigma=np.clip(POP_SIGMA_KMS * lum ** 0.25 * 10.0 ** rng.normal(0, POP_SIGMA_DEX, n),
                      120.0, 420.0))


def photo_z_columns(rng: np.random.Generator, z_true, rmag) -> dict[str, np.ndarray]:
    """DR10 photo-z sweep columns for true redshifts ``z_true`` and dereddened r mags.

    The PDF is lognormal in 1 + z with width s (POP_PZ_WIDTH, growing with r) centred on
    ln(1 + z_true) + s N(0, 1): calibrated, sigma_z ~ s (1 + z); quantiles are exact.
    z_spec for a POP_F_ZSPEC fraction (-99 otherwise), ``survey``, ``training``.
    """
    z_true = np.asarray(z_true, np.float64)
    n = z_true.size
    lo, hi = POP_PZ_WIDTH
    s = lo + (hi - lo) * np.clip((np.asarray(rmag) - 19.0) / (POP_R_LIMIT - 19.0), 0.0, 1.0)
    mu = np.log1p(z_true) + s * rng.standard_normal(n)

    def q(k):
        return (np.expm1(mu + k * s)).astype(np.float32)

    has = rng.random(n) < POP_F_ZSPEC
    survey = np.where(has, rng.choice(np.array(_SPEC_SURVEYS), n, p=_SPEC_SURVEY_P), "")
    return dict(
        z_phot_mean=(np.exp(mu + 0.5 * s * s) - 1).astype(np.float32),
        z_phot_median=q(0.0), z_phot_std=(np.exp(mu + 0.5 * s * s) *
                                          np.sqrt(np.expm1(s * s))).astype(np.float32),
        z_phot_l68=q(-_Z68), z_phot_u68=q(_Z68), z_phot_l95=q(-_Z95), z_phot_u95=q(_Z95),
        z_spec=np.where(has, z_true + 5e-5 * (1 + z_true) * rng.standard_normal(n),
                        dr10.PHOTOZ_FILL).astype(np.float32),
        survey=survey.astype(str), training=has & (rng.random(n) < POP_F_TRAINING))


# ----------------------------------------------------------------------------- one brick
@dataclass
class BrickData:
    """In-memory planes of one synthetic brick plus the truth used to make them."""

    spec: BrickSpec
    size: int
    wcs: Any
    image: dict[str, np.ndarray]
    invvar: dict[str, np.ndarray]
    psfsize: dict[str, np.ndarray]
    maskbits: np.ndarray
    wisem: tuple[np.ndarray, np.ndarray]
    catalogue: dict[str, np.ndarray]
    record: BrickRecord


def make_brick(spec: BrickSpec, size: int, seed: int, index: int = 0,
               n_galaxies: int | None = None) -> BrickData:
    """All planes of one brick, deterministic in (seed, brickid, size)."""
    S = int(size)
    rng = np.random.default_rng([int(seed), int(spec.brickid), S])
    wcs = dr10.brick_wcs(spec.ra, spec.dec, S)
    margin = primary_margin(S)
    full = S >= 2000
    if n_galaxies is None:
        n_galaxies = 40 if full else 10
    maskbits = np.zeros((S, S), dtype=np.int32)
    maskbits[_nprimary_mask(spec, wcs, S, margin)] |= MASKBITS["NPRIMARY"]

    # --- depth and PSF maps
    invvar, psfsize, sig_unw = {}, {}, {}
    for b in dr10.BANDS:
        depth = rng.uniform(0.75, 1.3)
        ivar0 = depth / SKY_SIGMA[b] ** 2
        nexp = np.full((S, S), 2.0, dtype=np.float32)
        for _ in range(3):   # exposure footprints (offset pointings)
            w, h = rng.uniform(0.5, 1.0, 2) * S
            x0, y0 = rng.uniform(-0.3 * S, S - 0.4 * w), rng.uniform(-0.3 * S, S - 0.4 * h)
            nexp[max(int(y0), 0):max(int(y0 + h), 0), max(int(x0), 0):max(int(x0 + w), 0)] += 1
        jitter = np.float32(1.0) - np.float32(0.05) * rng.random((S, S), dtype=np.float32)
        invvar[b] = (np.float32(ivar0 / 3.0) * nexp * jitter).astype(np.float32)
        # smooth, rounded to 0.001" so that lossless GZIP_1 compresses runs of equal values
        fwhm = np.float32(PSF_FWHM[b] * rng.uniform(0.92, 1.08)) * _smooth_field(rng, S, 0.08)
        psfsize[b] = (np.round(fwhm * np.float32(1000)) / np.float32(1000)).astype(np.float32)
        sig_unw[b] = 1.5 * SKY_SIGMA[b]
    records: dict[str, list] = {"allmask": [], "zero": [], "other": []}

    # zero coverage: an edge strip in one band
    zb = dr10.BANDS[index % 3]
    width = int(rng.uniform(0.10, 0.16) * S)
    edge = ["left", "right", "bottom", "top"][int(rng.integers(4))]
    zx0, zx1, zy0, zy1 = {"left": (0, width, 0, S), "right": (S - width, S, 0, S),
                          "bottom": (0, S, 0, width), "top": (0, S, S - width, S)}[edge]
    invvar[zb][zy0:zy1, zx0:zx1] = 0
    records["zero"].append(dict(band=zb, x0=zx0, x1=zx1, y0=zy0, y1=zy1, edge=edge))

    # ALLMASK patches: bad-column segments and blobs, invvar 0 in that band
    for b in dr10.BANDS:
        for k in range(int(rng.integers(1, 3)) + (2 if full else 0)):
            if k % 2 == 0:
                cw, cl = int(rng.integers(1, 4)), int(rng.uniform(0.1, 0.4) * S)
            else:
                cw = cl = int(rng.integers(6, 20))
            x0, y0 = int(rng.integers(0, S - cw)), int(rng.integers(0, S - cl))
            maskbits[y0:y0 + cl, x0:x0 + cw] |= _ALLMASK[b]
            invvar[b][y0:y0 + cl, x0:x0 + cw] = 0
            records["allmask"].append(dict(band=b, x0=x0, x1=x0 + cw, y0=y0, y1=y0 + cl))

    # SUB_BLOB rectangle (processing flag) and a GALAXY ellipse in every second brick
    sx0, sy0 = (int(v) for v in rng.integers(margin, S // 2, 2))
    sw = max(8, int(0.1 * S))
    maskbits[sy0:sy0 + sw, sx0:sx0 + sw] |= MASKBITS["SUB_BLOB"]
    records["other"].append(dict(bit="SUB_BLOB", x0=sx0, x1=sx0 + sw, y0=sy0, y1=sy0 + sw))
    if index % 2 == 1:
        gx, gy, gr = S * 0.75, S * 0.3, max(10.0, 0.06 * S)
        ys, xs, disk = _disk(S, gx, gy, gr)
        maskbits[ys, xs] |= np.where(disk, MASKBITS["GALAXY"], 0).astype(np.int32)
        records["other"].append(dict(bit="GALAXY", x=gx, y=gy, r=gr))
    # a CLUSTER (globular-cluster mask) disk in every fourth brick: the mask only, no light
    if index % 4 == 2:
        cx, cy, cr = S * 0.28, S * 0.7, max(8.0, 0.04 * S)
        ys, xs, disk = _disk(S, cx, cy, cr)
        maskbits[ys, xs] |= np.where(disk, MASKBITS["CLUSTER"], 0).astype(np.int32)
        records["other"].append(dict(bit="CLUSTER", x=cx, y=cy, r=cr))

    # --- stars
    model = {b: np.zeros((S, S), dtype=np.float32) for b in dr10.BANDS}
    wise1 = np.zeros((S, S), dtype=np.uint8)
    wise2 = np.zeros((S, S), dtype=np.uint8)
    n_bright, n_med, n_faint = (2, 6, 40) if full else (1, 2, 6)
    mags = np.r_[rng.uniform(11.8, 12.9, n_bright), rng.uniform(13.3, 15.8, n_med),
                 rng.uniform(16.5, 21.0, n_faint)]
    lo, hi = margin + 0.15 * S, S - margin - 0.15 * S
    stars = []
    bright_xy = []
    for i, G in enumerate(mags):
        if G < 13:
            sx, sy = rng.uniform(lo, hi, 2)          # well inside: its masks are in the brick
            bright_xy.append((sx, sy))
        else:
            sx, sy = rng.uniform(0, S - 1, 2)
        # mask radii (px): legacypipe-like 1630" x 1.396^-G for BRIGHT, half that for MEDIUM,
        # WISE halos 1.6x larger; capped so that a small brick is not all masked
        r_bright = min(1630.0 * 1.396 ** (-G) / dr10.PIXSCALE_ARCSEC, 0.15 * S) if G < 13 else 0.0
        r_med = min(0.5 * 1630.0 * 1.396 ** (-G) / dr10.PIXSCALE_ARCSEC, 0.1 * S) \
            if G < 16 else 0.0
        r_w1 = min(1.6 * max(r_bright, 2 * r_med), 0.15 * S) if G < 16 else 0.0
        r_w2 = 0.7 * r_w1
        star = dict(x=float(sx), y=float(sy), G=float(G), r_bright=float(r_bright),
                    r_medium=float(r_med), r_wisem1=float(r_w1), r_wisem2=float(r_w2),
                    flux={}, saturated={})
        for b in dr10.BANDS:
            flux = 10 ** ((22.5 - (G + STAR_COLOUR[b])) / 2.5)
            fw = psfsize[b][int(np.clip(round(sy), 0, S - 1)), int(np.clip(round(sx), 0, S - 1))]
            sig = float(fw) * _FWHM_TO_SIGMA / dr10.PIXSCALE_ARCSEC
            half = int(min(max(6 * sig, 2 * sig * (flux / 0.01) ** (1 / 3.0)), 0.3 * S, 300))
            x0, y0, st = _star_stamp(sx, sy, flux, sig, half)
            _add_stamp(model[b], st, x0, y0)
            star["flux"][b] = float(flux)
            peak = 0.95 * flux / (2 * np.pi * sig * sig)
            if peak > SATURATION[b]:
                r_sat = sig * math.sqrt(2 * math.log(peak / SATURATION[b])) + 1.0
                ys, xs, disk = _disk(S, sx, sy, r_sat + 2.0)
                maskbits[ys, xs] |= np.where(disk, _SATUR[b], 0).astype(np.int32)
                ys2, xs2, core = _disk(S, sx, sy, r_sat)
                invvar[b][ys2, xs2][core] = 0
                sub = model[b][ys2, xs2]
                sub[core] = SATURATION[b]
                # bleed trail along columns
                L = int(3 * r_sat * math.sqrt(peak / SATURATION[b]))
                bx0 = max(int(round(sx)) - 1, 0)
                by0, by1 = max(int(round(sy)) - L, 0), min(int(round(sy)) + L + 1, S)
                maskbits[by0:by1, bx0:bx0 + 3] |= _SATUR[b]
                invvar[b][by0:by1, bx0:bx0 + 3] = 0
                model[b][by0:by1, bx0:bx0 + 3] = SATURATION[b]
                star["saturated"][b] = dict(r_sat=float(r_sat), trail=[bx0, bx0 + 3, by0, by1])
        for radius, bit in ((r_bright, "BRIGHT"), (r_med, "MEDIUM"), (r_w1, "WISEM1"),
                            (r_w2, "WISEM2")):
            if radius > 0:
                ys, xs, disk = _disk(S, sx, sy, radius)
                maskbits[ys, xs] |= np.where(disk, MASKBITS[bit], 0).astype(np.int32)
                if bit == "WISEM1":
                    wise1[ys, xs] |= disk.astype(np.uint8)
                elif bit == "WISEM2":
                    wise2[ys, xs] |= disk.astype(np.uint8)
        stars.append(star)

    # psfsize is invvar-weighted: 0 where there is no data
    for b in dr10.BANDS:
        psfsize[b][invvar[b] == 0] = 0

    # --- galaxies (catalogue)
    roles: dict[str, int] = {}
    gxy = []
    def primary_xy(x, y):
        ra, dec = dr10.brick_pixel_to_radec(wcs, x, y)
        return bool(_in_primary(spec, ra, dec))

    def centre_bits(x, y) -> int:
        return int(maskbits[int(np.clip(np.rint(y), 0, S - 1)),
                            int(np.clip(np.rint(x), 0, S - 1))])
    # roles: inside the zero-coverage strip; inside the bright star's BRIGHT mask; a few pixels
    # inside the primary boundary; inside a medium star's MEDIUM (not BRIGHT) mask; inside the
    # GALAXY disk (odd bricks); inside the CLUSTER disk (every fourth brick)
    cands = []
    zxa, zxb = max(zx0, margin + 3), min(zx1, S - margin) - 3
    zya, zyb = max(zy0, margin + 3), min(zy1, S - margin) - 3
    if zxb > zxa and zyb > zya:
        cands.append(("zero_coverage_" + zb, rng.uniform(zxa, zxb), rng.uniform(zya, zyb)))
    if bright_xy:
        bx_, by_ = bright_xy[0]
        rb = stars[0]["r_bright"]
        cands.append(("near_bright_star", bx_ + 0.5 * rb, by_ + 0.1 * rb))
    cands.append(("primary_edge", margin + 3.3, rng.uniform(S / 3, 2 * S / 3)))
    for st in stars:
        x, y = st["x"] + 0.6 * st["r_medium"], st["y"] + 0.05 * st["r_medium"]
        if 13.0 <= st["G"] < 16.0 and 0 <= x <= S - 1 and \
                centre_bits(x, y) & (MASKBITS["MEDIUM"] | MASKBITS["BRIGHT"]) == MASKBITS["MEDIUM"]:
            cands.append(("near_medium_star", x, y))
            break
    for rec_ in records["other"]:
        if rec_["bit"] in ("GALAXY", "CLUSTER"):
            role = "in_sga_galaxy" if rec_["bit"] == "GALAXY" else "in_cluster"
            cands.append((role, rec_["x"] + 0.4 * rec_["r"], rec_["y"] - 0.2 * rec_["r"]))
    for role, x, y in cands:
        if primary_xy(x, y):
            roles[role] = len(gxy)
            gxy.append((float(x), float(y)))
    while len(gxy) < n_galaxies:
        x, y = rng.uniform(margin - 2, S - margin + 2, 2)
        if primary_xy(x, y):
            gxy.append((float(x), float(y)))
    gxy = np.array(gxy[:n_galaxies]).reshape(-1, 2)
    roles = {k: v for k, v in roles.items() if v < len(gxy)}
    ng = len(gxy)
    # lens properties from their own stream: independent of the masks and positions above
    prng = np.random.default_rng([int(seed), int(spec.brickid), S, 0x1E45])
    pop = lrg_population(prng, ng)
    ra, dec = dr10.brick_pixel_to_radec(wcs, gxy[:, 0], gxy[:, 1])
    ebv = synthetic_ebv(ra, dec)
    mw = {b: dr10.mw_transmission(ebv, b) for b in dr10.BANDS}
    # observed (not extinction-corrected) fluxes, as DR10's flux_<band>
    fluxes = {b: 10 ** ((22.5 - pop[k]) / 2.5) * mw[b].astype(np.float64)
              for b, k in (("g", "g"), ("r", "r"), ("z", "z_mag"))}
    grad = np.random.default_rng([int(seed), int(spec.brickid), S, 0xC0102]).normal(
        POP_RE_LAMBDA_SLOPE, POP_RE_LAMBDA_SLOPE_SD, ng)
    for i, (x, y) in enumerate(gxy):
        yi, xi = int(np.clip(round(y), 0, S - 1)), int(np.clip(round(x), 0, S - 1))
        sig = {b: float(psfsize[b][yi, xi] or PSF_FWHM[b]) * _FWHM_TO_SIGMA /
               dr10.PIXSCALE_ARCSEC for b in dr10.BANDS}
        radii = band_radii(pop["shape_r"][i] / dr10.PIXSCALE_ARCSEC, float(grad[i]))
        x0, y0, st = render_galaxy(x, y, radii,
                                   float(pop["sersic"][i]), float(pop["q"][i]),
                                   float(pop["pa"][i]), {b: fluxes[b][i] for b in dr10.BANDS},
                                   sig)
        for b in dr10.BANDS:
            _add_stamp(model[b], st[b], x0, y0)
    # the catalogue: Tractor forces PSF inside BRIGHT, GALAXY and CLUSTER masks (the pixels
    # keep the true galaxy); maskbits at the centre pixel as legacypipe (rint of bx, by)
    cat_mb = maskbits[np.clip(np.rint(gxy[:, 1]).astype(int), 0, S - 1),
                      np.clip(np.rint(gxy[:, 0]).astype(int), 0, S - 1)].astype(np.int32)
    forced = (cat_mb & FORCED_PSF_BITS) != 0
    e = (1 - pop["q"]) / (1 + pop["q"])
    two_pa = np.deg2rad(2 * pop["pa"])
    catalogue = dict(
        brickname=np.array([spec.brickname] * ng),
        objid=np.arange(ng, dtype=np.int32), ra=ra, dec=dec,
        flux_r=fluxes["r"].astype(np.float32),
        release=np.full(ng, dr10.RELEASE_DR10, np.int16),
        brickid=np.full(ng, spec.brickid, np.int32),
        type=np.where(forced, "PSF", pop["type"]),
        sersic=np.where(forced, 0.0, pop["sersic"]).astype(np.float32),
        shape_r=np.where(forced, 0.0, pop["shape_r"]).astype(np.float32),
        shape_e1=np.where(forced, 0.0, e * np.cos(two_pa)).astype(np.float32),
        shape_e2=np.where(forced, 0.0, e * np.sin(two_pa)).astype(np.float32),
        flux_g=fluxes["g"].astype(np.float32), flux_z=fluxes["z"].astype(np.float32),
        ebv=ebv, **{f"mw_transmission_{b}": mw[b] for b in dr10.BANDS}, maskbits=cat_mb,
        **photo_z_columns(prng, pop["z"], pop["r"]))
    user = prng.random(ng) < POP_F_USER
    catalogue["z"] = np.where(user, pop["z"] + 5e-5 * (1 + pop["z"]) * prng.standard_normal(ng),
                              np.nan)
    catalogue["sigma"] = np.where(user, pop["sigma"] * 10 ** prng.normal(0, 0.03, ng), np.nan)
    catalogue.update(bx=gxy[:, 0].astype(np.float64), by=gxy[:, 1].astype(np.float64),
                     z_true=pop["z"], sigma_true=pop["sigma"])

    # --- noise
    image = {}
    for b in dr10.BANDS:
        iv = invvar[b]
        noise = rng.standard_normal((S, S), dtype=np.float32)
        sigma = pixel_noise_sigma(model[b], iv, b, sig_unw[b])
        img = model[b] + noise * sigma
        sat = (invvar[b] == 0) & (model[b] >= SATURATION[b])
        img[sat] = model[b][sat]
        image[b] = img.astype(np.float32)

    record = BrickRecord(spec=spec, size=S, directory=dr10.brick_dir(spec.brickname), files=[],
                         faults=[], n_galaxies=ng, roles=roles, stars=stars,
                         allmask=records["allmask"], zero_coverage=records["zero"],
                         other_masks=records["other"], primary_margin_px=margin,
                         forced_psf=[int(i) for i in np.flatnonzero(forced)])
    return BrickData(spec=spec, size=S, wcs=wcs, image=image, invvar=invvar, psfsize=psfsize,
                     maskbits=maskbits, wisem=(wise1, wise2), catalogue=catalogue, record=record)


# ----------------------------------------------------------------------------- writing
def _header(product: str, band: str | None, spec: BrickSpec, wcs) -> list[dict]:
    cards = []
    cards.append(("BRICKNAME", spec.brickname, "DR10 brick name"))
    cards.append(("BRICKID", int(spec.brickid), "DR10 brick id"))
    cards.append(("PRODTYPE", product, "product type"))
    if band is not None:
        cards.append(("BAND", band, "filter"))
    if dr10.PRODUCT_BUNIT[product]:
        cards.append(("BUNIT", dr10.PRODUCT_BUNIT[product], "units"))
    if product in ("image", "invvar"):
        cards.append(("MAGZERO", dr10.MAGZERO, "AB mag = MAGZERO - 2.5 log10(flux)"))
    cards.append(("SURVEY", "DECaLS", "synthetic stand-in for DR10 South"))
    cards.append(("DR", "DR10", ""))
    cards.append(("SYNTHET", True, "SYNTHETIC data, not Legacy Surveys pixels"))
    cards.extend(dr10.wcs_header_cards(wcs))
    return [dict(name=k, value=v, comment=c) for k, v, c in cards]


def write_plane(path: str | os.PathLike, data: np.ndarray, product: str, band: str | None,
                spec: BrickSpec, wcs, dither_seed: int = 1,
                extra_hdus: Sequence[tuple[str, np.ndarray]] = ()) -> None:
    """Write one product as DR10 does (HDU 1, tile-compressed with the DR10 settings)."""
    import fitsio

    c = dr10.COMPRESSION[product]
    data = np.ascontiguousarray(data, dtype=dr10.PRODUCT_DTYPES[product])
    kw: dict[str, Any] = dict(compress=c["fitsio_compress"], tile_dims=dr10.TILE_SHAPE)
    if c["qlevel"] is not None:
        kw["qlevel"] = c["qlevel"]
    if c["qmethod"] is not None:
        kw["qmethod"] = c["qmethod"]
    if c.get("hcomp_scale") is not None:
        kw["hcomp_scale"] = c["hcomp_scale"]
    if c["qmethod"] == "SUBTRACTIVE_DITHER_2":
        kw["dither_seed"] = int(dither_seed)
    tmp = f"{os.fspath(path)}.tmp"
    if os.path.exists(tmp):
        os.remove(tmp)
    with fitsio.FITS(tmp, "rw", clobber=True) as f:
        f.write(data, header=_header(product, band, spec, wcs), **kw)
        for name, arr in extra_hdus:
            f.write(np.ascontiguousarray(arr), extname=name, compress="GZIP",
                    tile_dims=dr10.TILE_SHAPE, qlevel=0)
    os.replace(tmp, path)


def write_survey_bricks(path: str | os.PathLike, specs: Sequence[BrickSpec]) -> None:
    """survey-bricks table (HDU 1) with DR10's columns."""
    from astropy.io import fits

    cols = [
        fits.Column("BRICKNAME", "8A", array=np.array([s.brickname for s in specs])),
        fits.Column("BRICKID", "J", array=np.array([s.brickid for s in specs], np.int32)),
        fits.Column("BRICKQ", "I", array=np.array([s.brickrow % 4 for s in specs], np.int16)),
        fits.Column("BRICKROW", "J", array=np.array([s.brickrow for s in specs], np.int32)),
        fits.Column("BRICKCOL", "J", array=np.array([s.brickcol for s in specs], np.int32)),
    ] + [fits.Column(k.upper(), "D", array=np.array([getattr(s, k) for s in specs], np.float64))
         for k in ("ra", "dec", "ra1", "ra2", "dec1", "dec2")]
    fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU.from_columns(cols)]).writeto(
        path, overwrite=True)


def write_catalogue(path: str | os.PathLike, catalogues: Sequence[Mapping[str, np.ndarray]]):
    """One Parquet file of the bricks' catalogues, sorted by (brickname, objid).

    Documented columns get their ``dr10.CATALOGUE_COLUMNS`` Arrow type (NaN -> null in the
    nullable ones); the synthetic truth columns (:data:`TRUTH_COLUMNS`) are float64.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    keys = list(catalogues[0].keys())
    merged = {k: np.concatenate([np.asarray(c[k]) for c in catalogues]) for k in keys}
    order = np.lexsort((merged["objid"], merged["brickname"]))
    arrays = {}
    for k, v in merged.items():
        v = v[order]
        spec = dr10.CATALOGUE_COLUMN_BY_NAME.get(k)
        typ = pa.type_for_alias(spec.dtype) if spec else None
        if v.dtype.kind in "UO":
            arrays[k] = pa.array(v.astype(str), type=typ)
        elif spec is not None and spec.nullable:
            arrays[k] = pa.array(v, type=typ, mask=np.isnan(v))
        else:
            arrays[k] = pa.array(v, type=typ)
    pq.write_table(pa.table(arrays), path)


def _parse_faults(faults, n_bricks: int) -> dict[int, list[str]]:
    if isinstance(faults, str):
        faults = faults.replace(",", " ").split()
    items: list[tuple[str, int | None]] = []
    if isinstance(faults, Mapping):
        items = [(k, int(v)) for k, v in faults.items()]
    else:
        for f in faults or ():
            name, _, idx = str(f).partition(":")
            items.append((name.strip(), int(idx) if idx else None))
    out: dict[int, list[str]] = {}
    nxt = n_bricks - 1
    for name, idx in items:
        if name not in FAULTS:
            raise ValueError(f"unknown fault {name!r}; known: {FAULTS}")
        if idx is None:
            if nxt < 1:
                raise ValueError(f"too many faults for {n_bricks} bricks (brick 0 stays clean); "
                                 f"use name:index to stack faults on one brick")
            idx, nxt = nxt, nxt - 1
        if not 0 <= idx < n_bricks:
            raise ValueError(f"fault {name!r} on brick index {idx}: only {n_bricks} bricks")
        out.setdefault(idx, []).append(name)
    return out


def _size_px(size) -> int:
    if isinstance(size, str):
        if size == "small":
            return SMALL_SIZE
        if size == "full":
            return FULL_SIZE
        if size.isdigit():
            return int(size)
        raise ValueError(f"size must be 'small', 'full' or an int, got {size!r}")
    size = int(size)
    if size < 100:
        raise ValueError(f"brick size must be >= 100 px, got {size}")
    return size


def generate_survey(root: str | os.PathLike, n_bricks: int = 4, size="small", seed: int = 42,
                    faults: Iterable[str] | Mapping[str, int] | str = (),
                    n_galaxies: int | None = None, layout: str = "contiguous") -> SurveyDescription:
    """Write a synthetic survey under ``root`` (see the module docstring); returns its description.

    Existing files of the same bricks are overwritten; nothing else under ``root`` is touched.
    """
    t0 = time.perf_counter()
    S = _size_px(size)
    if n_bricks < 1:
        raise ValueError("n_bricks must be >= 1")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    fault_map = _parse_faults(faults, n_bricks)
    specs = choose_bricks(n_bricks, seed, S, layout)
    records, catalogues = [], []
    for i, spec in enumerate(specs):
        bd = make_brick(spec, S, seed, index=i, n_galaxies=n_galaxies)
        rec = bd.record
        rec.faults = list(fault_map.get(i, []))
        catalogues.append(bd.catalogue)
        if "nan_invvar" in rec.faults:
            rng = np.random.default_rng([seed, spec.brickid, 7])
            for b in dr10.BANDS:
                x0, y0 = (int(v) for v in rng.integers(S // 4, 3 * S // 4 - 12, 2))
                bd.invvar[b][y0:y0 + 12, x0:x0 + 12] = np.nan
                rec.nan_invvar.append(dict(band=b, x0=x0, x1=x0 + 12, y0=y0, y1=y0 + 12))
        records.append(rec)
        if "absent" in rec.faults:
            continue
        d = root / rec.directory
        d.mkdir(parents=True, exist_ok=True)
        for product, band in dr10.CACHED_PRODUCTS:
            if product == "psfsize" and "no_psfsize" in rec.faults:
                continue
            if product == "maskbits" and "no_maskbits" in rec.faults:
                continue
            name = dr10.product_filename(spec.brickname, product, band)
            if product == "maskbits":
                data, extra = bd.maskbits, (("WISEM1", bd.wisem[0]), ("WISEM2", bd.wisem[1]))
            else:
                data, extra = getattr(bd, product)[band], ()
            dseed = 1 + (seed * 7919 + spec.brickid * 31 + dr10.BANDS.index(band or "g")) % 10000
            write_plane(d / name, data, product, band, spec, bd.wcs, dseed, extra)
            rec.files.append(name)
        if "truncated" in rec.faults:
            p = d / dr10.product_filename(spec.brickname, "image", "r")
            n = p.stat().st_size
            with open(p, "r+b") as f:
                f.truncate(int(n * 0.6))
        if "corrupt" in rec.faults:
            p = d / dr10.product_filename(spec.brickname, "invvar", "g")
            with open(p, "r+b") as f:
                f.write(np.random.default_rng([seed, 99]).integers(0, 256, 2880, np.uint8)
                        .tobytes())
    sb = root / SURVEY_BRICKS_NAME
    write_survey_bricks(sb, specs)
    cat = root / CATALOGUE_NAME
    write_catalogue(cat, catalogues)
    return SurveyDescription(root=str(root), size=S, seed=int(seed), survey_bricks=str(sb),
                             catalogue=str(cat), bricks=records,
                             faults={r.spec.brickname: r.faults for r in records if r.faults},
                             seconds=time.perf_counter() - t0)


def cache_brick(desc, rec, cache_root: str, *, label: str, psf_median: bool = True,
                heads: bool = True) -> None:
    """Put one generated brick into a coadd cache the way stage 4b leaves it: its files
    copied to ``<cache_root>/<brick>/`` (local path or s3://) and the real 4b ``_SUCCESS``
    document (``coadd_cache.make_success``) with the sizes and sha256 of the files present.

    Files a fault removed upstream (no_psfsize, no_maskbits) are still listed, as after a
    cache whose objects were later lost, so stage 4c's fallbacks are exercised.
    ``psf_median``: psfsize entries carry 4b's brick median (``coadd_cache.psfsize_summary``)
    as real 4b markers do; False writes markers without it (an older 4b: 4c computes it).
    ``label`` is the marker's code_version/stage/run_id; ``written_at`` is fixed, so markers
    (and the ``cache_marker_sha`` column) are identical across cache backends.  ``heads``:
    also the brick's ``_HEADS`` object and the marker's ``heads`` entry, written by 4b's own
    ``coadd_cache.write_heads`` (files absent upstream are left out of it); False = a marker
    of a 4b from before heads objects.
    """
    import hashlib

    from injection_pipeline import coadd_cache, storage

    brick = rec.spec.brickname
    files = {}
    for name in dr10.brick_filenames(brick):
        src = os.path.join(desc.root, rec.directory, name)
        if os.path.exists(src):
            storage.put_file(src, storage.join_uri(cache_root, brick, name))
            with open(src, "rb") as f:
                sha, size = hashlib.sha256(f.read()).hexdigest(), os.path.getsize(src)
        else:
            sha, size = "0" * 64, 1
        files[name] = {"size": size, "sha256": sha, "source_url": f"file://{src}"}
        if psf_median and "-psfsize-" in name and os.path.exists(src):
            files[name]["psf_median"] = coadd_cache.psfsize_summary(src)
    marker = coadd_cache.make_success(brick, files, code_version=label, stage=label,
                                      run_id=label, base_url=str(desc.root))
    marker["written_at"] = "2026-01-01T00:00:00+00:00"
    if heads:
        cfg = coadd_cache.CacheConfig(cache_root=cache_root, max_retries=0)
        marker["heads"] = coadd_cache.write_heads(brick, cfg, files)
    storage.put_bytes(storage.join_uri(cache_root, brick, dr10.SUCCESS_MARKER),
                      json.dumps(marker, sort_keys=True).encode())


def cache_survey(desc, cache_root: str, *, label: str) -> None:
    """:func:`cache_brick` for every brick present upstream (absent bricks skipped, as 4b
    blacklists them)."""
    for rec in desc.bricks:
        if "absent" not in rec.faults:
            cache_brick(desc, rec, cache_root, label=label)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m injection_pipeline.synthetic_survey",
                                 description="Write a synthetic DR10-South-like survey.")
    ap.add_argument("--root", required=True)
    ap.add_argument("--n-bricks", type=int, default=4)
    ap.add_argument("--size", default="small", help="small (400 px), full (3600 px) or an int")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--n-galaxies", type=int, default=None, help="per brick")
    ap.add_argument("--faults", nargs="*", default=[],
                    help=f"fault names from {FAULTS}, optionally name:brick_index")
    ap.add_argument("--layout", choices=LAYOUTS, default="contiguous",
                    help="contiguous sky patch, or bricks spread over the sky (several splits)")
    ap.add_argument("--json", action="store_true", help="print the full description as JSON")
    args = ap.parse_args(argv)
    desc = generate_survey(args.root, args.n_bricks, args.size, args.seed, args.faults,
                           args.n_galaxies, args.layout)
    if args.json:
        print(json.dumps(desc.to_dict(), indent=1, default=str))
    else:
        print(f"wrote {len(desc.bricks)} bricks of {desc.size}x{desc.size} px under {desc.root} "
              f"in {desc.seconds:.1f} s")
        for r in desc.bricks:
            print(f"  {r.spec.brickname} id={r.spec.brickid} galaxies={r.n_galaxies} "
                  f"files={len(r.files)} faults={','.join(r.faults) or '-'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
