"""Benchmark: ms per 3-band lensed-arc stamp, ``lensing.render_lensed_arc`` vs lenstronomy.

Usage::

    .venv/bin/python benchmarks/bench_render.py            # 20 configurations, 5 repeats
    .venv/bin/python benchmarks/bench_render.py --configs 10 --repeats 3
    .venv/bin/python benchmarks/bench_render.py --ours-only   # ours only, wall + CPU time

A script, not a test.  Single-threaded (BLAS/OpenMP pinned to 1 thread before NumPy is
imported), so "stamps/s" is a per-core rate.

Work compared (identical output): one SIE + external shear lens, one elliptical Sersic source,
3 bands (g, r, z) with Gaussian PSFs of FWHM 1.5 / 1.3 / 1.2 arcsec, 0.262"/pixel stamps of
64x64 and 96x96 pixels.  Our renderer evaluates the source on the stamp padded by the largest
kernel half-width (so PSF-scattered light from just outside the stamp enters it); lenstronomy is
given the same padded grid (its 'same' convolution would otherwise drop that light) and the
stamp is cropped, so both produce the same stamp.

* ours, adaptive: ``render_lensed_arc(...)`` (default ``supersample=None``).
* ours, uniform ``supersample=4`` for reference.
* lenstronomy ``ImageModel`` (SIE + SHEAR, SERSIC_ELLIPSE, PSF type GAUSSIAN, regular
  supersampling), one ImageModel per band (the PSF differs per band and per target, so the
  realistic per-stamp cost includes building them: "build+image"); "image only" times the
  three ``image()`` calls with prebuilt models.
* Equal accuracy: the lenstronomy supersampling factor is the smallest s in 1..16 whose
  integrated lensed flux (padded canvas, before PSF) is as close to its own uniform 16x
  reference as our adaptive rendering is to ours (16x uniform, ``supersample=16``), judged
  by the worst case over the 64-px configurations; both accuracies are printed.

Configurations (seeded): theta_E U(0.3, 1.5)", lens q U(0.5, 1), lens centre at a random
sub-pixel offset, shear gamma U(0, 0.05) at a random angle, source r_e U(0.05, 0.3)" (major
axis), n U(0.8, 1.2), q U(0.5, 1), source offset uniform in a disc of radius 0.6 theta_E,
r mag U(21.5, 23.5), g - r = 1.15, r - z = 0.85.
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS",
             "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lensing import (LensModel, SersicSource, gaussian_kernel, render_lensed_arc,  # noqa: E402
                     render_unit_lensed_source, sersic_unit_total_flux)

warnings.filterwarnings("ignore", category=DeprecationWarning)  # lenstronomy vs NumPy 2

PIX = 0.262
FWHM = {"g": 1.5, "r": 1.3, "z": 1.2}
SEED = 20260501


def lt_bn(n):
    return 1.9992 * n - 0.3271


def e1e2(q, phi):
    e = (1.0 - q) / (1.0 + q)
    return e * math.cos(2 * phi), e * math.sin(2 * phi)


def make_configs(n_configs, seed=SEED):
    rng = np.random.default_rng(seed)
    configs = []
    for _ in range(n_configs):
        theta_e = rng.uniform(0.3, 1.5)
        gamma, phi_g = rng.uniform(0, 0.05), rng.uniform(0, np.pi)
        lens = LensModel(theta_e, rng.uniform(0.5, 1.0), rng.uniform(0, np.pi),
                         rng.uniform(-0.5, 0.5) * PIX, rng.uniform(-0.5, 0.5) * PIX,
                         gamma * math.cos(2 * phi_g), gamma * math.sin(2 * phi_g))
        beta, ang = 0.6 * theta_e * math.sqrt(rng.uniform()), rng.uniform(0, 2 * np.pi)
        source = SersicSource(beta * math.cos(ang), beta * math.sin(ang), rng.uniform(0.05, 0.3),
                              rng.uniform(0.8, 1.2), rng.uniform(0.5, 1.0), rng.uniform(0, np.pi))
        r = rng.uniform(21.5, 23.5)
        configs.append((lens, source, {"g": r + 1.15, "r": r, "z": r - 0.85}))
    return configs


class LenstronomyRenderer:
    """lenstronomy ImageModel on the same padded grid as ours; returns cropped stamps."""

    def __init__(self, n_pix):
        from lenstronomy.Data.imaging_data import ImageData
        from lenstronomy.Data.psf import PSF
        from lenstronomy.ImSim.image_model import ImageModel
        from lenstronomy.LensModel.lens_model import LensModel as LtLens
        from lenstronomy.LightModel.light_model import LightModel as LtLight

        self.ImageData, self.PSF, self.ImageModel = ImageData, PSF, ImageModel
        self.n_pix = n_pix
        self.margin = max(gaussian_kernel(f, PIX).shape[0] // 2 for f in FWHM.values())
        self.canvas = n_pix + 2 * self.margin
        self.lens_model = LtLens(["SIE", "SHEAR"])
        self.light_model = LtLight(["SERSIC_ELLIPSE"],
                                   profile_kwargs_list=[{"sersic_major_axis": False}])

    def _data(self):
        m = self.canvas
        return self.ImageData(image_data=np.zeros((m, m)), transform_pix2angle=np.diag([PIX, PIX]),
                              ra_at_xy_0=-(m - 1) / 2 * PIX, dec_at_xy_0=-(m - 1) / 2 * PIX)

    def build(self, supersample, psf_type="GAUSSIAN", fwhm=FWHM):
        """One ImageModel per band of ``fwhm`` ({band: PSF FWHM [arcsec]}; the canvas margin
        is sized for the largest kernel of the module's FWHM)."""
        data = self._data()
        models = {}
        for band, fw in fwhm.items():
            psf = self.PSF(psf_type=psf_type, fwhm=fw, truncation=5) if psf_type != "NONE" \
                else self.PSF(psf_type="NONE")
            models[band] = self.ImageModel(data, psf, lens_model_class=self.lens_model,
                                           source_model_class=self.light_model,
                                           kwargs_numerics=dict(supersampling_factor=supersample))
        return models

    @staticmethod
    def kwargs(lens, source, flux):
        e1, e2 = e1e2(lens.q, lens.phi)
        se1, se2 = e1e2(source.q, source.phi)
        kw_lens = [dict(theta_E=lens.theta_e, e1=e1, e2=e2, center_x=lens.x0, center_y=lens.y0),
                   dict(gamma1=lens.gamma1, gamma2=lens.gamma2, ra_0=lens.x0, dec_0=lens.y0)]
        amp = flux / sersic_unit_total_flux(source.n, source.r_e, source.q, bn=lt_bn(source.n))
        kw_src = [dict(amp=amp, R_sersic=math.sqrt(source.q) * source.r_e, n_sersic=source.n,
                       e1=se1, e2=se2, center_x=lens.x0 + source.dx, center_y=lens.y0 + source.dy)]
        return kw_lens, kw_src

    def render(self, lens, source, mags, supersample, models=None):
        models = models or self.build(supersample)
        m0, m1 = self.margin, self.margin + self.n_pix
        out = {}
        for band, mag in mags.items():
            kw_lens, kw_src = self.kwargs(lens, source, 10 ** (-0.4 * (mag - 22.5)))
            out[band] = models[band].image(kw_lens, kw_src)[m0:m1, m0:m1]
        return out

    def unit_flux(self, lens, source, supersample):
        """Integrated lensed flux (canvas, before PSF) for unit intrinsic flux."""
        model = self.ImageModel(self._data(), self.PSF(psf_type="NONE"),
                                lens_model_class=self.lens_model,
                                source_model_class=self.light_model,
                                kwargs_numerics=dict(supersampling_factor=supersample))
        kw_lens, kw_src = self.kwargs(lens, source, 1.0)
        return float(model.image(kw_lens, kw_src, unconvolved=True).sum())


def time_call(fn, repeats, warm_up=True):
    """Median wall time [s] of ``repeats`` calls (after one warm-up call if ``warm_up``)."""
    if warm_up:
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def flux_accuracy(configs, lt64, max_s=16):
    """Integrated lensed flux (64-px padded canvas, before PSF, unit intrinsic flux) errors.

    Returns {label: [|rel. error| per config]} for ours (adaptive, ss=4) and lenstronomy
    (ss = 1..max_s), each against its own uniform 16x and 32x references.
    """
    canvas = 64 + 2 * lt64.margin
    errs = {}

    def add(label, values):
        errs.setdefault(label, []).append(values)

    for lens, source, _ in configs:
        ours = {s: render_unit_lensed_source(lens, source, canvas, PIX, supersample=s)[0].sum()
                for s in (4, 16, 32)}
        adaptive = render_unit_lensed_source(lens, source, canvas, PIX)[0].sum()
        for ref in (16, 32):
            add(("ours adaptive", ref), abs(adaptive / ours[ref] - 1))
            add(("ours ss=4", ref), abs(ours[4] / ours[ref] - 1))
        lt = {s: lt64.unit_flux(lens, source, s) for s in list(range(1, max_s + 1)) + [32]}
        for s in range(1, max_s + 1):
            for ref in (16, 32):
                add((f"lenstronomy ss={s}", ref), abs(lt[s] / lt[ref] - 1))
    return errs


def equal_accuracy_factor(errs, ref, max_s=16):
    """Smallest lenstronomy factor whose worst error vs ``ref`` is <= ours adaptive's worst."""
    target = max(errs[("ours adaptive", ref)])
    for s in range(1, max_s + 1):
        if max(errs[(f"lenstronomy ss={s}", ref)]) <= target:
            return s
    return max_s


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per configuration (ours)")
    ap.add_argument("--lt-repeats", type=int, default=2,
                    help="timed calls per configuration for lenstronomy (each call takes ~1-3 s at "
                         "16x; one warm-up call per stamp size instead of per configuration)")
    ap.add_argument("--ours-only", action="store_true",
                    help="time only lensing.render_lensed_arc (no lenstronomy comparison)")
    args = ap.parse_args(argv)
    if args.ours_only:
        configs = make_configs(args.configs)
        print(f"bench_render --ours-only: {len(configs)} configurations (seed {SEED}), "
              f"numpy {np.__version__}; ms per 3-band stamp (mean over configurations of the "
              f"median of {args.repeats} calls), wall and CPU (process) time")
        for n_pix in (64, 96):
            wall, cpu = [], []
            for lens, source, mags in configs:
                fn = (lambda: render_lensed_arc(lens, source, mags, FWHM, n_pix=n_pix))
                wall.append(time_call(fn, args.repeats))
                fn()
                ts = []
                for _ in range(args.repeats):
                    t0 = time.process_time()
                    fn()
                    ts.append(time.process_time() - t0)
                cpu.append(statistics.median(ts))
            print(f"  {n_pix}x{n_pix}: wall {1e3 * statistics.fmean(wall):.1f} ms, "
                  f"cpu {1e3 * statistics.fmean(cpu):.1f} ms")
        return
    import lenstronomy

    configs = make_configs(args.configs)
    print(f"bench_render: {len(configs)} seeded configurations (seed {SEED}), 3 bands g/r/z, "
          f"FWHM {FWHM}, pixscale {PIX}\", single thread; numpy {np.__version__}, "
          f"lenstronomy {lenstronomy.__version__}")

    # Ours first, on its own: interleaving with lenstronomy's large (16x) allocations was seen
    # to inflate our times by ~1.5-2x through allocator / page-fault churn.
    ours_t = {}
    for n_pix in (64, 96):
        t_ad, t_ss4 = [], []
        for lens, source, mags in configs:
            t_ad.append(time_call(lambda: render_lensed_arc(lens, source, mags, FWHM, n_pix=n_pix),
                                  args.repeats))
            t_ss4.append(time_call(lambda: render_lensed_arc(lens, source, mags, FWHM, n_pix=n_pix,
                                                             supersample=4), args.repeats))
        ours_t[n_pix] = (t_ad, t_ss4)

    lt64 = LenstronomyRenderer(64)
    errs = flux_accuracy(configs, lt64)
    s_eq = equal_accuracy_factor(errs, 16)
    s_eq32 = equal_accuracy_factor(errs, 32)
    print("\nIntegrated lensed flux, |rel. error| vs each code's own uniform reference "
          "(64-px stamp + PSF padding, before PSF), worst / median over configurations:")
    print(f"  {'':24s} {'vs 16x':>19s}   {'vs 32x':>19s}")
    for label in ["ours adaptive", "ours ss=4"] + [f"lenstronomy ss={s}" for s in range(1, 17)]:
        cols = [f"{max(errs[(label, r)]):.2e} / {statistics.median(errs[(label, r)]):.2e}"
                for r in (16, 32)]
        print(f"  {label:24s} {cols[0]:>19s}   {cols[1]:>19s}")
    print(f"  -> equal accuracy (worst case) vs 16x: lenstronomy supersampling {s_eq} "
          f"(vs 32x it would be {s_eq32})")

    print(f"\nTiming (ms per 3-band stamp; ours: median of {args.repeats} after a warm-up; "
          f"lenstronomy: median of {args.lt_repeats} after one warm-up per stamp size)")
    print(f"{'stamp':>6} | {'ours adaptive':>13} | {'ours ss=4':>9} | {'lenstronomy':>11} | "
          f"{'of which':>8} | {'ratio lt/ours':>13} | {'ours stamps/s':>13} | {'lt stamps/s':>11}")
    print(f"{'':>6} | {'':>13} | {'':>9} | {f'ss={s_eq}':>11} | {'build':>8} | {'':>13} | "
          f"{'per core':>13} | {'per core':>11}")
    for n_pix in (64, 96):
        lt = lt64 if n_pix == 64 else LenstronomyRenderer(96)
        lens0, source0, mags0 = configs[0]
        lt.render(lens0, source0, mags0, s_eq)  # warm-up for this stamp size
        t_lt_build, t_lt_img = [], []
        for lens, source, mags in configs:
            t0 = time.perf_counter()
            models = lt.build(s_eq)
            t_lt_build.append(time.perf_counter() - t0)
            t_lt_img.append(time_call(lambda: lt.render(lens, source, mags, s_eq, models),
                                      args.lt_repeats, warm_up=False))
        t_ad, t_ss4 = ours_t[n_pix]
        ms = {k: 1e3 * statistics.fmean(v) for k, v in
              (("ad", t_ad), ("ss4", t_ss4), ("build", t_lt_build), ("img", t_lt_img))}
        lt_total = ms["build"] + ms["img"]
        print(f"{f'{n_pix}x{n_pix}':>6} | {ms['ad']:13.1f} | {ms['ss4']:9.1f} | {lt_total:11.1f} | "
              f"{ms['build']:8.1f} | {lt_total / ms['ad']:13.0f} | {1e3 / ms['ad']:13.1f} | "
              f"{1e3 / lt_total:11.2f}")
        print(f"{'':>6}   median over configs: ours {1e3 * statistics.median(t_ad):.1f} ms "
              f"(range {1e3 * min(t_ad):.1f}-{1e3 * max(t_ad):.1f}), ss=4 "
              f"{1e3 * statistics.median(t_ss4):.1f} ms, lenstronomy "
              f"{1e3 * (statistics.median(t_lt_img) + statistics.median(t_lt_build)):.0f} ms")
    print("\nms/stamp = mean over configurations of each one's median time; lenstronomy = "
          "building its 3 per-band ImageModels (PSF differs per band/target) + 3 image() calls; "
          "ratio = lenstronomy / ours adaptive; stamps/s = 1000 / (ms/stamp), one core.")


if __name__ == "__main__":
    main()
