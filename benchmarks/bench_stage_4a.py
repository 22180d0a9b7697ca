"""Stage 4a runtime per million tasks on this machine (local Spark).

    .venv/bin/python benchmarks/bench_stage_4a.py [--tasks 1000000] [--master local[2]]

Builds a synthetic sky patch (survey-bricks table + parent catalogue; no pixels needed by 4a),
then runs stage 4a for one train experiment sized to ~--tasks rows (paired controls, 50%),
and reports: the pure-NumPy fan-out cost per million rows (one core, no Spark), the target
preparation time, and the manifest write + summary time per million rows.
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
                  .astype(np.float32)})
    pq.write_table(t, os.path.join(root, "cat.parquet"))
    return b.size


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=1_000_000, help="manifest rows to plan")
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
        e1 = dataclasses.replace(exp, n_total_per_split=200_000)
        t0 = time.perf_counter()
        tbl = mf.expand_targets(t, e1, cfg, nt, {"train": nt})
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
        spark.stop()
    per_m = (t_write + t_sum) / rows * 1e6
    print(f"machine: {os.cpu_count()} cores; master {args.master}; {n_targets:,} targets on "
          f"{args.bricks_side ** 2:,} bricks")
    print(f"pure NumPy fan-out (1 core, no Spark): {pure:.2f} s per million rows")
    print(f"target preparation (classify, dedup, split, rank; 2 writes): {t_prep:.1f} s")
    print(f"manifest: {rows:,} rows written in {t_write:.1f} s + summary from Parquet "
          f"{t_sum:.1f} s")
    print(f"STAGE 4a: {per_m:.1f} s per million tasks (write + summary, {args.master})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
