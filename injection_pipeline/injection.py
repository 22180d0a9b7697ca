"""Stage 4c core: inject one lensed source into one DR10 cutout (pure NumPy, no Spark).

For a manifest task (a dict with :data:`manifests.MANIFEST_COLUMNS`) and the planes of its
brick (:class:`BrickSource`: in-memory :class:`ArrayBrick` for tests, :class:`CachedBrick` for
the coadd cache written by stage 4b), :func:`inject_task` cuts the stamp, renders the lensed
arc with :func:`lensing.render_lensed_arc`, adds it, measures :func:`lensing.stamp_metrics`,
and returns a :class:`TaskResult` (one output row + the stamp arrays) whose ``status`` and
``status_reason`` say what happened.  :func:`process_brick` runs every task of one brick with
the brick opened once.  The Spark glue is :mod:`injection_pipeline.stages.stage_4c`; the user
documentation is ``docs/injection.md``.

Geometry (docs/conventions.md)
------------------------------
* The target's brick pixel (x = column, y = row, 0-based, float) comes from the brick WCS
  (``dr10.radec_to_brick_pixel``; the DR10 WCS has east LEFT, so +x is toward decreasing RA:
  no sign is applied by hand anywhere, the WCS does it).
* The stamp is cut on whole pixels (``dr10.cutout_origin``): the pixel containing the target
  lands at index ``N // 2``; stamp pixel ``[0, 0]`` is brick pixel ``(x0, y0)``.
* Stamp pixel centres sit at ``(i - (N - 1)/2) * pixscale`` arcsec, so the lens centre, i.e.
  the target's exact sub-pixel position, is
  ``lens_x = (x - x0 - (N - 1)/2) * pixscale``, ``lens_y = (y - y0 - (N - 1)/2) * pixscale``
  (in [0, 1) pixel for even N, [-0.5, 0.5) for odd N), carried into ``LensModel(x0, y0)``:
  never rounded away (the earlier pipeline's half-pixel bug).
* The source centre is lens centre + (src_x_arcsec, src_y_arcsec): the manifest's offsets are
  source-plane offsets from the lens centre along +x/+y, exactly ``SersicSource.dx/dy``.
* Angles (lens_phi_rad, src_phi_rad, shear_phi_rad) are radians from +x toward +y.
  Shear: (g1, g2) = shear (cos 2 phi, sin 2 phi) from ``shear`` and ``shear_phi_rad``; the
  manifest's ``shear_g1/g2`` must agree (else ``invalid_task``).

Rule for stamps running off the brick (shift-free): if any stamp pixel falls outside the
brick's pixel grid the task gets ``status = "off_brick"`` and no stamp: the cutout is never
shifted or clamped (that would move the lens off the galaxy) nor padded (fake pixels).  In
real DR10 targets lie in the brick's unique area, >= ~82 px from the edge, so 64/96-px stamps
always fit; the status exists for small test bricks and for wrong inputs.

Photometry: source magnitudes -> nanomaggies inside ``render_lensed_arc`` (``mag_to_nMgy``,
AB zero point 22.5); the manifest's ``src_flux_<b>`` must equal ``mag_to_nMgy(src_mag_<b>)``
(relative 1e-9).  The unlensed Sersic source is normalised analytically; the lensed image is
never renormalised, so ``sum(arc) ~ mu_total * flux`` (minus light the PSF scatters off the
stamp).  The coadd already holds the sky noise; optionally (``shot_noise``, on by default for
the train tier) the arc's own Poisson noise is added to ``image`` from a dedicated
``task_seed64`` stream (:func:`arc_shot_noise`; ``arc`` stays noiseless, invvar unchanged;
docs/injection.md "Arc shot noise").

Pixels: the output ``image`` is ``original + arc`` (``+ arc shot noise`` when on); non-finite original image / invvar pixels
are *masked and counted*: such a pixel gets image 0 and invvar 0 (DR10's own "no data"
convention) in every stored plane, the counts are ``n_nonfinite_image_<b>`` /
``n_nonfinite_invvar_<b>``, and the metrics treat the pixel as bad (invvar 0).  NaN never
reaches the arc (a model) or the metrics.  ``image = original + arc`` is computed in float64
and each stored float32 plane is rounded once, so ``|image32 - original32 - arc32| <=
(ulp(image32) + ulp(arc32)) / 2`` (~1e-9 nMgy for sky pixels; DR10 images themselves are
quantised at 1e-4 nMgy).  No float format can make that difference exactly zero for every
pixel (the sum of two float32 numbers is not always a float32 number); a bit-exact original is
the paired control row's ``image`` (same cutout, no arc).

Statuses (:data:`STATUSES`): ``ok``; ``off_brick``; ``missing_brick`` (no ``_SUCCESS`` marker
or image/invvar file absent); ``corrupt_file`` (an image/invvar/maskbits file or tile that
cannot be read); ``missing_maskbits`` (only with ``on_missing_maskbits = "skip"``; by default
such tasks are injected, the metrics needing maskbits are null and ``status_reason`` says
why); ``invalid_task`` (manifest values the models reject); ``error`` (anything unexpected:
exception type and message in ``status_reason``, never swallowed into a valid-looking row).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import numpy as np

from lensing.clumps import ClumpModel, clumps_to_records, draw_clumps  # noqa: F401 (re-exported)
from lensing.render import PSF_OVERSAMPLE_ALLOWED, PSF_OVERSAMPLE_DEFAULT
from lensing.sources import ClumpySource
from lensing import (MASKBITS_BAD, PSF_MATCH, STAMP_METRIC_KEYS, LensModel, SersicSource,
                     mag_to_nMgy, moffat_nea_alpha, render_lensed_arc, stamp_metrics)
from lensing.images import (DegenerateImagesError, lensed_source_flags, point_magnification_outside,
                            solve_point_images, source_direction)
from lensing.metrics import ARC_REGION_K_DEFAULT, check_region_k

from injection_pipeline import dr10
from injection_pipeline.psf_fallback import (DEFAULT_FWHM_ARCSEC, MAX_FWHM_ARCSEC,
                                             MIN_FWHM_ARCSEC, brick_median_fwhm, resolve_fwhm)

BANDS: tuple[str, ...] = dr10.BANDS
STATUSES: tuple[str, ...] = ("ok", "off_brick", "missing_brick", "corrupt_file",
                             "missing_maskbits", "invalid_task", "error")
#: statuses that do not count toward the job's error threshold
TOLERATED_STATUSES: tuple[str, ...] = ("ok", "off_brick")
PSF_MODELS = ("gaussian", "moffat")
SOURCE_MODELS = ("sersic", "clumpy", "auto")
FLUX_REL_TOL = 1e-9
SHEAR_ABS_TOL = 1e-9
#: stamp_metrics keys that need maskbits (all but n_pix): null when maskbits are missing
MASK_DEPENDENT_KEYS: tuple[str, ...] = tuple(k for k in STAMP_METRIC_KEYS if k != "n_pix")
#: fixed image slots of the point-source solver (SIE + shear: at most 4 images)
N_IMAGE_SLOTS = 4
SHOT_NOISE_MODES = ("auto", "on", "off")
#: Philox key offset of the arc shot-noise stream: key = task_seed64 (as uint64) + 2^64 x this
#: ("SHOT"), disjoint from the manifest's draws (Philox(key=task_seed64), docs/manifests.md)
SHOT_NOISE_STREAM = 0x53484F54
#: conf/injection.toml [shot_noise] typical DR10-South inputs (docs/injection.md, "Arc shot
#: noise"): DECam nominal zero points (AB mag giving 1 electron/s; legacypipe decam.py
#: DecamImage.ZP0), exposure time per exposure [s] and number of exposures in the coadd
DEFAULT_SHOT_ZPT = (("g", 25.001), ("r", 25.209), ("z", 24.875))
DEFAULT_SHOT_EXPTIME = (("g", 90.0), ("r", 90.0), ("z", 90.0))
DEFAULT_SHOT_NEXP = (("g", 3.0), ("r", 3.0), ("z", 3.0))


# =========================================================================== configuration
@dataclass(frozen=True)
class InjectionConfig:
    """Settings of stage 4c that shape the pixels/metrics (hashed into ``injection_config_sha``).

    ``psf_default_fwhm``: ((band, FWHM arcsec), ...) used when nothing else is available.
    ``on_missing_maskbits``: "inject" (default: inject, null mask metrics) or "skip".
    ``store_stamps``: False = metrics only.  ``store_invvar_maskbits``: keep those cutouts.
    ``supersample``: None = the renderer's adaptive rule (0.1 % flux accuracy).
    ``source_model``: "sersic" (smooth, the manifest's Sersic), "clumpy" (that Sersic as
    the disc plus star-forming clumps drawn from ``task_seed64`` with ``clump_model``,
    :mod:`lensing.clumps`) or "auto" (clumpy for the tiers ``source_model_tiers``, sersic for
    the others: :meth:`source_model_for`); the clump model is hashed unless "sersic", the
    tiers only for "auto".
    ``psf_oversample``: fine cells per pixel (per axis) of the renderer's convolution grid,
    the pixel response applied once (lensing/render.py; 1 = legacy double pixel response).
    ``arc_region_k``, ``arc_region_bands``: threshold k (arc > k sigma) of ``arc_snr_region_<b>``
    and the bands whose best value is ``arc_snr_region`` (docs/metrics.md).
    ``mu_point_factor``: mu_point at this multiple (> 1) of the tangential critical radius;
    ``resolved_b_fac``/``resolved_r_fac``: LensPop factors of ``lens_resolved``/``arc_like``
    (docs/metrics.md).  ``shot_noise``: "auto" (on for ``shot_noise_tiers``) | "on" | "off";
    ``shot_zpt``/``shot_exptime``/``shot_nexp``: ((band, value), ...) of the effective-gain
    model (:meth:`shot_gain`, docs/injection.md "Arc shot noise").
    ``code_version``, ``store_stamps`` and ``store_invvar_maskbits`` are not part of the hash
    (provenance / output format, they change no pixel or metric).
    """

    psf_model: str = "gaussian"
    moffat_beta: float = 3.5
    use_psfsize_maps: bool = True
    psf_default_fwhm: tuple = tuple(sorted(DEFAULT_FWHM_ARCSEC.items()))
    psf_min_fwhm: float = MIN_FWHM_ARCSEC
    psf_max_fwhm: float = MAX_FWHM_ARCSEC
    bad_bits: int = MASKBITS_BAD
    on_missing_maskbits: str = "inject"
    store_stamps: bool = True
    store_invvar_maskbits: bool = True
    pixscale: float = dr10.PIXSCALE_ARCSEC
    supersample: Optional[int] = None
    psf_oversample: int = PSF_OVERSAMPLE_DEFAULT
    source_model: str = "auto"
    source_model_tiers: tuple = ("train",)
    clump_model: ClumpModel = ClumpModel()
    arc_region_k: float = ARC_REGION_K_DEFAULT
    arc_region_bands: str = "".join(BANDS)
    mu_point_factor: float = 1.1
    resolved_b_fac: float = 2.0
    resolved_r_fac: float = 2.0
    shot_noise: str = "auto"
    shot_noise_tiers: tuple = ("train",)
    shot_zpt: tuple = DEFAULT_SHOT_ZPT
    shot_exptime: tuple = DEFAULT_SHOT_EXPTIME
    shot_nexp: tuple = DEFAULT_SHOT_NEXP
    code_version: str = "unknown"

    def __post_init__(self):
        if self.psf_model not in PSF_MODELS:
            raise ValueError(f"psf_model must be one of {PSF_MODELS}, got {self.psf_model!r}")
        if not (self.moffat_beta > 1 and math.isfinite(self.moffat_beta)):
            raise ValueError(f"moffat_beta must be > 1, got {self.moffat_beta}")
        if self.source_model not in SOURCE_MODELS:
            raise ValueError(f"source_model must be one of {SOURCE_MODELS}, got "
                             f"{self.source_model!r}")
        object.__setattr__(self, "source_model_tiers", tuple(self.source_model_tiers))
        if self.psf_oversample not in PSF_OVERSAMPLE_ALLOWED:
            raise ValueError(f"psf_oversample must be one of {PSF_OVERSAMPLE_ALLOWED}, got "
                             f"{self.psf_oversample!r}")
        if self.supersample is not None and self.supersample % self.psf_oversample:
            raise ValueError(f"supersample ({self.supersample}) must be a multiple of "
                             f"psf_oversample ({self.psf_oversample})")
        if self.on_missing_maskbits not in ("inject", "skip"):
            raise ValueError("on_missing_maskbits must be 'inject' or 'skip', got "
                             f"{self.on_missing_maskbits!r}")
        d = dict(self.psf_default_fwhm)
        for b in BANDS:
            if b not in d:
                raise ValueError(f"psf_default_fwhm lacks band {b!r}: {d}")
        object.__setattr__(self, "arc_region_k", check_region_k(self.arc_region_k))
        if not (self.mu_point_factor > 1 and math.isfinite(self.mu_point_factor)):
            raise ValueError(f"mu_point_factor must be finite and > 1, got {self.mu_point_factor}")
        for name in ("resolved_b_fac", "resolved_r_fac"):
            v = getattr(self, name)
            if not (v > 0 and math.isfinite(v)):
                raise ValueError(f"{name} must be finite and > 0, got {v}")
        if self.shot_noise not in SHOT_NOISE_MODES:
            raise ValueError(f"shot_noise must be one of {SHOT_NOISE_MODES}, got "
                             f"{self.shot_noise!r}")
        object.__setattr__(self, "shot_noise_tiers", tuple(self.shot_noise_tiers))
        for name in ("shot_zpt", "shot_exptime", "shot_nexp"):
            d = dict(getattr(self, name))
            bad = [b for b in BANDS if not (b in d and math.isfinite(float(d[b]))
                                             and (name == "shot_zpt" or float(d[b]) > 0))]
            if bad:
                raise ValueError(f"{name} needs a finite (positive) value for band(s) {bad}: {d}")
            object.__setattr__(self, name, tuple(sorted((b, float(v)) for b, v in d.items())))
        rb = self.arc_region_bands
        if not (isinstance(rb, str) and rb and all(b in BANDS for b in rb)
                and len(set(rb)) == len(rb)):
            raise ValueError(f"arc_region_bands must be distinct letters of {''.join(BANDS)}, "
                             f"got {rb!r}")

    @property
    def default_fwhm(self) -> dict:
        return dict(self.psf_default_fwhm)

    def hashed_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k in ("code_version", "store_stamps", "store_invvar_maskbits"):  # not physics
            d.pop(k)
        d["psf_default_fwhm"] = dict(self.psf_default_fwhm)
        for k in ("shot_zpt", "shot_exptime", "shot_nexp"):
            d[k] = dict(getattr(self, k))
        d["shot_noise_tiers"] = list(self.shot_noise_tiers)
        if self.source_model == "sersic":        # the clump model shapes nothing then
            d.pop("clump_model")
        if self.source_model != "auto":          # the tiers choose nothing then
            d.pop("source_model_tiers")
        else:
            d["source_model_tiers"] = list(self.source_model_tiers)
        return d

    def source_model_for(self, tier) -> str:
        """"sersic" or "clumpy": the source model of a task of ``tier``."""
        if self.source_model == "auto":
            return "clumpy" if tier in self.source_model_tiers else "sersic"
        return self.source_model

    def shot_gain(self, band: str) -> float:
        """Effective gain of the coadd [electrons per nanomaggy] in ``band``:
        nexp x exptime x 10^(0.4 (zpt - 22.5)) (docs/injection.md, "Arc shot noise")."""
        zpt, t, n = (dict(self.shot_zpt)[band], dict(self.shot_exptime)[band],
                     dict(self.shot_nexp)[band])
        return n * t * 10.0 ** (0.4 * (zpt - 22.5))

    def shot_noise_for(self, tier) -> bool:
        """Whether the arc's shot noise is added for a task of ``tier``."""
        if self.shot_noise == "auto":
            return tier in self.shot_noise_tiers
        return self.shot_noise == "on"

    def config_sha(self) -> str:
        """16-hex blake2b of the settings above (not the code version); computed once per
        instance (the dataclass is frozen; it goes into every output row)."""
        sha = self.__dict__.get("_config_sha")
        if sha is None:
            blob = json.dumps(self.hashed_dict(), sort_keys=True, default=str).encode()
            sha = hashlib.blake2b(blob, digest_size=8).hexdigest()
            object.__setattr__(self, "_config_sha", sha)
        return sha


