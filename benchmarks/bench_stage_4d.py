"""Throughput of stage 4d (completeness from scores) through local Spark.

    .venv/bin/python benchmarks/bench_stage_4d.py [--rows 1000000] [--master local[2]]
        [--root /dev/shm/bench4d] [--reps 1]

Writes --rows synthetic scored tasks once (4c metrics layout, split-partitioned Parquet with
the columns 4d reads: task_id, split, status, is_control and the seven 1-D variables'
columns; 50 % paired controls; train/val/test = 70/15/15 %; 1 % not ok) and a scores
Parquet (score = theta_E + noise for injections), then times ``stage_4d.run_stage_4d``
(splits val,test; fpr 0.01, 0.001; one fixed threshold; plots on) end to end: reads, join,
accounting, thresholds, binning, ROC, outputs.  Reports seconds and seconds per million rows.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402


def write_inputs(root: str, rows: int, seed: int = 1) -> tuple[str, str]:
    rng = np.random.default_rng(seed)
    metrics = os.path.join(root, "results", "phase4c", "bench", "metrics", "bench")
    scores = os.path.join(root, "scores.parquet")
    if os.path.isdir(metrics) and os.path.exists(scores):
        return os.path.join(root, "results"), scores
    shutil.rmtree(root, ignore_errors=True)
    ctl = (np.arange(rows) % 2).astype(np.int8)
    split = rng.choice(np.array(["train", "val", "test"]), rows, p=[0.7, 0.15, 0.15])
    status = np.where(rng.random(rows) < 0.01, "off_brick", "ok")
    theta = np.where(ctl == 1, np.nan, rng.uniform(0.2, 3.5, rows))
    t = pa.table({
        "task_id": pa.array([f"bench/{i:09d}" for i in range(rows)]),
        "split": pa.array(split), "status": pa.array(status), "is_control": pa.array(ctl),
        "theta_e_arcsec": theta,
        "arc_snr_region": np.where(ctl == 1, np.nan, rng.lognormal(3, 1, rows)),
        "src_mag_r": rng.uniform(19, 27, rows),
        "arc_flux_r": np.where(ctl == 1, 0.0, rng.lognormal(0, 1, rows)),
        "mu_total": np.where(ctl == 1, np.nan, rng.uniform(1, 40, rows)),
        "lens_mag_r": rng.uniform(15, 22, rows), "psf_fwhm_used_r": rng.uniform(0.8, 2, rows)})
    pq.write_to_dataset(t, metrics, partition_cols=["split"])
    score = np.where(ctl == 1, rng.uniform(0, 4, rows), theta + rng.normal(0, 0.5, rows))
    pq.write_table(pa.table({"task_id": t.column("task_id"), "score": score}), scores)
    return os.path.join(root, "results"), scores


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--master", default="local[2]")
    ap.add_argument("--root", default="/dev/shm/bench4d" if os.path.isdir("/dev/shm")
                    else "/tmp/bench4d")
    ap.add_argument("--reps", type=int, default=1)
    a = ap.parse_args()
    from injection_pipeline.analysis import completeness as cp
    from injection_pipeline.spark_session import build_spark
    from injection_pipeline.stages import stage_4d

    t0 = time.perf_counter()
    out, scores = write_inputs(a.root, a.rows)
    print(f"inputs ({a.rows} rows) ready in {time.perf_counter() - t0:.1f} s under {a.root}")
    spark = build_spark(a.master, app_name="bench-4d")
    cfg = cp.load_config()
    times = []
    for rep in range(a.reps + 1):          # the first run warms the JVM up (not reported)
        t1 = time.perf_counter()
        s = stage_4d.run_stage_4d(spark, cfg, out=out, variant="bench", experiment_id="bench",
                                  scores=scores, splits=["val", "test"], fpr=[0.01, 0.001],
                                  thresholds=[2.0])
        dt = time.perf_counter() - t1
        if rep:
            times.append(dt)
        print(f"run {rep}{' (warm-up)' if rep == 0 else ''}: {dt:.1f} s; accounting exact "
              f"{s['accounting']['exact']}, counted injections "
              f"{s['accounting']['scored_ok_injections_counted']}; phases [s] "
              f"{s['seconds_by_phase']}")
    best = min(times)
    print(f"stage 4d over {a.rows} scored tasks ({a.master}): {best:.1f} s = "
          f"{best / (a.rows / 1e6):.1f} s per million rows")
    spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
