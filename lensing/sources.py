"""Source models for the ray-shooting renderer, behind one interface (pure NumPy).

The renderer (:mod:`lensing.render`) never looks inside a source model.  It needs, from a
*source model*:

* ``components()``: a tuple of K *components* (below), all lensed with one ray trace (the
  lens is achromatic);
* ``band_fractions(band)``: a length-K array, the fraction of the band's intrinsic
  (unlensed) flux carried by each component (non-negative, summing to 1).

and, from each *component*:

* ``dx, dy`` [arcsec]: the component's centre, as an offset from the lens centre in the
  source plane;
* ``brightness(ddx, ddy)``: surface brightness in the component's own units ("I_e = 1") at
  source-plane offsets (ddx, ddy) [arcsec] from that centre (vectorised, >= 0);
* ``unit_total``: the analytic total flux of ``brightness`` [its units x arcsec^2], so that
  ``brightness / unit_total`` has unit flux (the rendered image is never renormalised
  numerically: it carries the magnification);
* ``scale`` [arcsec]: the smallest length over which the brightness changes appreciably; the
  adaptive quadrature splits every cell near the component until its source-plane footprint
  is below ``scale`` before trusting its error estimate (Sersic: the minor-axis half-light
  radius r_e q);
* ``refine_radius`` [arcsec]: pixels whose source-plane footprint comes within this distance
  of the component centre are integrated adaptively (error-controlled); elsewhere the
  brightness must be smooth enough for a 5-ray (centre + corners) quadrature (Sersic:
  4 r_e).

Models here: :class:`SersicSource` (one component, behaviour unchanged) and
:class:`ClumpySource` (a Sersic disc plus K compact clumps, each with its own colour, i.e.
per-band flux fractions).

Plugging in a real-galaxy (pixelised, user-supplied) source later, e.g. a GalSim COSMOS
stamp: write a component whose ``brightness`` interpolates the stamp (deconvolved of its own
PSF, or accepting it) at source-plane offsets, ``unit_total`` = the stamp's sum x its pixel
area (the flux of the interpolant), ``scale`` = its pixel scale, ``refine_radius`` = the
radius enclosing its non-zero pixels; and a model whose ``components()`` returns it and whose
``band_fractions`` returns ``[1.0]`` (or one component per band image with one-hot
fractions).  Nothing in :mod:`lensing.mass_profiles` or the renderer changes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from .sersic import sersic_bn, sersic_unit_total_flux

#: refinement zone of a Sersic component, in major-axis half-light radii
SERSIC_REFINE_RADIUS_RE = 4.0


@runtime_checkable
class SourceComponent(Protocol):
    dx: float
    dy: float

    def brightness(self, ddx, ddy): ...

    @property
    def unit_total(self) -> float: ...

    @property
    def scale(self) -> float: ...

    @property
    def refine_radius(self) -> float: ...


@runtime_checkable
class SourceModel(Protocol):
    def components(self) -> tuple: ...

    def band_fractions(self, band: str) -> np.ndarray: ...


@dataclass(frozen=True)
class SersicSource:
    """Elliptical Sersic source (a one-component source model). Offsets and radii in arcsec,
    phi in radians.

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

    # ---------------------------------------------------------------- component interface
    @cached_property
    def b_n(self) -> float:
        return sersic_bn(self.n) if self.bn is None else float(self.bn)

    @cached_property
    def unit_total(self) -> float:
        return sersic_unit_total_flux(self.n, self.r_e, self.q, bn=self.b_n)

    @property
    def scale(self) -> float:
        return self.r_e * self.q

    @property
    def refine_radius(self) -> float:
        return SERSIC_REFINE_RADIUS_RE * self.r_e

    def brightness(self, ddx, ddy):
        """I / I_e at source-plane offsets (ddx, ddy) [arcsec] from the source centre."""
        if self.q == 1.0:                   # round (every clump): no rotation needed
            r2 = (ddx * ddx + ddy * ddy) * (1.0 / (self.r_e * self.r_e))
        else:
            c, s = math.cos(self.phi), math.sin(self.phi)
            xp = ddx * c + ddy * s
            yp = (ddy * c - ddx * s) / self.q
            r2 = (xp * xp + yp * yp) * (1.0 / (self.r_e * self.r_e))
        if self.n == 1.0:
            scaled = np.sqrt(r2)
        elif self.n == 0.5:
            scaled = r2
        else:
            scaled = np.power(r2, 0.5 / self.n)
        return np.exp(-self.b_n * (scaled - 1.0))

    # ------------------------------------------------------------------- model interface
    def components(self) -> tuple:
        return (self,)

    def band_fractions(self, band: str) -> np.ndarray:
        return np.ones(1)