# =========================================================================== output schema
@dataclass(frozen=True)
class OutColumn:
    name: str
    type: str        # string, int32, int64, float64, bool, binary
    unit: str
    description: str


def _band_cols(stem: str, type_: str, unit: str, desc: str) -> list:
    return [OutColumn(f"{stem}_{b}", type_, unit, desc.format(b=b)) for b in BANDS]


def _metric_columns() -> list:
    cols = []
    for k in STAMP_METRIC_KEYS:
        t = "int32" if (k == "n_pix" or k.startswith(("n_good_pix", "arc_region_npix"))) \
            else "float64"
        cols.append(OutColumn(k, t, "", f"lensing.stamp_metrics['{k}'] (docs/metrics.md); null "
                              "when maskbits are missing (except n_pix) or status != ok"))
    return cols


#: columns 4c adds to the manifest columns (metrics dataset = manifest columns + these)
RESULT_COLUMNS: tuple[OutColumn, ...] = tuple([
    OutColumn("status", "string", "", "ok | off_brick | missing_brick | corrupt_file | "
              "missing_maskbits | invalid_task | error"),
    OutColumn("status_reason", "string", "", "why the status is not ok; on ok rows, notes "
              "(maskbits missing, non-finite pixels masked); null otherwise"),
    OutColumn("target_x_pix", "float64", "pixel", "0-based brick column of (ra, dec) from the "
              "brick WCS (east left)"),
    OutColumn("target_y_pix", "float64", "pixel", "0-based brick row of (ra, dec)"),
    OutColumn("stamp_x0", "int32", "pixel", "brick column of stamp pixel [0, 0]"),
    OutColumn("stamp_y0", "int32", "pixel", "brick row of stamp pixel [0, 0]"),
    OutColumn("lens_x_arcsec", "float64", "arcsec", "lens centre (the target's exact position) "
              "in stamp coordinates: (target_x_pix - stamp_x0 - (N-1)/2) * 0.262"),
    OutColumn("lens_y_arcsec", "float64", "arcsec", "lens centre y in stamp coordinates"),
    OutColumn("psf_model", "string", "", "gaussian | moffat"),
    OutColumn("moffat_beta", "float64", "", "Moffat index (null for gaussian)"),
    OutColumn("psf_match", "string", "", "how the kernel honours psf_fwhm_used_<b> (the DR10 "
              "psfsize, a Gaussian-equivalent FWHM): gaussian_fwhm (Gaussian of that FWHM) | "
              "nea_pixelised (Moffat whose pixelised-kernel NEA 1/sum(k^2) equals that "
              "Gaussian's); null in outputs written before the NEA fix (Moffat FWHM = psfsize)"),
    *_band_cols("moffat_alpha", "float64", "arcsec", "core radius alpha of the NEA-matched "
                "Moffat kernel (1 + r^2/alpha^2)^-beta in band {b} (null for gaussian)"),
    *_band_cols("psf_fwhm_used", "float64", "arcsec", "psfsize used in band {b}: the DR10 "
                "Gaussian-equivalent FWHM (NEA definition) the kernel honours, see psf_match"),
    *_band_cols("psf_source", "string", "", "where psf_fwhm_used_{b} came from: centre | "
                "brick_median | bricks_table | default"),
    *_band_cols("psfsize_centre", "float64", "arcsec", "raw psfsize-{b} value at the stamp "
                "centre (may be 0/NaN = no data); null if the map is unavailable"),
    OutColumn("psf_note", "string", "", "why PSF levels were skipped (null when every band "
              "used the centre value)"),
    OutColumn("mu_total", "float64", "", "flux-ratio total magnification of the extended source "
              "(lensed / intrinsic flux before PSF, on the padded canvas); null for controls"),
    OutColumn("mu_point", "float64", "", "DIAGNOSTIC point magnification 1/det(A) at "
              "mu_point_factor (1.1) x the tangential critical radius along the source direction: "
              "always outside the critical curve; = 11/(1 - shear^2) for any SIE + shear "
              "(docs/metrics.md); replaces mu_point_1p1; null for controls"),
    OutColumn("mu_point_radius_arcsec", "float64", "arcsec", "distance from the lens centre "
              "where mu_point is evaluated (1.1 theta_E for an SIS without shear)"),
    OutColumn("n_images", "int32", "", "number of images of the source centre (point-source "
              "solver on the lens equation, lensing.images); null for controls"),
    *[c for k in range(1, N_IMAGE_SLOTS + 1) for c in (
        OutColumn(f"image{k}_x_arcsec", "float64", "arcsec", f"x of image {k} (by |mu| "
                  "descending) in stamp coordinates (same frame as lens_x_arcsec); null if "
                  f"n_images < {k}"),
        OutColumn(f"image{k}_y_arcsec", "float64", "arcsec", f"y of image {k}"),
        OutColumn(f"image{k}_mu", "float64", "", f"signed point magnification of image {k} "
                  "(negative: saddle-point image)"))],
    OutColumn("image_sep_max_arcsec", "float64", "arcsec", "largest separation between two "
              "images (0 for one image); null for controls"),
    OutColumn("lens_resolved", "bool", "", "LensPop resolution test: n_images >= 2 and "
              "b_fac theta_E^2 >= (r_fac src_reff)^2 + FWHM^2 in the best-seeing band "
              "(docs/metrics.md); null for controls"),
    OutColumn("arc_like", "bool", "", "lens_resolved and mu_total x src_reff > FWHM "
              "(LensPop tangential-stretch test, docs/metrics.md); null for controls"),
    OutColumn("arc_shot_noise", "bool", "", "true when the arc's Poisson noise was added to "
              "image (docs/injection.md); arc stays noiseless; invvar unchanged"),
    *_band_cols("arc_gain", "float64", "electron/nanomaggy", "effective coadd gain used for "
                "the arc shot noise in band {b} (null when no noise was added)"),
    OutColumn("arc_gain_source", "string", "", "inputs of arc_gain_<b>: 'conf_typical' "
              "(conf/injection.toml [shot_noise] nexp x exptime x 10^(0.4 (zpt - 22.5))); "
              "null when no noise was added"),
    *_band_cols("arc_flux", "float64", "nanomaggy", "sum of the PSF-convolved arc model over "
                "the stamp in band {b} (0 for controls)"),
    OutColumn("render_n_refined_pix", "int32", "", "canvas pixels integrated adaptively by the "
              "renderer (0 for controls)"),
    # ---- source model (issue 15): smooth Sersic or Sersic disc + clumps (lensing.clumps)
    OutColumn("source_model", "string", "", "sersic | clumpy: this task's source model "
              "(InjectionConfig.source_model_for its tier)"),
    OutColumn("n_clumps", "int32", "", "clumps of the source (0 for sersic or a non-clumpy "
              "draw; null for controls)"),
    *_band_cols("clump_flux_frac", "float64", "", "fraction of the source's intrinsic band-{b} "
                "flux carried by its clumps (0 without clumps; null for controls)"),
    OutColumn("clumps_json", "string", "", "every clump parameter: JSON list of {dx, dy "
              "[arcsec, from the source centre], r_e [arcsec, circular Gaussian], flux_frac "
              "{band: fraction}} (exact float round-trip); '[]' without clumps; null for controls"),
    *_metric_columns(),
    *_band_cols("n_nonfinite_image", "int32", "", "stamp pixels with a non-finite image-{b} "
                "value (masked: image 0, invvar 0)"),
    *_band_cols("n_nonfinite_invvar", "int32", "", "stamp pixels with a non-finite invvar-{b} "
                "value (masked: invvar 0)"),
    OutColumn("maskbits_available", "bool", "", "false when the maskbits file is missing"),
    OutColumn("code_version", "string", "", "package version, source hash and git commit "
              "(injection_pipeline.provenance.code_version)"),
    OutColumn("injection_config_sha", "string", "", "blake2b-64 of the 4c settings "
              "(InjectionConfig.hashed_dict)"),
    OutColumn("cache_marker_sha", "string", "", "blake2b-64 of the brick's _SUCCESS marker "
              "(which cached files were used)"),
])

