"""Tests of lensing.metrics: good-pixel definition, bad/WISE fractions and arc S/N metrics."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lensing.maskbits import MASKBITS, MASKBITS_BAD_NAMES
from lensing.metrics import (
    ARC_REGION_K_DEFAULT,
    STAMP_METRIC_KEYS,
    arc_aperture_snr,
    arc_peak_snr,
    arc_region_snr,
    arc_snr,
    bad_pixel_frac,
    good_pixel_mask,
    stamp_metrics,
    wise_brightmask_frac,
)

N = 8
NPIX = N * N


def _ones(shape=(3, N, N), value=1.0):
    return np.full(shape, value, dtype=np.float32)


def _mb(fill=0):
    return np.full((N, N), fill, dtype=np.int32)


# ----------------------------------------------------------------------------- good pixels


def test_nprimary_only_pixels_are_good():
    """Regression: an earlier pipeline counted NPRIMARY (valid overlap) pixels as bad."""
    mb = _mb(MASKBITS["NPRIMARY"])
    good = good_pixel_mask(_ones(), mb)
    assert good.shape == (3, N, N)
    assert good.all()
    assert bad_pixel_frac(good) == ((0.0, 0.0, 0.0), 0.0)
    m = stamp_metrics(_ones(), _ones(), mb)
    assert m["bad_pixel_frac"] == 0.0
    assert m["n_good_pix"] == NPIX


@pytest.mark.parametrize("name", MASKBITS_BAD_NAMES)
def test_each_bad_bit_makes_pixel_bad_even_with_nprimary(name):
    mb = _mb(MASKBITS["NPRIMARY"])
    mb[2, 5] |= MASKBITS[name]
    good = good_pixel_mask(_ones(), mb)
    assert not good[:, 2, 5].any()  # maskbits broadcast over all bands
    assert good.sum() == 3 * (NPIX - 1)


@pytest.mark.parametrize("name", ["NPRIMARY", "WISEM1", "WISEM2", "SUB_BLOB"])
def test_non_bad_bits_are_good(name):
    mb = _mb(MASKBITS[name])
    assert good_pixel_mask(_ones(), mb).all()


def test_wise_bits_not_bad_but_counted():
    mb = _mb()
    mb[0, :3] = MASKBITS["WISEM1"]
    mb[1, :2] = MASKBITS["WISEM2"]
    mb[2, 0] = MASKBITS["WISEM1"] | MASKBITS["WISEM2"] | MASKBITS["NPRIMARY"]
    mb[3, 0] = MASKBITS["BRIGHT"]  # bad but not WISE: must not count
    assert wise_brightmask_frac(mb) == pytest.approx(6 / NPIX, abs=0)
    good = good_pixel_mask(_ones(), mb)
    assert good.sum() == 3 * (NPIX - 1)  # only the BRIGHT pixel is bad
    m = stamp_metrics(_ones(), _ones(), mb)
    assert m["wise_brightmask_frac"] == 6 / NPIX
    assert m["bad_pixel_frac"] == 1 / NPIX


def test_custom_bad_bits_is_honoured():
    mb = _mb()
    mb[4, 4] = MASKBITS["NPRIMARY"]
    mb[5, 5] = MASKBITS["BRIGHT"]
    good = good_pixel_mask(_ones(), mb, bad_bits=MASKBITS["NPRIMARY"])
    assert not good[:, 4, 4].any() and good[:, 5, 5].all()


@pytest.mark.parametrize("bad_value", [0.0, -1.0, -1e-30, np.nan, np.inf, -np.inf])
def test_invvar_nonpositive_or_nonfinite_excluded_per_band(bad_value):
    iv = _ones()
    iv[1, 3, 3] = bad_value
    good = good_pixel_mask(iv, _mb())
    assert not good[1, 3, 3]
    assert good[0, 3, 3] and good[2, 3, 3]  # only that band
    assert good.sum() == 3 * NPIX - 1


def test_tiny_positive_invvar_is_good():
    iv = _ones()
    iv[0, 0, 0] = np.float32(1e-40)  # subnormal but > 0
    assert good_pixel_mask(iv, _mb()).all()


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_image_nonfinite_excluded(bad_value):
    img = np.zeros((3, N, N), np.float32)  # image == 0 is NOT a bad-pixel criterion
    img[2, 1, 6] = bad_value
    good = good_pixel_mask(_ones(), _mb(), image=img)
    assert not good[2, 1, 6]
    assert good.sum() == 3 * NPIX - 1
    assert good_pixel_mask(_ones(), _mb()).all()  # without image: not excluded


def test_good_mask_2d_single_band():
    iv = np.ones((N, N), np.float32)
    iv[0, 0] = 0
    good = good_pixel_mask(iv, _mb())
    assert good.shape == (N, N) and good.sum() == NPIX - 1


def test_float_maskbits_rejected():
    with pytest.raises(TypeError):
        good_pixel_mask(_ones(), np.zeros((N, N), np.float32))


# ----------------------------------------------------------------------------- fractions


def test_bad_pixel_frac_per_band_and_union():
    good = np.ones((3, N, N), bool)
    good[0, 0, 0] = False  # g bad at A
    good[1, 0, 1] = False  # r bad at B
    good[1, 0, 0] = False  # r also bad at A (same position: counted once in combined)
    per, comb = bad_pixel_frac(good)
    assert per == (1 / NPIX, 2 / NPIX, 0.0)
    assert comb == 2 / NPIX
    assert all(isinstance(v, float) for v in per) and isinstance(comb, float)


def test_bad_pixel_frac_all_bad():
    per, comb = bad_pixel_frac(np.zeros((2, N, N), bool))
    assert per == (1.0, 1.0) and comb == 1.0


# ----------------------------------------------------------------------------- arc_snr


def test_arc_snr_constant_arc_analytic():
    a, w, n_bad = 0.37, 2.5, 5
    arc = np.full((N, N), a, np.float32)
    iv = np.full((N, N), w, np.float32)
    good = np.ones((N, N), bool)
    good.flat[:n_bad] = False  # bad pixels carry arc, must not count
    per, comb = arc_snr(arc, iv, good)
    expected = math.sqrt((NPIX - n_bad) * w) * a
    assert per[0] == pytest.approx(expected, rel=1e-6)
    assert comb == pytest.approx(expected, rel=1e-6)


def test_arc_snr_weighted_analytic():
    arc = np.array([[1.0, 2.0], [3.0, -0.5]])
    iv = np.array([[4.0, 0.25], [1.0, 100.0]])
    per, _ = arc_snr(arc, iv, np.ones((2, 2), bool))
    assert per[0] == pytest.approx(math.sqrt(4 * 1 + 0.25 * 4 + 1 * 9 + 100 * 0.25), rel=1e-12)


def test_arc_snr_invariant_to_bad_pixels_where_arc_zero():
    rng = np.random.default_rng(1)
    arc = np.zeros((3, N, N))
    arc[:, 2:5, 3:6] = rng.uniform(0.1, 1.0, size=(3, 3, 3))
    iv = rng.uniform(0.5, 5.0, size=(3, N, N))
    ref = arc_snr(arc, iv, np.ones((3, N, N), bool))
    good = rng.random((3, N, N)) > 0.4
    good[:, 2:5, 3:6] = True
    iv2 = iv.copy()
    iv2[~good] = rng.choice([0.0, -3.0, np.nan, np.inf], size=(~good).sum())
    assert arc_snr(arc, iv, good) == ref
    assert arc_snr(arc, iv2, np.ones((3, N, N), bool)) == ref  # mask from invvar alone
    assert ref.combined > 0


def test_arc_snr_caller_mask_cannot_bring_in_bad_weights():
    arc = np.ones((N, N))
    iv = np.ones((N, N))
    iv[0, :4] = [0.0, -5.0, np.nan, np.inf]
    per, comb = arc_snr(arc, iv, np.ones((N, N), bool))
    assert comb == pytest.approx(math.sqrt(NPIX - 4), rel=1e-12)


@pytest.mark.parametrize("k", [3.0, 0.01, -2.0])
def test_arc_snr_scales_linearly_with_arc(k):
    rng = np.random.default_rng(2)
    arc = rng.normal(size=(3, N, N))
    iv = rng.uniform(0.1, 3, size=(3, N, N))
    good = rng.random((3, N, N)) > 0.2
    a = arc_snr(arc, iv, good)
    b = arc_snr(k * arc, iv, good)
    assert np.allclose(b.per_band, abs(k) * np.array(a.per_band), rtol=1e-12)
    assert b.combined == pytest.approx(abs(k) * a.combined, rel=1e-12)
    # and as sqrt of the inverse-variance scale (invvar is 1/sigma^2, not sigma^2)
    c = arc_snr(arc, 4.0 * iv, good)
    assert c.combined == pytest.approx(2.0 * a.combined, rel=1e-12)


def test_arc_snr_combined_is_quadrature_sum():
    rng = np.random.default_rng(3)
    arc = rng.uniform(0, 1, size=(3, N, N))
    iv = rng.uniform(0.1, 3, size=(3, N, N))
    good = rng.random((3, N, N)) > 0.3
    per, comb = arc_snr(arc, iv, good)
    assert len(set(per)) == 3
    assert comb == pytest.approx(math.sqrt(sum(p * p for p in per)), rel=1e-12)
    for b in range(3):
        assert arc_snr(arc[b], iv[b], good[b]).combined == pytest.approx(per[b], rel=1e-12)


def test_arc_snr_no_good_pixels_is_zero():
    good = np.ones((2, N, N), bool)
    good[0] = False
    per, comb = arc_snr(np.ones((2, N, N)), np.ones((2, N, N)), good)
    assert per[0] == 0.0 and per[1] == pytest.approx(N)
    assert comb == pytest.approx(N)


def test_nonfinite_arc_raises():
    arc = np.ones((N, N))
    arc[1, 1] = np.nan
    for f in (arc_snr, arc_peak_snr, arc_aperture_snr):
        with pytest.raises(ValueError):
            f(arc, np.ones((N, N)), np.ones((N, N), bool))


def test_arc_snr_matches_empirical_matched_filter_snr():
    """Simulate Gaussian noise with the given invvar; the optimal statistic T = sum w a d has
    mean(T | arc) / std(T | noise) = arc_snr.  Three bands jointly: checks the quadrature sum."""
    rng = np.random.default_rng(20260101)
    n, R = 16, 2000
    y, x = np.mgrid[:n, :n] - (n - 1) / 2
    r = np.hypot(x, y)
    arc = np.stack([s * np.exp(-0.5 * ((r - 4.0) / 1.2) ** 2) for s in (0.02, 0.05, 0.08)])
    iv = rng.uniform(50.0, 800.0, size=(3, n, n))  # strongly varying weights
    good = rng.random((3, n, n)) > 0.15
    iv[~good] = 0.0
    expected = arc_snr(arc.astype(np.float32), iv.astype(np.float32), good)

    sigma = np.where(good, 1.0 / np.sqrt(np.where(good, iv, 1.0)), 0.0)
    noise = rng.normal(size=(R, 3, n, n)) * sigma
    filt = np.where(good, iv * arc, 0.0)
    t_noise = (noise * filt).sum(axis=(2, 3))  # (R, 3) per band
    t_signal = (filt * arc).sum(axis=(1, 2))  # noise-free mean of T
    emp_band = t_signal / t_noise.std(axis=0, ddof=1)
    emp_comb = t_signal.sum() / t_noise.sum(axis=1).std(ddof=1)
    # sampling error of a std from 2000 draws: ~1.6%; allow 5%
    assert np.allclose(emp_band, expected.per_band, rtol=0.05)
    assert emp_comb == pytest.approx(expected.combined, rel=0.05)
    # sanity of the test itself: the result is of plausible order (arcs near detection limit)
    assert 3 < expected.combined < 100


# ----------------------------------------------------------------------------- peak S/N


def test_arc_peak_snr_ignores_bad_pixels():
    arc = np.zeros((3, N, N), np.float32)
    iv = _ones(value=4.0)
    arc[0, 1, 1] = 1e6  # huge, on a BRIGHT pixel
    arc[0, 5, 5] = 3.0  # g-band good peak: 3 * 2 = 6
    arc[1, 6, 6] = 1e6
    iv[1, 6, 6] = 0.0  # huge, on an r-band zero-weight pixel
    arc[1, 2, 2] = 1.0  # r-band good peak: 2
    arc[2, 3, 3] = 0.5
    iv[2, 3, 3] = 100.0  # z-band peak: 0.5 * 10 = 5
    mb = _mb()
    mb[1, 1] = MASKBITS["BRIGHT"]
    good = good_pixel_mask(iv, mb)
    per, comb = arc_peak_snr(arc, iv, good)
    assert per == pytest.approx((6.0, 2.0, 5.0), rel=1e-6)
    assert comb == pytest.approx(6.0, rel=1e-6)


def test_arc_peak_snr_no_good_pixels_is_nan():
    good = np.ones((3, N, N), bool)
    good[1] = False
    arc = np.ones((3, N, N))
    arc[2] *= 7
    per, comb = arc_peak_snr(arc, np.ones((3, N, N)), good)
    assert per[0] == 1.0 and math.isnan(per[1]) and per[2] == 7.0 and comb == 7.0
    per, comb = arc_peak_snr(arc, np.ones((3, N, N)), np.zeros((3, N, N), bool))
    assert all(math.isnan(p) for p in per) and math.isnan(comb)


# ----------------------------------------------------------------------------- aperture S/N


def _lenspop_snfunc_reference(d, sig):
    """Literal transcription of LensPop's SNfunc total S/N (loop form, test only)."""
    order = sorted(range(len(d)), key=lambda i: -d[i] / sig[i])
    best, sd, sv = -math.inf, 0.0, 0.0
    for i in order:
        sd += d[i]
        sv += sig[i] ** 2
        best = max(best, sd / math.sqrt(sv))
    return best


