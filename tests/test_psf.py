"""Tests of lensing.psf: kernel shape/normalisation/centring/FWHM, the Moffat wing rule, and
the shift-free 'same' FFT convolution (impulse response at every pixel, any kernel size).

Pitfalls covered (known-pitfalls.md): ifftshift centring bug (impulse at (32,32) came out at
(9,9)); 6 x FWHM Moffat kernels larger than the 64-px stamp crashed; psfsize 0 used as FWHM.
Tolerances are stated in the assertion messages.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.interpolate import CubicSpline
from scipy.optimize import brentq
from scipy.signal import convolve2d

from lensing import convolve_fft, fft_size, gaussian_kernel, moffat_alpha, moffat_kernel, psf_kernel

PIX = 0.262
KERNELS = [
    ("gaussian", 0.6, None), ("gaussian", 1.0, None), ("gaussian", 1.9, None),
    ("moffat", 0.8, 3.5), ("moffat", 1.3, 2.5), ("moffat", 1.0, 4.765), ("moffat", 1.6, 1.8),
]


def _make(model, fwhm, beta, pixscale=PIX):
    if model == "gaussian":
        return gaussian_kernel(fwhm, pixscale)
    return moffat_kernel(fwhm, beta, pixscale)


def _measured_fwhm_pix(kernel):
    """FWHM [pixels] from the sampled central row: cubic spline through log(profile), root of
    log(I/I_peak) = log(1/2) on each side (log-interpolation: exact for a Gaussian)."""
    c = kernel.shape[0] // 2
    row = np.log(kernel[c] / kernel[c, c])
    off = np.arange(row.size) - c
    spline = CubicSpline(off, row)
    right = brentq(lambda t: spline(t) - math.log(0.5), 0.0, c)
    left = brentq(lambda t: spline(t) - math.log(0.5), -c, 0.0)
    return right - left


@pytest.mark.parametrize("model, fwhm, beta", KERNELS)
def test_kernel_odd_centred_unit_sum(model, fwhm, beta):
    k = _make(model, fwhm, beta)
    assert k.ndim == 2 and k.shape[0] == k.shape[1] and k.shape[0] % 2 == 1, f"odd square, got {k.shape}"
    c = k.shape[0] // 2
    assert abs(k.sum() - 1.0) <= 1e-12, f"kernel sum {k.sum()!r} (1 +/- 1e-12)"
    assert np.all(k >= 0) and np.all(np.isfinite(k))
    assert np.unravel_index(np.argmax(k), k.shape) == (c, c), "peak at the centre pixel"
    assert np.count_nonzero(k == k.max()) == 1, "single peak"
    off = np.arange(k.shape[0]) - c
    mx, my = (k * off[None, :]).sum(), (k * off[:, None]).sum()
    assert abs(mx) <= 1e-12 and abs(my) <= 1e-12, f"first moments ({mx:.1e}, {my:.1e}) (|.| <= 1e-12)"
    # circular symmetry: invariant under transposition and flips
    np.testing.assert_allclose(k, k.T, atol=1e-15)
    np.testing.assert_allclose(k, k[::-1, ::-1], atol=1e-15)


@pytest.mark.parametrize("model, fwhm, beta", KERNELS)
def test_kernel_fwhm_matches_request(model, fwhm, beta):
    k = _make(model, fwhm, beta)
    measured = _measured_fwhm_pix(k) * PIX
    assert measured == pytest.approx(fwhm, rel=2e-3), \
        f"{model} FWHM measured {measured:.5f}\" vs requested {fwhm}\" (rel 2e-3, log-spline interpolated)"


@pytest.mark.parametrize("model, fwhm, beta", KERNELS)
def test_kernel_samples_the_analytic_profile(model, fwhm, beta):
    """Exact shape: ratios to the centre value equal the analytic profile at pixel centres."""
    k = _make(model, fwhm, beta)
    c = k.shape[0] // 2
    off = np.arange(k.shape[0]) - c
    r2 = (off[:, None] ** 2 + off[None, :] ** 2) * PIX**2
    if model == "gaussian":
        sigma = fwhm / (2 * math.sqrt(2 * math.log(2)))
        prof = np.exp(-0.5 * r2 / sigma**2)
    else:
        alpha = moffat_alpha(fwhm, beta)
        prof = (1 + r2 / alpha**2) ** (-beta)
    np.testing.assert_allclose(k / k[c, c], prof, rtol=1e-12, atol=1e-300,
                               err_msg="kernel / peak == analytic profile (1e-12)")


def test_moffat_alpha_definition():
    for beta in (1.5, 2.5, 3.5, 10.0):
        a = moffat_alpha(1.0, beta)
        # half maximum at r = FWHM/2
        assert (1 + (0.5 / a) ** 2) ** (-beta) == pytest.approx(0.5, rel=1e-13)


@pytest.mark.parametrize("fwhm", [0.9, 1.4, 2.5])
@pytest.mark.parametrize("beta", [2.0, 2.5, 3.5, 4.5])
@pytest.mark.parametrize("wing_tol", [1e-2, 1e-3, 1e-4])
def test_moffat_wing_rule(fwhm, beta, wing_tol):
    """Before renormalisation the kernel holds >= 1 - wing_tol of the analytic Moffat flux."""
    k = moffat_kernel(fwhm, beta, PIX, wing_tol=wing_tol)
    c = k.shape[0] // 2
    alpha_pix = moffat_alpha(fwhm, beta) / PIX
    unnormalised_sum = (k / k[c, c]).sum()  # peak of (1 + r^2/alpha^2)^-beta is 1
    total = math.pi * alpha_pix**2 / (beta - 1)  # integral of the untruncated profile [pix^2]
    frac = unnormalised_sum / total
    assert frac >= 1 - wing_tol, f"kernel encloses {frac:.6f} < 1 - wing_tol = {1 - wing_tol}"
    assert frac <= 1 + 1e-9, f"enclosed fraction {frac} > 1: sampling sum exceeds the integral"
    # and not wastefully large: half-width = ceil(R), R the radius enclosing 1 - wing_tol
    radius = alpha_pix * math.sqrt(wing_tol ** (1 / (1 - beta)) - 1)
    assert c == max(1, math.ceil(radius)), f"half-width {c} vs ceil(R) = {math.ceil(radius)}"


def test_gaussian_truncation():
    for fwhm in (0.8, 1.2, 2.0):
        k = gaussian_kernel(fwhm, PIX)
        c = k.shape[0] // 2
        sigma_pix = fwhm / (2 * math.sqrt(2 * math.log(2))) / PIX
        assert c >= 5 * sigma_pix
        frac = (k / k[c, c]).sum() / (2 * math.pi * sigma_pix**2)
        assert frac >= 1 - 4e-6, f"Gaussian kernel encloses {frac:.8f} (>= 1 - 4e-6)"


def test_tiny_fwhm_gives_near_delta():
    k = gaussian_kernel(0.02, PIX)
    assert k.shape == (3, 3) and k[1, 1] == pytest.approx(1.0, abs=1e-12)
    km = moffat_kernel(0.02, 3.5, PIX)
    assert km.shape[0] % 2 == 1 and abs(km.sum() - 1) < 1e-12 and km[km.shape[0] // 2, km.shape[0] // 2] > 0.98


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("model", ["gaussian", "moffat"])
def test_bad_fwhm_raises_clear_error(model, bad):
    with pytest.raises(ValueError, match="FWHM"):
        psf_kernel(model, bad, PIX)


def test_other_bad_arguments():
    with pytest.raises(ValueError, match="pixscale"):
        gaussian_kernel(1.0, 0.0)
    with pytest.raises(ValueError, match="beta"):
        moffat_kernel(1.0, 1.0)
    with pytest.raises(ValueError, match="wing_tol"):
        moffat_kernel(1.0, 3.5, wing_tol=0.0)
    with pytest.raises(ValueError, match="PSF model"):
        psf_kernel("airy", 1.0)
    with pytest.raises(ValueError, match="odd"):
        convolve_fft(np.ones((8, 8)), np.ones((4, 4)) / 16)


def test_psf_kernel_dispatch():
    np.testing.assert_array_equal(psf_kernel("gaussian", 1.1, PIX), gaussian_kernel(1.1, PIX))
    np.testing.assert_array_equal(psf_kernel("moffat", 1.1, PIX, 2.7), moffat_kernel(1.1, 2.7, PIX))


def test_fft_size():
    for n in list(range(1, 300)) + [1000, 1025, 4097]:
        m = fft_size(n)
        assert m >= n
        r = m
        for p in (2, 3, 5):
            while r % p == 0:
                r //= p
        assert r == 1, f"fft_size({n}) = {m} is not 5-smooth"
        # smallest such: no 5-smooth number in [n, m)
        for k in range(n, m):
            rr = k
            for p in (2, 3, 5):
                while rr % p == 0:
                    rr //= p
            assert rr != 1, f"fft_size({n}) = {m} but {k} is 5-smooth"


# ------------------------------------------------------------------------------ convolution

def _asymmetric_kernel(size, seed=0):
    """Random non-symmetric odd kernel: catches flips (correlation vs convolution) and shifts."""
    rng = np.random.default_rng(seed)
    k = rng.uniform(0.1, 1.0, (size, size))
    return k / k.sum()


SHAPES = [(7, 7), (8, 8), (9, 12), (16, 15), (1, 5), (64, 64)]
KSIZES = [1, 3, 5, 21]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("ksize", KSIZES)
def test_impulse_response_at_every_pixel(shape, ksize):
    h, w = shape
    kernel = _asymmetric_kernel(ksize, seed=ksize)
    hk = ksize // 2
    pixels = [(i, j) for i in range(h) for j in range(w)]
    if len(pixels) > 300:  # 64x64: corners, edges, centre and a random sample
        rng = np.random.default_rng(1)
        pick = rng.choice(len(pixels), 200, replace=False)
        pixels = [pixels[p] for p in pick] + [(0, 0), (0, w - 1), (h - 1, 0), (h - 1, w - 1), (32, 32),
                                              (31, 31), (32, 31)]
    stack = np.zeros((len(pixels), h, w))
    for n, (i, j) in enumerate(pixels):
        stack[n, i, j] = 1.0
    out = convolve_fft(stack, kernel)  # batched (..., H, W)
    assert out.shape == stack.shape
    yy, xx = np.mgrid[0:h, 0:w]
    for n, (i, j) in enumerate(pixels):
        # expected: out[y, x] = K[y - i + hk, x - j + hk] where inside the kernel, else 0
        ky, kx = yy - i + hk, xx - j + hk
        ok = (ky >= 0) & (ky < ksize) & (kx >= 0) & (kx < ksize)
        expected = np.zeros((h, w))
        expected[ok] = kernel[ky[ok], kx[ok]]
        err = np.max(np.abs(out[n] - expected))
        assert err <= 1e-14, f"impulse at {(i, j)}: response != (cropped) kernel there, max err {err:.1e}"
    # peak position with a centrally peaked kernel: an impulse stays where it is
    peaked = gaussian_kernel(0.262 * ksize / 2.0 + 0.1, PIX) if ksize > 1 else np.ones((1, 1))
    out = convolve_fft(stack, peaked)
    for n, (i, j) in enumerate(pixels):
        assert np.unravel_index(np.argmax(out[n]), (h, w)) == (i, j), f"impulse at {(i, j)} moved"
        assert out[n, i, j] == pytest.approx(peaked[peaked.shape[0] // 2, peaked.shape[1] // 2], abs=1e-14)


@pytest.mark.parametrize("shape", [(12, 12), (13, 10), (64, 64), (5, 9)], ids=str)
@pytest.mark.parametrize("ksize", [3, 7, 15, 33, 131])
def test_matches_scipy_convolve2d_same(shape, ksize):
    rng = np.random.default_rng(ksize + shape[0])
    img = rng.normal(size=shape)
    kernel = _asymmetric_kernel(ksize, seed=3)
    ref = convolve2d(img, kernel, mode="same")
    got = convolve_fft(img, kernel)
    err = np.max(np.abs(got - ref))
    assert err <= 1e-12, f"convolve_fft vs scipy convolve2d(mode='same'): max err {err:.2e} (> 1e-12)"


@pytest.mark.parametrize("model, fwhm, beta", KERNELS)
def test_flux_conserved_when_kernel_fits(model, fwhm, beta):
    kernel = _make(model, fwhm, beta)
    hk = kernel.shape[0] // 2
    n = 2 * hk + 20
    rng = np.random.default_rng(2)
    img = np.zeros((n, n))
    img[hk:n - hk, hk:n - hk] = rng.uniform(0, 5, (n - 2 * hk, n - 2 * hk))
    out = convolve_fft(img, kernel)
    assert out.sum() == pytest.approx(img.sum(), rel=1e-6), \
        f"flux {out.sum():.9g} vs {img.sum():.9g} (rel 1e-6)"
    # and a point source's centroid does not move
    img = np.zeros((n, n))
    img[n // 2, n // 2 + 3] = 2.0
    out = convolve_fft(img, kernel)
    yy, xx = np.mgrid[0:n, 0:n]
    cy, cx = (out * yy).sum() / out.sum(), (out * xx).sum() / out.sum()
    assert abs(cy - n // 2) < 1e-9 and abs(cx - (n // 2 + 3)) < 1e-9, f"centroid moved to {(cy, cx)}"


@pytest.mark.parametrize("kernel_fn", [lambda: moffat_kernel(6.0, 3.5, PIX), lambda: gaussian_kernel(6.0, PIX),
                                       lambda: moffat_kernel(3.0, 2.5, PIX)],
                         ids=["moffat6", "gaussian6", "moffat3_b2.5"])
def test_kernel_larger_than_64px_stamp(kernel_fn):
    kernel = kernel_fn()
    assert kernel.shape[0] > 64, f"test premise: kernel {kernel.shape} larger than the stamp"
    c = kernel.shape[0] // 2
    img = np.zeros((64, 64))
    for (i, j) in ((32, 32), (0, 0), (63, 10), (31, 32)):
        img[:] = 0
        img[i, j] = 1.0
        out = convolve_fft(img, kernel)
        assert out.shape == (64, 64) and np.all(np.isfinite(out))
        assert np.unravel_index(np.argmax(out), out.shape) == (i, j), f"impulse at {(i, j)} moved"
        assert out[i, j] == pytest.approx(kernel[c, c], rel=1e-12)
        assert out.sum() <= 1.0 + 1e-12, "a cropped kernel cannot create flux"
    # a flat image: interior value is the kernel mass that overlaps the stamp (<= 1)
    flat = convolve_fft(np.ones((64, 64)), kernel)
    ref = convolve2d(np.ones((64, 64)), kernel, mode="same")
    np.testing.assert_allclose(flat, ref, atol=1e-12)