#: stamp planes (stamps dataset only): raw little-endian C-order bytes; see stamps_io
STAMP_COLUMNS: tuple[OutColumn, ...] = (
    OutColumn("image", "binary", "nanomaggy/pixel", "injected image, float32 (B, N, N), B = "
              "len(bands) in the order of `bands`"),
    OutColumn("arc", "binary", "nanomaggy/pixel", "arc model alone (PSF-convolved), float32 "
              "(B, N, N); zeros for controls; original = image - arc"),
    OutColumn("invvar", "binary", "1/nanomaggy^2", "invvar cutout, float32 (B, N, N) (0 where "
              "masked); null with --no-store-invvar-maskbits"),
    OutColumn("maskbits", "binary", "", "DR10 MASKBITS cutout, int32 (N, N); null if the file "
              "is missing or with --no-store-invvar-maskbits"),
)
RESULT_COLUMN_NAMES = tuple(c.name for c in RESULT_COLUMNS)
STAMP_COLUMN_NAMES = tuple(c.name for c in STAMP_COLUMNS)
#: byte layout of each stamp plane in the binary columns (little-endian, C order)
STAMP_DTYPES: dict = {name: np.dtype("<i4") if name == "maskbits" else np.dtype("<f4")
                      for name in STAMP_COLUMN_NAMES}

_ARROW = {"string": "string", "int32": "int32", "int64": "int64", "float64": "float64",
          "bool": "bool_", "binary": "binary", "int8": "int8", "int16": "int16"}


def output_arrow_schema(with_stamps: bool):
    """pyarrow schema of 4c's output rows: manifest columns + RESULT_COLUMNS (+ STAMP_COLUMNS)."""
    import pyarrow as pa

    from injection_pipeline import manifests as mf

    fields = [pa.field(f.name, f.type, nullable=True) for f in mf.manifest_schema()]
    extra = list(RESULT_COLUMNS) + (list(STAMP_COLUMNS) if with_stamps else [])
    fields += [pa.field(c.name, getattr(pa, _ARROW[c.type])(), nullable=True) for c in extra]
    return pa.schema(fields)


# =========================================================================== brick sources
class BrickUnavailable(Exception):
    """The whole brick cannot be used: ``status`` (missing_brick | corrupt_file | error)."""

    def __init__(self, status: str, reason: str):
        super().__init__(f"{status}: {reason}")
        self.status = status
        self.reason = reason

    def __reduce__(self):
        return (self.__class__, (self.status, self.reason))


class BrickSource:
    """Interface of the planes of one brick used by :func:`inject_task`.

    Attributes: ``brickname``, ``shape`` (ny, nx), ``wcs`` (astropy), ``bands`` (bands with
    image AND invvar), ``maskbits_state`` ("ok" | "missing" | "corrupt") and
    ``maskbits_reason``, ``psfsize_reason`` (band -> None if the map is usable, else why not),
    ``table_psf`` (band -> survey-bricks psfsize_<band> or None), ``marker_sha``.
    ``read(product, band, rows, cols)`` returns a native float32/int32 array or raises
    ``dr10.DR10FileError``.
    """

    brickname: str
    shape: tuple
    wcs: Any
    bands: tuple
    maskbits_state: str = "ok"
    maskbits_reason: str = ""
    marker_sha: Optional[str] = None

    def __init__(self):
        self.psfsize_reason: dict = {}
        self.table_psf: dict = {}
        self._median: dict = {}
        self._stored_median: dict = {}      # band -> (fwhm, (min, max)) from a 4b marker

    def read(self, product: str, band: Optional[str], rows: slice, cols: slice) -> np.ndarray:
        raise NotImplementedError

    def prefetch(self, regions: Mapping) -> int:
        """Warm a read cache for ``regions`` ({(product, band): [(rows, cols), ...]}) before
        the per-task loop; returns the number of tiles decoded.  No cache here: 0."""
        return 0

    def fetch_tiles(self, regions: Mapping) -> None:
        """Fetch the stored bytes ``regions`` need, without decoding them (a brick opened
        ahead of its turn, stage 4c's look-ahead).  Nothing to fetch here."""
        return None

    def describe(self, message: str) -> str:
        """``message`` with local temporary paths replaced by the cache URIs (deterministic
        status reasons whatever the temp directory)."""
        for local, uri in getattr(self, "_uri_of", {}).items():
            message = message.replace(local, uri)
        return message

    def psf_median(self, band: str, min_fwhm=MIN_FWHM_ARCSEC, max_fwhm=MAX_FWHM_ARCSEC):
        """Brick median of valid psfsize-<band> pixels (``psf_fallback.brick_median_fwhm``,
        cached).  A usable map whose 4b marker recorded the median for the same valid range
        (:class:`CachedBrick`) gives that value, identical to the computed one, without
        reading the plane; otherwise the whole plane is read once."""
        if band not in self._median:
            stored = self._stored_median.get(band)
            if self.psfsize_reason.get(band, "absent") is not None:
                self._median[band] = None
            elif stored is not None and stored[1] == (float(min_fwhm), float(max_fwhm)):
                self._median[band] = stored[0]
            else:
                ny, nx = self.shape
                try:
                    plane = self.read("psfsize", band, slice(0, ny), slice(0, nx))
                    self._median[band] = brick_median_fwhm(plane, min_fwhm, max_fwhm)
                except dr10.DR10FileError as exc:
                    self.psfsize_reason[band] = f"corrupt: {self.describe(str(exc))}"
                    self._median[band] = None
        return self._median[band]


