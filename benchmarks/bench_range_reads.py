"""Benchmark: bytes fetched per task by 4c's brick reads, whole files vs range reads.

    .venv/bin/python benchmarks/bench_range_reads.py

One full-size (3600 x 3600) synthetic brick cached on a local moto S3 server; 4c's NumPy path
(``injection.process_brick`` with ``CachedBrick.open(fetch=...)``) over 7 tasks of 64 px and of
96 px (the shipped density) and 170 tasks of 64 px, with fetch = whole, range and auto.
Prints MB fetched, kB per task, wall seconds and the ok count.  moto has no latency or
bandwidth limit: the wall times favour whole downloads here, not on AWS S3.
"""
from __future__ import annotations

import glob
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import numpy as np  # noqa: E402

from injection_pipeline import injection as inj  # noqa: E402
from injection_pipeline import storage  # noqa: E402
from injection_pipeline import synthetic_survey as ss  # noqa: E402
from injection_pipeline.local_services import (AWS_ENV_TO_CLEAR, patched_environ,  # noqa: E402
                                               start_moto_s3)
from test_injection import make_task  # noqa: E402


def main() -> int:
    root = tempfile.mkdtemp(prefix="bench-range-")
    desc = ss.generate_survey(root, n_bricks=1, size="full", seed=9)
    rec = desc.bricks[0]
    files = glob.glob(os.path.join(root, "**", f"legacysurvey-{rec.spec.brickname}-*.fits.fz"),
                      recursive=True)
    total = sum(os.path.getsize(f) for f in files)
    with start_moto_s3() as server, patched_environ(server.env, unset=AWS_ENV_TO_CLEAR):
        storage.clear_client_cache()
        server.client().create_bucket(Bucket="bench-range")
        cache = "s3://bench-range/cache"
        ss.cache_brick(desc, rec, cache, label="bench")
        with inj.CachedBrick.open(cache, rec.spec.brickname, fetch="range") as cb:
            wcs = cb.wcs

        class _Brick:
            pass
        b = _Brick()
        b.wcs, b.brickname = wcs, rec.spec.brickname
        rng = np.random.default_rng(1)
        for ntask, size in ((7, 64), (7, 96), (170, 64)):
            xs, ys = rng.uniform(200, 3400, ntask), rng.uniform(200, 3400, ntask)
            tasks = [make_task(b, x, y, task_id=f"t{i}", stamp_size_px=size)
                     for i, (x, y) in enumerate(zip(xs, ys))]
            for fetch in ("whole", "range", "auto"):
                box = {}

                def opener():
                    box["b"] = inj.CachedBrick.open(cache, rec.spec.brickname, fetch=fetch)
                    return box["b"]
                t0 = time.time()
                res = list(inj.process_brick(tasks, opener, inj.InjectionConfig()))
                dt = time.time() - t0
                got = box["b"].bytes_fetched
                got = total if got is None else got
                print(f"{ntask:4d} tasks {size} px fetch={fetch:5s}: {got / 1e6:7.2f} MB "
                      f"({got / ntask / 1e3:7.1f} kB per task; brick files {total / 1e6:.1f} MB)"
                      f", {dt:6.2f} s, ok {sum(r.row['status'] == 'ok' for r in res)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
