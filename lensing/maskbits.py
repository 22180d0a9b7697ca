"""DR10 MASKBITS: bit names, the project's bad-pixel set, and the WISE bright-star bits.

Source: legacysurvey.org DR10 "bitmasks" page and legacypipe ``bits.py`` (tag DR10.0.12).
Bits above 16 (RESOLVED, MCLOUDS, WISE_GAIA) exist only after DR10 and are not defined here.

``MASKBITS_BAD`` is this project's documented choice of bits that make a pixel unusable for
photometry of an injected arc:

* BRIGHT, MEDIUM      -- halos and ghosts of bright (G<13) / medium (G<16) stars
* SATUR_G/R/Z, SATUR_I -- saturated in at least one exposure
* ALLMASK_G/R/Z, ALLMASK_I -- a CP data-quality flag set in every exposure
* BAILOUT             -- source fitting bailed out (model-subtracted residuals unreliable)
* GALAXY, CLUSTER     -- inside a large SGA galaxy or a globular cluster

Deliberately NOT bad: NPRIMARY (bit 0 marks valid data outside the brick's unique area; an
earlier pipeline counted it as bad and lost good pixels near brick edges), WISEM1/WISEM2
(WISE halos do not corrupt optical pixels; tracked separately as ``MASKBITS_WISE``) and
SUB_BLOB (a processing flag).  Pixels with invvar <= 0 or non-finite values are bad
independently of maskbits (see :mod:`lensing.metrics`).
"""
from __future__ import annotations

import numpy as np

MASKBITS: dict[str, int] = {
    "NPRIMARY": 1 << 0,
    "BRIGHT": 1 << 1,
    "SATUR_G": 1 << 2,
    "SATUR_R": 1 << 3,
    "SATUR_Z": 1 << 4,
    "ALLMASK_G": 1 << 5,
    "ALLMASK_R": 1 << 6,
    "ALLMASK_Z": 1 << 7,
    "WISEM1": 1 << 8,
    "WISEM2": 1 << 9,
    "BAILOUT": 1 << 10,
    "MEDIUM": 1 << 11,
    "GALAXY": 1 << 12,
    "CLUSTER": 1 << 13,
    "SATUR_I": 1 << 14,
    "ALLMASK_I": 1 << 15,
    "SUB_BLOB": 1 << 16,
}

MASKBITS_BAD_NAMES: tuple[str, ...] = (
    "BRIGHT", "SATUR_G", "SATUR_R", "SATUR_Z", "ALLMASK_G", "ALLMASK_R", "ALLMASK_Z",
    "BAILOUT", "MEDIUM", "GALAXY", "CLUSTER", "SATUR_I", "ALLMASK_I",
)
MASKBITS_WISE_NAMES: tuple[str, ...] = ("WISEM1", "WISEM2")


def maskbits_value(names) -> int:
    """OR of the named DR10 maskbits; raises KeyError naming an unknown bit."""
    value = 0
    for name in names:
        key = name.strip().upper()
        if key not in MASKBITS:
            raise KeyError(f"unknown DR10 maskbit {name!r}; known: {', '.join(MASKBITS)}")
        value |= MASKBITS[key]
    return value


MASKBITS_BAD: int = maskbits_value(MASKBITS_BAD_NAMES)
MASKBITS_WISE: int = maskbits_value(MASKBITS_WISE_NAMES)


def maskbit_names(value: int) -> list[str]:
    """Names of the DR10 bits set in one integer maskbits value (inverse of maskbits_value)."""
    return [name for name, bit in MASKBITS.items() if int(value) & bit]


def has_any_bit(maskbits: np.ndarray, bits: int) -> np.ndarray:
    """Boolean array: True where any of ``bits`` is set in the int maskbits array."""
    return (np.asarray(maskbits).astype(np.int64) & int(bits)) != 0