def test_arc_aperture_snr_simple_case():
    arc = np.array([[10.0, 1.0], [0.0, 0.0]])
    per, _ = arc_aperture_snr(arc, np.ones((2, 2)), np.ones((2, 2), bool))
    assert per[0] == pytest.approx(10.0)  # prefix {10}: 10 > 11/sqrt(2)
    arc = np.array([[3.0, 3.0], [3.0, 0.0]])
    per, _ = arc_aperture_snr(arc, np.ones((2, 2)), np.ones((2, 2), bool))
    assert per[0] == pytest.approx(9 / math.sqrt(3))


def test_arc_aperture_snr_matches_lenspop_reference_and_bounds():
    rng = np.random.default_rng(5)
    for _ in range(20):
        arc = rng.normal(0.2, 1.0, size=(3, 6, 6))
        iv = rng.uniform(0.1, 10.0, size=(3, 6, 6))
        good = rng.random((3, 6, 6)) > 0.3
        good[:, 0, 0] = True
        ap = arc_aperture_snr(arc, iv, good)
        pk = arc_peak_snr(arc, iv, good)
        mf = arc_snr(arc, iv, good)
        for b in range(3):
            g = good[b]
            ref = _lenspop_snfunc_reference(list(arc[b][g]), list(1 / np.sqrt(iv[b][g])))
            assert ap.per_band[b] == pytest.approx(ref, rel=1e-10)
            assert pk.per_band[b] <= ap.per_band[b] * (1 + 1e-12) + 1e-12
            assert ap.per_band[b] <= mf.per_band[b] * (1 + 1e-12) + 1e-12
        assert ap.combined == max(ap.per_band)


