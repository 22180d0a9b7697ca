"""lensing.images: tangential critical curve, point magnification outside it, point images.

Analytic identities (SIS; SIE critical curve q x'^2 + y'^2/q = theta_E^2 without shear;
caustic cusps of physics-conventions.md), an independent numerical bracketing of det A along
rays, a seeded sweep over q, phi and shear (sign structure of det A), and agreement of the
image solver with lenstronomy's LensEquationSolver (test extra) on held-out cases.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.optimize import brentq

from lensing.images import (PointImages, lensed_source_flags, point_magnification_outside,
                            solve_point_images, source_direction, tangential_critical_radius)
from lensing.mass_profiles import LensModel


def _det_a(lens, r, t):
    fxx, fxy, fyx, fyy = lens.hessian(lens.x0 + r * np.cos(t), lens.y0 + r * np.sin(t))
    return (1 - fxx) * (1 - fyy) - fxy * fyx


def _random_lenses(n, seed):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        gamma, gphi = rng.uniform(0, 0.35), rng.uniform(0, math.pi)
        yield LensModel(theta_e=rng.uniform(0.3, 3.0), q=rng.choice([1.0, rng.uniform(0.2, 1)]),
                        phi=rng.uniform(-math.pi, math.pi), x0=rng.uniform(-0.2, 0.2),
                        y0=rng.uniform(-0.2, 0.2), gamma1=gamma * math.cos(2 * gphi),
                        gamma2=gamma * math.sin(2 * gphi))


# ------------------------------------------------------------------------ critical curve
def test_sis_critical_radius_and_point_magnification_are_the_seed_values():
    lens = LensModel(1.37, x0=0.1, y0=-0.2)
    t = np.linspace(-math.pi, math.pi, 17)
    np.testing.assert_allclose(tangential_critical_radius(lens, t), 1.37, rtol=1e-14)
    pm = point_magnification_outside(lens, 0.7)
    assert pm.radius == pytest.approx(1.1 * 1.37, rel=1e-14)  # the seed's "1.1 theta_E"
    assert pm.mu == pytest.approx(11.0, rel=1e-12)            # r / (r - theta_E) at 1.1 theta_E


@pytest.mark.parametrize("q", [0.2, 0.5, 0.83, 0.9995, 1.0])
def test_sie_critical_curve_is_the_analytic_ellipse_without_shear(q):
    te, phi = 1.2, 0.4
    lens = LensModel(te, q, phi, 0.05, 0.02)
    t = np.linspace(0, 2 * math.pi, 181)
    tp = t - phi
    expected = te / np.sqrt(q * np.cos(tp) ** 2 + np.sin(tp) ** 2 / q)
    np.testing.assert_allclose(tangential_critical_radius(lens, t), expected, rtol=1e-12)
    # theta_E / sqrt(q) along the major axis (where 1.1 theta_E was inside for q < 0.83),
    # theta_E sqrt(q) along the minor axis
    assert tangential_critical_radius(lens, phi) == pytest.approx(te / math.sqrt(q), rel=1e-12)
    assert tangential_critical_radius(lens, phi + math.pi / 2) == pytest.approx(
        te * math.sqrt(q), rel=1e-12)


def test_critical_radius_matches_independent_bracketing_and_sign_structure():
    """Seeded sweep over theta_E, q, phi, shear <= 0.35, centre offsets and ray angles: brentq
    on det A(r) agrees with the closed form to 1e-10; det A < 0 inside, > 0 outside (out to
    50 r_t); mu_point is evaluated outside (det A > 0) and equals 11 / (1 - gamma^2)."""
    rng = np.random.default_rng(2026)
    checked = 0
    for lens in _random_lenses(150, 7):
        g2 = lens.gamma1 ** 2 + lens.gamma2 ** 2
        for t in rng.uniform(-math.pi, math.pi, 6):
            rt = tangential_critical_radius(lens, t)
            assert math.isfinite(rt) and rt > 0
            root = brentq(lambda r: _det_a(lens, r, t), 1e-6 * rt, 1e3 * rt, xtol=1e-14,
                          rtol=1e-14)
            assert root == pytest.approx(rt, rel=1e-10)
            inside = rt * np.geomspace(1e-4, 0.999, 40)
            outside = rt * np.geomspace(1.001, 50, 40)
            assert np.all(_det_a(lens, inside, t) < 0), "det A must be < 0 inside r_t"
            assert np.all(_det_a(lens, outside, t) > 0), "det A must be > 0 outside r_t"
            pm = point_magnification_outside(lens, t)
            assert pm.radius == pytest.approx(1.1 * rt, rel=1e-14) and pm.radius > rt
            assert _det_a(lens, pm.radius, t) > 0
            assert pm.mu == pytest.approx(11.0 / (1.0 - g2), rel=1e-9)
            checked += 1
    assert checked == 900


def test_no_critical_curve_gives_nan_not_a_number_inside():
    open_curve = LensModel(1.0, 0.7, 0.0, gamma1=1.0)          # gamma = 1: det M = 0
    assert math.isnan(tangential_critical_radius(open_curve, 0.3))
    pm = point_magnification_outside(open_curve, 0.3)
    assert math.isnan(pm.mu) and math.isnan(pm.radius)
    assert math.isnan(point_magnification_outside(LensModel(0.0), 0.0).mu)
    with pytest.raises(ValueError):
        point_magnification_outside(LensModel(1.0), 0.0, factor=1.0)


def test_source_direction_rule():
    lens = LensModel(1.0, 0.7, 0.9)
    assert source_direction(lens, 0.0, 0.0) == 0.9
    assert source_direction(lens, -0.1, 0.1) == pytest.approx(3 * math.pi / 4)


# --------------------------------------------------------------------------- image solver
def test_sis_images_are_analytic():
    te, beta, a = 1.3, 0.4, 0.6
    lens = LensModel(te, x0=0.11, y0=-0.07)
    im = solve_point_images(lens, lens.x0 + beta * math.cos(a), lens.y0 + beta * math.sin(a))
    assert im.n == 2
    r = np.hypot(im.x - lens.x0, im.y - lens.y0)
    np.testing.assert_allclose(r, [beta + te, te - beta], rtol=1e-12)
    np.testing.assert_allclose(im.mu, [1 + te / beta, 1 - te / beta], rtol=1e-10)
    assert im.max_separation() == pytest.approx(2 * te, rel=1e-12)
    # outside the Einstein radius (beta > theta_E): one image at beta + theta_E
    one = solve_point_images(lens, lens.x0 + 1.5 * te, lens.y0)
    assert one.n == 1 and one.x[0] - lens.x0 == pytest.approx(2.5 * te, rel=1e-12)


@pytest.mark.parametrize("beta, n_expected", [
    (0.47177 * 0.995, 4), (0.47177 * 1.005, 2),     # major-axis cusp of the tangential caustic
    (1.07742 * 0.99, 2), (1.07742 * 1.01, 1),       # the cut (pseudo-caustic) on the major axis
])
def test_image_counts_across_caustics(beta, n_expected):
    """physics-conventions.md: q = 0.6, theta_E = 1.2: cusp at 0.47177, cut at 1.07742."""
    lens = LensModel(1.2, 0.6, 0.0)
    im = solve_point_images(lens, beta, 0.0)
    assert im.n == n_expected
    bx, by = lens.ray_shoot(im.x, im.y)
    assert np.abs(bx - beta).max() < 1e-12 and np.abs(by).max() < 1e-12


def test_images_solve_the_lens_equation_and_are_ordered():
    rng = np.random.default_rng(11)
    counts = set()
    for lens in _random_lenses(60, 3):
        r, a = rng.uniform(0, 1.2) * lens.theta_e, rng.uniform(0, 2 * math.pi)
        sx, sy = lens.x0 + r * math.cos(a), lens.y0 + r * math.sin(a)
        im = solve_point_images(lens, sx, sy)
        counts.add(im.n)
        assert 1 <= im.n <= 4
        bx, by = lens.ray_shoot(im.x, im.y)
        assert np.abs(bx - sx).max() < 1e-10 and np.abs(by - sy).max() < 1e-10
        assert np.all(np.diff(np.abs(im.mu)) <= 0)
        np.testing.assert_allclose(im.mu, lens.magnification(im.x, im.y), rtol=1e-12)
    assert {1, 2, 4} <= counts


def test_solver_refuses_degenerate_lenses():
    with pytest.raises(ValueError):
        solve_point_images(LensModel(0.0), 0.1, 0.0)
    with pytest.raises(ValueError):
        solve_point_images(LensModel(1.0, gamma1=1.2), 0.1, 0.0)


def _lenstronomy_cases():
    """Held-out cases (seed 99, never used to tune the solver): doubles, quads, near-caustic."""
    rng = np.random.default_rng(99)
    cases = []
    for lens in _random_lenses(30, 99):
        if lens.q == 1.0 and lens.gamma1 == 0:
            continue
        r, a = rng.uniform(0, 1.1) * lens.theta_e, rng.uniform(0, 2 * math.pi)
        cases.append((lens, lens.x0 + r * math.cos(a), lens.y0 + r * math.sin(a)))
    # near the tangential caustic: a source just inside/outside the major-axis cusp
    cusp = LensModel(1.2, 0.6, 0.0)
    cases += [(cusp, 0.47177 * 0.98, 0.0), (cusp, 0.47177 * 1.02, 0.0),
              (cusp, 0.0, 0.34696 * 0.98), (cusp, 0.0, 0.34696 * 1.02)]
    return cases


def test_image_counts_and_positions_agree_with_lenstronomy():
    pytest.importorskip("lenstronomy")
    from lenstronomy.LensModel.lens_model import LensModel as LtLensModel
    from lenstronomy.LensModel.Solver.lens_equation_solver import LensEquationSolver

    lt = LtLensModel(["SIE", "SHEAR"])
    solver = LensEquationSolver(lt)
    n_by_count = {}
    for lens, sx, sy in _lenstronomy_cases():
        e = (1 - lens.q) / (1 + lens.q)        # lenstronomy e1/e2 for q = b/a
        kw = [dict(theta_E=lens.theta_e, e1=e * math.cos(2 * lens.phi),
                   e2=e * math.sin(2 * lens.phi), center_x=lens.x0, center_y=lens.y0),
              dict(gamma1=lens.gamma1, gamma2=lens.gamma2, ra_0=lens.x0, dec_0=lens.y0)]
        xs, ys = solver.image_position_from_source(
            sx, sy, kw, min_distance=0.01, search_window=6 * lens.theta_e,
            precision_limit=1e-11, num_iter_max=100)
        im = solve_point_images(lens, sx, sy)
        # lenstronomy's gradient-descent search misses the strongly demagnified image that an
        # SIE (+ shear) forms next to its singular centre when the source is just inside the
        # cut (|mu| -> 0 there; ours solve the lens equation, test above): compare the images
        # with |mu| >= 0.01, and require every lenstronomy image to be one of ours.
        bright = np.abs(im.mu) >= 0.01
        mu_lt = np.asarray(lt.magnification(np.array(xs), np.array(ys), kw))
        assert int(bright.sum()) == int((np.abs(mu_lt) >= 0.01).sum()), (lens, sx, sy, im, xs)
        n_by_count[im.n] = n_by_count.get(im.n, 0) + 1
        for x, y in zip(xs, ys):   # lenstronomy's SIE has a 1e-10" core: 1e-6" tolerance
            d = np.hypot(im.x - x, im.y - y)
            assert d.min() < 1e-6
        assert np.sort(np.abs(mu_lt[np.abs(mu_lt) >= 0.01])) == pytest.approx(
            np.sort(np.abs(im.mu[bright])), rel=1e-4)
    assert n_by_count.get(2, 0) >= 8 and n_by_count.get(4, 0) >= 4, n_by_count


# ---------------------------------------------------------------------------------- flags
def test_lenspop_flags_rule():
    # 2 theta_E^2 >= (2 r_e)^2 + fwhm^2 and n >= 2; arc-like also needs mu r_e > fwhm
    assert lensed_source_flags(2, 1.0, 0.2, 10.0, 1.2) == (True, True)
    assert lensed_source_flags(2, 1.0, 0.2, 5.0, 1.2) == (True, False)   # 5*0.2 < 1.2
    assert lensed_source_flags(1, 2.0, 0.2, 50.0, 1.2) == (False, False)
    assert lensed_source_flags(4, 0.8, 0.2, 50.0, 1.2) == (False, False)  # 1.28 < 1.6
    assert lensed_source_flags(2, 0.9, 0.2, 50.0, 1.2) == (True, True)   # 1.62 >= 1.6


def test_point_images_empty_separation():
    im = PointImages(np.array([1.0]), np.array([0.0]), np.array([2.0]))
    assert im.n == 1 and im.max_separation() == 0.0


def test_einstein_ring_is_reported_as_degenerate():
    from lensing.images import DegenerateImagesError
    with pytest.raises(DegenerateImagesError):
        solve_point_images(LensModel(1.0, x0=0.1, y0=0.2), 0.1, 0.2)
    # an SIE with the source on its centre is a regular quad (cross)
    assert solve_point_images(LensModel(1.0, 0.7, 0.3), 0.0, 0.0).n == 4


def test_shared_angle_grid_is_read_only_and_solves_do_not_depend_on_call_order():
    """The coarse grid's (t, cos t, sin t) are computed once per n_angles and shared by every
    solve: read-only, equal to a fresh computation, and a solve gives the same bytes whether
    it runs first, after others or with another n_angles in between."""
    from lensing.images import _angle_grid

    t, c, s = _angle_grid(4096)
    assert not (t.flags.writeable or c.flags.writeable or s.flags.writeable)
    fresh = np.arange(4096) * (2 * math.pi / 4096)
    assert np.array_equal(t, fresh) and np.array_equal(c, np.cos(fresh)) \
        and np.array_equal(s, np.sin(fresh))
    lenses = list(_random_lenses(6, 5))
    first = [solve_point_images(L, L.x0 + 0.2, L.y0 - 0.1) for L in lenses]
    solve_point_images(lenses[0], lenses[0].x0 + 0.3, lenses[0].y0, n_angles=1024)
    again = [solve_point_images(L, L.x0 + 0.2, L.y0 - 0.1) for L in reversed(lenses)][::-1]
    for a, b in zip(first, again):
        assert a.x.tobytes() == b.x.tobytes() and a.mu.tobytes() == b.mu.tobytes()