class ArrayBrick(BrickSource):
    """A brick held in memory: ``planes[(product, band)] = array`` (maskbits band None).

    A missing key means that file is absent.  ``wcs`` defaults to a DR10 TAN WCS centred on
    (``ra_c``, ``dec_c``) with the planes' shape.  For unit tests and notebooks.
    """

    def __init__(self, brickname: str, planes: Mapping, *, wcs=None, ra_c: float = 150.0,
                 dec_c: float = 2.0, table_psf: Optional[Mapping] = None,
                 marker_sha: Optional[str] = None):
        super().__init__()
        self.brickname = brickname
        self.planes = dict(planes)
        shapes = {np.shape(a) for a in self.planes.values()}
        if len(shapes) != 1:
            raise ValueError(f"planes of different shapes: {shapes}")
        self.shape = shapes.pop()
        self.wcs = wcs if wcs is not None else dr10.brick_wcs(ra_c, dec_c, self.shape[0])
        self.bands = tuple(b for b in BANDS if ("image", b) in self.planes
                           and ("invvar", b) in self.planes)
        self.maskbits_state = "ok" if ("maskbits", None) in self.planes else "missing"
        self.maskbits_reason = "" if self.maskbits_state == "ok" else "maskbits plane absent"
        self.psfsize_reason = {b: (None if ("psfsize", b) in self.planes else "absent")
                               for b in BANDS}
        self.table_psf = dict(table_psf or {})
        self.marker_sha = marker_sha

    def read(self, product, band, rows, cols):
        a = self.planes[(product, band)]
        return np.asarray(a[rows, cols])