# ----------------------------------------------------------------------------- region S/N


def _region_reference(arc, iv, good, k):
    """Brute-force loop over pixels (test only): sum arc / sqrt(sum 1/iv) over good pixels
    with arc * sqrt(iv) > k; (0.0, 0) for an empty region."""
    flux, var, n = 0.0, 0.0, 0
    for a, w, g in zip(np.ravel(arc).tolist(), np.ravel(iv).tolist(), np.ravel(good).tolist()):
        if g and math.isfinite(w) and w > 0 and a * math.sqrt(w) > k:
            flux += a
            var += 1.0 / w
            n += 1
    return (flux / math.sqrt(var) if n else 0.0), n


def test_region_snr_uniform_arc_on_uniform_noise_is_f_n_over_sigma_sqrt_n():
    """Uniform arc f on n pixels, uniform sigma: S/N = f n / (sigma sqrt(n)) = f sqrt(n)/sigma."""
    f, sigma, n_arc = 0.3, 0.125, 20                   # per-pixel S/N 2.4 > k = 1
    arc = np.zeros((N, N))
    arc.flat[:n_arc] = f
    iv = np.full((N, N), 1 / sigma ** 2)
    per, comb, npix = arc_region_snr(arc, iv, np.ones((N, N), bool))
    assert npix == (n_arc,)
    assert per[0] == pytest.approx(f * n_arc / (sigma * math.sqrt(n_arc)), rel=1e-14)
    assert comb == per[0]
    # the region is the whole arc here, and the arc is uniform: the matched filter equals it
    assert arc_snr(arc, iv, np.ones((N, N), bool)).combined == pytest.approx(per[0], rel=1e-14)
    assert ARC_REGION_K_DEFAULT == 1.0


