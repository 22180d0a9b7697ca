"""The adaptive sub-pixel rule of lensing.render against a uniform 16x-supersampled reference.

Requirement: the integrated lensed flux (before PSF) is within 0.1 % of the 16x reference,
for SIE + shear lenses and Sersic sources spanning the project's priors and beyond
(theta_E 0-2", r_e 0.03-0.6", n 0.5-4, q 0.3-1, sources anywhere inside 1 theta_E).
"""
import math

import numpy as np
import pytest

from lensing import LensModel, SersicSource, render_unit_lensed_source
from lensing.render import fine_supersample

TOLERANCE = 1e-3


def _random_configs(seed, count):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        theta_e = 0.0 if rng.uniform() < 0.15 else rng.uniform(0.2, 2.0)
        gamma, gamma_phi = rng.uniform(0, 0.1), rng.uniform(0, math.pi)
        lens = LensModel(theta_e, rng.uniform(0.3, 1.0), rng.uniform(0, math.pi),
                         rng.uniform(-0.13, 0.13), rng.uniform(-0.13, 0.13),
                         gamma * math.cos(2 * gamma_phi), gamma * math.sin(2 * gamma_phi))
        radius = rng.uniform(0, 1.0) * max(theta_e, 0.3)
        angle = rng.uniform(0, 2 * math.pi)
        source = SersicSource(radius * math.cos(angle), radius * math.sin(angle),
                              float(np.exp(rng.uniform(np.log(0.03), np.log(0.6)))),
                              float(rng.choice([0.5, 0.8, 1.0, 1.5, 2.5, 4.0])),
                              rng.uniform(0.3, 1.0), rng.uniform(0, math.pi))
        yield lens, source


@pytest.mark.parametrize("lens,source", list(_random_configs(seed=2026, count=24)))
def test_adaptive_flux_within_0p1_percent_of_16x_reference(lens, source):
    reference, _, _ = render_unit_lensed_source(lens, source, 72, supersample=16)
    adaptive, (_, s_fine), n_refined = render_unit_lensed_source(lens, source, 72)
    rel = adaptive.sum() / reference.sum() - 1.0
    assert abs(rel) < TOLERANCE, (
        f"adaptive lensed flux differs from the 16x reference by {rel:.2e} (> {TOLERANCE}); "
        f"s_fine={s_fine}, refined pixels={n_refined}, lens={lens}, source={source}")
    assert n_refined > 0, "the source's neighbourhood must be refined"


def test_point_sampling_pitfall_is_avoided():
    """Point-sampling R_e = 0.15" at 0.262"/px overestimates flux by tens of % (pitfall);
    the adaptive rule stays within 0.1 % of the analytic flux for an unlensed n=1 source."""
    lens = LensModel(0.0)
    source = SersicSource(0.05, -0.03, 0.15, 1.0, 1.0, 0.0)
    point, _, _ = render_unit_lensed_source(lens, source, 48, supersample=1)
    adaptive, _, _ = render_unit_lensed_source(lens, source, 48)
    assert abs(point.sum() - 1) > 0.05, "sanity: point sampling is badly off for this source"
    assert abs(adaptive.sum() - 1) < TOLERANCE, f"adaptive flux {adaptive.sum():.6f} != 1"


def test_rule_values():
    assert fine_supersample(SersicSource(0, 0, 0.3, 2.0), 0.262) == 16
    assert fine_supersample(SersicSource(0, 0, 0.5, 1.0), 0.262) == 8
    assert fine_supersample(SersicSource(0, 0, 0.1, 1.0, q=0.5), 0.262) == 16
    assert fine_supersample(SersicSource(0, 0, 0.2, 0.5), 0.262) == math.ceil(8 * 0.262 / 0.2)
