"""Stage 4a runtime per million tasks on this machine (local Spark).

    .venv/bin/python benchmarks/bench_stage_4a.py [--tasks 1000000] [--master local[2]]

Builds a synthetic sky patch (survey-bricks table + parent catalogue with the DR10 lens columns
of the conditioned model: photo-z, flux_z, Tractor shapes, maskbits; no pixels needed by 4a),
then runs stage 4a for the shipped train experiment (lens_model = conditioned) with ~--tasks
candidate rows (paired controls, 50%), and reports: the pure-NumPy fan-out cost per million
candidate rows (one core, no Spark), the target preparation time, the acceptance, and the
manifest + rejections write and summary time per million candidate rows.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from injection_pipeline import manifests as mf  # noqa: E402
from injection_pipeline import synthetic_survey as ss  # noqa: E402


def lens_columns(rng, n: int) -> dict:
    """LRG-like DR10 lens columns (photo-z, r-z, Tractor shapes, clean centre maskbits)."""
    z = rng.uniform(0.3, 0.7, n)
    e, th = rng.uniform(0, 0.3, n), rng.uniform(0, np.pi, n)
    return {"z_phot_median": z.astype(np.float32), "maskbits": np.zeros(n, np.int32),
            "rz": (0.6 + z + rng.normal(0, 0.05, n)), "shape_e1": (e * np.cos(2 * th)).astype(np.float32),
            "shape_e2": (e * np.sin(2 * th)).astype(np.float32),
            "mw_transmission_r": np.full(n, 0.95, np.float32),
            "mw_transmission_z": np.full(n, 0.97, np.float32)}


def make_patch(root: str, n: int, per_brick: int, seed: int = 0) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    specs = [ss.grid_brick(400 + i, 500 + j) for i in range(n) for j in range(n)]
    ss.write_survey_bricks(os.path.join(root, "survey-bricks.fits.gz"), specs)
    rng = np.random.default_rng(seed)
    nb = len(specs)
    ra1, ra2 = np.array([s.ra1 for s in specs]), np.array([s.ra2 for s in specs])
    dec1, dec2 = np.array([s.dec1 for s in specs]), np.array([s.dec2 for s in specs])
    b = np.repeat(np.arange(nb), per_brick)
    u, v = rng.uniform(0.01, 0.99, (2, b.size))
    t = pa.table({"brickname": np.array([s.brickname for s in specs])[b],
                  "objid": np.tile(np.arange(per_brick, dtype=np.int32), nb),
                  "ra": (ra1[b] + ((ra2 - ra1) % 360)[b] * u) % 360,
                  "dec": dec1[b] + (dec2 - dec1)[b] * v,
                  "flux_r": (10 ** ((22.5 - rng.uniform(18.5, 20.5, b.size)) / 2.5))
                  .astype(np.float32), **lens_columns(rng, b.size)})
    rz = t.column("rz").to_numpy()
    t = t.drop_columns(["rz"]).append_column(
        "flux_z", pa.array((t.column("flux_r").to_numpy() * 10 ** (0.4 * rz)).astype(np.float32)))
    pq.write_table(t, os.path.join(root, "cat.parquet"))
    return b.size


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=1_000_000, help="candidate rows to plan (before the acceptance)")
    ap.add_argument("--master", default="local[2]")
    ap.add_argument("--bricks-side", type=int, default=40, help="patch of N x N bricks")
    ap.add_argument("--per-brick", type=int, default=20, help="targets per brick")
    args = ap.parse_args()

    from injection_pipeline.spark_session import build_spark
    from injection_pipeline.stages import stage_4a

    cfg = mf.load_config(experiments=["train_stamp64_bandsgrz_gridgrid_small"],
                         overrides={"n_total_train_per_split": int(np.ceil(args.tasks / 3)),
                                    "healpix_nside": 32})
    exp = cfg.experiments[0]
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as d:
        n_targets = make_patch(d, args.bricks_side, args.per_brick)

        # pure fan-out, one core
        rng = np.random.default_rng(1)
        nt = 20_000
        t = {"brickname": np.array([f"{1000 + i // 20:04d}p100" for i in range(nt)]),
             "objid": np.arange(nt) % 20, "ra": rng.uniform(0, 1, nt), "dec": rng.uniform(0, 1, nt),
             "lens_mag_r": rng.uniform(19, 20, nt), "healpix_cell": np.zeros(nt, np.int64),
             "split": np.array(["train"] * nt), "rank_global": np.arange(nt),
             "rank_split": np.arange(nt)}
        lc = lens_columns(rng, nt)
        t.update({k: np.asarray(v, np.float64) for k, v in lc.items() if k != "rz"})
        t["flux_r"] = 10 ** ((22.5 - t["lens_mag_r"]) / 2.5)
        t["flux_z"] = t["flux_r"] * 10 ** (0.4 * lc["rz"])
        e1 = dataclasses.replace(exp, n_total_per_split=200_000)
        # warm-up outside the timing: imports, the cosmology's distance table
        mf.expand_targets({k: v[:50] for k, v in t.items()}, dataclasses.replace(
            exp, n_total_per_split=500), cfg, 50, {"train": 50}, include_rejected=True)
        t0 = time.perf_counter()
        tbl = mf.expand_targets(t, e1, cfg, nt, {"train": nt}, include_rejected=True)
        pure = (time.perf_counter() - t0) / tbl.num_rows * 1e6

        spark = build_spark(args.master, app_name="bench-4a")
        spark.range(10).count()  # JVM warm-up outside the timing
        t0 = time.perf_counter()
        root = os.path.join(d, "out", "phase4a", "bench")
        info = stage_4a.prepare_targets(spark, cfg, os.path.join(d, "cat.parquet"),
                                        os.path.join(d, "survey-bricks.fits.gz"), root)
        t_prep = time.perf_counter() - t0
        info.update(catalogue="bench", survey_bricks="bench")
        t0 = time.perf_counter()
        path = stage_4a.write_manifest(spark, cfg, exp, root, info)
        t_write = time.perf_counter() - t0
        t0 = time.perf_counter()
        summary, _ = stage_4a.summarise_manifest(spark, cfg, exp, path, info)
        t_sum = time.perf_counter() - t0
        rows = summary["rows_total"]
        acc = summary["acceptance"]
        spark.stop()
    cand_rows = summary["rows_expected"]      # candidate rows (units x (1 + pair probability))
    per_m = (t_write + t_sum) / cand_rows * 1e6
    print(f"machine: {os.cpu_count()} cores; master {args.master}; {n_targets:,} targets on "
          f"{args.bricks_side ** 2:,} bricks")
    print(f"pure NumPy fan-out (1 core, no Spark; conditioned model): {pure:.2f} s per million "
          f"candidate rows")
    print(f"acceptance: {acc['accepted']:,} of {acc['candidates']:,} candidate units "
          f"({100 * acc['acceptance_rate']:.1f} %); rejected by reason {acc['rejected_by_reason']}")
    print(f"target preparation (classify, dedup, split, rank; 2 writes): {t_prep:.1f} s")
    print(f"manifest: {rows:,} rows written in {t_write:.1f} s + summary from Parquet "
          f"{t_sum:.1f} s")
    print(f"STAGE 4a: {per_m:.1f} s per million candidate rows (write + summary, {args.master}); "
          f"{(t_write + t_sum) / max(rows, 1) * 1e6:.1f} s per million written tasks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