def test_region_threshold_excludes_faint_pixels_strictly():
    sigma = 0.5                                        # invvar 4: a * sqrt(w) = 2 a exactly
    arc = np.zeros((N, N))
    arc[0, :5] = 2.0                                   # 4 sigma: in
    arc[1, :7] = 0.25                                  # 0.5 sigma: out for k = 1
    arc[2, :3] = 0.5                                   # exactly 1 sigma: out (strict >)
    iv = np.full((N, N), 1 / sigma ** 2)
    good = np.ones((N, N), bool)
    per, _, npix = arc_region_snr(arc, iv, good, k=1.0)
    assert npix == (5,) and per[0] == pytest.approx(5 * 2.0 / (sigma * math.sqrt(5)), rel=1e-14)
    per, _, npix = arc_region_snr(arc, iv, good, k=0.4)   # faint pixels now in
    assert npix == (15,)
    assert per[0] == pytest.approx((10 + 1.75 + 1.5) / (sigma * math.sqrt(15)), rel=1e-14)
    per, _, npix = arc_region_snr(arc, iv, good, k=0.0)   # every pixel with arc > 0
    assert npix == (15,)
    per, _, npix = arc_region_snr(arc, iv, good, k=4.0)   # 4 sigma exactly: strict, empty
    assert npix == (0,) and per == (0.0,)


