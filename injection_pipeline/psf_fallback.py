"""PSF FWHM per band for one stamp, with a recorded fallback chain (stage 4c, requirement 7).

DR10 publishes no PSF images under ``coadd/``; the ``psfsize-<band>`` maps give, per pixel,
the inverse-variance weighted Gaussian-equivalent FWHM [arcsec] of the coadd PSF, **0 where
the band has no data** (docs/dr10.md).  The FWHM used for a stamp in band b is the first
*valid* value of:

====================  =====================================================================
``psf_source_<b>``    value
====================  =====================================================================
``centre``            psfsize-b at the stamp's centre pixel (the pixel containing the target)
``brick_median``      median of the valid psfsize-b pixels of the whole brick
``bricks_table``      the survey-bricks-dr10-south ``psfsize_<b>`` column (per-brick median)
``default``           a configured per-band default (``conf/injection.toml [psf]``)
====================  =====================================================================

A value is valid iff it is finite and ``min_fwhm < value <= max_fwhm`` (defaults 0 and 10
arcsec): 0 / negative / NaN / inf mean "no data" (an earlier pipeline used psfsize 0 as a
FWHM and left 6,928 g-band arcs unconvolved: known-pitfalls.md), and values above 10" are not
a DECam PSF (a corrupt map).  A missing or corrupt psfsize file skips the first two levels.
With ``use_psfsize_maps = False`` the maps are not read at all and the chain starts at
``bricks_table``.  Every level that was tried and rejected is listed in the returned note.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

PSF_SOURCES: tuple[str, ...] = ("centre", "brick_median", "bricks_table", "default")

#: typical DR10 South FWHM [arcsec] used only when nothing else is available (recorded as
#: psf_source = "default"); overridden by conf/injection.toml [psf].default_fwhm_arcsec.
DEFAULT_FWHM_ARCSEC: dict[str, float] = {"g": 1.5, "r": 1.3, "z": 1.2}
MIN_FWHM_ARCSEC = 0.0     # exclusive
MAX_FWHM_ARCSEC = 10.0    # inclusive


def is_valid_fwhm(value, min_fwhm: float = MIN_FWHM_ARCSEC,
                  max_fwhm: float = MAX_FWHM_ARCSEC) -> bool:
    """True iff ``value`` is a usable FWHM: finite and in (min_fwhm, max_fwhm] arcsec."""
    if value is None:
        return False
    try:
        v = float(value)
    except (TypeError, ValueError):
        return False
    return math.isfinite(v) and min_fwhm < v <= max_fwhm


@dataclass(frozen=True)
class PSFChoice:
    """The FWHM used for one band, where it came from, and why earlier levels were skipped."""

    fwhm: float
    source: str
    note: str = ""          # e.g. "centre=0 (no data); brick_median unavailable (file missing)"


def resolve_fwhm(band: str, *, centre_value: Optional[float],
                 centre_unavailable_reason: str = "",
                 brick_median: Optional[Callable[[], Optional[float]]] = None,
                 table_value: Optional[float] = None,
                 default: Optional[Mapping[str, float]] = None,
                 use_maps: bool = True,
                 min_fwhm: float = MIN_FWHM_ARCSEC,
                 max_fwhm: float = MAX_FWHM_ARCSEC) -> PSFChoice:
    """Walk the fallback chain for one band (module docstring).

    ``centre_value``: psfsize at the stamp centre (None if the map is unavailable, then
    ``centre_unavailable_reason`` says why); ``brick_median``: a callable computing the brick
    median lazily (only called when the centre is invalid; returns None if unavailable);
    ``table_value``: survey-bricks psfsize_<band> (None if the table/column is absent);
    ``default``: band -> FWHM.  Raises ValueError if even the default is invalid.
    """
    notes = []
    if use_maps:
        if centre_value is None:
            notes.append(f"centre unavailable ({centre_unavailable_reason or 'no map'})")
        elif is_valid_fwhm(centre_value, min_fwhm, max_fwhm):
            return PSFChoice(float(centre_value), "centre")
        else:
            notes.append(f"centre={float(centre_value):g} invalid")
        med = brick_median() if (brick_median is not None and centre_value is not None) else None
        if is_valid_fwhm(med, min_fwhm, max_fwhm):
            return PSFChoice(float(med), "brick_median", "; ".join(notes))
        notes.append("brick_median unavailable" if med is None
                     else f"brick_median={float(med):g} invalid")
    else:
        notes.append("psfsize maps not used (use_psfsize_maps=0)")
    if is_valid_fwhm(table_value, min_fwhm, max_fwhm):
        return PSFChoice(float(table_value), "bricks_table", "; ".join(notes))
    notes.append("bricks_table unavailable" if table_value is None
                 else f"bricks_table={float(table_value):g} invalid")
    dflt = (default if default is not None else DEFAULT_FWHM_ARCSEC).get(band)
    if not is_valid_fwhm(dflt, min_fwhm, max_fwhm):
        raise ValueError(f"no valid PSF FWHM for band {band!r}: {'; '.join(notes)}; "
                         f"configured default {dflt!r} is invalid too")
    return PSFChoice(float(dflt), "default", "; ".join(notes))


def valid_fwhm_median(plane, min_fwhm: float = MIN_FWHM_ARCSEC,
                      max_fwhm: float = MAX_FWHM_ARCSEC) -> tuple[Optional[float], int]:
    """(median, count) of the valid pixels of a psfsize plane; (None, 0) if none is valid.

    Valid = finite and in (min_fwhm, max_fwhm], compared in float64; the median is the one
    ``np.median`` gives on the float64 valid values, bit for bit (the middle value, or the
    float64 average of the middle two).  A float32 plane (every DR10 psfsize map) is not
    copied to float64: the valid pixels are selected in float32 (against float64 bounds) and
    the middle one or two found with ``np.partition`` (float32 -> float64 is exact and
    monotonic, so the order is the same), then averaged in float64 as ``np.median`` does
    (its mean adds from +0.0, which only matters for a -0.0 median, i.e. min_fwhm < 0):
    about 2x faster on a 3600^2 plane (0.16 -> 0.07 s).  Any other dtype takes the plain
    float64 + ``np.median`` path.
    """
    import numpy as np

    a = np.asarray(plane)
    if a.dtype != np.float32:
        a = np.asarray(a, dtype=np.float64).ravel()
        a = a[np.isfinite(a) & (a > min_fwhm) & (a <= max_fwhm)]
        if a.size == 0:
            return None, 0
        return float(np.median(a)), int(a.size)
    a = a.ravel()
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(a)
        ok &= np.greater(a, np.float64(min_fwhm))      # float64 scalars: compared in float64
        ok &= np.less_equal(a, np.float64(max_fwhm))
    v = a[ok]
    n = int(v.size)
    if n == 0:
        return None, 0
    k = n // 2
    zero = np.float64(0.0)   # np.median's mean sums from +0.0: same sign of a zero median
    if n % 2:
        return float(zero + np.float64(np.partition(v, k)[k])), n
    part = np.partition(v, [k - 1, k])
    return float((zero + np.float64(part[k - 1]) + np.float64(part[k])) / 2.0), n


def brick_median_fwhm(plane, min_fwhm: float = MIN_FWHM_ARCSEC,
                      max_fwhm: float = MAX_FWHM_ARCSEC) -> Optional[float]:
    """Median of the valid pixels of a psfsize plane (NumPy array); None if none is valid.

    The one definition of the ``brick_median`` level (stage 4b stores it in ``_SUCCESS``,
    stage 4c computes it when the marker has none): :func:`valid_fwhm_median`.
    """
    return valid_fwhm_median(plane, min_fwhm, max_fwhm)[0]


class BricksPSFTable:
    """The ``bricks_table`` level for every brick of a survey-bricks table, compact enough to
    broadcast whole (no list of the manifest's bricks needed on the driver).

    ``names``: brick names; ``psfsize``: (n, len(bands)) per-brick median psfsize [arcsec]
    (NaN = none).  Stored as a sorted fixed-width byte array and a float32 matrix (DR10 South:
    ~10 MB for ~350k bricks, where a dict of dicts would take ~100x that); :meth:`get` is a
    binary search.  Duplicate names keep the first row.
    """

    def __init__(self, names, psfsize, bands: tuple[str, ...]):
        import numpy as np

        names = np.char.strip(np.char.lower(np.asarray(names).astype(str)))
        psf = np.asarray(psfsize, dtype=np.float32).reshape(len(names), len(bands))
        order = np.argsort(names, kind="stable")
        names, psf = names[order], psf[order]
        keep = np.ones(len(names), bool)
        keep[1:] = names[1:] != names[:-1]
        self.names = names[keep].astype("S")
        self.psfsize = psf[keep]
        self.bands = tuple(bands)

    def __len__(self) -> int:
        return int(self.names.size)

    def get(self, brickname) -> Optional[dict]:
        """{band: psfsize or None} of a brick, None when the table does not list it."""
        import numpy as np

        key = str(brickname).strip().lower().encode()
        i = int(np.searchsorted(self.names, key))
        if i >= self.names.size or self.names[i] != key:
            return None
        return {b: (float(v) if np.isfinite(v) else None)
                for b, v in zip(self.bands, self.psfsize[i])}