@dataclass(frozen=True)
class Clump:
    """One star-forming clump: a circular Gaussian (Sersic n = 0.5) of half-light radius
    ``r_e`` [arcsec] centred at (``dx``, ``dy``) [arcsec] from the source (disc) centre, carrying
    ``flux_frac[band]`` of the source's intrinsic flux in each band (its colour)."""

    dx: float
    dy: float
    r_e: float
    flux_frac: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self):
        for name in ("dx", "dy"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"clump {name} must be finite, got {getattr(self, name)}")
        if not (math.isfinite(self.r_e) and self.r_e > 0):
            raise ValueError(f"clump r_e must be a positive number of arcsec, got {self.r_e}")
        for b, f in self.flux_frac.items():
            if not (math.isfinite(f) and 0.0 <= f < 1.0):
                raise ValueError(f"clump flux fraction in band {b} must be in [0, 1), got {f}")


@dataclass(frozen=True)
class ClumpySource:
    """A Sersic disc plus compact clumps (a source model of 1 + K components).

    ``disc``: the smooth component (its ``dx, dy`` is the source centre); ``clumps``: a tuple
    of :class:`Clump` whose offsets are relative to the disc centre.  In band b the clumps
    carry ``clump.flux_frac[b]`` of the band's intrinsic flux and the disc the rest
    ``1 - sum_k flux_frac_k[b]`` (> 0 required), so the band's total intrinsic flux is the
    catalogue magnitude's whatever the clump colours.
    """

    disc: SersicSource
    clumps: tuple = ()

    def __post_init__(self):
        object.__setattr__(self, "clumps", tuple(self.clumps))
        bands = set()
        for c in self.clumps:
            if not isinstance(c, Clump):
                raise ValueError(f"clumps must be Clump instances, got {type(c).__name__}")
            bands |= set(c.flux_frac)
        for b in bands:
            total = sum(c.flux_frac.get(b, 0.0) for c in self.clumps)
            if not total < 1.0:
                raise ValueError(f"clump flux fractions in band {b} sum to {total} >= 1")

    @property
    def dx(self) -> float:
        return self.disc.dx

    @property
    def dy(self) -> float:
        return self.disc.dy

    @cached_property
    def _clump_components(self) -> tuple:
        return tuple(SersicSource(self.disc.dx + c.dx, self.disc.dy + c.dy, c.r_e, 0.5, 1.0, 0.0)
                     for c in self.clumps)

    def components(self) -> tuple:
        return (self.disc,) + self._clump_components

    def band_fractions(self, band: str) -> np.ndarray:
        fr = np.array([c.flux_frac.get(band, None) for c in self.clumps], dtype=object)
        if any(f is None for f in fr):
            raise ValueError(f"ClumpySource: a clump has no flux fraction for band {band!r}")
        fr = fr.astype(np.float64)
        return np.concatenate([[1.0 - fr.sum()], fr])


def as_source_model(source) -> SourceModel:
    """Check that ``source`` implements the source-model interface (module docstring)."""
    if not (hasattr(source, "components") and hasattr(source, "band_fractions")):
        raise TypeError(f"{type(source).__name__} is not a source model (needs components() "
                        "and band_fractions(band))")
    return source


def component_arrays(components: Sequence) -> dict:
    """Per-component constants the renderer needs, as arrays of length K."""
    return dict(dx=np.array([c.dx for c in components], dtype=np.float64),
                dy=np.array([c.dy for c in components], dtype=np.float64),
                unit_total=np.array([float(c.unit_total) for c in components]),
                scale=np.array([float(c.scale) for c in components]),
                refine_radius=np.array([float(c.refine_radius) for c in components]))