class CachedBrick(BrickSource):
    """A brick of the 4b coadd cache ``<cache_root>/<brickname>/`` (local path or s3://).

    Opening (:meth:`open`): GET ``_SUCCESS`` (absent -> ``missing_brick``), then fetch the
    needed files (image/invvar of the bands, maskbits, psfsize of the bands if the maps are
    used): local files are read in place; S3 objects are downloaded with
    ``storage.download_to_temp`` (``/dev/shm`` when available) and symlinked under their DR10
    names into a temporary directory so that ``dr10.BrickPlanes`` reads them (fitsio: only
    the compression tiles a cutout touches are decompressed).  Every fetched file's headers
    are validated once (``dr10.inspect_plane``): a corrupt/truncated image or invvar ->
    ``corrupt_file`` for the whole brick; maskbits absent -> injected without mask metrics,
    corrupt -> ``corrupt_file``; psfsize absent or corrupt -> PSF fallback.  All temporary
    files are removed on :meth:`close`.  Range reads (``fetch`` "range" / "auto", S3) fetch
    only the needed tiles' bytes instead and keep them in memory: each tile is decoded from
    them once (:mod:`injection_pipeline.tile_codec`, bit-identical to fitsio; no temporary
    file, no symlink, no FITS open); a plane whose compression layout the codec does not
    decode gets a sparse local file read by fitsio.  Their heads come from the brick's
    ``_HEADS`` object (one GET for all files, :mod:`injection_pipeline.brick_heads`) when
    ``_SUCCESS`` describes one, else from one GET per file; an object deleted or replaced
    after 4b is then found by its first tile GET (the plane's reads fail: ``corrupt_file``,
    or the PSF fallback for psfsize).
    """

    def __init__(self):
        super().__init__()
        self._stack = contextlib.ExitStack()
        self._planes: Optional[dr10.BrickPlanes] = None
        self._sparse: dict = {}            # (product, band) -> tile_ranges.SparsePlane
        self._range_error: dict = {}       # (product, band) -> why its tiles are unusable
        self.fetch = "whole"
        self.fetch_auto_fraction = 0.5
        self.range_merge_gap = 64 * 1024
        #: range reads: files whose head came from the brick's heads object / from their
        #: own GET, and why the heads object was not used (None when it was, or no range reads)
        self.heads_from_index = 0
        self.head_gets = 0
        self.heads_note: Optional[str] = None
        self._meta_bytes = 0                # _SUCCESS + _HEADS bytes read (bytes_fetched)
        self.download_threads = 4
        self._heads_get = None              # a Future of the _HEADS GET started with _SUCCESS's

    @classmethod
    def open(cls, cache_root: str, brickname: str, bands: Sequence[str] = BANDS, *,
             use_psfsize_maps: bool = True, table_psf: Optional[Mapping] = None,
             storage_obj=None, download_threads: int = 4, fetch: str = "whole",
             fetch_auto_fraction: float = 0.5,
             range_merge_gap: int = 64 * 1024) -> "CachedBrick":
        """``fetch`` (S3 caches; local files are always read in place): "whole" downloads
        each needed file; "range" fetches the headers and table rows, then only the
        compression tiles the stamps touch (:mod:`injection_pipeline.tile_ranges`); "auto"
        does that, but takes a plane whole when its stamps need more than
        ``fetch_auto_fraction`` of its tile bytes."""
        from injection_pipeline import storage as st

        if fetch not in ("whole", "range", "auto"):
            raise ValueError(f"fetch must be 'whole', 'range' or 'auto', got {fetch!r}")
        s = storage_obj or st.default_storage()
        self = cls()
        self.fetch = fetch
        self.fetch_auto_fraction = float(fetch_auto_fraction)
        self.range_merge_gap = int(range_merge_gap)
        self.brickname = dr10.validate_brickname(brickname)
        self.table_psf = dict(table_psf or {})
        try:
            self.download_threads = max(1, int(download_threads))
            self._open(s, cache_root, bands, use_psfsize_maps)
        except BaseException:
            self.close()
            raise
        return self

    def _open(self, s, cache_root, bands, use_maps):
        from injection_pipeline import coadd_cache
        from injection_pipeline import storage as st

        threads = self.download_threads

        bdir = st.join_uri(cache_root, self.brickname)
        marker_uri = st.join_uri(bdir, dr10.SUCCESS_MARKER)
        if self.fetch in ("range", "auto") and st.is_s3_uri(bdir) and threads > 1:
            # the heads object's GET overlaps the marker's (one S3 latency less per brick);
            # it is used only if the marker then describes it (_load_heads)
            from injection_pipeline import brick_heads, tile_ranges
            self._heads_get = tile_ranges.process_pool("brick-fetch", threads).submit(
                s.get_bytes, st.join_uri(bdir, brick_heads.HEADS_NAME))
        try:
            marker = s.get_bytes(marker_uri)
            self._meta_bytes += len(marker)
        except st.StorageNotFound:
            raise BrickUnavailable("missing_brick", f"brick not in the cache: no {marker_uri}")
        doc = coadd_cache.parse_json(marker)
        problems = coadd_cache.validate_success(doc, self.brickname)
        if problems:  # the 4b contract: cached iff _SUCCESS is valid and lists all 10 files
            raise BrickUnavailable("missing_brick", f"brick not in the cache: invalid "
                                   f"{marker_uri}: {'; '.join(problems[:3])}")
        self.marker_sha = hashlib.blake2b(marker, digest_size=8).hexdigest()
        wanted = [("image", b) for b in bands] + [("invvar", b) for b in bands]
        wanted += [("maskbits", None)]
        if use_maps:
            wanted += [("psfsize", b) for b in bands]
        names = {k: dr10.product_filename(self.brickname, *k) for k in wanted}
        paths, missing = self._fetch(s, bdir, names, threads, doc)
        req_missing = [names[k] for k in wanted if k[0] in ("image", "invvar") and k in missing]
        if req_missing:
            raise BrickUnavailable("missing_brick", f"{bdir}: _SUCCESS present but required "
                                   f"file(s) absent: {', '.join(req_missing)}")
        # psfsize brick medians recorded by 4b (docs/cache.md): used by psf_median only if
        # well formed and the fetched file has the recorded size (the object 4b measured)
        for k in wanted:
            if k[0] == "psfsize" and k in paths:
                e = doc["files"][names[k]]
                pm = coadd_cache.stored_psf_median(e)
                if pm is not None and self._object_size(k, paths) == e["size"]:
                    self._stored_median[k[1]] = (pm[0], pm[2])
        # planes held in memory (range reads, tile_codec) have no path; the others are files
        files = {k: p for k, p in paths.items() if p is not None}
        first = next(iter(files.values()), None)
        if first is None:
            directory = None
        elif st.parse_uri(bdir).scheme == "file" and all(
                os.path.dirname(p) == os.path.dirname(first) for p in files.values()):
            directory = os.path.dirname(first)
        else:  # symlink farm with DR10 names next to the downloaded temporaries
            parent = os.path.dirname(first)
            directory = tempfile.mkdtemp(
                prefix=st.temp_name_prefix("4c-", parent) + f"{self.brickname}-", dir=parent)
            self._stack.callback(shutil.rmtree, directory, True)
            for k, p in files.items():
                os.symlink(p, os.path.join(directory, names[k]))
        self._uri_of = {os.path.join(directory, names[k]): st.join_uri(bdir, names[k])
                        for k in files}
        self._uri_of.update({p: st.join_uri(bdir, names[k]) for k, p in files.items()})
        # tile cache: each compression tile is decompressed once per brick opening (paired
        # controls and neighbouring targets share tiles); docs/performance.md
        # the heads the range reads parsed (headers and tile table) are not parsed again
        self._planes = dr10.BrickPlanes(
            directory, self.brickname, size=None, cache_tiles=True,
            heads={names[k]: sp.parsed_head for k, sp in self._sparse.items() if k in paths},
            decoders={k: (sp.uri, sp.decode_tile) for k, sp in self._sparse.items()
                      if k in paths and paths[k] is None})
        # the required files must be the objects 4b cached: sizes against _SUCCESS (a stat, no
        # read); an image/invvar/maskbits file replaced after 4b is corrupt_file.  (A psfsize
        # map of another size stays usable; only its recorded brick median is not used:
        # psf_median recomputes it from the plane, tests/test_psf_median_marker.py.)
        for k in wanted:
            if k not in paths or k[0] == "psfsize":
                continue
            recorded = doc["files"][names[k]].get("size")
            actual = self._object_size(k, paths)
            if recorded is not None and int(recorded) != actual:
                raise BrickUnavailable(
                    "corrupt_file", f"{st.join_uri(bdir, names[k])}: {actual} bytes, but the "
                    f"brick's {dr10.SUCCESS_MARKER} records {recorded}: replaced after 4b "
                    f"cached it")
        # validate headers once; required products first
        shape = None
        for k in wanted:
            if k in missing:
                continue
            try:
                info = self._planes.info(*k)
            except (dr10.DR10FileError, OSError, ValueError) as exc:
                if k[0] in ("image", "invvar", "maskbits"):
                    raise BrickUnavailable("corrupt_file", self.describe(str(exc))) from None
                self.psfsize_reason[k[1]] = f"corrupt: {self.describe(str(exc))}"
                continue
            if shape is None:
                shape = tuple(info.shape)
            elif tuple(info.shape) != shape:
                msg = f"{names[k]}: shape {tuple(info.shape)} != {shape} of the other planes"
                if k[0] == "psfsize":
                    self.psfsize_reason[k[1]] = f"corrupt: {msg}"
                    continue
                raise BrickUnavailable("corrupt_file", msg)
            if k[0] == "psfsize":
                self.psfsize_reason[k[1]] = None
        for b in bands:
            if use_maps and ("psfsize", b) in missing:
                self.psfsize_reason[b] = "file absent from the cache"
            elif not use_maps:
                self.psfsize_reason[b] = "maps not used"
        if ("maskbits", None) in missing:
            self.maskbits_state = "missing"
            self.maskbits_reason = f"{names[('maskbits', None)]} absent from the cache"
        self.shape = shape
        self.bands = tuple(bands)
        try:
            self.wcs = self._planes.info("image", bands[0]).wcs()
        except Exception as exc:  # noqa: BLE001 - a header without a usable WCS
            raise BrickUnavailable("corrupt_file", f"image-{bands[0]} header WCS: {exc}") from None
        _check_wcs_scale(self.wcs, names[("image", bands[0])])

    def _object_size(self, k, paths) -> int:
        """Bytes of plane ``k``'s object: its local file's size, or the object size a plane
        held in memory records (range reads)."""
        if paths[k] is None:
            return self._sparse[k].size
        return os.path.getsize(paths[k])

    def prefetch(self, regions: Mapping) -> int:
        """Fetch (:meth:`fetch_tiles`) and decompress, plane by plane in file order, the tiles
        ``regions`` touch ({(product, band): [(rows, cols), ...]}) before the per-task loop, so
        that the loop only assembles cutouts from cached tiles (decompression no longer
        interleaves with rendering); returns the tiles decompressed.  Never raises but for
        transient faults: unreadable tiles are reported by the reads needing them."""
        if self._planes is None:
            return 0
        self.fetch_tiles(regions)
        return sum(self._planes.prefetch(p, b, r) for (p, b), r in regions.items())

    def fetch_tiles(self, regions: Mapping) -> None:
        """Range reads: GET the compressed bytes of the tiles ``regions`` touch, every plane
        at once, without decompressing them (what a brick opened ahead of its turn holds:
        ~0.5 MB at the shipped density).  Tiles already fetched are not fetched again; under
        ``fetch = "auto"`` a plane whose regions need more than ``fetch_auto_fraction`` of
        its tile bytes is fetched whole.  A no-op for planes read in place or downloaded
        whole.  Transient faults propagate; other failures make the plane unusable, reported
        by the reads that need it."""
        if self._planes is None:
            return
        jobs = []                             # range reads: every plane's tiles first, in one go
        for k, regs in regions.items():
            sp = self._sparse.get(k)
            if sp is None:
                continue
            tiles = sorted({t for r in regs for t in sp.tiles_for(*r)})
            if self.fetch == "auto" and \
                    sp.needed_bytes(tiles) > self.fetch_auto_fraction * sp.tile_bytes_total:
                tiles = range(sp.layout.n_tiles)          # dense: the whole plane
            jobs.append((k, tiles))

        def fetch(job):
            try:
                self._ensure(*job)
            except dr10.DR10FileError:
                pass                             # reported by the reads that need the plane
        # the planes' GETs overlap (one plane per thread, each plane's ranges on the
        # "range-get" pool): on S3, where a GET waits ~20-50 ms, ~13 GETs one plane after the
        # other would make a brick's wall time latency-bound.  Transient faults propagate.
        if len(jobs) > 1 and self.download_threads > 1:
            from injection_pipeline import tile_ranges
            list(tile_ranges.process_pool("brick-fetch", self.download_threads).map(fetch, jobs))
        else:
            for job in jobs:
                fetch(job)

    def _fetch(self, s, bdir, names, threads, doc=None):
        """Local paths (in place) or downloaded temporaries of the wanted files.  Range
        reads take each file's head from the brick's heads object when ``doc`` (the parsed
        ``_SUCCESS``) describes a usable one (:meth:`_load_heads`), else by its own GET."""
        from injection_pipeline import storage as st
        from injection_pipeline import tile_ranges

        ranged = self.fetch in ("range", "auto") and st.is_s3_uri(bdir)
        heads: dict = {}
        if ranged:
            heads, self.heads_note = self._load_heads(s, bdir, doc)

        def get(item):
            k, name = item
            if ranged:
                return self._open_sparse(s, st.join_uri(bdir, name), k, name, heads.get(name))
            cm = s.download_to_temp(st.join_uri(bdir, name))
            try:
                return k, cm, cm.__enter__(), None
            except BaseException as exc:  # noqa: BLE001 - sorted out below, after cleanup
                return k, None, None, exc

        items = list(names.items())
        # threads overlap GETs; with every head from _HEADS no GET is made here (the sparse
        # planes are only parsed and created), so the pool's hand-offs would be pure cost
        no_gets = ranged and all(name in heads for name in names.values())
        if threads > 1 and st.is_s3_uri(bdir) and not no_gets:
            results = list(tile_ranges.process_pool("brick-fetch", threads).map(get, items))
        else:
            results = [get(it) for it in items]
        paths, missing, errors = {}, set(), []
        for k, cm, path, exc in results:
            if cm is not None:
                self._stack.push(cm.__exit__)   # removed on close, whatever happens next
                paths[k] = path
            elif isinstance(exc, st.StorageNotFound):
                missing.add(k)
            else:
                errors.append(exc)
        if errors:   # a transient fault first: it must reach Spark's task retry
            raise next((e for e in errors if st.is_transient(e)), errors[0])
        if ranged:
            self.heads_from_index = sum(sp.expected_size is not None
                                        for sp in self._sparse.values())
            self.head_gets = len(items) - self.heads_from_index
        return paths, missing

    def _load_heads(self, s, bdir, doc) -> tuple[dict, Optional[str]]:
        """({file name: (head bytes, object size)}, None) from ``<brick>/_HEADS`` (one GET),
        or ({}, why not): no ``heads`` entry in ``_SUCCESS`` (an older 4b), a malformed one,
        the object absent or not the one ``_SUCCESS`` describes.  Transient faults
        propagate (Spark retries the task)."""
        from injection_pipeline import brick_heads
        from injection_pipeline import storage as st

        pending, self._heads_get = self._heads_get, None
        try:
            entry = brick_heads.entry(doc, dr10.brick_filenames(self.brickname))
            blob = pending.result() if pending is not None else \
                s.get_bytes(st.join_uri(bdir, brick_heads.HEADS_NAME))
            self._meta_bytes += len(blob)
            return brick_heads.unpack(blob, entry), None
        except brick_heads.HeadsUnusable as exc:
            return {}, str(exc)
        except st.StorageError as exc:
            if st.is_transient(exc):
                raise
            return {}, f"{brick_heads.HEADS_NAME}: {type(exc).__name__}: {exc}"

    def _open_sparse(self, s, uri, k, name, head=None):
        """(k, cleanup context, local sparse path or None for a plane held in memory, None)
        or (k, None, None, exception).  ``head``: (head bytes, object size) from the heads
        object, or None (its own GET)."""
        from injection_pipeline import storage as st
        from injection_pipeline import tile_codec, tile_ranges

        cm = contextlib.ExitStack()
        try:
            sp = tile_ranges.SparsePlane(
                s, uri, None, merge_gap=self.range_merge_gap,
                head=head[0] if head else None, size=head[1] if head else None)
            try:
                sp.codec()            # decoded in memory (tile_codec): no file, no FITS open
                path = None
            except (tile_codec.UnsupportedTiles, KeyError, ValueError, TypeError):
                # a layout the codec does not decode (or a header it cannot read): a sparse
                # file for fitsio, which reads it, or reports what is wrong with it
                d = s.temp_dir()              # where download_to_temp puts its files
                fd, path = tempfile.mkstemp(prefix=st.temp_name_prefix("dl-", d),
                                            suffix="-" + name, dir=d)
                os.close(fd)
                cm.callback(tile_ranges.remove_quietly, path)
                sp.to_file(path)
            self._sparse[k] = sp
        except dr10.DR10FileError:
            # not a tile-compressed object (or corrupt): take it whole; the header check
            # that follows reports what is wrong with it
            cm.close()
            cm = s.download_to_temp(uri)
            try:
                return k, cm, cm.__enter__(), None
            except BaseException as exc:  # noqa: BLE001
                return k, None, None, exc
        except BaseException as exc:  # noqa: BLE001 - sorted out by _fetch, after cleanup
            cm.close()
            return k, None, None, exc
        return k, cm, path, None

    def _ensure(self, k, tiles) -> None:
        """Fetch ``tiles`` of plane ``k`` if it is sparse.  Transient faults propagate; any
        other failure makes the plane unusable (its reads raise DR10FileError, i.e. the
        tasks reading it get corrupt_file)."""
        sp = self._sparse.get(k)
        if sp is None:
            return
        if k in self._range_error:
            raise dr10.DR10FileError(self._range_error[k])
        from injection_pipeline.storage import is_transient
        try:
            sp.ensure_tiles(tiles)
        except Exception as exc:  # noqa: BLE001
            if is_transient(exc):
                raise
            self._range_error[k] = f"{sp.uri}: range read failed: {type(exc).__name__}: {exc}"
            raise dr10.DR10FileError(self._range_error[k]) from None

    @property
    def bytes_fetched(self) -> Optional[int]:
        """Bytes read from storage by range reads, the brick's ``_SUCCESS`` and ``_HEADS``
        included (None when files were taken whole)."""
        if not self._sparse:
            return None
        return int(sum(sp.bytes_fetched for sp in self._sparse.values()) + self._meta_bytes)

    def read(self, product, band, rows, cols):
        sp = self._sparse.get((product, band))
        if sp is not None:
            self._ensure((product, band), sp.tiles_for(rows, cols))
        return self._planes.read(product, band, rows, cols).data

    def close(self):
        pending, self._heads_get = self._heads_get, None
        if pending is not None and not pending.cancel():
            pending.exception()          # e.g. the marker was absent: wait for, drop the GET
        if self._planes is not None:
            self._planes.close()
            self._planes = None
        for sp in self._sparse.values():       # in-memory tile bytes (up to whole planes)
            if sp.path is None:
                sp.release()
        self._stack.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _check_wcs_scale(wcs, label: str, pixscale: float = dr10.PIXSCALE_ARCSEC) -> None:
    """The stamp grid assumes 0.262"/px: refuse a WCS with another scale (corrupt header)."""
    try:
        cd = np.asarray(wcs.wcs.cd if wcs.wcs.has_cd() else wcs.pixel_scale_matrix, float)
        scale = math.sqrt(abs(np.linalg.det(cd))) * 3600.0
    except Exception as exc:  # noqa: BLE001
        raise BrickUnavailable("corrupt_file", f"{label}: unusable WCS ({exc})") from None
    if not (abs(scale / pixscale - 1.0) < 1e-4):
        raise BrickUnavailable("corrupt_file", f"{label}: WCS pixel scale {scale:.6f}\"/px, "
                               f"expected {pixscale}\"/px")


