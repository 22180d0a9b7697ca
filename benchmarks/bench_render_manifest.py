"""Benchmark: render CPU per task over a 4a manifest's lensed tasks, as stage 4c builds them.

Usage::

    bash scripts/run_main.sh --out /tmp/demo_out        # makes the demo manifests
    .venv/bin/python benchmarks/bench_render_manifest.py \\
        /tmp/demo_out/phase4a/demo/manifests_filtered/train_stamp64_bandsgrz_gridgrid_small
    ... --profile          # + cProfile (CPU time) of one more pass
    ... --save a.npz       # the images, to compare two code versions (--compare a.npz b.npz)

A script, not a test.  Single-threaded (BLAS/OpenMP pinned to 1 thread before NumPy is
imported): "ms per task" is CPU time on one core.  Each task's lens, source (clumps
included) and magnitudes come from the 4c code (``injection._models``,
``injection._source_model``) and the shipped conf; the PSF is Gaussian with FWHM 1.1 / 1.2 /
1.3 arcsec in g / r / z (no brick needed).  One untimed pass, then ``--repeats`` timed ones.
"""
from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_v] = "1"

import argparse  # noqa: E402
import cProfile  # noqa: E402
import glob  # noqa: E402
import pstats  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from injection_pipeline import injection as inj  # noqa: E402
from injection_pipeline.stages import stage_4c as s4c  # noqa: E402
from lensing import render_lensed_arc  # noqa: E402

_CFG_FLAGS = ("supersample", "psf_model", "moffat_beta", "use_psfsize_maps",
              "on_missing_maskbits", "store_invvar_maskbits", "psf_oversample",
              "arc_region_k", "arc_region_bands")


def load_jobs(manifest_dir: str, n: int):
    rows = []
    for f in sorted(glob.glob(os.path.join(manifest_dir, "*.parquet"))):
        rows += pq.read_table(f).to_pylist()
    rows = [r for r in rows if (r.get("theta_e_arcsec") or 0) > 0][:n]
    if not rows:
        raise SystemExit(f"{manifest_dir}: no lensed tasks (theta_e_arcsec > 0) in *.parquet")
    cfg = s4c.config_from_args(argparse.Namespace(**{k: None for k in _CFG_FLAGS}),
                               s4c.load_conf(None))
    jobs = []
    for t in rows:
        bands = inj._task_bands(t)
        lens, src, mags = inj._models(t, bands, 0.03, -0.07)
        row: dict = {}
        src = inj._source_model(t, src, bands, cfg, row)
        fwhm = {b: 1.1 + 0.1 * i for i, b in enumerate(bands)}
        jobs.append((lens, src, mags, fwhm, int(t.get("stamp_size") or 64),
                     int(row.get("n_clumps") or 0)))
    return jobs, cfg


def run(jobs, cfg):
    kw = inj.render_keywords(cfg)
    return [render_lensed_arc(lens, src, mags, fwhm, n_pix=n, **kw)
            for lens, src, mags, fwhm, n, _ in jobs]


def compare(a_path: str, b_path: str) -> None:
    a, b = np.load(a_path), np.load(b_path)
    peak = flux = 0.0
    for k in a.files:
        x, y = a[k], b[k]
        pk = np.abs(y).max(axis=(1, 2), keepdims=True)
        peak = max(peak, float((np.abs(x - y) / pk).max()))
        flux = max(flux, float(np.abs(x.sum((1, 2)) / y.sum((1, 2)) - 1).max()))
    print(f"{len(a.files)} tasks: max |difference| / band peak {peak:.3g}; max relative band "
          f"flux difference {flux:.3g}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("manifest", nargs="?", help="a 4a manifest directory (*.parquet)")
    ap.add_argument("--n", type=int, default=60, help="lensed tasks (first N)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--save", default="", help=".npz of the images (band-stacked per task)")
    ap.add_argument("--compare", nargs=2, metavar=("A", "B"), help="two --save files")
    a = ap.parse_args(argv)
    if a.compare:
        compare(*a.compare)
        return 0
    if not a.manifest:
        ap.error("a manifest directory is required (or --compare A B)")
    jobs, cfg = load_jobs(a.manifest, a.n)
    out = run(jobs, cfg)                                                 # untimed
    times = []
    for _ in range(a.repeats):
        t0 = time.process_time()
        out = run(jobs, cfg)
        times.append(1e3 * (time.process_time() - t0) / len(jobs))
    print(f"{len(jobs)} lensed tasks ({sum(j[5] > 0 for j in jobs)} clumpy, mean "
          f"{np.mean([j[5] for j in jobs]):.2f} clumps): render CPU ms per task "
          + ", ".join(f"{t:.2f}" for t in times)
          + f"; adaptively refined pixels per task {np.mean([o.n_refined_pixels for o in out]):.0f}")
    if a.save:
        np.savez(a.save, *[np.stack([o.images[b] for b in o.images]) for o in out])
    if a.profile:
        pr = cProfile.Profile(time.process_time)
        pr.enable()
        run(jobs, cfg)
        pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(18)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
