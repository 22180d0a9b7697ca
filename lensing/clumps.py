"""Star-forming clump population for :class:`lensing.sources.ClumpySource` (pure NumPy).

Model (every number from conf/injection.toml ``[source.clumps]``; sources in docs/injection.md):

* a source is clumpy with probability ``p_clumpy`` = 0.55 (Guo et al. 2015, ApJ 800, 39:
  55-60 % of star-forming galaxies at 0.5 < z < 3 have at least one off-centre UV clump,
  low- and intermediate-mass hosts; lower, 15-40 %, for massive hosts at z ~ 0.5);
* a clumpy source has n = 1 + Poisson(``mean_extra_clumps`` = 1) clumps, at most
  ``max_clumps`` = 8 (Soto et al. 2017, ApJ 837, 6: on average 2 clumps per clumpy galaxy,
  at most 8, UVUDF at 0.5 <= z <= 1.5);
* together they carry a fraction F ~ U(``total_frac_min``, ``total_frac_max``) = U(0.10,
  0.30) of the light in the reference band (mean 0.20: Soto et al. 2017 find 19 % of the
  rest-frame FUV flux on average; Guo et al. 2012, ApJ 757, 120: ~20 % of the UV/optical
  light together), split among the clumps by a flat Dirichlet;
* each clump is a circular Gaussian (Sersic n = 0.5) of half-light radius log-uniform in
  [``r_e_min``, ``r_e_max``] = [0.02", 0.06"] (a few hundred pc at z ~ 1-2, the observed
  "few hundred pc to 1 kpc" giant clumps, which ground-based DR10 data cannot resolve),
  capped at ``r_e_max_disc_frac`` = 0.5 of the disc's r_e;
* positions uniform over the disc's elliptical isophote of semi-major axis
  ``radius_max_re`` = 1.5 r_e (same q, phi) -- a modelling choice;
* colours: a clump is bluer than the disc (Guo et al. 2018, ApJ 853, 108: outer clumps bluer,
  clumps of clumpy hosts with enhanced sSFR) by delta ~ U(0, ``colour_offset_max_mag`` = 0.5)
  mag per unit of the band's ``colour_slope`` (g +1, r 0, i -0.5, z -1): its flux fraction
  in band b is f_ref 10^(0.4 delta slope_b).  The amplitude is a modelling choice, not a fit.

Randomness: only from the task's ``task_seed64``, through a dedicated stream
``numpy.random.Generator(PCG64(SeedSequence([task_seed64 mod 2^64, CLUMP_STREAM])))``, so
clumps never consume or shift the manifest's Philox draws; draws in a fixed order (clumpy?,
count, total fraction, Dirichlet, positions, sizes, colours).  Every drawn value is recorded
in the 4c output (``clumps_json``): the arc is reproducible from the output alone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .sources import Clump, SersicSource

#: stream id of the clump draws (ASCII "clump"), mixed with task_seed64 by SeedSequence
CLUMP_STREAM = 0x636C756D70


@dataclass(frozen=True)
class ClumpModel:
    p_clumpy: float = 0.55
    mean_extra_clumps: float = 1.0
    max_clumps: int = 8
    total_frac_min: float = 0.10
    total_frac_max: float = 0.30
    r_e_min: float = 0.02
    r_e_max: float = 0.06
    r_e_max_disc_frac: float = 0.5
    radius_max_re: float = 1.5
    colour_offset_max_mag: float = 0.5
    ref_band: str = "r"
    colour_slope: tuple = (("g", 1.0), ("i", -0.5), ("r", 0.0), ("z", -1.0))

    def __post_init__(self):
        object.__setattr__(self, "colour_slope", tuple(sorted(dict(self.colour_slope).items())))
        if not (0.0 <= self.p_clumpy <= 1.0):
            raise ValueError(f"p_clumpy must be in [0, 1], got {self.p_clumpy}")
        if not (self.mean_extra_clumps >= 0 and self.max_clumps >= 1):
            raise ValueError("need mean_extra_clumps >= 0 and max_clumps >= 1")
        if not (0.0 <= self.total_frac_min <= self.total_frac_max < 1.0):
            raise ValueError("need 0 <= total_frac_min <= total_frac_max < 1")
        if not (0.0 < self.r_e_min <= self.r_e_max and 0 < self.r_e_max_disc_frac):
            raise ValueError("need 0 < r_e_min <= r_e_max and r_e_max_disc_frac > 0")
        if not (self.radius_max_re > 0 and self.colour_offset_max_mag >= 0):
            raise ValueError("need radius_max_re > 0 and colour_offset_max_mag >= 0")
        slope = dict(self.colour_slope)
        if self.ref_band not in slope or slope[self.ref_band] != 0.0:
            raise ValueError(f"colour_slope must give the reference band {self.ref_band!r} slope 0")
        worst = self.total_frac_max * 10 ** (0.4 * self.colour_offset_max_mag * max(slope.values()))
        if not worst < 1.0:
            raise ValueError(f"clumps could carry {worst:.2f} >= 1 of a band's flux")

    @classmethod
    def from_conf(cls, d: dict) -> "ClumpModel":
        d = dict(d)
        if "colour_slope" in d:
            d["colour_slope"] = tuple(sorted((k, float(v)) for k, v in d["colour_slope"].items()))
        return cls(**d)


def clump_rng(task_seed64: int) -> np.random.Generator:
    """The dedicated clump stream of a task (module docstring)."""
    key = int(task_seed64) % (1 << 64)
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([key, CLUMP_STREAM])))


def draw_clumps(model: ClumpModel, disc: SersicSource, bands, task_seed64: int) -> tuple:
    """Clumps of one source (a tuple of :class:`Clump`, possibly empty), from task_seed64."""
    slope = dict(model.colour_slope)
    missing = [b for b in bands if b not in slope]
    if missing:
        raise ValueError(f"clump colour_slope has no value for band(s) {missing}")
    rng = clump_rng(task_seed64)
    if not rng.random() < model.p_clumpy:
        return ()
    n = int(min(1 + rng.poisson(model.mean_extra_clumps), model.max_clumps))
    total = model.total_frac_min + (model.total_frac_max - model.total_frac_min) * rng.random()
    fracs = total * rng.dirichlet(np.ones(n))
    rad = model.radius_max_re * disc.r_e * np.sqrt(rng.random(n))
    ang = 2.0 * math.pi * rng.random(n)
    xp, yp = rad * np.cos(ang), disc.q * rad * np.sin(ang)            # disc frame
    c, s = math.cos(disc.phi), math.sin(disc.phi)
    dx, dy = xp * c - yp * s, xp * s + yp * c
    hi = min(model.r_e_max, model.r_e_max_disc_frac * disc.r_e)
    lo = min(model.r_e_min, hi)
    r_e = np.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * rng.random(n))
    delta = model.colour_offset_max_mag * rng.random(n)
    out = []
    for k in range(n):
        ff = {b: float(fracs[k] * 10 ** (0.4 * delta[k] * slope[b])) for b in bands}
        out.append(Clump(float(dx[k]), float(dy[k]), float(r_e[k]), ff))
    return tuple(out)


def clumps_to_records(clumps) -> list:
    """JSON-ready records [{dx, dy, r_e, flux_frac: {band: f}}] (floats round-trip exactly)."""
    return [dict(dx=c.dx, dy=c.dy, r_e=c.r_e, flux_frac=dict(c.flux_frac)) for c in clumps]


def clumps_from_records(records) -> tuple:
    return tuple(Clump(float(r["dx"]), float(r["dy"]), float(r["r_e"]),
                       {b: float(f) for b, f in r["flux_frac"].items()}) for r in records)
