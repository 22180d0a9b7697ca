"""Tractor e1/e2 -> (q, phi) in this project's angle convention, proved on pixels and on the sky.

The synthetic survey renders a galaxy from its catalogue shape (``render_galaxy`` takes the
Tractor position angle east of north); image moments measured on those pixels must give the
phi of :func:`lensing.shapes.tractor_e1e2_to_q_phi`, and the brick's TAN WCS (astropy) must
map that pixel direction to the Tractor position angle on the sky.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from injection_pipeline import dr10
from injection_pipeline import synthetic_survey as ss
from lensing.shapes import (moments_shape, position_angle_difference, q_phi_to_tractor_e1e2,
                            tractor_e1e2_to_q_phi)


def test_reference_values():
    # theta = atan2(e2, e1)/2 = 0: major axis north = +y -> phi = pi/2; q = (1-e)/(1+e)
    q, phi = tractor_e1e2_to_q_phi(0.2, 0.0)
    assert q == pytest.approx(0.8 / 1.2, abs=1e-15) and phi == pytest.approx(np.pi / 2, abs=1e-15)
    # e2 > 0, e1 = 0: theta = 45 deg east of north -> toward -x, +y -> phi = 135 deg
    assert tractor_e1e2_to_q_phi(0.0, 0.3)[1] == pytest.approx(np.radians(135.0), abs=1e-14)
    # e1 < 0: theta = 90 deg (east = -x) -> phi = 0 (mod pi)
    assert position_angle_difference(tractor_e1e2_to_q_phi(-0.3, 0.0)[1], 0.0) < 1e-14


@settings(max_examples=200, deadline=None)
@given(st.floats(0.05, 1.0), st.floats(0.0, np.pi, exclude_max=True))
def test_round_trip(q, phi):
    e1, e2 = q_phi_to_tractor_e1e2(q, phi)
    q2, phi2 = tractor_e1e2_to_q_phi(e1, e2)
    assert q2 == pytest.approx(q, rel=1e-12, abs=1e-12)
    if q < 1 - 1e-9:
        assert position_angle_difference(phi2, phi) < 1e-9


def test_bad_ellipticity_is_refused():
    with pytest.raises(ValueError, match="< 1"):
        tractor_e1e2_to_q_phi(0.8, 0.7)
    with pytest.raises(ValueError, match="finite"):
        tractor_e1e2_to_q_phi(np.nan, 0.1)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        q_phi_to_tractor_e1e2(0.0, 0.3)


CASES = [(0.25, 0.0), (0.0, 0.25), (-0.2, 0.1), (0.15, -0.3), (-0.3, -0.05), (0.05, 0.33)]


@pytest.mark.parametrize("e1,e2", CASES)
def test_synthetic_survey_pixels_follow_the_catalogue_shape(e1, e2):
    """Render as the synthetic survey renders catalogue galaxies; measure moments on pixels."""
    e = math.hypot(e1, e2)
    q_cat = (1 - e) / (1 + e)
    pa_deg = math.degrees(0.5 * math.atan2(e2, e1))     # Tractor: east of north
    x, y = 200.3, 199.6
    x0, y0, stamps = ss.render_galaxy(x, y, re_px=6.0, n=1.0, q=q_cat, pa_deg=pa_deg,
                                      fluxes={"r": 100.0}, sigmas_px={"r": 1.9})
    img = stamps["r"]
    q_meas, phi_meas = moments_shape(img, x - x0, y - y0, sigma_w_px=12.0)
    _, phi = tractor_e1e2_to_q_phi(e1, e2)
    assert math.degrees(position_angle_difference(phi_meas, phi)) < 0.5
    assert q_cat < q_meas < 1.0       # PSF and weight round the moments ellipse, never flip it

    # the pixel direction phi is the Tractor PA on the sky, through the brick's TAN WCS
    wcs = dr10.brick_wcs(150.0, 2.0, ss.SMALL_SIZE)
    cx, cy = 199.5, 199.5
    ra0, dec0 = dr10.brick_pixel_to_radec(wcs, np.array([cx]), np.array([cy]))
    ra1, dec1 = dr10.brick_pixel_to_radec(wcs, np.array([cx + 10 * math.cos(phi)]),
                                          np.array([cy + 10 * math.sin(phi)]))
    d_east = (ra1[0] - ra0[0]) * math.cos(math.radians(dec0[0]))
    d_north = dec1[0] - dec0[0]
    pa_sky = math.degrees(math.atan2(d_east, d_north))
    diff = (pa_sky - pa_deg) % 180.0
    assert min(diff, 180.0 - diff) < 0.05


def test_moments_recover_an_analytic_gaussian():
    ny, nx = 81, 91
    yy, xx = np.mgrid[0:ny, 0:nx].astype(float)
    x0, y0, phi, sa, sb = 44.2, 40.7, 0.6, 6.0, 3.0
    u = (xx - x0) * math.cos(phi) + (yy - y0) * math.sin(phi)
    v = -(xx - x0) * math.sin(phi) + (yy - y0) * math.cos(phi)
    img = np.exp(-0.5 * (u * u / sa ** 2 + v * v / sb ** 2))
    q, phi_m = moments_shape(img, x0, y0, sigma_w_px=1e6)   # ~unweighted
    assert q == pytest.approx(sb / sa, rel=1e-6)
    assert position_angle_difference(phi_m, phi) < 1e-9
    # a finite circular weight keeps the orientation
    assert position_angle_difference(moments_shape(img, x0, y0, 4.0)[1], phi) < 1e-9
    with pytest.raises(ValueError, match="no positive"):
        moments_shape(np.zeros((5, 5)), 2, 2, 1.0)