def test_region_snr_varying_noise_matches_brute_force():
    rng = np.random.default_rng(11)
    for _ in range(10):
        arc = rng.normal(0.3, 1.0, size=(3, 7, 7))
        iv = rng.uniform(0.05, 20.0, size=(3, 7, 7))
        good = rng.random((3, 7, 7)) > 0.25
        k = float(rng.uniform(0, 3))
        got = arc_region_snr(arc, iv, good, k=k)
        for b in range(3):
            ref, n = _region_reference(arc[b], iv[b], good[b], k)
            assert got.npix[b] == n
            assert got.per_band[b] == pytest.approx(ref, rel=1e-12)
        assert got.combined == max(got.per_band)


def test_region_snr_excludes_masked_and_nonpositive_invvar_pixels():
    """Bright arc pixels on a BRIGHT maskbit, at invvar 0 / < 0 / NaN / inf, or with a NaN
    image are not in the region (same good-pixel rule as every metric)."""
    arc = np.zeros((3, N, N))
    arc[:, 2:6, 2:6] = 1.0
    iv = np.full((3, N, N), 4.0)
    iv[0, 2, 2:6] = [0.0, -1.0, np.nan, np.inf]
    img = np.zeros((3, N, N))
    img[1, 3, 3] = np.nan
    mb = _mb()
    mb[5, 5] = MASKBITS["BRIGHT"]
    mb[4, 4] = MASKBITS["NPRIMARY"] | MASKBITS["WISEM1"]   # not bad: stays in
    m = stamp_metrics(arc, iv, mb, image=img)
    assert (m["arc_region_npix_g"], m["arc_region_npix_r"], m["arc_region_npix_z"]) == (11, 14, 15)
    for b, n in zip("grz", (11, 14, 15)):
        assert m[f"arc_snr_region_{b}"] == pytest.approx(n * 1.0 / (0.5 * math.sqrt(n)), rel=1e-14)
    assert m["arc_snr_region"] == m["arc_snr_region_z"]
    # the masked pixels' arc values do not matter at all
    arc2 = arc.copy()
    arc2[0, 2, 2:6] = 1e30
    arc2[:, 5, 5] = 1e30
    arc2[1, 3, 3] = 1e30
    m2 = stamp_metrics(arc2, iv, mb, image=img)
    assert all(m2[k] == m[k] for k in m if "region" in k)
    # the caller's good mask cannot bring in a zero/negative weight
    per, _, npix = arc_region_snr(arc[0], iv[0], np.ones((N, N), bool))
    assert npix == (12,)


def test_region_snr_zero_arc_and_no_good_pixel_give_zero_not_nan():
    w = np.full((3, N, N), 2.0)
    w[2] = 0.0                                         # band z: no good pixel
    zero = np.zeros((3, N, N))
    assert arc_region_snr(zero, w, np.ones((3, N, N), bool)) == ((0.0,) * 3, 0.0, (0,) * 3)
    m = stamp_metrics(zero, w, _mb())                  # the zero-arc fast path
    for b in "grz":
        assert m[f"arc_snr_region_{b}"] == 0.0 and m[f"arc_region_npix_{b}"] == 0
    assert m["arc_snr_region"] == 0.0
    arc = np.ones((3, N, N))
    m = stamp_metrics(arc, w, _mb())                   # general path, z has no good pixel
    assert m["arc_snr_region_z"] == 0.0 and m["arc_region_npix_z"] == 0
    assert m["arc_snr_region_g"] == pytest.approx(math.sqrt(2) * N, rel=1e-14)
    negative = -np.ones((3, N, N))                     # a negative arc is never above k >= 0
    assert arc_region_snr(negative, w, np.ones((3, N, N), bool), k=0.0).npix == (0, 0, 0)


def test_region_snr_combined_and_region_bands():
    arc = np.stack([np.full((N, N), v) for v in (0.2, 0.5, 0.3)])
    w = np.full((3, N, N), 100.0)                      # per-pixel S/N 2, 5, 3
    m = stamp_metrics(arc, w, _mb())
    per = [m[f"arc_snr_region_{b}"] for b in "grz"]
    assert per == pytest.approx([2 * N, 5 * N, 3 * N], rel=1e-14)
    assert m["arc_snr_region"] == per[1]               # best band
    assert stamp_metrics(arc, w, _mb(), region_bands="gz")["arc_snr_region"] == per[2]
    assert stamp_metrics(arc, w, _mb(), region_bands=("z", "i"))["arc_snr_region"] == per[2]
    assert math.isnan(stamp_metrics(arc, w, _mb(), region_bands=())["arc_snr_region"])
    m3 = stamp_metrics(arc, w, _mb(), region_k=2.5)    # g drops out (2 < 2.5)
    assert m3["arc_region_npix_g"] == 0 and m3["arc_snr_region_g"] == 0.0
    assert m3["arc_snr_region_r"] == m["arc_snr_region_r"]


