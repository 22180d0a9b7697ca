"""Physics tests of lensing.mass_profiles (SIS, SIE, external shear) by analytic identities.

Conventions (physics-conventions.md): lenstronomy's SIE with the circularised theta_E, i.e.
alpha_x' = (theta_E sqrt(q)/f) arctan(f x'/psi), alpha_y' = (theta_E sqrt(q)/f) artanh(f y'/psi),
kappa = theta_E / (2 sqrt(q x'^2 + y'^2/q)); critical curve q x'^2 + y'^2/q = theta_E^2 of
area pi theta_E^2.  Tolerances are stated in the assertion messages.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy.optimize import brentq

from lensing import (LensModel, convergence_sie, convergence_sis, deflection_shear,
                     deflection_sie, deflection_sis, hessian_shear, hessian_sie, hessian_sis,
                     point_magnification, shear_components)

# ------------------------------------------------------------------------- reference values


@pytest.mark.parametrize("x, y, ax, ay, kappa", [
    (0.7, 0.2, 1.01970026, 0.41661151, 0.99907536),
    (-0.3, 0.9, -0.29716801, 1.22797675, 0.50636968),
    (1.5, -0.4, 1.02657777, -0.39170706, 0.47189025),
])
def test_sie_reference_values(x, y, ax, ay, kappa):
    """lenstronomy values for q=0.6, theta_E=1.2, phi=0 (8 decimals)."""
    got_ax, got_ay = deflection_sie(x, y, 1.2, 0.6, 0.0)
    assert got_ax == pytest.approx(ax, abs=1e-8), "alpha_x vs lenstronomy table (abs 1e-8)"
    assert got_ay == pytest.approx(ay, abs=1e-8), "alpha_y vs lenstronomy table (abs 1e-8)"
    assert convergence_sie(x, y, 1.2, 0.6, 0.0) == pytest.approx(kappa, abs=1e-8), \
        "kappa vs lenstronomy table (abs 1e-8)"
    # same through the composite model, and rotated/offset consistently
    lm = LensModel(1.2, 0.6, 0.0)
    assert lm.deflection(x, y)[0] == pytest.approx(ax, abs=1e-8)
    phi, x0, y0 = 0.9, 0.31, -0.17
    c, s = math.cos(phi), math.sin(phi)
    rx, ry = x0 + c * x - s * y, y0 + s * x + c * y  # the point rotated with the lens
    bx, by = deflection_sie(rx, ry, 1.2, 0.6, phi, x0, y0)
    assert c * bx + s * by == pytest.approx(ax, abs=1e-8), "rotated lens: alpha_x' (abs 1e-8)"
    assert -s * bx + c * by == pytest.approx(ay, abs=1e-8), "rotated lens: alpha_y' (abs 1e-8)"
    assert convergence_sie(rx, ry, 1.2, 0.6, phi, x0, y0) == pytest.approx(kappa, abs=1e-8)


def _sie_reference(x, y, theta_e, q, phi=0.0, x0=0.0, y0=0.0):
    """Direct transcription of the convention formulas (q < 1, away from the centre)."""
    c, s = math.cos(phi), math.sin(phi)
    dx, dy = np.asarray(x) - x0, np.asarray(y) - y0
    xp, yp = c * dx + s * dy, -s * dx + c * dy
    f = math.sqrt(1 - q * q)
    psi = np.sqrt(q * q * xp**2 + yp**2)
    axp = theta_e * math.sqrt(q) / f * np.arctan(f * xp / psi)
    ayp = theta_e * math.sqrt(q) / f * np.arctanh(f * yp / psi)
    kappa = theta_e / (2 * np.sqrt(q * xp**2 + yp**2 / q))
    return c * axp - s * ayp, s * axp + c * ayp, kappa


def test_sie_matches_convention_formula_on_grid():
    rng = np.random.default_rng(1)
    x, y = rng.uniform(-3, 3, (2, 500))
    for q in (0.1, 0.39, 0.6, 0.95, 0.998):
        for phi in (0.0, 0.7, -2.3):
            ref = _sie_reference(x, y, 1.3, q, phi, 0.2, -0.1)
            ax, ay = deflection_sie(x, y, 1.3, q, phi, 0.2, -0.1)
            kap = convergence_sie(x, y, 1.3, q, phi, 0.2, -0.1)
            for got, want, name in ((ax, ref[0], "ax"), (ay, ref[1], "ay"), (kap, ref[2], "kappa")):
                np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12,
                                           err_msg=f"{name} q={q} phi={phi} (rtol 1e-10)")


# ------------------------------------------------------------------- Hessian vs deflection

def _fd_jacobian(defl, x, y, h=1e-6):
    axp, ayp = defl(x + h, y)
    axm, aym = defl(x - h, y)
    bxp, byp = defl(x, y + h)
    bxm, bym = defl(x, y - h)
    return ((axp - axm) / (2 * h), (bxp - bxm) / (2 * h),
            (ayp - aym) / (2 * h), (byp - bym) / (2 * h))


MODELS = [
    ("SIS", LensModel(1.1, 1.0, 0.0, 0.05, -0.12)),
    ("SIE", LensModel(1.2, 0.6, 0.0)),
    ("SIE rot+off", LensModel(0.9, 0.45, 1.1, -0.3, 0.22)),
    ("SIE q~1", LensModel(1.0, 1 - 1e-4, 0.4, 0.1, 0.1)),
    ("shear only", LensModel(0.0, 1.0, 0.0, 0.3, 0.1, 0.07, -0.04)),
    ("SIE+shear", LensModel(1.3, 0.3, -0.6, 0.13, -0.07, 0.05, 0.08)),
]


@pytest.mark.parametrize("name, lens", MODELS, ids=[m[0] for m in MODELS])
def test_hessian_is_derivative_of_deflection(name, lens):
    rng = np.random.default_rng(7)
    x, y = rng.uniform(-2.5, 2.5, (2, 400))
    r = np.hypot(x - lens.x0, y - lens.y0)
    x, y = x[r > 0.1], y[r > 0.1]
    jxx, jxy, jyx, jyy = _fd_jacobian(lens.deflection, x, y)
    fxx, fxy, fyx, fyy = lens.hessian(x, y)
    for got, fd, comp in ((fxx, jxx, "f_xx"), (fxy, jxy, "f_xy"), (fyx, jyx, "f_yx"), (fyy, jyy, "f_yy")):
        err = np.max(np.abs(got - fd))
        assert err < 2e-7, f"{name}: {comp} vs central FD of alpha: max err {err:.2e} (> 2e-7)"
    # alpha is a gradient: its Jacobian is symmetric
    assert np.max(np.abs(jxy - jyx)) < 2e-7, f"{name}: curl of alpha != 0 (2e-7)"
    np.testing.assert_array_equal(fxy, fyx)


def test_component_hessians_vs_fd():
    x, y = np.meshgrid(np.linspace(-2, 2, 21) + 0.013, np.linspace(-2, 2, 21) - 0.007)
    for defl, hess in (
        (lambda a, b: deflection_sis(a, b, 0.8, 0.1, 0.2), lambda a, b: hessian_sis(a, b, 0.8, 0.1, 0.2)),
        (lambda a, b: deflection_sie(a, b, 0.8, 0.3, 2.0, 0.1, 0.2),
         lambda a, b: hessian_sie(a, b, 0.8, 0.3, 2.0, 0.1, 0.2)),
        (lambda a, b: deflection_shear(a, b, 0.03, -0.06), lambda a, b: hessian_shear(a, b, 0.03, -0.06)),
    ):
        fd = _fd_jacobian(defl, x, y)
        an = hess(x, y)
        for i in range(4):
            np.testing.assert_allclose(an[i], fd[i], atol=2e-7, err_msg="component Hessian vs FD (2e-7)")


@pytest.mark.parametrize("q, phi", [(1.0, 0.0), (0.6, 0.0), (0.25, 0.8), (0.9, -1.4)])
def test_convergence_is_half_trace_and_matches_formula(q, phi):
    rng = np.random.default_rng(3)
    x, y = rng.uniform(-3, 3, (2, 300))
    theta_e, x0, y0 = 1.4, -0.2, 0.3
    fxx, _, _, fyy = hessian_sie(x, y, theta_e, q, phi, x0, y0)
    c, s = math.cos(phi), math.sin(phi)
    xp, yp = c * (x - x0) + s * (y - y0), -s * (x - x0) + c * (y - y0)
    kappa = theta_e / (2 * np.sqrt(q * xp**2 + yp**2 / q))
    np.testing.assert_allclose(0.5 * (fxx + fyy), kappa, rtol=1e-12, err_msg="(f_xx+f_yy)/2 = kappa (1e-12)")
    np.testing.assert_allclose(convergence_sie(x, y, theta_e, q, phi, x0, y0), kappa, rtol=1e-12)
    # isothermal: |gamma| = kappa, so det A = 1 - 2 kappa for a pure SIE
    mu = LensModel(theta_e, q, phi, x0, y0).magnification(x, y)
    np.testing.assert_allclose(1 / mu, 1 - 2 * kappa, rtol=1e-10, atol=1e-12,
                               err_msg="SIE: det A = 1 - 2 kappa (1e-10)")
    if q == 1.0:
        r = np.hypot(x - x0, y - y0)
        np.testing.assert_allclose(convergence_sis(x, y, theta_e, x0, y0), theta_e / (2 * r), rtol=1e-12)


# --------------------------------------------------------------- critical curve of an SIE

def _critical_radius(lens, ang):
    """Radius (from the lens centre) where det A = 0 along direction ang (tangential curve)."""
    def det(r):
        return 1.0 / lens.magnification(lens.x0 + r * math.cos(ang), lens.y0 + r * math.sin(ang))
    return brentq(det, 1e-3, 20.0, xtol=1e-14, rtol=1e-14)


@pytest.mark.parametrize("theta_e, q, phi", [(1.2, 0.6, 0.0), (0.8, 0.3, 0.7), (1.0, 0.95, -1.2),
                                             (1.5, 1.0, 0.0)])
def test_critical_curve_area_and_shape(theta_e, q, phi):
    lens = LensModel(theta_e, q, phi, 0.17, -0.09)
    m = 2048
    angles = (np.arange(m) + 0.5) * (2 * np.pi / m)
    rc = np.array([_critical_radius(lens, a) for a in angles[::16]])
    # shape: q x'^2 + y'^2/q = theta_E^2
    xp, yp = rc * np.cos(angles[::16] - phi), rc * np.sin(angles[::16] - phi)
    np.testing.assert_allclose(q * xp**2 + yp**2 / q, theta_e**2, rtol=1e-10,
                               err_msg="critical curve is q x'^2 + y'^2/q = theta_E^2 (1e-10)")
    # area by the polar formula (periodic trapezoid on the analytic radius = spectrally exact)
    r_all = theta_e / np.sqrt(q * np.cos(angles - phi) ** 2 + np.sin(angles - phi) ** 2 / q)
    area = 0.5 * np.mean(r_all**2) * 2 * np.pi
    assert area == pytest.approx(np.pi * theta_e**2, rel=1e-10), "polar area = pi theta_E^2 (1e-10)"


def test_critical_region_pixel_count_and_mean_convergence():
    """Count grid cells with det A < 0 (inside the tangential curve) and average kappa there."""
    theta_e, q, phi = 1.2, 0.6, 0.5
    lens = LensModel(theta_e, q, phi)
    h = 0.0025
    half = 1.2 * theta_e / math.sqrt(q)
    g = np.arange(-half + h / 2, half, h)
    x, y = np.meshgrid(g, g)
    det = 1.0 / lens.magnification(x, y)
    inside = det < 0
    area = inside.sum() * h * h
    assert area == pytest.approx(np.pi * theta_e**2, rel=1e-3), \
        f"area with det A < 0 = {area:.6f} vs pi theta_E^2 = {np.pi * theta_e**2:.6f} (rel 1e-3)"
    kappa = convergence_sie(x, y, theta_e, q, phi)
    mean_kappa = kappa[inside].mean()
    assert mean_kappa == pytest.approx(1.0, rel=2e-3), f"<kappa> inside = {mean_kappa:.6f} (1 +/- 2e-3)"


@pytest.mark.parametrize("theta_e, q, phi", [(1.2, 0.6, 0.0), (0.7, 0.25, 1.0), (1.0, 1 - 1e-7, 0.3),
                                             (1.1, 1.0, 0.0)])
def test_mean_convergence_inside_critical_curve_by_gauss(theta_e, q, phi):
    """<kappa> = (1/(2A)) contour integral of alpha . n dl (divergence theorem) = 1."""
    x0, y0 = -0.3, 0.4
    m = 4096
    t = np.arange(m) * (2 * np.pi / m)
    # ellipse q x'^2 + y'^2/q = theta_E^2 parametrised in the lens frame
    a, b = theta_e / math.sqrt(q), theta_e * math.sqrt(q)
    c, s = math.cos(phi), math.sin(phi)
    xp, yp = a * np.cos(t), b * np.sin(t)
    dxp, dyp = -a * np.sin(t), b * np.cos(t)
    x, y = x0 + c * xp - s * yp, y0 + s * xp + c * yp
    dx, dy = c * dxp - s * dyp, s * dxp + c * dyp
    ax, ay = LensModel(theta_e, q, phi, x0, y0).deflection(x, y)
    flux = np.mean(ax * dy - ay * dx) * 2 * np.pi
    area = math.pi * a * b
    assert area == pytest.approx(math.pi * theta_e**2, rel=1e-12)
    assert flux / (2 * area) == pytest.approx(1.0, rel=1e-9), "<kappa> inside critical curve = 1 (1e-9)"


# --------------------------------------------------------------------- caustics of an SIE

def test_tangential_caustic_cusps_and_cut_q06():
    """q=0.6, theta_E=1.2: cusps 0.47177 (major), 0.34696 (minor); cut 1.07742, 1.27647."""
    for phi, x0, y0 in ((0.0, 0.0, 0.0), (0.8, 0.25, -0.4)):
        lens = LensModel(1.2, 0.6, phi, x0, y0)
        for ang_off, cusp, cut in ((0.0, 0.47177, 1.07742), (math.pi / 2, 0.34696, 1.27647)):
            ang = phi + ang_off
            rc = _critical_radius(lens, ang)
            bx, by = lens.ray_shoot(x0 + rc * math.cos(ang), y0 + rc * math.sin(ang))
            beta = math.hypot(bx - x0, by - y0)
            assert beta == pytest.approx(cusp, abs=1e-4), \
                f"cusp at angle {ang_off:.2f}: {beta:.6f} vs {cusp} (abs 1e-4)"
            # cusp lies on the principal axis (on the same side for the major, opposite for minor)
            along = (bx - x0) * math.cos(ang) + (by - y0) * math.sin(ang)
            assert abs(along) == pytest.approx(beta, abs=1e-9), "cusp on the principal axis"
            # the cut: image of the centre approached along the axis, |alpha(0+)|
            ax, ay = lens.deflection(x0 + 1e-10 * math.cos(ang), y0 + 1e-10 * math.sin(ang))
            assert math.hypot(ax, ay) == pytest.approx(cut, abs=1e-4), \
                f"cut at angle {ang_off:.2f}: {math.hypot(ax, ay):.6f} vs {cut} (abs 1e-4)"


def test_naked_cusp_threshold():
    """Naked cusps (major-axis cusp outside the cut) appear for q < 0.394235."""
    def cusp_minus_cut(q):
        lens = LensModel(1.0, q, 0.0)
        rc = _critical_radius(lens, 0.0)
        cusp = abs(lens.ray_shoot(rc, 0.0)[0])
        cut = abs(lens.deflection(1e-10, 0.0)[0])
        return cusp - cut
    assert cusp_minus_cut(0.38) > 0 and cusp_minus_cut(0.41) < 0
    q_naked = brentq(cusp_minus_cut, 0.3, 0.5, xtol=1e-10)
    assert q_naked == pytest.approx(0.394235, abs=2e-6), f"naked-cusp q = {q_naked:.7f} (abs 2e-6)"


# -------------------------------------------------------------------------- SIS -> q -> 1

@pytest.mark.parametrize("eps", [0.0, 1e-9, 1e-6, 1e-4, 1e-3])
def test_sie_tends_to_sis(eps):
    q = 1.0 - eps
    rng = np.random.default_rng(11)
    x, y = rng.uniform(-3, 3, (2, 300))
    x = np.append(x, [0.0, 1e-12, 0.0, 2.0, -0.5])
    y = np.append(y, [0.0, 0.0, -3e-13, 0.0, 0.0])
    ax, ay = deflection_sie(x, y, 1.2, q, 0.6, 0.0, 0.0)
    sx, sy = deflection_sis(x, y, 1.2)
    h = hessian_sie(x, y, 1.2, q, 0.6)
    hs = hessian_sis(x, y, 1.2)
    assert np.all(np.isfinite(ax)) and np.all(np.isfinite(ay)) and all(np.all(np.isfinite(c)) for c in h)
    err = np.max(np.hypot(ax - sx, ay - sy))
    # first order in (1 - q): max |delta alpha| = c theta_E (1 - q), c measured 1/3 (eps >= 1e-9)
    assert err <= 0.5 * 1.2 * eps + 1e-14, \
        f"|alpha_SIE(q=1-{eps}) - alpha_SIS| = {err:.3e} > 0.5 theta_E (1-q)"
    if eps > 0:
        assert err >= 0.2 * 1.2 * eps, \
            f"|delta alpha| = {err:.2e} < 0.2 theta_E (1-q): not first order in 1-q (stuck at SIS?)"
    r = np.hypot(x, y)
    ok = r > 1e-6
    for i in range(4):
        rel = np.max(np.abs(h[i][ok] - hs[i][ok]) * r[ok])
        assert rel <= 1.2 * 2 * eps + 1e-12, f"Hessian r*|d f| = {rel:.2e} (<= 2 theta_E eps)"


def test_sie_smooth_across_series_switch():
    """alpha(q) is smooth through the series/closed-form switch near 1 - q ~ 1e-3."""
    x, y = np.array([0.7, -1.3, 0.2, 2.5]), np.array([0.4, 0.9, -1.8, 0.01])
    qs = 1 - np.linspace(0.8e-3, 1.3e-3, 26)
    vals = np.array([np.concatenate(deflection_sie(x, y, 1.0, q, 0.3)) for q in qs])
    second = np.abs(np.diff(vals, 2, axis=0))
    # alpha is analytic in q: second differences ~ alpha'' dq^2 ~ 1e-10; a jump would show
    assert second.max() < 1e-9, f"second difference in q {second.max():.2e} (> 1e-9): jump at switch?"
    # and the closed form evaluated directly agrees just below the switch (q = 1 - 1e-3)
    q = 1 - 1e-3
    ref = _sie_reference(x, y, 1.0, q, 0.3)
    got = deflection_sie(x, y, 1.0, q, 0.3)
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-11, atol=1e-11,
                               err_msg="series vs closed form at the switch (1e-11)")
    np.testing.assert_allclose(got[1], ref[1], rtol=1e-11, atol=1e-11,
                               err_msg="series vs closed form at the switch (1e-11)")


def test_deflection_finite_and_zero_at_lens_centre():
    for lens in (LensModel(1.0, 1.0, 0.0, 0.3, -0.2), LensModel(1.0, 0.5, 0.7, 0.3, -0.2),
                 LensModel(1.0, 1 - 1e-8, 0.7, 0.3, -0.2), LensModel(1.0, 0.5, 0.7, 0.3, -0.2, 0.1, 0.05)):
        ax, ay = lens.deflection(0.3, -0.2)
        assert ax == 0.0 and ay == 0.0, f"alpha at the centre must be 0 (symmetric limit), got {ax, ay}"
        h = lens.hessian(0.3, -0.2)
        assert all(np.isfinite(v) for v in h)
        mu = lens.magnification(0.3, -0.2)
        assert np.isfinite(mu) and abs(mu) < 1e-6, f"mu at the singular centre ~ 0, got {mu}"
        # and tiny offsets stay bounded by the cut: |alpha| <= theta_E / sqrt(q) * (pi/2)
        eps = np.array([1e-300, 1e-15, 1e-9])
        ax, ay = lens.deflection(0.3 + eps, -0.2 + eps)
        assert np.all(np.isfinite(ax)) and np.all(np.hypot(ax, ay) < 3.0)


# -------------------------------------------------------------------------------- SIS images

@pytest.mark.parametrize("beta, theta_e, ang", [(0.3, 1.0, 0.0), (0.05, 1.2, 2.0), (0.7, 0.8, -1.0),
                                                (0.5, 1.5, math.pi)])
def test_sis_images_and_magnifications(beta, theta_e, ang):
    x0, y0 = 0.2, -0.1
    lens = LensModel(theta_e, 1.0, 0.0, x0, y0)
    ux, uy = math.cos(ang), math.sin(ang)
    bx, by = x0 + beta * ux, y0 + beta * uy

    def resid(t):  # lens equation along the source axis (image at signed distance t)
        sx, sy = lens.ray_shoot(x0 + t * ux, y0 + t * uy)
        return (sx - bx) * ux + (sy - by) * uy

    t_plus = brentq(resid, 1e-9, 10 * theta_e, xtol=1e-14)
    t_minus = brentq(resid, -10 * theta_e, -1e-9, xtol=1e-14)
    assert t_plus == pytest.approx(beta + theta_e, abs=1e-10), "image at beta + theta_E (1e-10)"
    assert t_minus == pytest.approx(beta - theta_e, abs=1e-10), "image at beta - theta_E (1e-10)"
    for t in (t_plus, t_minus):  # perpendicular residual also zero
        sx, sy = lens.ray_shoot(x0 + t * ux, y0 + t * uy)
        assert math.hypot(sx - bx, sy - by) < 1e-10
    mu_p = lens.magnification(x0 + t_plus * ux, y0 + t_plus * uy)
    mu_m = point_magnification(x0 + t_minus * ux, y0 + t_minus * uy, theta_e, x0=x0, y0=y0)
    assert mu_p == pytest.approx(1 + theta_e / beta, rel=1e-9), "mu+ = 1 + theta_E/beta (1e-9)"
    assert mu_m == pytest.approx(1 - theta_e / beta, rel=1e-9), "mu- = 1 - theta_E/beta, negative (1e-9)"
    assert mu_m < 0
    assert abs(mu_p) + abs(mu_m) == pytest.approx(2 * theta_e / beta, rel=1e-9)


def test_sis_einstein_radius_from_velocity_dispersion():
    # theta_E = 4 pi (sigma/c)^2 D_ls/D_s: 250 km/s, 0.5 -> 0.9012"
    theta = 4 * math.pi * (250.0 / 299792.458) ** 2 * 0.5 * 180 / math.pi * 3600
    assert theta == pytest.approx(0.9012, abs=1e-4)
    # and an SIS of that radius has its critical circle there
    assert LensModel(theta).magnification(theta * 1.000001, 0.0) > 1e5


# ------------------------------------------------------------------------------------ shear

def test_shear_components_and_deflection():
    g1, g2 = shear_components(0.05, math.pi / 8)
    assert (g1, g2) == pytest.approx((0.05 / math.sqrt(2), 0.05 / math.sqrt(2)), abs=1e-15)
    assert shear_components(0.1, 0.0) == pytest.approx((0.1, 0.0))
    assert shear_components(0.1, math.pi / 2) == pytest.approx((-0.1, 0.0), abs=1e-15), \
        "phi_gamma = 90 deg gives gamma1 = -gamma (2 phi convention)"
    g1v, g2v = shear_components(np.array([0.1, 0.2]), np.array([0.0, math.pi / 4]))
    np.testing.assert_allclose(g1v, [0.1, 0.0], atol=1e-15)
    np.testing.assert_allclose(g2v, [0.0, 0.2], atol=1e-15)
    assert np.hypot(*shear_components(0.07, 1.234)) == pytest.approx(0.07, rel=1e-14)
    # conventions example: gamma = (0.05, 0.02) at (1, 2) -> (0.09, -0.08)
    assert deflection_shear(1.0, 2.0, 0.05, 0.02) == pytest.approx((0.09, -0.08), abs=1e-15)
    # via LensModel: shear about the lens centre, no SIE
    lm = LensModel(0.0, 1.0, 0.0, 0.4, -0.3, 0.05, 0.02)
    assert lm.deflection(1.4, 1.7) == pytest.approx((0.09, -0.08), abs=1e-14)
    # shear deflection is the gradient of psi = (g1 (x^2 - y^2) + 2 g2 x y)/2
    psi = lambda x, y: 0.5 * (0.05 * (x * x - y * y) + 2 * 0.02 * x * y)  # noqa: E731
    h = 1e-6
    gx = (psi(1 + h, 2) - psi(1 - h, 2)) / (2 * h)
    gy = (psi(1, 2 + h) - psi(1, 2 - h)) / (2 * h)
    assert (gx, gy) == pytest.approx((0.09, -0.08), abs=1e-8)
    # shear Hessian: kappa = 0, |gamma| = 0.0538...
    fxx, fxy, fyx, fyy = hessian_shear(np.zeros(3), np.zeros(3), 0.05, 0.02)
    np.testing.assert_array_equal(fxx + fyy, 0.0)
    np.testing.assert_allclose(np.hypot(0.5 * (fxx - fyy), fxy), math.hypot(0.05, 0.02), rtol=1e-14)


def test_composite_is_sum_of_components():
    lens = LensModel(1.1, 0.55, 0.35, 0.12, -0.2, 0.04, -0.03)
    rng = np.random.default_rng(5)
    x, y = rng.uniform(-2, 2, (2, 100))
    ax, ay = lens.deflection(x, y)
    sx, sy = deflection_sie(x, y, 1.1, 0.55, 0.35, 0.12, -0.2)
    hx, hy = deflection_shear(x - 0.12, y + 0.2, 0.04, -0.03)
    np.testing.assert_allclose(ax, sx + hx, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(ay, sy + hy, rtol=1e-14, atol=1e-15)
    bx, by = lens.ray_shoot(x, y)
    np.testing.assert_allclose(bx, x - ax, rtol=1e-14)
    np.testing.assert_allclose(by, y - ay, rtol=1e-14)


@pytest.mark.parametrize("kw", [dict(theta_e=-1.0), dict(theta_e=np.nan), dict(theta_e=np.inf),
                                dict(theta_e=1.0, q=0.0), dict(theta_e=1.0, q=1.2),
                                dict(theta_e=1.0, q=np.nan), dict(theta_e=1.0, x0=np.nan),
                                dict(theta_e=1.0, gamma1=np.inf)])
def test_lens_model_rejects_invalid(kw):
    with pytest.raises(ValueError):
        LensModel(**kw)


# ----------------------------------------------------------------- hypothesis properties

coord = st.one_of(st.floats(-6.0, 6.0, allow_nan=False),
                  st.sampled_from([0.0, 1.0, -1.0, 1e-300, 1e-12]))
q_st = st.one_of(st.floats(0.05, 1.0), st.sampled_from([1.0, 1 - 1e-15, 1 - 1e-12, 1 - 1e-9, 1 - 1e-5,
                                                        1 - 1e-3, 0.05]))
theta_st = st.one_of(st.floats(0.0, 3.0), st.sampled_from([0.0, 1.0]))
phi_st = st.floats(-7.0, 7.0)
gamma_st = st.one_of(st.just(0.0), st.floats(-0.3, 0.3))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("d", [5e-324, 2.2250738585e-313, 1e-310])
def test_sis_deflection_subnormal_offset(d):
    ax, ay = deflection_sis(0.0, 0.0, 1.0, 0.0, d)
    assert np.isfinite(ax) and np.isfinite(ay), f"deflection_sis at distance {d} = {(ax, ay)}"
    assert abs(ay + 1.0) < 1e-12 and ax == 0.0, "theta_E times the unit vector toward the point"


def test_sis_deflection_tiny_normal_offset():
    for d in (1e-300, 1e-200, 1e-17):
        ax, ay = deflection_sis(0.0, 0.0, 1.3, d, 0.0)
        assert ax == pytest.approx(-1.3, rel=1e-15) and ay == 0.0


@settings(max_examples=300, deadline=None)
@given(x=coord, y=coord, theta_e=theta_st, q=q_st, phi=phi_st, x0=coord, y0=coord,
       g1=gamma_st, g2=gamma_st, at_centre=st.booleans())
def test_property_everything_finite(x, y, theta_e, q, phi, x0, y0, g1, g2, at_centre):
    if at_centre:
        x, y = x0, y0
    lens = LensModel(theta_e, q, phi, x0, y0, g1, g2)
    xa, ya = np.array([x, x0, x0]), np.array([y, y0, y0 + 1e-13])
    ax, ay = lens.deflection(xa, ya)
    assert np.all(np.isfinite(ax)) and np.all(np.isfinite(ay)), (ax, ay)
    # a SIE deflection is bounded: |alpha| <= theta_E * pi/(2 sqrt(q)) * ... (< the cut, for
    # artanh it grows only logarithmically); plus the shear term
    h = lens.hessian(xa, ya)
    assert all(np.all(np.isfinite(c)) for c in h), h
    det = (1 - h[0]) * (1 - h[3]) - h[1] * h[2]
    with np.errstate(divide="ignore"):
        mu = lens.magnification(xa, ya)
    assert not np.any(np.isnan(mu)), mu
    # finite wherever det A != 0 (on the critical curve itself a point magnification diverges)
    assert np.all(np.isfinite(mu) | (det == 0)), (mu, det)
    bx, by = lens.ray_shoot(xa, ya)
    assert np.all(np.isfinite(bx)) and np.all(np.isfinite(by))


@settings(max_examples=200, deadline=None)
@given(x=st.floats(-5, 5), y=st.floats(-5, 5), theta_e=st.floats(0.1, 3.0), q=q_st, phi=phi_st,
       x0=st.floats(-1, 1, allow_subnormal=False), y0=st.floats(-1, 1, allow_subnormal=False))
def test_property_sie_symmetries(x, y, theta_e, q, phi, x0, y0):
    assume(math.hypot(x, y) > 1e-6)
    lens = LensModel(theta_e, q, phi, x0, y0)
    c, s = math.cos(phi), math.sin(phi)

    def defl_lens_frame(xp, yp):
        """Deflection (lens frame components) at lens-frame position (xp, yp)."""
        ax, ay = lens.deflection(x0 + c * xp - s * yp, y0 + s * xp + c * yp)
        return c * ax + s * ay, -s * ax + c * ay

    ax, ay = defl_lens_frame(x, y)
    tol = 1e-9 * (1 + abs(ax) + abs(ay))
    # point symmetry about the centre
    bx, by = defl_lens_frame(-x, -y)
    assert abs(bx + ax) < tol and abs(by + ay) < tol, "alpha(-x,-y) = -alpha(x,y)"
    # reflection about the major axis (y' -> -y')
    bx, by = defl_lens_frame(x, -y)
    assert abs(bx - ax) < tol and abs(by + ay) < tol, "mirror about the major axis"
    # reflection about the minor axis (x' -> -x')
    bx, by = defl_lens_frame(-x, y)
    assert abs(bx + ax) < tol and abs(by - ay) < tol, "mirror about the minor axis"
    # theta_E is a pure scale: alpha(theta_E) / theta_E independent of theta_E at fixed position
    a2 = LensModel(2 * theta_e, q, phi, x0, y0).deflection(x0 + c * x - s * y, y0 + s * x + c * y)
    a1 = lens.deflection(x0 + c * x - s * y, y0 + s * x + c * y)
    assert a2[0] == pytest.approx(2 * a1[0], rel=1e-12, abs=1e-15)
    assert a2[1] == pytest.approx(2 * a1[1], rel=1e-12, abs=1e-15)
    # isothermal: alpha is homogeneous of degree 0 (radially constant)
    r1 = defl_lens_frame(3.7 * x, 3.7 * y)
    # (absolute tolerance: the frame rotation about (x0, y0) rounds positions at ~1e-16 |x0|)
    tol_h = 1e-9 * theta_e * (1 + max(abs(x0), abs(y0)) / max(math.hypot(x, y), 1e-3))
    assert abs(r1[0] - ax) <= tol_h and abs(r1[1] - ay) <= tol_h, "alpha is radially constant"
