"""Benchmark: ms per source of ``lensing.images`` (critical radius, mu_point, point images).

Usage::

    .venv/bin/python benchmarks/bench_images.py              # 200 configurations
    .venv/bin/python benchmarks/bench_images.py --configs 50

A script, not a test.  Single-threaded (BLAS/OpenMP pinned to 1 thread before NumPy is
imported).  Configurations (seeded): theta_E U(0.5, 2)", q U(0.3, 1), shear U(0, 0.1) at a
random angle, source offset uniform in a disc of radius 0.8 theta_E.  Prints the per-source
cost of ``point_magnification_outside`` and ``solve_point_images`` (4c calls each once per
injection) and the image-count distribution.
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from lensing.images import point_magnification_outside, solve_point_images  # noqa: E402
from lensing.mass_profiles import LensModel  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", type=int, default=200)
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args(argv)
    rng = np.random.default_rng(a.seed)
    cases = []
    for _ in range(a.configs):
        g, gp = rng.uniform(0, 0.1), rng.uniform(0, math.pi)
        lens = LensModel(rng.uniform(0.5, 2.0), rng.uniform(0.3, 1.0), rng.uniform(0, math.pi),
                         rng.uniform(-0.13, 0.13), rng.uniform(-0.13, 0.13),
                         g * math.cos(2 * gp), g * math.sin(2 * gp))
        r = 0.8 * lens.theta_e * math.sqrt(rng.uniform())
        t = rng.uniform(0, 2 * math.pi)
        cases.append((lens, r * math.cos(t), r * math.sin(t)))
    t0 = time.perf_counter()
    for lens, dx, dy in cases:
        point_magnification_outside(lens, math.atan2(dy, dx))
    t1 = time.perf_counter()
    counts: dict = {}
    for lens, dx, dy in cases:
        n = solve_point_images(lens, lens.x0 + dx, lens.y0 + dy).n
        counts[n] = counts.get(n, 0) + 1
    t2 = time.perf_counter()
    print(f"{a.configs} sources: mu_point {1e3 * (t1 - t0) / a.configs:.3f} ms/source, "
          f"solve_point_images {1e3 * (t2 - t1) / a.configs:.2f} ms/source; "
          f"image counts {dict(sorted(counts.items()))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