@pytest.mark.parametrize("k", [-0.1, math.nan, math.inf, "one", None])
def test_region_threshold_must_be_finite_nonnegative(k):
    with pytest.raises(ValueError, match="finite number >= 0"):
        arc_region_snr(np.ones((N, N)), np.ones((N, N)), np.ones((N, N), bool), k=k)
    with pytest.raises(ValueError, match="finite number >= 0"):
        stamp_metrics(_ones(), _ones(), _mb(), region_k=k)


def test_region_snr_deterministic_and_float32_exact():
    rng = np.random.default_rng(12)
    arc = np.abs(rng.normal(0, 0.05, size=(3, 64, 64))).astype(np.float32)
    iv = rng.uniform(50, 500, size=(3, 64, 64)).astype(np.float32)
    mb = np.zeros((64, 64), np.int32)
    runs = [stamp_metrics(arc, iv, mb) for _ in range(3)]
    runs.append(stamp_metrics(arc.astype(np.float64), iv.astype(np.float64), mb))
    for r in runs[1:]:
        assert r == runs[0]
    good = good_pixel_mask(iv, mb)
    assert arc_region_snr(arc, iv, good) == arc_region_snr(arc, iv, good)


# ----------------------------------------------------------------------------- stamp_metrics


def test_stamp_metrics_keys_types_and_consistency():
    rng = np.random.default_rng(7)
    arc = rng.uniform(0, 0.1, size=(3, N, N)).astype(np.float32)
    iv = rng.uniform(10, 100, size=(3, N, N)).astype(np.float32)
    iv[2, 0, 0] = 0.0
    img = rng.normal(size=(3, N, N)).astype(np.float32)
    img[0, 7, 7] = np.nan
    mb = _mb(MASKBITS["NPRIMARY"])
    mb[3, 3] |= MASKBITS["SATUR_R"]
    mb[4, :] |= MASKBITS["WISEM2"]
    m = stamp_metrics(arc, iv, mb, image=img)
    assert tuple(m) == STAMP_METRIC_KEYS
    for k, v in m.items():
        assert type(v) is (int if k.startswith("n_") or "_npix_" in k else float), k
    assert m["n_pix"] == NPIX
    assert (m["n_good_pix_g"], m["n_good_pix_r"], m["n_good_pix_z"]) == (NPIX - 2, NPIX - 1, NPIX - 2)
    assert m["n_good_pix"] == NPIX - 3
    assert m["bad_pixel_frac_r"] == 1 / NPIX and m["bad_pixel_frac"] == 3 / NPIX
    assert m["wise_brightmask_frac"] == N / NPIX
    good = good_pixel_mask(iv, mb, image=img)
    ref = arc_snr(arc, iv, good)
    assert (m["arc_snr_g"], m["arc_snr_r"], m["arc_snr_z"]) == ref.per_band
    assert m["arc_snr"] == ref.combined
    assert m["arc_peak_snr"] == max(m["arc_peak_snr_g"], m["arc_peak_snr_r"], m["arc_peak_snr_z"])
    # dict input, in any key order, gives identical results
    m2 = stamp_metrics({"z": arc[2], "g": arc[0], "r": arc[1]}, iv, mb, image=img)
    assert m2 == m


def test_stamp_metrics_missing_band_and_shape_errors():
    with pytest.raises(KeyError):
        stamp_metrics({"g": np.zeros((N, N)), "r": np.zeros((N, N))}, _ones(), _mb())
    with pytest.raises(ValueError):
        stamp_metrics(_ones((2, N, N)), _ones(), _mb())
    with pytest.raises(ValueError):
        stamp_metrics(_ones(), _ones(), np.zeros((N + 1, N + 1), np.int32))


def test_stamp_metrics_custom_bands():
    m = stamp_metrics(_ones((2, N, N)), _ones((2, N, N)), _mb(), bands=("r", "z"))
    assert "arc_snr_g" not in m and m["arc_snr_r"] == pytest.approx(N)
    assert m["arc_snr"] == pytest.approx(N * math.sqrt(2))
    assert "arc_region_npix_g" not in m and m["arc_region_npix_z"] == 0   # 1 sigma: not > 1
    m = stamp_metrics(_ones((2, N, N)), _ones((2, N, N)), _mb(), bands=("r", "z"), region_k=0.5)
    assert m["arc_region_npix_z"] == NPIX and m["arc_snr_region"] == pytest.approx(N)


# ----------------------------------------------------------------------------- properties

_f32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
_f32_any = st.floats(width=32)


@st.composite
def _stamps(draw):
    b = draw(st.integers(1, 3))
    n = draw(st.integers(1, 6))
    arc = draw(hnp.arrays(np.float32, (b, n, n), elements=_f32))
    iv = draw(hnp.arrays(np.float32, (b, n, n), elements=_f32_any))
    img = draw(hnp.arrays(np.float32, (b, n, n), elements=_f32_any))
    mb = draw(hnp.arrays(np.int32, (n, n), elements=st.integers(0, (1 << 17) - 1)))
    return arc, iv, img, mb, ("g", "r", "z")[:b]