# =========================================================================== one task
@dataclass
class TaskResult:
    """One output row (manifest columns + RESULT_COLUMNS) and the stamps (or None).

    ``stamps``: ``image``, ``arc``, ``invvar`` float32 (B, N, N), ``maskbits`` int32 (N, N)
    (None when unavailable); ``arrays64`` (only with ``keep_float64=True``): the float64
    ``original`` (cleaned), ``arc`` and ``image`` planes before the float32 cast.
    """

    row: dict
    stamps: Optional[dict] = None
    arrays64: Optional[dict] = None

    @property
    def status(self) -> str:
        return self.row["status"]


class _TaskError(Exception):
    def __init__(self, status: str, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


def _base_row(task: Mapping, cfg: InjectionConfig) -> dict:
    row = dict(task)
    for c in RESULT_COLUMN_NAMES:
        row.setdefault(c, None)
    row["psf_model"] = cfg.psf_model
    row["moffat_beta"] = float(cfg.moffat_beta) if cfg.psf_model == "moffat" else None
    row["psf_match"] = PSF_MATCH[cfg.psf_model]
    row["source_model"] = cfg.source_model_for(task.get("tier"))
    row["code_version"] = cfg.code_version
    row["injection_config_sha"] = cfg.config_sha()
    return row


def failed_result(task: Mapping, cfg: InjectionConfig, status: str, reason: str,
                  marker_sha: Optional[str] = None) -> TaskResult:
    """The output row of a task that could not be processed (no stamps, metrics null)."""
    if status not in STATUSES:
        raise ValueError(f"unknown status {status!r}")
    row = _base_row(task, cfg)
    row["status"], row["status_reason"] = status, reason
    row["cache_marker_sha"] = marker_sha
    return TaskResult(row, None)


def _finite(task, key) -> float:
    v = task.get(key)
    if v is None or not isinstance(v, (int, float, np.floating, np.integer)) \
            or not math.isfinite(float(v)):
        raise _TaskError("invalid_task", f"{key} = {v!r}: a finite number is required")
    return float(v)


def _task_bands(task: Mapping) -> tuple:
    bands = str(task.get("bands") or "")
    if not bands or any(b not in BANDS for b in bands) or len(set(bands)) != len(bands):
        raise _TaskError("invalid_task", f"bands = {task.get('bands')!r}: expected distinct "
                         f"letters of {''.join(BANDS)}")
    return tuple(bands)


def render_keywords(cfg: InjectionConfig) -> dict:
    """The keywords of ``lensing.render_lensed_arc`` that come from the 4c config (pixel scale,
    PSF model, Moffat beta, supersampling, PSF oversampling): the one mapping, shared by the
    per-task injection and the benchmarks that time it."""
    return dict(pixscale=cfg.pixscale, psf_model=cfg.psf_model, moffat_beta=cfg.moffat_beta,
                supersample=cfg.supersample, psf_oversample=cfg.psf_oversample)


def _models(task: Mapping, bands: Sequence[str], lens_x: float, lens_y: float):
    """LensModel, SersicSource and magnitudes from the manifest (nothing is re-drawn)."""
    theta_e = _finite(task, "theta_e_arcsec")
    shear, shear_phi = _finite(task, "shear"), _finite(task, "shear_phi_rad")
    g1, g2 = shear * math.cos(2 * shear_phi), shear * math.sin(2 * shear_phi)
    for key, val in (("shear_g1", g1), ("shear_g2", g2)):
        m = task.get(key)
        if m is not None and not abs(float(m) - val) <= SHEAR_ABS_TOL:
            raise _TaskError("invalid_task", f"{key} = {m!r} disagrees with shear "
                             f"(cos, sin)(2 shear_phi_rad) = {val!r}")
    mags = {}
    for b in bands:
        mag = _finite(task, f"src_mag_{b}")
        fl = task.get(f"src_flux_{b}")
        if fl is not None and not abs(float(fl) / mag_to_nMgy(mag) - 1.0) <= FLUX_REL_TOL:
            raise _TaskError("invalid_task", f"src_flux_{b} = {fl!r} nMgy disagrees with "
                             f"mag_to_nMgy(src_mag_{b} = {mag!r}) = {mag_to_nMgy(mag)!r}")
        mags[b] = mag
    try:
        lens = LensModel(theta_e=theta_e, q=_finite(task, "lens_q"),
                         phi=_finite(task, "lens_phi_rad"), x0=lens_x, y0=lens_y,
                         gamma1=g1, gamma2=g2)
        source = SersicSource(dx=_finite(task, "src_x_arcsec"), dy=_finite(task, "src_y_arcsec"),
                              r_e=_finite(task, "src_reff_arcsec"), n=_finite(task, "src_n"),
                              q=_finite(task, "src_q"), phi=_finite(task, "src_phi_rad"))
    except ValueError as exc:
        raise _TaskError("invalid_task", str(exc)) from None
    return lens, source, mags


def _source_model(task: Mapping, disc, bands, cfg: InjectionConfig, row: dict):
    """The source model of a task (issue 15), recording every clump parameter in ``row``:
    the manifest's Sersic itself, or (source_model = "clumpy") that Sersic as the disc of a
    ClumpySource whose clumps come only from ``task_seed64`` (lensing.clumps)."""
    clumps = ()
    if cfg.source_model_for(task.get("tier")) == "clumpy":
        seed = task.get("task_seed64")
        if seed is None:
            raise _TaskError("invalid_task", "source_model clumpy needs task_seed64")
        try:
            clumps = draw_clumps(cfg.clump_model, disc, bands, int(seed))
        except ValueError as exc:
            raise _TaskError("invalid_task", f"clumps: {exc}") from None
    row["n_clumps"] = len(clumps)
    for b in bands:
        row[f"clump_flux_frac_{b}"] = float(sum(c.flux_frac[b] for c in clumps))
    row["clumps_json"] = json.dumps(clumps_to_records(clumps))
    return ClumpySource(disc, clumps) if clumps else disc


def inject_task(task: Mapping, brick: BrickSource, cfg: InjectionConfig, *,
                pixel: Optional[tuple] = None, keep_float64: bool = False) -> TaskResult:
    """Cut, render, add and measure one task; never raises for a task-level problem.

    ``task``: manifest row (dict); ``brick``: its brick's planes; ``pixel``: precomputed
    (x, y) brick pixel of (ra, dec) (else computed from ``brick.wcs``).  Returns a
    :class:`TaskResult` whose row has every manifest column plus :data:`RESULT_COLUMNS`.
    """
    geometry: dict = {}
    try:
        return _inject(task, brick, cfg, pixel, keep_float64, geometry)
    except _TaskError as exc:
        res = failed_result(task, cfg, exc.status, exc.reason, brick.marker_sha)
    except dr10.DR10FileError as exc:
        res = failed_result(task, cfg, "corrupt_file", brick.describe(str(exc)),
                            brick.marker_sha)
    except Exception as exc:  # noqa: BLE001 - becomes status=error with the reason, counted
        from injection_pipeline.storage import is_transient
        if is_transient(exc):      # a range read of the brick's tiles: Spark retries the task
            raise
        tb = traceback.extract_tb(exc.__traceback__)
        where = f" at {os.path.basename(tb[-1].filename)}:{tb[-1].lineno}" if tb else ""
        res = failed_result(task, cfg, "error", f"{type(exc).__name__}: {exc}{where}",
                            brick.marker_sha)
    res.row.update(geometry)      # where the stamp would have been (e.g. off_brick)
    return res


_GEOMETRY_KEYS = ("target_x_pix", "target_y_pix", "stamp_x0", "stamp_y0", "lens_x_arcsec",
                  "lens_y_arcsec")


def _inject(task, brick, cfg, pixel, keep_float64, geometry):
    row = _base_row(task, cfg)
    row["cache_marker_sha"] = brick.marker_sha
    notes = []
    bands = _task_bands(task)
    absent = [b for b in bands if b not in brick.bands]
    if absent:
        raise _TaskError("missing_brick", f"band(s) {absent} have no image/invvar in brick "
                         f"{brick.brickname}")
    n = task.get("stamp_size_px")
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise _TaskError("invalid_task", f"stamp_size_px = {n!r}")
    n = int(n)
    is_control = task.get("is_control")
    if is_control not in (0, 1, True, False):
        raise _TaskError("invalid_task", f"is_control = {is_control!r}")
    if task.get("brickname") not in (None, brick.brickname):
        raise _TaskError("invalid_task", f"task brick {task.get('brickname')!r} != opened "
                         f"brick {brick.brickname!r}")
    if brick.maskbits_state == "missing" and cfg.on_missing_maskbits == "skip":
        raise _TaskError("missing_maskbits", brick.maskbits_reason)

    # ---- geometry: target pixel from the WCS, whole-pixel cut, exact sub-pixel lens centre
    if pixel is None:
        px, py = dr10.radec_to_brick_pixel(brick.wcs, _finite(task, "ra"), _finite(task, "dec"))
        pixel = (float(px), float(py))
    px, py = float(pixel[0]), float(pixel[1])
    if not (math.isfinite(px) and math.isfinite(py)):
        raise _TaskError("invalid_task", f"(ra, dec) = ({task.get('ra')}, {task.get('dec')}) "
                         f"has no pixel position in brick {brick.brickname}")
    row["target_x_pix"], row["target_y_pix"] = px, py
    ny, nx = brick.shape
    if not (-1e6 < px < 1e6 and -1e6 < py < 1e6):
        raise _TaskError("off_brick", f"target pixel ({px:.1f}, {py:.1f}) far outside the "
                         f"{nx}x{ny} brick")
    x0, y0 = dr10.cutout_origin(px, py, n)
    row["stamp_x0"], row["stamp_y0"] = x0, y0
    half = 0.5 * (n - 1)
    row["lens_x_arcsec"] = (px - x0 - half) * cfg.pixscale
    row["lens_y_arcsec"] = (py - y0 - half) * cfg.pixscale
    geometry.update({k: row[k] for k in _GEOMETRY_KEYS})
    window = stamp_window(x0, y0, n, brick.shape)
    if window is None:
        raise _TaskError("off_brick", f"{n}x{n} stamp at brick pixels x {x0}:{x0 + n}, "
                         f"y {y0}:{y0 + n} runs off the {nx}x{ny} brick (target at "
                         f"({px:.2f}, {py:.2f})); stamps are never shifted or padded")
    (rows, cols), centre_pixel = window

    # ---- pixels (float64 for the arithmetic), non-finite masked and counted
    img = np.empty((len(bands), n, n), np.float64)
    ivar = np.empty((len(bands), n, n), np.float64)
    nonfinite = []
    for i, b in enumerate(bands):
        im, iv = img[i], ivar[i]               # views: filled in place (float32 -> float64)
        im[...] = brick.read("image", b, rows, cols)
        iv[...] = brick.read("invvar", b, rows, cols)
        n_im = n_iv = 0
        if not (np.isfinite(im).all() and np.isfinite(iv).all()):
            bad_im, bad_iv = ~np.isfinite(im), ~np.isfinite(iv)
            n_im, n_iv = int(bad_im.sum()), int(bad_iv.sum())
            nonfinite.append(f"{b}: image {n_im}, invvar {n_iv}")
            im[bad_im] = 0.0
            iv[bad_im | bad_iv] = 0.0
        row[f"n_nonfinite_image_{b}"] = n_im
        row[f"n_nonfinite_invvar_{b}"] = n_iv
    if nonfinite:
        notes.append("non-finite pixels masked (image 0, invvar 0): " + "; ".join(nonfinite))
    maskbits = None
    if brick.maskbits_state == "ok":
        maskbits = brick.read("maskbits", None, rows, cols).astype(np.int32, copy=False)
    else:
        notes.append(f"maskbits unavailable ({brick.maskbits_reason}): metrics needing "
                     f"maskbits are null")
    row["maskbits_available"] = maskbits is not None

    # ---- PSF per band (centre -> brick median -> bricks table -> default)
    fwhm, psf_notes = {}, []
    for b in bands:
        centre = None
        reason = brick.psfsize_reason.get(b, "absent") if cfg.use_psfsize_maps else "not used"
        if cfg.use_psfsize_maps and reason is None:
            try:
                centre = float(brick.read("psfsize", b, *centre_pixel)[0, 0])
            except dr10.DR10FileError as exc:
                reason = f"corrupt: {brick.describe(str(exc))}"
        row[f"psfsize_centre_{b}"] = centre
        choice = resolve_fwhm(
            b, centre_value=centre, centre_unavailable_reason=reason or "",
            brick_median=(lambda b=b: brick.psf_median(b, cfg.psf_min_fwhm, cfg.psf_max_fwhm)),
            table_value=brick.table_psf.get(b), default=cfg.default_fwhm,
            use_maps=cfg.use_psfsize_maps, min_fwhm=cfg.psf_min_fwhm, max_fwhm=cfg.psf_max_fwhm)
        fwhm[b] = choice.fwhm
        row[f"psf_fwhm_used_{b}"] = choice.fwhm
        row[f"psf_source_{b}"] = choice.source
        if choice.note:
            psf_notes.append(f"{b}: {choice.note}")
    row["psf_note"] = " | ".join(psf_notes) if psf_notes else None

    # ---- the arc (controls: none, no render)
    arc = np.zeros_like(img)
    if int(is_control) == 1:
        row["render_n_refined_pix"] = 0
        for b in bands:
            row[f"arc_flux_{b}"] = 0.0
            if cfg.psf_model == "moffat":        # provenance: the kernel an arc would get
                row[f"moffat_alpha_{b}"] = moffat_nea_alpha(fwhm[b], cfg.moffat_beta,
                                                            cfg.pixscale)[0]
    else:
        lens, source, mags = _models(task, bands, row["lens_x_arcsec"], row["lens_y_arcsec"])
        source = _source_model(task, source, bands, cfg, row)
        try:
            res = render_lensed_arc(lens, source, mags, fwhm, n_pix=n, **render_keywords(cfg))
        except ValueError as exc:
            raise _TaskError("invalid_task", f"render_lensed_arc: {exc}") from None
        for i, b in enumerate(bands):
            arc[i] = res.images[b]
        if not np.all(np.isfinite(arc)):
            raise _TaskError("error", "renderer returned non-finite arc pixels")
        row["mu_total"] = float(res.mu_total)
        row.update(_point_images(task, lens, source, res.mu_total, fwhm, bands, cfg, notes))
        row["render_n_refined_pix"] = int(res.n_refined_pixels)
        for b, alpha in res.psf_alpha.items():
            row[f"moffat_alpha_{b}"] = float(alpha)
        for i, b in enumerate(bands):
            row[f"arc_flux_{b}"] = float(arc[i].sum())
    image = img + arc                           # float64 (+ shot noise below)
    row["arc_shot_noise"] = False
    if int(is_control) != 1 and cfg.shot_noise_for(task.get("tier")):
        gains = {b: cfg.shot_gain(b) for b in bands}
        # drawn from the STORED (float32-rounded) arc, so that a user can regenerate the exact
        # noise from the stamps: arc_shot_noise(arc_plane, gains from arc_gain_<b>, bands,
        # task_seed64)
        noise = arc_shot_noise(arc.astype(np.float32).astype(np.float64), gains, bands,
                               _task_seed(task))
        image = image + noise
        row["arc_shot_noise"] = True
        row["arc_gain_source"] = "conf_typical"
        for b in bands:
            row[f"arc_gain_{b}"] = gains[b]

    # ---- metrics over good pixels (invvar 0 marks the masked non-finite pixels)
    if maskbits is not None:
        met = stamp_metrics(arc, ivar, maskbits, bands=bands, bad_bits=cfg.bad_bits,
                            region_k=cfg.arc_region_k, region_bands=cfg.arc_region_bands)
        for k, v in met.items():
            if k in row or k in RESULT_COLUMN_NAMES:
                row[k] = v
    else:
        row["n_pix"] = n * n
    row["status"] = "ok"
    row["status_reason"] = "; ".join(notes) if notes else None

    stamps = None
    if cfg.store_stamps:
        keep = cfg.store_invvar_maskbits
        stamps = {"image": image.astype(np.float32), "arc": arc.astype(np.float32),
                  "invvar": ivar.astype(np.float32) if keep else None,
                  "maskbits": maskbits if (keep and maskbits is not None) else None}
    arrays64 = {"original": img, "arc": arc, "image": image, "invvar": ivar} \
        if keep_float64 else None
    return TaskResult(row, stamps, arrays64)


def _task_seed(task: Mapping) -> int:
    v = task.get("task_seed64")
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
        raise _TaskError("invalid_task", f"task_seed64 = {v!r}: an integer is required for the "
                         "arc shot noise")
    return int(v)


def shot_noise_rng(task_seed64: int) -> np.random.Generator:
    """The arc shot-noise stream of a task: ``Philox(key = (task_seed64 mod 2^64) +
    2^64 x SHOT_NOISE_STREAM)``, disjoint from the manifest's ``Philox(key=task_seed64)``."""
    key = (int(task_seed64) % (1 << 64)) + (SHOT_NOISE_STREAM << 64)
    return np.random.Generator(np.random.Philox(key=key))


def arc_shot_noise(arc: np.ndarray, gains: Mapping[str, float], bands: Sequence[str],
                   task_seed64: int) -> np.ndarray:
    """Poisson noise of the arc's photons, (B, N, N) nanomaggies (float64).

    ``arc``: (B, N, N) noiseless arc [nMgy/pixel] (4c passes the stored float32 plane, so the
    noise of a row can be regenerated exactly from its stamps); ``gains``: band -> G_b
    [e-/nMgy] (``InjectionConfig.shot_gain``, stored as ``arc_gain_<b>``).  Band b (in
    ``bands`` order, one stream for all bands, :func:`shot_noise_rng`): electrons
    k ~ Poisson(G_b arc), noise = k / G_b - arc; so E[noise] = 0 and Var[noise] = arc / G_b
    per pixel, and noise is exactly 0 where arc <= 0 (no photons)."""
    arc = np.asarray(arc, dtype=np.float64)
    rng = shot_noise_rng(task_seed64)
    noise = np.zeros_like(arc)
    for i, b in enumerate(bands):
        g = float(gains[b])
        a = arc[i]
        pos = a > 0
        lam = np.where(pos, a * g, 0.0)
        k = rng.poisson(lam)
        noise[i] = np.where(pos, k / g - a, 0.0)
    return noise


def _point_images(task, lens, source, mu_total, fwhm, bands, cfg, notes) -> dict:
    """mu_point (outside the critical curve), point images of the source centre and the
    LensPop resolved / arc-like flags (docs/metrics.md).  Degenerate lenses (theta_E = 0,
    shear >= 1: no tangential critical curve) give nulls and a note."""
    # a clumpy source: its disc is the Sersic of the manifest (the source centre, its r_e)
    source = getattr(source, "disc", source)
    out: dict = {}
    pm = point_magnification_outside(lens, source_direction(lens, source.dx, source.dy),
                                     cfg.mu_point_factor)
    if not math.isfinite(pm.mu):
        notes.append("no tangential critical curve (theta_E = 0 or shear >= 1): mu_point, "
                     "images and flags are null")
        return out
    out["mu_point"], out["mu_point_radius_arcsec"] = pm.mu, pm.radius
    try:
        im = solve_point_images(lens, lens.x0 + source.dx, lens.y0 + source.dy)
    except DegenerateImagesError as exc:
        # an Einstein ring: no finite image set; the flags are evaluated as multiply imaged
        notes.append(f"point images undefined ({exc}): n_images and image columns null, "
                     "flags evaluated with n_images >= 2")
        best = min(float(fwhm[b]) for b in bands)
        out["lens_resolved"], out["arc_like"] = lensed_source_flags(
            2, lens.theta_e, source.r_e, float(mu_total), best, cfg.resolved_b_fac,
            cfg.resolved_r_fac)
        return out
    out["n_images"] = im.n
    for k in range(im.n):
        out[f"image{k + 1}_x_arcsec"] = float(im.x[k])
        out[f"image{k + 1}_y_arcsec"] = float(im.y[k])
        out[f"image{k + 1}_mu"] = float(im.mu[k])
    out["image_sep_max_arcsec"] = im.max_separation()
    best = min(float(fwhm[b]) for b in bands)
    out["lens_resolved"], out["arc_like"] = lensed_source_flags(
        im.n, lens.theta_e, source.r_e, float(mu_total), best, cfg.resolved_b_fac,
        cfg.resolved_r_fac)
    return out


# =========================================================================== one brick
def task_pixels(wcs, tasks: Sequence[Mapping]) -> list:
    """Vectorised brick pixels (x, y) of the tasks' (ra, dec); NaN for unusable values."""
    def num(v):
        try:
            return float(v)
        except (TypeError, ValueError):
            return float("nan")
    ra = np.array([num(t.get("ra")) for t in tasks], np.float64)
    dec = np.array([num(t.get("dec")) for t in tasks], np.float64)
    ok = np.isfinite(ra) & np.isfinite(dec) & (np.abs(dec) <= 90)
    x = np.full(ra.shape, np.nan)
    y = np.full(ra.shape, np.nan)
    if ok.any():
        with np.errstate(all="ignore"):
            x[ok], y[ok] = dr10.radec_to_brick_pixel(wcs, ra[ok], dec[ok])
    return list(zip(x.tolist(), y.tolist()))


def stamp_window(x0: int, y0: int, n: int, shape) -> Optional[tuple]:
    """``((rows, cols), (centre_rows, centre_cols))`` slices of the n x n stamp with origin
    (x0, y0) (``dr10.cutout_origin``) and of its centre pixel, the one containing the target
    (where the psfsize map is read); None if the stamp runs off a brick of ``shape``
    (ny, nx): stamps are never shifted or padded."""
    ny, nx = shape
    if x0 < 0 or y0 < 0 or x0 + n > nx or y0 + n > ny:
        return None
    cy, cx = y0 + n // 2, x0 + n // 2
    return ((slice(y0, y0 + n), slice(x0, x0 + n)), (slice(cy, cy + 1), slice(cx, cx + 1)))


def stamp_regions(tasks: Sequence[Mapping], pixels: Sequence, brick: BrickSource,
                  cfg: InjectionConfig) -> dict:
    """{(product, band): [(rows, cols), ...]}: the brick regions :func:`inject_task` will read
    for these tasks (same geometry: ``dr10.cutout_origin``; stamps off the brick and invalid
    tasks are left out).  Used only to warm the tile cache: it never changes a result."""
    out: dict = {}
    for t, (px, py) in zip(tasks, pixels):
        n = t.get("stamp_size_px")
        bands = str(t.get("bands") or "")
        if not (isinstance(n, (int, np.integer)) and n >= 1 and math.isfinite(px)
                and math.isfinite(py) and abs(px) < 1e6 and abs(py) < 1e6):
            continue
        n = int(n)
        window = stamp_window(*dr10.cutout_origin(px, py, n), n, brick.shape)
        if window is None:
            continue
        region, centre = window
        for b in bands:
            if b in brick.bands:
                out.setdefault(("image", b), []).append(region)
                out.setdefault(("invvar", b), []).append(region)
                if cfg.use_psfsize_maps and brick.psfsize_reason.get(b, "absent") is None:
                    out.setdefault(("psfsize", b), []).append(centre)
        if brick.maskbits_state == "ok":
            out.setdefault(("maskbits", None), []).append(region)
    return out


#: TEST-ONLY hook (tests/test_faults.py, "a worker killed mid-job is retried"): when this
#: environment variable holds a file path, the process that starts its SECOND brick while
#: that file does not exist creates it and exits at once (``os._exit``, as a killed Python
#: worker: no cleanup, temporaries left behind); every later attempt finds the file and
#: runs normally.  Unset (always, in production): inert, one dictionary lookup per brick.
TEST_EXIT_ONCE_ENV = "PHASE4_TEST_EXIT_WORKER_ONCE"
_BRICKS_STARTED = [0]


def _test_exit_once(marker: str) -> None:
    _BRICKS_STARTED[0] += 1
    if _BRICKS_STARTED[0] < 2:
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    os._exit(17)


def process_brick(tasks: Sequence[Mapping], open_brick: Callable[[], BrickSource],
                  cfg: InjectionConfig) -> Iterator[TaskResult]:
    """Yield one :class:`TaskResult` per task (same order), opening the brick once.

    ``open_brick()`` returns a :class:`BrickSource` (closed afterwards if it has ``close``)
    or raises :class:`BrickUnavailable` -> every task gets that status.  A transient storage
    fault (``storage.is_transient``: throttling, 5xx, reset, timeout, after the storage layer's
    own retries) is RE-RAISED, never recorded: the Spark task fails and Spark retries it.  Any
    other exception while opening -> every task gets ``error`` with the exception in
    ``status_reason``.
    """
    if not tasks:
        return
    from injection_pipeline.storage import is_transient
    if os.environ.get(TEST_EXIT_ONCE_ENV):
        _test_exit_once(os.environ[TEST_EXIT_ONCE_ENV])
    try:
        brick = open_brick()
    except BrickUnavailable as exc:
        for t in tasks:
            yield failed_result(t, cfg, exc.status, exc.reason)
        return
    except Exception as exc:  # noqa: BLE001 - e.g. a missing dependency on an executor
        if is_transient(exc):
            raise
        reason = f"opening brick failed: {type(exc).__name__}: {exc}"
        for t in tasks:
            yield failed_result(t, cfg, "error", reason)
        return
    try:
        pixels = task_pixels(brick.wcs, tasks)
        brick.prefetch(stamp_regions(tasks, pixels, brick, cfg))
        for t, pix in zip(tasks, pixels):
            yield inject_task(t, brick, cfg, pixel=pix)
    finally:
        close = getattr(brick, "close", None)
        if close is not None:
            close()


# =========================================================================== Arrow rows
def stamp_bytes(result: TaskResult) -> dict:
    """STAMP_COLUMNS of one result as little-endian C-order bytes (None when absent)."""
    out = {}
    for name in STAMP_COLUMN_NAMES:
        a = (result.stamps or {}).get(name)
        if a is None:
            out[name] = None
        else:
            out[name] = np.ascontiguousarray(a, dtype=STAMP_DTYPES[name]).tobytes()
    return out


def results_to_table(results: Sequence[TaskResult], schema, with_stamps: bool):
    """A pyarrow Table of the results in ``schema`` (output_arrow_schema), without copying
    the stamps.

    Scalar columns: ``RecordBatch.from_pylist`` of the rows (Arrow's C++ conversion; a key
    missing from a row is null), one chunk.  Stamp columns: one chunk per row whose data
    buffer *is* the result's plane (:func:`stamp_bytes` layout: little-endian, C order;
    converted only if a plane is not already so), null where a plane is absent.  Writing
    the table to Parquet then reads each plane once, where concatenating the planes first
    copied ~370 kB per 96-px row (0.08 ms per row).  The table keeps the planes alive.
    """
    import pyarrow as pa

    stamp_names = [n for n in schema.names if n in STAMP_COLUMN_NAMES] if with_stamps else []
    scalar = pa.schema([f for f in schema if f.name not in stamp_names])
    sb = pa.RecordBatch.from_pylist([r.row for r in results], schema=scalar)
    cols = {n: pa.chunked_array([c], type=c.type) for n, c in zip(scalar.names, sb.columns)}
    null_plane = pa.nulls(1, pa.binary())
    for name in stamp_names:
        dt = STAMP_DTYPES[name]
        chunks = []
        for r in results:
            a = (r.stamps or {}).get(name)
            if a is None:
                chunks.append(null_plane)
                continue
            data = pa.py_buffer(np.ascontiguousarray(a, dtype=dt))
            offsets = pa.py_buffer(np.array([0, data.size], np.int32))
            chunks.append(pa.BinaryArray.from_buffers(pa.binary(), 1, [None, offsets, data]))
        cols[name] = pa.chunked_array(chunks, type=pa.binary())
    return pa.Table.from_arrays([cols[n] for n in schema.names], schema=schema)


def results_to_batch(results: Sequence[TaskResult], schema, with_stamps: bool):
    """A pyarrow RecordBatch of the results in ``schema``: :func:`results_to_table` with
    each column in one contiguous buffer (this copies the stamps)."""
    import pyarrow as pa

    table = results_to_table(results, schema, with_stamps).combine_chunks()
    batches = table.to_batches()
    if not batches:
        return pa.RecordBatch.from_pylist([], schema=schema)
    return batches[0]
