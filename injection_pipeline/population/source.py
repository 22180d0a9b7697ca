"""Source population: z_s ~ 1-3 star-forming galaxies (docs/population.md).

Colours come from a power-law rest-frame UV continuum f_lambda ~ lambda^beta (beta the UV
slope), i.e. f_nu ~ lambda^(beta + 2): between two observed bands of effective wavelengths
l1 < l2, m1 - m2 = 2.5 (beta + 2) log10(l2/l1).  When the z band samples the rest frame
redward of the Balmer break (lambda_z/(1+z_s) > 3650 A, z_s < ~1.5), ``balmer_break_mag``
is added to r - z.  The Lyman-alpha forest's attenuation (z_s > 2.28 in g) is applied on top by
:mod:`.igm` (conf [source] igm).  Magnitudes in AB, sizes in arcsec.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

BALMER_BREAK_AA = 3650.0


def colours_from_uv_slope(beta, z_s, lam_aa: dict, balmer_break_mag: float):
    """(g - r, r - z) of a power-law UV continuum of slope ``beta`` at redshift ``z_s``."""
    beta = np.asarray(beta, np.float64)
    z_s = np.asarray(z_s, np.float64)
    gr = 2.5 * (beta + 2.0) * np.log10(lam_aa["r"] / lam_aa["g"])
    rz = 2.5 * (beta + 2.0) * np.log10(lam_aa["z"] / lam_aa["r"])
    rz = rz + np.where(lam_aa["z"] / (1.0 + z_s) > BALMER_BREAK_AA, balmer_break_mag, 0.0)
    return gr, rz


@dataclass(frozen=True)
class UVLuminosityFunction:
    """Unlensed source magnitude from the rest-frame UV luminosity function at z_s.

    A Schechter function in absolute magnitude at ``lambda_uv_aa`` (1500 A),
    ``phi(M) ~ 10^(-0.4 (alpha + 1) x) exp(-10^(-0.4 x))`` with ``x = M - M*(z)``, drawn on
    ``dm_bright <= x <= dm_faint`` by inverse CDF of one frozen uniform; ``M*(z)`` is
    interpolated linearly in the nodes ``(z_nodes, m_star)`` (constant outside them); ``alpha``
    does not evolve.  The observed r magnitude follows from the source's own UV slope beta
    (f_lambda ~ lambda^beta, so f_nu ~ lambda^(beta + 2)):
    ``m_r = M + DM(z) - 2.5 log10(1 + z) - 2.5 (beta + 2) log10(lambda_r / ((1 + z) lambda_uv))``
    (AB; the -2.5 log10(1 + z) is the bandwidth term of a K-correction).  Numbers and their
    sources: conf/population.toml [source.mag_r], docs/population.md.
    """

    z_nodes: tuple
    m_star: tuple
    alpha: float
    dm_bright: float
    dm_faint: float
    lambda_uv_aa: float
    n_grid: int = 4001

    def __post_init__(self):
        z, m = np.asarray(self.z_nodes, float), np.asarray(self.m_star, float)
        if z.ndim != 1 or z.size < 1 or z.size != m.size or np.any(np.diff(z) <= 0):
            raise ValueError("uv_lf: z_nodes must increase strictly and match m_star in length")
        if not (np.all(np.isfinite(m)) and math.isfinite(self.alpha)):
            raise ValueError("uv_lf: m_star and alpha must be finite")
        if not self.dm_bright < self.dm_faint:
            raise ValueError("uv_lf: need dm_bright < dm_faint")
        if not self.lambda_uv_aa > 0:
            raise ValueError("uv_lf: lambda_uv_aa must be > 0")

    def m_star_at(self, z) -> np.ndarray:
        """M*(z) [AB mag at lambda_uv_aa]."""
        return np.interp(np.asarray(z, np.float64), self.z_nodes, self.m_star)

    def _cdf_table(self):
        x = np.linspace(self.dm_bright, self.dm_faint, self.n_grid)
        lum = 10.0 ** (-0.4 * x)
        pdf = lum ** (self.alpha + 1.0) * np.exp(-lum)
        cdf = np.concatenate([[0.0], np.cumsum(0.5 * (pdf[1:] + pdf[:-1]) * np.diff(x))])
        return cdf / cdf[-1], x

    def absolute_mag(self, u, z) -> np.ndarray:
        """Absolute UV magnitude of uniforms ``u`` in [0, 1) at redshifts ``z``."""
        cdf, x = self._cdf_table()
        return np.interp(np.asarray(u, np.float64), cdf, x) + self.m_star_at(z)

    def apparent_r(self, u, z, beta, distance_modulus, lambda_r_aa: float) -> np.ndarray:
        """Observed unlensed r magnitude (AB); ``distance_modulus``: DM(z) [mag]."""
        return self.apparent_r_from_absolute(self.absolute_mag(u, z), z, beta,
                                             distance_modulus, lambda_r_aa)

    def apparent_r_from_absolute(self, m_abs, z, beta, distance_modulus,
                                 lambda_r_aa: float) -> np.ndarray:
        """:meth:`apparent_r` of an already drawn absolute UV magnitude ``m_abs``."""
        z = np.asarray(z, np.float64)
        k_colour = 2.5 * (np.asarray(beta, np.float64) + 2.0) * np.log10(
            lambda_r_aa / ((1.0 + z) * self.lambda_uv_aa))
        return (np.asarray(m_abs, np.float64) + np.asarray(distance_modulus, np.float64)
                - 2.5 * np.log10(1.0 + z) - k_colour)

    def describe(self) -> str:
        return (f"UV LF Schechter alpha {self.alpha:g}, M*(z) on {list(self.z_nodes)} = "
                f"{list(self.m_star)}, x in [{self.dm_bright:g}, {self.dm_faint:g}]")

    @classmethod
    def from_toml(cls, d, where: str) -> "UVLuminosityFunction":
        keys = {"dist", "z_nodes", "m_star", "alpha", "dm_bright", "dm_faint", "lambda_uv_aa"}
        unknown, missing = set(d) - keys, keys - set(d)
        if unknown or missing:
            raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}, missing key(s) "
                             f"{sorted(missing)} for dist = 'uv_lf'")
        return cls(z_nodes=tuple(float(v) for v in d["z_nodes"]),
                   m_star=tuple(float(v) for v in d["m_star"]), alpha=float(d["alpha"]),
                   dm_bright=float(d["dm_bright"]), dm_faint=float(d["dm_faint"]),
                   lambda_uv_aa=float(d["lambda_uv_aa"]))


@dataclass(frozen=True)
class UVSlopeColourMagnitude:
    """UV slope beta tied to the source's absolute UV magnitude (a colour-magnitude relation):
    ``beta = beta_ref + dbeta_dm (M_UV - m_ref) + scatter * g``, ``g`` standard normal from the
    slot's two frozen uniforms by the same Box-Muller transform as ``manifests.Dist`` "normal"
    (so ``dbeta_dm = 0`` gives the independent ``N(beta_ref, scatter)`` draws bit for bit).
    ``M_UV`` is the absolute magnitude at the luminosity function's ``lambda_uv_aa`` (1500 A)
    drawn by :class:`UVLuminosityFunction` (conf ``[source.mag_r] dist = "uv_lf"``): drawn
    first, then beta, then the observed r of that M_UV and beta.  dbeta_dm < 0: brighter
    (more negative M_UV) is redder.  Numbers and sources: conf/population.toml
    [source.uv_slope], docs/population.md.
    """

    beta_ref: float
    m_ref: float
    dbeta_dm: float
    scatter: float

    def __post_init__(self):
        if not all(math.isfinite(v) for v in (self.beta_ref, self.m_ref, self.dbeta_dm,
                                              self.scatter)):
            raise ValueError("colour_magnitude: beta_ref, m_ref, dbeta_dm, scatter must be "
                             "finite")
        if not self.scatter >= 0:
            raise ValueError(f"colour_magnitude: need scatter >= 0, got {self.scatter}")

    def mean_at(self, m_uv) -> np.ndarray:
        """The relation's mean beta at absolute UV magnitude ``m_uv``."""
        return self.beta_ref + self.dbeta_dm * (np.asarray(m_uv, np.float64) - self.m_ref)

    def sample(self, m_uv, u1, u2) -> np.ndarray:
        """beta of sources of absolute UV magnitude ``m_uv`` from uniforms ``u1``, ``u2``."""
        u1, u2 = np.asarray(u1, np.float64), np.asarray(u2, np.float64)
        g = np.sqrt(-2.0 * np.log1p(-u1)) * np.cos(2.0 * np.pi * u2)
        return self.mean_at(m_uv) + self.scatter * g

    def describe(self) -> str:
        return (f"beta = {self.beta_ref:g} + {self.dbeta_dm:g} (M_UV - {self.m_ref:g}) + "
                f"N(0, {self.scatter:g}^2)")

    @classmethod
    def from_toml(cls, d, where: str) -> "UVSlopeColourMagnitude":
        keys = {"dist", "beta_ref", "m_ref", "dbeta_dm", "scatter"}
        unknown, missing = set(d) - keys, keys - set(d)
        if unknown or missing:
            raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}, missing key(s) "
                             f"{sorted(missing)} for dist = 'colour_magnitude'")
        vals = {}
        for k in keys - {"dist"}:
            v = d[k]
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"{where}: {k} = {v!r} must be a number")
            vals[k] = float(v)
        return cls(**vals)
