"""Benchmark: cost of applying the pixel response once (issue 15), A/B in one process.

    .venv/bin/python benchmarks/bench_pixel_response.py [--reps 5] [--calls 3]

``render_lensed_arc`` with ``psf_oversample = 1`` (the pre-issue-15 scheme, bit-identical to
it) against the default ``psf_oversample = 4``, on the 20 seeded configurations of
bench_render.py, 64 and 96 px, 3 bands.  Single thread (BLAS pinned), CPU time, both paths
warmed up first, the order alternated between repetitions; prints per-repetition ms per
stamp, the ratio of the means, the ratio of the minima (the least disturbed repetition:
on a shared VM single repetitions scatter by tens of per cent) and the median of the
per-repetition ratios (each repetition times 1 and 4 back to back, so a burst of load on the
machine shifts both; the most robust of the three when other processes share the cores).

Measured (2 shared cores, load 2-6 from other processes, runs of 7 repetitions): before the
sparse fine cells and the profile-held Gaussian weights (commit 4bdbe59; 5 runs) ratio of
means 1.22-1.46 at 64 px and 1.39-1.53 at 96 px (minima 1.23-1.45, 1.40-1.65; medians of the
per-repetition ratios 1.34-1.37, 1.38-1.48); after (11 runs) 0.97-1.20 and 0.98-1.08
(medians 0.92-1.03 and 0.96-1.09; minima mostly 0.93-1.17, but 1.53 at 64 px and 1.32, 1.45
at 96 px in runs where a single f = 1 repetition ran undisturbed).  Deterministic count (valgrind callgrind, 2 x 20
configurations at 96 px, instructions net of the imports): f = 1 3.66e9 before, 3.51e9 after;
f = 4 4.22e9 before (1.15x f = 1), 3.56e9 after (1.01x).
"""
from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_render as br  # noqa: E402
from lensing import render_lensed_arc  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--calls", type=int, default=3, help="calls per configuration and rep")
    ap.add_argument("--configs", type=int, default=20)
    a = ap.parse_args(argv)
    cfgs = br.make_configs(a.configs)
    for n in (64, 96):
        ms = {1: [], 4: []}
        for f in (1, 4):
            for lens, src, mags in cfgs:
                render_lensed_arc(lens, src, mags, br.FWHM, n_pix=n, psf_oversample=f)
        for rep in range(a.reps):
            for f in ((1, 4) if rep % 2 == 0 else (4, 1)):
                t0 = time.process_time()
                for lens, src, mags in cfgs:
                    for _ in range(a.calls):
                        render_lensed_arc(lens, src, mags, br.FWHM, n_pix=n, psf_oversample=f)
                ms[f].append((time.process_time() - t0) / (a.calls * len(cfgs)) * 1e3)
        print(f"{n}x{n}: psf_oversample 1: {' '.join(f'{x:.2f}' for x in ms[1])} ms; "
              f"4: {' '.join(f'{x:.2f}' for x in ms[4])} ms; ratio of means "
              f"{statistics.mean(ms[4]) / statistics.mean(ms[1]):.2f}, of minima "
              f"{min(ms[4]) / min(ms[1]):.2f}, median of the per-repetition ratios "
              f"{statistics.median(b / a for a, b in zip(ms[1], ms[4])):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
