"""Source models behind one interface (lensing/sources.py) as rendered by lensing/render.py.

* flux conservation at theta_E = 0 (analytic truth) to 0.1 % for every source model,
  including compact clumps, per component and per band (colours);
* determinism (bit-identical reruns);
* the adaptive error control for a multi-component source: per-component lensed flux vs a
  32x uniform reference (sources where uniform sampling converges: n <= 1 discs, Gaussian
  clumps);
* one ray trace + per-band linear combination: a ClumpySource's band image equals the
  fraction-weighted sum of its components rendered one by one;
* a user-defined component (here a pixelised image, bilinear interpolation: the real-galaxy
  plug-in path) renders through the same code without any change to the lens models.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from lensing import (Clump, ClumpySource, LensModel, SersicSource, mag_to_nMgy,
                     render_lensed_arc, render_unit_components)

PIX = 0.262
NO_LENS = LensModel(0.0)
FWHM = {"g": 1.3, "r": 1.1, "z": 0.95}


def _clumpy(dx=0.07, dy=-0.04, r_e=0.35, n=1.0, q=0.6, phi=0.4):
    clumps = (Clump(0.12, 0.05, 0.03, {"g": 0.12, "r": 0.08, "z": 0.05}),
              Clump(-0.2, -0.08, 0.05, {"g": 0.06, "r": 0.05, "z": 0.03}),
              Clump(0.02, 0.25, 0.02, {"g": 0.04, "r": 0.02, "z": 0.01}))
    return ClumpySource(SersicSource(dx, dy, r_e, n, q, phi), clumps)


def test_band_fractions_sum_to_one_and_validate():
    src = _clumpy()
    for b in "grz":
        w = src.band_fractions(b)
        assert w.shape == (4,) and np.all(w >= 0) and w.sum() == pytest.approx(1.0, abs=1e-15)
    assert src.band_fractions("g")[0] == pytest.approx(1 - 0.22)
    with pytest.raises(ValueError):
        src.band_fractions("i")                       # a clump without an i fraction
    with pytest.raises(ValueError):
        ClumpySource(SersicSource(0, 0, 0.3), (Clump(0, 0, 0.02, {"g": 0.6}),
                                               Clump(0, 0, 0.02, {"g": 0.5})))
    with pytest.raises(ValueError):
        Clump(0.0, 0.0, -0.1, {"g": 0.1})
    assert len(SersicSource(0, 0, 0.3).components()) == 1


@pytest.mark.parametrize("f", [1, 4])
@pytest.mark.parametrize("source", [
    SersicSource(0.03, -0.02, 0.05, 4.0, 0.7, 0.3), SersicSource(0.1, 0.0, 0.3, 1.0, 0.5, 1.0),
    _clumpy(), _clumpy(r_e=0.12, n=2.5)], ids=["sersic_cuspy", "sersic", "clumpy", "clumpy_cuspy"])
def test_unlensed_flux_of_every_component_and_band(source, f):
    units, _, _ = render_unit_components(NO_LENS, source, 80, PIX, None, f)
    for k, comp in enumerate(source.components()):
        assert abs(units[k].sum() - 1.0) < 1e-3, f"component {k} ({comp}): {units[k].sum():.6f}"
    mags = {"g": 22.0, "r": 21.6, "z": 21.1}
    res = render_lensed_arc(NO_LENS, source, mags, FWHM, n_pix=80, psf_oversample=f)
    for b, m in mags.items():
        assert abs(res.images[b].sum() / mag_to_nMgy(m) - 1.0) < 1e-3, b
        assert abs(res.mu_total_band[b] - 1.0) < 1e-3, b
    assert res.n_components == len(source.components())


def test_determinism_bit_identical():
    lens = LensModel(1.3, 0.7, 0.5, 0.03, -0.02, 0.04, -0.01)
    a = render_lensed_arc(lens, _clumpy(), {"g": 22.0, "z": 21.0}, FWHM, n_pix=48)
    b = render_lensed_arc(lens, _clumpy(), {"g": 22.0, "z": 21.0}, FWHM, n_pix=48)
    for band in a.images:
        assert np.array_equal(a.images[band], b.images[band])
    assert a.mu_total_band == b.mu_total_band


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_adaptive_clumpy_flux_matches_uniform_reference(seed):
    """Lensed (SIE + shear, source inside the caustic region) clumpy source: every
    component's lensed flux within 0.1 % (+ the reference's own 16x-32x scatter) of 32x
    uniform sampling."""
    rng = np.random.default_rng(seed)
    te = rng.uniform(0.8, 1.6)
    lens = LensModel(te, rng.uniform(0.5, 0.9), rng.uniform(0, math.pi), 0.05, -0.03,
                     rng.uniform(-0.05, 0.05), rng.uniform(-0.05, 0.05))
    r = rng.uniform(0.0, 0.4) * te
    a = rng.uniform(0, 2 * math.pi)
    src = _clumpy(r * math.cos(a), r * math.sin(a), rng.uniform(0.2, 0.4), 1.0)
    adaptive, _, n_ref = render_unit_components(lens, src, 48, PIX, None, 4)
    ref32, _, _ = render_unit_components(lens, src, 48, PIX, 32, 4)
    ref16, _, _ = render_unit_components(lens, src, 48, PIX, 16, 4)
    assert n_ref > 0
    for k in range(adaptive.shape[0]):
        scatter = abs(ref16[k].sum() / ref32[k].sum() - 1.0)
        rel = abs(adaptive[k].sum() / ref32[k].sum() - 1.0)
        assert rel < 1e-3 + scatter, f"component {k}: {rel:.2e} (scatter {scatter:.2e})"


def test_one_ray_trace_equals_sum_of_components():
    """Band image of a ClumpySource = sum over components of fraction x that component
    rendered alone (to 2e-5 of the peak: the joint error control refines the union of the
    components' zones, so the quadrature differs at the 1e-6-of-flux level)."""
    lens = LensModel(1.2, 0.75, 0.3, 0.0, 0.0, 0.02, 0.03)
    src = _clumpy(0.1, 0.05)
    mags = {"g": 22.0, "r": 21.5}
    joint = render_lensed_arc(lens, src, mags, FWHM, n_pix=48)
    for b, m in mags.items():
        total = np.zeros((48, 48))
        for comp, w in zip(src.components(), src.band_fractions(b)):
            one = render_lensed_arc(lens, comp, {b: m}, FWHM, n_pix=48)
            total += w * one.images[b]
        d = np.max(np.abs(joint.images[b] - total)) / total.max()
        assert d < 2e-5, f"{b}: {d:.2e}"
    # colours: the clumps are bluer, so the g image is not a scaled z-like r image
    ratio = joint.images["g"] / np.where(joint.images["r"] > 0, joint.images["r"], np.nan)
    assert np.nanmax(ratio) / np.nanmin(ratio[joint.images["r"] > 1e-3 * joint.images["r"].max()]) > 1.05


class PixelisedSource:
    """A test-only real-galaxy-like component: an image on a grid of ``scale`` arcsec cells,
    bilinear interpolation, zero outside.  Implements the component and model interfaces
    (lensing/sources.py) without touching lensing code."""

    def __init__(self, image, scale, dx, dy):
        self.image, self.cell, self.dx, self.dy = np.asarray(image, float), scale, dx, dy
        n = self.image.shape[0]
        self.half = 0.5 * (n - 1) * scale

    def brightness(self, ddx, ddy):
        n = self.image.shape[0]
        u = (np.asarray(ddx) + self.half) / self.cell
        v = (np.asarray(ddy) + self.half) / self.cell
        inside = (u >= 0) & (u <= n - 1) & (v >= 0) & (v <= n - 1)
        i0 = np.clip(np.floor(v).astype(int), 0, n - 2)
        j0 = np.clip(np.floor(u).astype(int), 0, n - 2)
        fv, fu = np.clip(v - i0, 0, 1), np.clip(u - j0, 0, 1)
        im = self.image
        val = ((1 - fv) * (1 - fu) * im[i0, j0] + (1 - fv) * fu * im[i0, j0 + 1]
               + fv * (1 - fu) * im[i0 + 1, j0] + fv * fu * im[i0 + 1, j0 + 1])
        return np.where(inside, val, 0.0)

    @property
    def unit_total(self):          # integral of the bilinear interpolant (trapezoid weights)
        w = np.ones(self.image.shape[0])
        w[0] = w[-1] = 0.5
        return float(w @ self.image @ w) * self.cell ** 2

    scale = property(lambda self: self.cell)
    refine_radius = property(lambda self: self.half * math.sqrt(2.0))

    def components(self):
        return (self,)

    def band_fractions(self, band):
        return np.ones(1)


def test_user_pixelised_source_plugs_in():
    g = (np.arange(41) - 20) * 0.03
    xx, yy = np.meshgrid(g, g)
    img = np.exp(-0.5 * ((xx - 0.1) ** 2 / 0.15 ** 2 + yy ** 2 / 0.08 ** 2))
    img += 0.3 * np.exp(-0.5 * ((xx + 0.2) ** 2 + (yy - 0.1) ** 2) / 0.04 ** 2)
    img[0] = img[-1] = img[:, 0] = img[:, -1] = 0.0
    src = PixelisedSource(img, 0.03, 0.05, -0.02)
    res = render_lensed_arc(NO_LENS, src, {"r": 22.0}, {"r": 1.1}, n_pix=48)
    assert abs(res.images["r"].sum() / mag_to_nMgy(22.0) - 1.0) < 1e-3
    lensed = render_lensed_arc(LensModel(1.0, 0.8, 0.2), src, {"r": 22.0}, {"r": 1.1}, n_pix=48)
    assert lensed.mu_total > 3.0 and np.all(np.isfinite(lensed.images["r"]))


@pytest.mark.parametrize("n", [0.5, 1.0, 2.7])
def test_round_sersic_brightness_is_the_elliptical_formula_at_any_angle(n):
    """q = 1 (every clump) skips the rotation: the brightness equals the major-axis formula
    I/I_e = exp(-b_n [(R/r_e)^(1/n) - 1]) evaluated in a rotated frame, for any phi, to
    rounding; and a q < 1 source still depends on phi."""
    rng = np.random.default_rng(7)
    dx, dy = rng.normal(0.0, 0.4, 5000), rng.normal(0.0, 0.4, 5000)
    for phi in (0.0, 0.9, -2.4):
        src = SersicSource(0.0, 0.0, 0.3, n, 1.0, phi)
        c, s = math.cos(phi), math.sin(phi)
        xp, yp = dx * c + dy * s, dy * c - dx * s
        ref = np.exp(-src.b_n * ((np.hypot(xp, yp) / 0.3) ** (1.0 / n) - 1.0))
        np.testing.assert_allclose(src.brightness(dx, dy), ref, rtol=1e-12, atol=0)
    flat = [SersicSource(0.0, 0.0, 0.3, n, 0.6, phi).brightness(dx, dy) for phi in (0.0, 0.9)]
    assert np.max(np.abs(flat[0] - flat[1])) > 0.1
