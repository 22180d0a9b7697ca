#!/usr/bin/env python
"""Benchmark of stage 4c on a synthetic survey (local cache), plus the QA outputs.

    .venv/bin/python benchmarks/bench_stage_4c.py [--size full|small] [--n-bricks 1]
        [--experiment train_stamp64_bandsgrz_gridgrid_small] [--tasks 2000] [--master local[2]]
        [--work /tmp/bench4c] [--qa]

Steps: synthetic survey -> manifest (stage 4a's pure functions; train tier: random sampling,
50 % paired controls, absolute brightness) -> local cache (<cache>/<brick>/ + _SUCCESS) ->
(1) one-core pure-NumPy loop (injection.process_brick over CachedBrick) and (2) the Spark
stage on ``--master``; prints per-task times and rates.  ``--qa`` then writes the QA gallery,
histograms and qa_summary.json under <work>/qa.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from injection_pipeline import dr10  # noqa: E402
from injection_pipeline import injection as inj  # noqa: E402
from injection_pipeline import manifests as mf  # noqa: E402
from injection_pipeline import synthetic_survey as ss  # noqa: E402


def build_manifest(desc, cfg, exp):
    import pandas as pd

    look = mf.brick_lookup(dr10.read_survey_bricks(desc.survey_bricks), cfg.split)
    cls = mf.classify_targets(pd.read_parquet(desc.catalogue), look)
    valid = cls[cls["reason"].isna()].sort_values(["target_key", "brickname", "objid"])
    valid = valid.reset_index(drop=True)
    valid["rank_global"] = np.arange(len(valid))
    valid["rank_split"] = valid.groupby("split").cumcount()
    return mf.expand_targets({k: valid[k].to_numpy() for k in mf.TARGET_COLUMNS}, exp, cfg,
                             len(valid), valid.groupby("split").size().to_dict())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="full")
    ap.add_argument("--n-bricks", type=int, default=1)
    ap.add_argument("--n-galaxies", type=int, default=None)
    ap.add_argument("--experiment", default="train_stamp64_bandsgrz_gridgrid_small")
    ap.add_argument("--tasks", type=int, default=2000, help="rows per split (train tier)")
    ap.add_argument("--master", default="local[2]")
    ap.add_argument("--work", default="/tmp/bench4c")
    ap.add_argument("--psf-model", default="gaussian")
    ap.add_argument("--qa", action="store_true")
    a = ap.parse_args(argv)

    import pyarrow.parquet as pq

    shutil.rmtree(a.work, ignore_errors=True)
    os.makedirs(a.work)
    t = time.perf_counter()
    desc = ss.generate_survey(os.path.join(a.work, "survey"), a.n_bricks, a.size, seed=5,
                              n_galaxies=a.n_galaxies)
    print(f"survey: {a.n_bricks} x {desc.size}^2 bricks in {time.perf_counter() - t:.1f} s")
    cfg = mf.load_config(experiments=[a.experiment],
                         overrides={"n_total_train_per_split": a.tasks, "guard_band": False})
    exp = cfg.experiment(a.experiment)
    table = build_manifest(desc, cfg, exp)
    out = os.path.join(a.work, "results")
    mdir = os.path.join(out, "phase4a", "bench", "manifests_filtered", a.experiment)
    os.makedirs(mdir)
    pq.write_table(table, os.path.join(mdir, "part-0.parquet"))
    cache = os.path.join(a.work, "cache")
    for rec in desc.bricks:
        d = os.path.join(cache, rec.spec.brickname)
        os.makedirs(d)
        for name in rec.files:
            shutil.copy(os.path.join(desc.root, rec.directory, name), d)
        with open(os.path.join(d, dr10.SUCCESS_MARKER), "w") as f:
            json.dump({"files": rec.files}, f)
    n = table.num_rows
    print(f"manifest: {n} tasks ({sum(table.column('is_control').to_pylist())} controls) on "
          f"{len(desc.bricks)} brick(s)")

    # (1) pure NumPy, one core, brick opened once
    icfg = inj.InjectionConfig(psf_model=a.psf_model, code_version=inj.code_version())
    rows = table.to_pylist()
    by_brick: dict = {}
    for r in rows:
        by_brick.setdefault(r["brickname"], []).append(r)
    t = time.perf_counter()
    statuses: dict = {}
    per_kind = {"injection": [], "control": []}
    for brick, tasks in by_brick.items():
        t_open = time.perf_counter()
        cb = inj.CachedBrick.open(cache, brick)
        t_open = time.perf_counter() - t_open
        pix = inj.task_pixels(cb.wcs, tasks)
        for task, p in zip(tasks, pix):
            t1 = time.perf_counter()
            res = inj.inject_task(task, cb, icfg, pixel=p)
            per_kind["control" if task["is_control"] else "injection"].append(
                time.perf_counter() - t1)
            statuses[res.status] = statuses.get(res.status, 0) + 1
        cb.close()
    dt = time.perf_counter() - t
    print(f"pure NumPy (1 core): {n} tasks in {dt:.2f} s = {n / dt:.0f} tasks/s; brick open "
          f"{t_open * 1e3:.0f} ms; statuses {statuses}")
    for k, v in per_kind.items():
        if v:
            print(f"  {k}: median {np.median(v) * 1e3:.2f} ms, p95 "
                  f"{np.percentile(v, 95) * 1e3:.2f} ms per task")

    # (2) Spark stage
    from injection_pipeline.spark_session import build_spark
    from injection_pipeline.stages import stage_4c

    spark = build_spark(a.master, app_name="bench-4c")
    t = time.perf_counter()
    s = stage_4c.run_stage_4c(spark, icfg, experiment_id=a.experiment, out=out, variant="bench",
                              cache=cache, error_threshold=1.0)
    dt = time.perf_counter() - t
    print(f"Spark {a.master}: {n} tasks, stage (inject + write stamps + metrics + summary) "
          f"{dt:.1f} s = {n / dt:.0f} tasks/s; inject+write stamps alone "
          f"{s['seconds_inject_and_write']:.1f} s")
    stamps = s["stamps_path"]
    size = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(stamps)
               for f in fs if f.endswith(".parquet"))
    print(f"stamps parquet: {size / 1e6:.1f} MB = {size / max(1, s['by_status'].get('ok', 1)) / 1e3:.1f}"
          f" kB per ok stamp (zstd)")
    if a.qa:
        from injection_pipeline import qa

        q = qa.run_qa(stamps, os.path.join(a.work, "qa"))
        print(json.dumps({k: q[k] for k in ("pngs", "core_leakage")}, indent=1))
    spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
