"""The clump population model (lensing/clumps.py): statistics of many draws against the
documented model (conf/injection.toml [source.clumps], docs/injection.md), determinism from
task_seed64 only, validation."""
from __future__ import annotations

import math

import numpy as np
import pytest

from lensing import SersicSource
from lensing.clumps import ClumpModel, clump_rng, clumps_from_records, clumps_to_records, draw_clumps

DISC = SersicSource(0.05, -0.02, 0.4, 1.0, 0.6, 0.7)
MODEL = ClumpModel()
N = 4000


@pytest.fixture(scope="module")
def draws():
    return [draw_clumps(MODEL, DISC, "grz", s) for s in range(N)]


def test_population_statistics_match_the_model(draws):
    clumpy = [c for c in draws if c]
    frac_clumpy = len(clumpy) / N
    se = math.sqrt(0.55 * 0.45 / N)
    assert abs(frac_clumpy - 0.55) < 4 * se, frac_clumpy
    counts = np.array([len(c) for c in clumpy])
    assert counts.min() >= 1 and counts.max() <= 8
    assert abs(counts.mean() - 2.0) < 4 * math.sqrt(1.0 / counts.size), counts.mean()
    total_r = np.array([sum(x.flux_frac["r"] for x in c) for c in clumpy])
    assert total_r.min() >= 0.10 and total_r.max() <= 0.30
    assert abs(total_r.mean() - 0.20) < 4 * (0.2 / math.sqrt(12) / math.sqrt(total_r.size))
    sizes = np.array([x.r_e for c in clumpy for x in c])
    assert sizes.min() >= 0.02 and sizes.max() <= 0.06
    for c in clumpy:
        for x in c:            # bluer than the disc: g fraction >= r >= z, at most 10^0.2
            assert x.flux_frac["g"] >= x.flux_frac["r"] >= x.flux_frac["z"]
            assert x.flux_frac["g"] <= x.flux_frac["r"] * 10 ** 0.2 * (1 + 1e-12)
            # inside the disc isophote of 1.5 r_e (same q, phi)
            c_, s_ = math.cos(DISC.phi), math.sin(DISC.phi)
            xp = x.dx * c_ + x.dy * s_
            yp = (-x.dx * s_ + x.dy * c_) / DISC.q
            assert math.hypot(xp, yp) <= 1.5 * DISC.r_e * (1 + 1e-12)


def test_determinism_and_seed_dependence():
    a = draw_clumps(MODEL, DISC, "grz", 2 ** 63 + 17)
    b = draw_clumps(MODEL, DISC, "grz", 2 ** 63 + 17)
    assert a == b
    assert draw_clumps(MODEL, DISC, "grz", -(2 ** 63) + 17) == a     # int64 storage of the key
    assert clump_rng(5).random() != clump_rng(6).random()
    # the dedicated stream is not the manifest's Philox stream of the same key
    assert clump_rng(5).random() != np.random.Generator(np.random.Philox(key=5)).random()


def test_records_round_trip_exactly(draws):
    import json
    for c in draws[:200]:
        assert clumps_from_records(json.loads(json.dumps(clumps_to_records(c)))) == c


def test_small_disc_caps_clump_size():
    small = SersicSource(0.0, 0.0, 0.05, 1.0)
    sizes = [x.r_e for s in range(300) for x in draw_clumps(MODEL, small, "gr", s)]
    assert sizes and max(sizes) <= 0.025 * (1 + 1e-12)


def test_validation():
    with pytest.raises(ValueError):
        ClumpModel(p_clumpy=1.5)
    with pytest.raises(ValueError):
        ClumpModel(total_frac_max=0.9)            # 0.9 x 10^0.2 > 1 in g
    with pytest.raises(ValueError):
        draw_clumps(MODEL, DISC, "gY", 1)
