"""Physics tests of lensing.photometry and lensing.sersic by analytic identities.

Every tolerance is stated in the assertion message.  Conventions under test (see
/work/shared/reference/physics-conventions.md): 1 nMgy <-> AB 22.5; b_n solves
P(2n, b_n) = 1/2 exactly; r_e is the MAJOR-axis half-light radius,
R = sqrt(x'^2 + (y'/q)^2) in the frame rotated by phi.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate
from scipy.special import gammaincinv

from lensing import (AB_ZP_NMGY, mag_to_nMgy, nMgy_to_mag, regularized_lower_gamma,
                     sersic_bn, sersic_bn_ciotti_bertin, sersic_elliptical_radius,
                     sersic_profile_Ie1, sersic_unit_total_flux)

# ------------------------------------------------------------------------------ photometry


def test_zero_point_is_22p5():
    assert AB_ZP_NMGY == 22.5
    assert mag_to_nMgy(22.5) == pytest.approx(1.0, rel=1e-15), "22.5 mag must be 1 nMgy (1e-15)"
    assert nMgy_to_mag(1.0) == pytest.approx(22.5, abs=1e-14), "1 nMgy must be 22.5 mag (1e-14)"
    # 5 mag = factor 100 exactly; 2.5 mag = factor 10
    assert mag_to_nMgy(17.5) == pytest.approx(100.0, rel=1e-14), "17.5 mag = 100 nMgy (1e-14)"
    assert mag_to_nMgy(25.0) == pytest.approx(0.1, rel=1e-14), "25 mag = 0.1 nMgy (1e-14)"
    assert isinstance(mag_to_nMgy(20.0), float) and isinstance(nMgy_to_mag(3.0), float)


@settings(max_examples=200, deadline=None)
@given(st.floats(min_value=-5.0, max_value=40.0, allow_nan=False))
def test_mag_flux_round_trip(mag):
    back = nMgy_to_mag(mag_to_nMgy(mag))
    assert abs(back - mag) <= 1e-12, f"mag -> nMgy -> mag round trip off by {back - mag} (> 1e-12)"


@settings(max_examples=200, deadline=None)
@given(st.floats(min_value=1e-12, max_value=1e12, allow_nan=False))
def test_flux_mag_round_trip(flux):
    back = mag_to_nMgy(nMgy_to_mag(flux))
    assert back == pytest.approx(flux, rel=1e-12), "nMgy -> mag -> nMgy round trip (rel 1e-12)"


def test_vectorised_matches_scalar():
    mags = np.array([[15.0, 20.0, 22.5], [23.1, 25.0, 30.0]])
    flux = mag_to_nMgy(mags)
    assert isinstance(flux, np.ndarray) and flux.shape == mags.shape
    expected = np.array([[mag_to_nMgy(float(m)) for m in row] for row in mags])
    np.testing.assert_allclose(flux, expected, rtol=1e-15, err_msg="vectorised == scalar (1e-15)")
    np.testing.assert_allclose(flux, 10 ** (-0.4 * (mags - 22.5)), rtol=1e-14)
    back = nMgy_to_mag(flux)
    assert back.shape == mags.shape
    np.testing.assert_allclose(back, mags, atol=1e-12, err_msg="vectorised round trip (1e-12)")


def test_nonpositive_flux_gives_nan_by_default():
    flux = np.array([1.0, 0.0, -3.0, np.nan, np.inf, 100.0])
    mag = nMgy_to_mag(flux)
    assert mag[0] == pytest.approx(22.5) and mag[5] == pytest.approx(17.5)
    assert np.all(np.isnan(mag[1:5])), f"flux <= 0 / non-finite must give NaN, got {mag}"
    assert math.isnan(nMgy_to_mag(0.0)) and math.isnan(nMgy_to_mag(-1.0))


@pytest.mark.parametrize("bad", [0.0, -1.0, [1.0, 0.0], [2.0, -5.0, 3.0], np.nan])
def test_nonpositive_flux_raises_when_asked(bad):
    with pytest.raises(ValueError, match="<= 0"):
        nMgy_to_mag(bad, nonpositive="raise")


def test_nonpositive_option_is_validated():
    with pytest.raises(ValueError):
        nMgy_to_mag(1.0, nonpositive="clip")
    assert nMgy_to_mag([1.0, 10.0], nonpositive="raise") == pytest.approx([22.5, 20.0])


def test_mag_inf_gives_zero_flux():
    assert mag_to_nMgy(np.inf) == 0.0


# ------------------------------------------------------------------------------------ b_n


def test_bn_matches_scipy_gammaincinv_dense_grid():
    n = np.linspace(0.2, 10.0, 981)
    b = sersic_bn(n)
    ref = gammaincinv(2 * n, 0.5)
    rel = np.max(np.abs(b / ref - 1))
    assert rel <= 1e-6, f"sersic_bn vs gammaincinv(2n, 1/2): max rel err {rel:.3e} (> 1e-6)"
    # the actual solver is much better than the required 1e-6
    assert rel <= 1e-10, f"sersic_bn claims < 1e-12; measured {rel:.3e} (> 1e-10)"


@pytest.mark.parametrize("n", [0.2, 0.25, 0.5, 1.0, 2.5, 4.0, 7.3, 10.0])
def test_bn_solves_half_light_equation(n):
    b = sersic_bn(n)
    p = regularized_lower_gamma(2 * n, b)
    assert abs(p - 0.5) <= 1e-12, f"P(2n, b_n) = {p!r}, expected 0.5 (1e-12)"


@pytest.mark.parametrize("n, expected", [(0.3, 0.315702), (0.35, 0.407424), (0.5, 0.693147),
                                         (1.0, 1.678347), (2.0, 3.672061), (4.0, 7.669249)])
def test_bn_reference_values(n, expected):
    assert sersic_bn(n) == pytest.approx(expected, abs=6e-7), \
        "b_n vs physics-conventions.md table (6 decimals, abs 6e-7)"


def test_bn_n_half_is_ln2():
    # n = 1/2: P(1, b) = 1 - e^-b = 1/2  =>  b = ln 2 exactly
    assert sersic_bn(0.5) == pytest.approx(math.log(2.0), rel=1e-13), "b_0.5 = ln 2 (1e-13)"


def test_regularized_lower_gamma_vs_scipy():
    from scipy.special import gammainc
    a = np.array([0.4, 1.0, 2.0, 5.5, 20.0])[:, None]
    x = np.array([0.0, 0.01, 0.5, 1.0, 3.0, 10.0, 25.0, 40.0])[None, :]
    np.testing.assert_allclose(regularized_lower_gamma(a, x), gammainc(a, x), rtol=1e-12,
                               atol=1e-300, err_msg="P(a, x) vs scipy.special.gammainc (1e-12)")


def test_ciotti_bertin_accuracy_numbers():
    def rel(n):
        return float(sersic_bn_ciotti_bertin(n) / gammaincinv(2 * n, 0.5) - 1)
    # conventions: error 2.5e-5 at n=1, 3.6e-4 at n=0.5, 10% at n=0.2
    assert abs(rel(1.0)) == pytest.approx(2.5e-5, rel=0.05), "CB rel err at n=1 ~ 2.5e-5 (5%)"
    assert abs(rel(0.5)) == pytest.approx(3.6e-4, rel=0.05), "CB rel err at n=0.5 ~ 3.6e-4 (5%)"
    assert abs(rel(0.2)) == pytest.approx(0.10, rel=0.05), "CB rel err at n=0.2 ~ 10% (5%)"
    # and it is an asymptotic series: better at large n
    assert abs(rel(4.0)) < 1e-6 and abs(rel(10.0)) < 1e-8


@pytest.mark.parametrize("n", [0.0, 0.05, 13.0, np.nan, np.inf])
def test_bn_rejects_out_of_range(n):
    with pytest.raises(ValueError):
        sersic_bn(n)


# --------------------------------------------------------------------- Sersic flux / shape

CASES = [  # (n, r_e, q, phi, x0, y0)
    (0.5, 0.3, 1.0, 0.0, 0.0, 0.0),
    (1.0, 0.7, 0.5, 0.4, 0.1, -0.2),
    (2.5, 0.2, 0.8, 2.0, -0.3, 0.05),
    (4.0, 1.3, 0.35, -1.1, 0.0, 0.4),
    (0.3, 0.5, 0.6, 1.0, 0.2, 0.2),
    (8.0, 0.4, 0.9, 0.3, 0.0, 0.0),
]
N_THETA = 720  # periodic trapezoid in angle: spectrally accurate


def _ray_radius_scale(n, r_e, q, phi):
    """g(theta) = elliptical radius of the unit vector at angle theta (R is linear along rays)."""
    th = np.arange(N_THETA) * (2 * np.pi / N_THETA)
    return th, sersic_elliptical_radius(np.cos(th), np.sin(th), q, phi)


def _flux_polar(n, r_e, q, phi, x0, y0, within_re=False):
    """Flux of sersic_profile_Ie1 by polar integration about (x0, y0) in the SKY frame.

    Radial variable r = s u^n (s = r_e) to tame the cusp/wings; the integrand calls the
    code's profile at sky positions.  within_re: integrate out to the ellipse R = r_e only,
    whose radius along a ray is r_e / g(theta) (found from sersic_elliptical_radius).
    """
    th, g = _ray_radius_scale(n, r_e, q, phi)
    c, s = np.cos(th), np.sin(th)

    def integrand(u, to_ellipse=False):
        # r = r_e w^n, r dr = n r_e^2 w^(2n-1) dw (integrable at w = 0 even for n < 1/2)
        if to_ellipse:  # u in [0, 1] -> w = u w_b(theta), r_e w_b^n = r_e / g
            wb = (1.0 / g) ** (1.0 / n)
            w, dw = u * wb, wb
        else:
            w, dw = u, 1.0
        if u == 0:
            return 0.0  # r dr -> 0 (or an integrable singularity for n < 1/2: measure zero)
        r = r_e * w**n
        vals = sersic_profile_Ie1(x0 + r * c, y0 + r * s, n, r_e, q, phi, x0, y0)
        return np.mean(vals * n * r_e**2 * w ** (2 * n - 1) * dw) * 2 * np.pi

    if within_re:
        val, _ = integrate.quad_vec(lambda u: integrand(u, True), 0.0, 1.0, epsrel=1e-10)
        return val
    val, _ = integrate.quad_vec(integrand, 0.0, np.inf, epsrel=1e-10, epsabs=0)
    return val


@pytest.mark.parametrize("n, r_e, q, phi, x0, y0", CASES)
def test_total_flux_equals_numerical_integral(n, r_e, q, phi, x0, y0):
    analytic = sersic_unit_total_flux(n, r_e, q)
    numeric = _flux_polar(n, r_e, q, phi, x0, y0)
    assert numeric == pytest.approx(analytic, rel=1e-4), \
        f"analytic F={analytic:.8g} vs numerical integral {numeric:.8g} (rel 1e-4)"


def test_total_flux_on_fine_grid():
    """Independent brute-force check on a plain Cartesian grid (n=1, rotated, elliptical)."""
    n, r_e, q, phi = 1.0, 0.5, 0.6, 0.7
    h = 0.005
    x = np.arange(-8, 8 + h / 2, h)  # I(8") ~ 1e-11 I_e: negligible wing
    total = 0.0
    for row in np.array_split(x, 8):  # bounded memory
        total += sersic_profile_Ie1(x[None, :], row[:, None], n, r_e, q, phi, 0.013, -0.021).sum()
    total *= h * h
    analytic = sersic_unit_total_flux(n, r_e, q)
    assert total == pytest.approx(analytic, rel=1e-4), f"grid {total} vs {analytic} (rel 1e-4)"


@pytest.mark.parametrize("n, r_e, q, phi, x0, y0", CASES)
def test_half_light_within_major_axis_re(n, r_e, q, phi, x0, y0):
    """Half the light inside the ellipse of major-axis radius r_e: pins b_n AND the r_e axis."""
    inside = _flux_polar(n, r_e, q, phi, x0, y0, within_re=True)
    total = sersic_unit_total_flux(n, r_e, q)
    assert inside / total == pytest.approx(0.5, abs=1e-5), \
        f"flux fraction inside R=r_e is {inside / total:.7f}, expected 0.5 (abs 1e-5)"


def test_flux_scaling_laws():
    f = sersic_unit_total_flux(1.5, 0.4, 0.7)
    assert sersic_unit_total_flux(1.5, 0.8, 0.7) == pytest.approx(4 * f, rel=1e-13), "F ~ r_e^2"
    assert sersic_unit_total_flux(1.5, 0.4, 0.35) == pytest.approx(f / 2, rel=1e-13), "F ~ q"
    # n = 1/2 is a Gaussian: F = 2 pi q r_e^2 e^{ln2} / (2 ln 2) = 2 pi q r_e^2 / ln 2
    assert sersic_unit_total_flux(0.5, 1.0, 1.0) == pytest.approx(2 * np.pi / np.log(2), rel=1e-13)
    # n = 1 exponential: F = 2 pi q r_e^2 e^b / b^2
    b1 = sersic_bn(1.0)
    assert sersic_unit_total_flux(1.0, 1.0, 0.5) == pytest.approx(np.pi * np.exp(b1) / b1**2, rel=1e-13)
    # vectorised over n
    ns = np.array([0.5, 1.0, 4.0])
    vec = sersic_unit_total_flux(ns, 1.0, 1.0, bn=sersic_bn(ns))
    np.testing.assert_allclose(vec, [sersic_unit_total_flux(v, 1.0, 1.0) for v in ns], rtol=1e-13)


@pytest.mark.parametrize("phi", [0.0, 0.3, 1.2, -2.0, np.pi / 2])
@pytest.mark.parametrize("q", [1.0, 0.7, 0.25])
def test_profile_is_one_on_the_re_ellipse(q, phi):
    n, r_e, x0, y0 = 2.0, 0.8, 0.15, -0.35
    c, s = np.cos(phi), np.sin(phi)
    # major axis (angle phi) at distance r_e, both directions
    for sign in (1, -1):
        v = sersic_profile_Ie1(x0 + sign * r_e * c, y0 + sign * r_e * s, n, r_e, q, phi, x0, y0)
        assert v == pytest.approx(1.0, abs=1e-12), f"I(r_e on major axis) = {v} (1 +/- 1e-12)"
        # minor axis (angle phi + 90 deg) at distance q r_e
        v = sersic_profile_Ie1(x0 - sign * q * r_e * s, y0 + sign * q * r_e * c, n, r_e, q, phi, x0, y0)
        assert v == pytest.approx(1.0, abs=1e-12), f"I(q r_e on minor axis) = {v} (1 +/- 1e-12)"
    # any point of the ellipse
    t = np.linspace(0, 2 * np.pi, 37)
    xe = x0 + r_e * np.cos(t) * c - q * r_e * np.sin(t) * s
    ye = y0 + r_e * np.cos(t) * s + q * r_e * np.sin(t) * c
    np.testing.assert_allclose(sersic_profile_Ie1(xe, ye, n, r_e, q, phi, x0, y0), 1.0, atol=1e-12)
    if q < 1:
        # NOT 1 at r_e along the minor axis (pins which axis r_e refers to)
        v = sersic_profile_Ie1(x0 - r_e * s, y0 + r_e * c, n, r_e, q, phi, x0, y0)
        assert v < 0.9, f"I(r_e along minor axis) = {v} should be well below 1 for q={q}"


def test_profile_shape_values():
    b = sersic_bn(1.0)
    # centre = e^{b}, monotone decreasing along any ray, exp law for n=1
    assert sersic_profile_Ie1(0.0, 0.0, 1.0, 0.5, 0.6, 0.3) == pytest.approx(np.exp(b), rel=1e-13)
    r = np.linspace(0, 3, 50)
    prof = sersic_profile_Ie1(r * np.cos(0.3), r * np.sin(0.3), 1.0, 0.5, 0.6, 0.3)
    np.testing.assert_allclose(prof, np.exp(-b * (r / 0.5 - 1)), rtol=1e-12)
    assert np.all(np.diff(sersic_profile_Ie1(r, 0.2 * r, 4.0, 0.5, 0.6, 1.0)) < 0)


@pytest.mark.parametrize("q, r_e", [(0.0, 1.0), (1.5, 1.0), (0.5, 0.0), (0.5, -1.0)])
def test_profile_rejects_bad_shape(q, r_e):
    with pytest.raises(ValueError):
        sersic_profile_Ie1(0.0, 0.0, 1.0, r_e, q, 0.0)