@settings(max_examples=300, deadline=None)
@given(_stamps())
def test_property_outputs_finite_and_fractions_in_range(stamp):
    arc, iv, img, mb, bands = stamp
    m = stamp_metrics(arc, iv, mb, bands=bands, image=img)
    good = good_pixel_mask(iv, mb, image=img)
    npix = mb.size
    assert 0.0 <= m["wise_brightmask_frac"] <= 1.0
    for b_i, b in enumerate(bands):
        assert m[f"n_good_pix_{b}"] == int(good[b_i].sum())
        assert 0.0 <= m[f"bad_pixel_frac_{b}"] <= 1.0
        assert m[f"bad_pixel_frac_{b}"] <= m["bad_pixel_frac"]
        assert math.isfinite(m[f"arc_snr_{b}"]) and m[f"arc_snr_{b}"] >= 0.0
        has_good = m[f"n_good_pix_{b}"] > 0
        for stem in ("arc_peak_snr", "arc_aperture_snr"):
            assert math.isfinite(m[f"{stem}_{b}"]) == has_good, stem
        if not has_good:
            assert m[f"arc_snr_{b}"] == 0.0
        else:
            pk, ap, mf = (m[f"{s}_{b}"] for s in ("arc_peak_snr", "arc_aperture_snr", "arc_snr"))
            assert pk <= ap + 1e-9 * abs(ap)  # the 1-pixel aperture is the peak
            assert ap <= mf * (1 + 1e-9)  # Cauchy-Schwarz
    assert 0.0 <= m["bad_pixel_frac"] <= 1.0
    assert m["n_good_pix"] == npix - round(m["bad_pixel_frac"] * npix)
    assert math.isfinite(m["arc_snr"])
    assert math.isfinite(m["arc_peak_snr"]) == any(m[f"n_good_pix_{b}"] > 0 for b in bands)


@settings(max_examples=200, deadline=None)
@given(_stamps(), st.floats(0.125, 8.0))
def test_property_arc_snr_homogeneous_and_mask_respected(stamp, k):
    arc, iv, img, mb, bands = stamp
    arc = np.clip(arc, -1e15, 1e15)  # keep k*arc exactly representable in range
    good = good_pixel_mask(iv, mb, image=img)
    a = arc_snr(arc, iv, good)
    b = arc_snr(arc.astype(np.float64) * k, iv, good)
    assert b.combined == pytest.approx(k * a.combined, rel=1e-9, abs=0)
    # arbitrary values on excluded pixels do not change anything
    arc2 = np.where(good, arc, np.float32(3e38))
    assert arc_snr(arc2, iv, good) == a
    for f in (arc_peak_snr, arc_aperture_snr):  # NaN-aware equality
        np.testing.assert_array_equal(f(arc2, iv, good).per_band, f(arc, iv, good).per_band)


@settings(max_examples=300, deadline=None)
@given(_stamps(), st.floats(0.0, 10.0))
def test_property_region_snr_bounded_by_aperture_and_matched_filter(stamp, k):
    """For any arc, noise map and mask: 0 <= region S/N <= aperture S/N <= matched-filter S/N
    (the matched filter is the optimal linear statistic; Cauchy-Schwarz), region S/N > k when
    the region is not empty, 0.0 exactly when it is, and the region shrinks as k grows."""
    arc, iv, img, mb, bands = stamp
    m = stamp_metrics(arc, iv, mb, bands=bands, image=img, region_k=k)
    m_hi = stamp_metrics(arc, iv, mb, bands=bands, image=img, region_k=2 * k + 0.5)
    for b in bands:
        reg, n = m[f"arc_snr_region_{b}"], m[f"arc_region_npix_{b}"]
        assert math.isfinite(reg) and reg >= 0.0
        assert 0 <= n <= m[f"n_good_pix_{b}"]
        assert m_hi[f"arc_region_npix_{b}"] <= n
        if n == 0:
            assert reg == 0.0
        else:
            assert reg > k * (1 - 1e-12)
            assert reg <= m[f"arc_aperture_snr_{b}"] * (1 + 1e-9)
            assert reg <= m[f"arc_snr_{b}"] * (1 + 1e-9)
    assert m["arc_snr_region"] == max(m[f"arc_snr_region_{b}"] for b in bands)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 3), st.integers(1, 12), st.integers(0, 2 ** 32 - 1), st.floats(0.0, 3.0))
