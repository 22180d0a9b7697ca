"""Distances and Einstein radii (astropy.cosmology, tabulated once per cosmology).

Units: distances in Mpc, velocity dispersion in km/s, angles in arcsec.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

#: speed of light [km/s] (exact, SI definition)
C_KMS = 299_792.458
ARCSEC_PER_RAD = 180.0 * 3600.0 / math.pi


def get_cosmology(name: str):
    """An astropy realisation by name (e.g. "Planck18", "WMAP9"): astropy.cosmology.realizations."""
    from astropy.cosmology import realizations

    if name not in realizations.available:
        raise ValueError(f"unknown cosmology {name!r}; astropy realisations: "
                         f"{sorted(realizations.available)}")
    return getattr(realizations, name)


@dataclass(frozen=True)
class DistanceTable:
    """Transverse comoving distance D_M(z) on a fine grid, interpolated (cubic-accurate).

    Exact for the ratios used here to < 1e-7 relative (tests/test_population.py compares with
    astropy's own angular_diameter_distance(z1, z2)).  Valid for 0 <= z <= z_max and
    cosmologies with Omega_k >= 0 (the Hogg 1999 eq. 19 relation for D_M between two
    redshifts); Omega_k < 0 is refused with a clear error.
    """

    name: str
    z: np.ndarray
    dm: np.ndarray         # Mpc
    dh: float              # Hubble distance c/H0, Mpc
    ok0: float

    @classmethod
    @lru_cache(maxsize=8)
    def for_cosmology(cls, name: str, z_max: float = 8.0, n: int = 8001) -> "DistanceTable":
        cosmo = get_cosmology(name)
        ok0 = float(cosmo.Ok0)
        if ok0 < -1e-12:
            raise ValueError(f"cosmology {name}: Omega_k = {ok0} < 0 is not supported by the "
                             f"tabulated distances (Hogg 1999 eq. 19 needs Omega_k >= 0)")
        z = np.linspace(0.0, z_max, n)
        dm = cosmo.comoving_transverse_distance(z).to_value("Mpc")
        return cls(name, z, np.asarray(dm, dtype=np.float64), float(cosmo.hubble_distance.to_value("Mpc")),
                   max(ok0, 0.0))

    def comoving_transverse(self, z) -> np.ndarray:
        z = np.asarray(z, dtype=np.float64)
        if np.any(~np.isfinite(z)) or np.any(z < 0) or np.any(z > self.z[-1]):
            raise ValueError(f"redshift outside [0, {self.z[-1]}] or not finite")
        # cubic Hermite interpolation with finite-difference slopes (D_M is smooth)
        h = self.z[1] - self.z[0]
        i = np.clip(((z - self.z[0]) / h).astype(np.int64), 0, self.z.size - 2)
        t = (z - self.z[i]) / h
        slope = np.gradient(self.dm, h)
        y0, y1, m0, m1 = self.dm[i], self.dm[i + 1], slope[i] * h, slope[i + 1] * h
        t2, t3 = t * t, t * t * t
        return ((2 * t3 - 3 * t2 + 1) * y0 + (t3 - 2 * t2 + t) * m0
                + (-2 * t3 + 3 * t2) * y1 + (t3 - t2) * m1)

    def angular_diameter(self, z) -> np.ndarray:
        z = np.asarray(z, dtype=np.float64)
        return self.comoving_transverse(z) / (1.0 + z)

    def angular_diameter_between(self, z1, z2) -> np.ndarray:
        """D_A(z1, z2) for z2 > z1 [Mpc] (Hogg 1999 eq. 19); NaN where z2 <= z1."""
        z1 = np.asarray(z1, dtype=np.float64)
        z2 = np.asarray(z2, dtype=np.float64)
        d1, d2 = self.comoving_transverse(z1), self.comoving_transverse(z2)
        k = self.ok0 / (self.dh * self.dh)
        d12 = d2 * np.sqrt(1.0 + k * d1 * d1) - d1 * np.sqrt(1.0 + k * d2 * d2)
        return np.where(z2 > z1, d12 / (1.0 + z2), np.nan)

    def luminosity(self, z) -> np.ndarray:
        z = np.asarray(z, dtype=np.float64)
        return self.comoving_transverse(z) * (1.0 + z)

    def distance_modulus(self, z) -> np.ndarray:
        return 5.0 * np.log10(self.luminosity(z) * 1e5)   # D_L in units of 10 pc


def sis_einstein_radius_arcsec(sigma_kms, dls_over_ds) -> np.ndarray:
    """theta_E = 4 pi (sigma/c)^2 D_ls/D_s [arcsec] (sigma in km/s)."""
    sigma = np.asarray(sigma_kms, dtype=np.float64)
    return 4.0 * math.pi * (sigma / C_KMS) ** 2 * np.asarray(dls_over_ds, np.float64) * ARCSEC_PER_RAD


def einstein_radius_sis(sigma_kms, z_l, z_s, table: DistanceTable) -> np.ndarray:
    """theta_E = 4 pi (sigma/c)^2 D_ls/D_s [arcsec] of a singular isothermal sphere.

    For the SIE it is the circularised Einstein radius (the convention of
    lensing.mass_profiles: the critical curve encloses pi theta_E^2).  NaN where z_s <= z_l.
    """
    ratio = table.angular_diameter_between(z_l, z_s) / table.angular_diameter(z_s)
    return sis_einstein_radius_arcsec(sigma_kms, ratio)