def test_property_region_snr_never_exceeds_matched_filter_on_random_arcs(nb, n, seed, k):
    """Random arcs (Gaussian blobs, ring segments and noise-like patterns, with negative
    round-off) on random noise maps with random masks: region S/N <= arc_snr per band."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:n, :n] - (n - 1) / 2
    r = np.hypot(x, y)
    arc = (rng.uniform(0, 5) * np.exp(-0.5 * ((r - rng.uniform(0, n / 2)) / rng.uniform(0.3, 3))
                                      ** 2)[None] * rng.uniform(0.1, 1, size=(nb, 1, 1))
           + rng.normal(0, rng.uniform(1e-8, 1), size=(nb, n, n)))
    iv = rng.uniform(0.01, 100, size=(nb, n, n)) * rng.uniform(0.1, 10)
    good = rng.random((nb, n, n)) > rng.uniform(0, 0.5)
    reg = arc_region_snr(arc, iv, good, k=k)
    mf = arc_snr(arc, iv, good)
    ap = arc_aperture_snr(arc, iv, good)
    for b in range(nb):
        assert reg.per_band[b] <= mf.per_band[b] * (1 + 1e-12)
        if reg.npix[b]:
            assert reg.per_band[b] <= ap.per_band[b] * (1 + 1e-12)
    # homogeneity: scaling the arc and the threshold together scales the region S/N
    c = float(rng.uniform(0.5, 4))
    scaled = arc_region_snr(arc * c, iv, good, k=k * c)
    if scaled.npix == reg.npix:          # (a pixel at the threshold may flip by rounding)
        assert np.allclose(scaled.per_band, c * np.array(reg.per_band), rtol=1e-12, atol=0)


def test_fast_decreasing_order_is_the_stable_argsort():
    """The unstable-sort shortcut in arc_aperture_snr gives np.argsort(-key, kind='stable')
    exactly: distinct keys, many ties (rounded values), signed zeros, a single element."""
    from lensing.metrics import _order_decreasing_stable

    rng = np.random.default_rng(17)
    cases = [rng.normal(size=5000), np.round(rng.normal(size=5000), 1),
             np.array([0.0, -0.0, 0.0, 1.0, -0.0]), np.array([3.0]),
             np.repeat(rng.random(50), 7)]
    for key in cases:
        assert np.array_equal(_order_decreasing_stable(key), np.argsort(-key, kind="stable"))


def test_stamp_metrics_equals_the_single_metric_functions():
    """stamp_metrics prepares the arrays once; its values are those of the public functions."""
    from lensing import metrics as M

    rng = np.random.default_rng(4)
    arc = np.abs(rng.normal(size=(3, 24, 24))) * (rng.random((3, 24, 24)) > 0.3)
    w = rng.random((3, 24, 24)) + 0.05
    w[0, :3] = 0.0
    mb = np.zeros((24, 24), np.int32)
    mb[5:8, 5:8] = M.MASKBITS_BAD & -M.MASKBITS_BAD        # lowest bad bit
    out = M.stamp_metrics(arc, w, mb)
    good = M.good_pixel_mask(w, mb)
    for stem, fn in (("arc_snr", M.arc_snr), ("arc_peak_snr", M.arc_peak_snr),
                     ("arc_aperture_snr", M.arc_aperture_snr)):
        ref = fn(arc, w, good)
        assert [out[f"{stem}_{b}"] for b in "grz"] == list(ref.per_band)
        assert out[stem] == ref.combined
    ref = M.arc_region_snr(arc, w, good)
    assert [out[f"arc_snr_region_{b}"] for b in "grz"] == list(ref.per_band)
    assert [out[f"arc_region_npix_{b}"] for b in "grz"] == list(ref.npix)
    assert out["arc_snr_region"] == ref.combined


def test_zero_arc_fast_path_equals_the_general_path():
    """A zero arc (paired control) takes a shortcut in stamp_metrics; its values are those of
    the single-metric functions, including bands without any good pixel (NaN peak/aperture)."""
    from lensing import metrics as M

    rng = np.random.default_rng(8)
    w = rng.random((3, 20, 20)) + 0.05
    w[2] = 0.0                                   # band z: no good pixel
    mb = np.zeros((20, 20), np.int32)
    arc = np.zeros((3, 20, 20))
    out = M.stamp_metrics(arc, w, mb)
    good = M.good_pixel_mask(w, mb)
    for stem, fn in (("arc_snr", M.arc_snr), ("arc_peak_snr", M.arc_peak_snr),
                     ("arc_aperture_snr", M.arc_aperture_snr)):
        ref = fn(arc, w, good)
        got = [out[f"{stem}_{b}"] for b in "grz"] + [out[stem]]
        want = list(ref.per_band) + [ref.combined]
        assert np.array_equal(np.array(got), np.array(want), equal_nan=True), stem
    assert math.isnan(out["arc_peak_snr_z"]) and out["arc_snr_z"] == 0.0
    with pytest.raises(ValueError, match="non-finite"):
        M.stamp_metrics(np.full((3, 20, 20), np.nan), w, mb)
