"""Stage 4c's brick look-ahead under S3 latency, without Spark.

Stage 4c's worker (``stage_4c._partition_fn``, the code a Spark task runs) over synthetic
bricks cached on a local moto S3 server, at the shipped density (an injection and its paired
control per brick), with every storage request delayed by ``--latency-ms`` (what S3 takes to
answer a GET, ~20-50 ms, and moto does not).  Each case is a (``lookahead_bricks``,
``download_threads``) pair ([job] in conf/injection.toml).  Prints wall and CPU per task and
how busy the core is (CPU / wall), and the ratio of each case's wall to the first case's.

The delay is a sleep in the storage layer of this process (a ``Storage`` subclass), so it
costs no CPU; the moto server runs in this process, so the CPU per task includes its work
(~40 % of it): compare the cases with each other, not with bench_stage_4c's CPU figures.
bench_stage_4c.py ``--s3-latency-ms`` measures the same through Spark and an HTTP proxy (whose
own request rate on 2 CPUs then bounds the wall).

    .venv/bin/python benchmarks/bench_lookahead.py --latency-ms 30
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--latency-ms", type=float, default=30.0,
                    help="delay of every storage request [ms] (0: none)")
    ap.add_argument("--bricks", type=int, default=16, help="small synthetic bricks")
    ap.add_argument("--cases", default="0:4,0:16,2:16,4:16,8:16,0:4",
                    help="lookahead_bricks:download_threads pairs, comma-separated (the first "
                         "is the reference; repeat it last to see the drift)")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "bench_lookahead"))
    a = ap.parse_args(argv)

    import pyarrow as pa

    from injection_pipeline import file_groups, storage
    from injection_pipeline import injection as inj
    from injection_pipeline import synthetic_survey as ss
    from injection_pipeline.local_services import AWS_ENV_TO_CLEAR, patched_environ, start_moto_s3
    from injection_pipeline.stages import stage_4c

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from test_injection import control_task, make_task

    latency = a.latency_ms / 1e3
    gets = collections.Counter()

    class Delayed(storage.Storage):
        """Every GET waits ``latency`` first (no CPU), counted by the pool of its thread."""

        def _wait(self):
            gets[threading.current_thread().name.split("_")[0]] += 1
            if latency:
                time.sleep(latency)

        def get_bytes(self, uri):
            self._wait()
            return storage.Storage.get_bytes(self, uri)

        def get_range(self, uri, start, end):
            self._wait()
            return storage.Storage.get_range(self, uri, start, end)

    with start_moto_s3() as server, patched_environ(server.env, unset=AWS_ENV_TO_CLEAR):
        storage.clear_client_cache()
        desc = ss.generate_survey(os.path.join(a.work, "survey"), n_bricks=a.bricks,
                                  size="small", seed=3)
        storage.default_storage().client().create_bucket(Bucket="lookahead")
        cache = "s3://lookahead/cache"
        tasks = []
        for rec in desc.bricks:
            ss.cache_brick(desc, rec, cache, label="bench")
            with inj.CachedBrick.open(cache, rec.spec.brickname, fetch="range") as cb:
                ny, nx = cb.shape
                tasks.append(make_task(cb, nx * 0.3, ny * 0.4,
                                       task_id=f"{rec.spec.brickname}-0"))
                tasks.append(dict(control_task(cb, nx * 0.3, ny * 0.4),
                                  task_id=f"{rec.spec.brickname}-1"))
        tasks.sort(key=lambda t: (file_groups.group_tag(t["brickname"], 10), t["brickname"],
                                  t["task_id"]))
        batch = pa.RecordBatch.from_pylist(tasks)
        storage._DEFAULT = Delayed()
        print(f"bench_lookahead: {a.bricks} small bricks on moto S3, {len(tasks)} tasks (an "
              f"injection and its control per brick), {a.latency_ms:.0f} ms per storage "
              f"request, fetch = auto; {os.cpu_count()} CPUs")
        ref = None
        for case in a.cases.split(","):
            la, th = (int(v) for v in case.split(":"))
            gets.clear()
            fn = stage_4c._partition_fn(inj.InjectionConfig(), cache, None, False, 128, th,
                                        fetch="auto", lookahead_bricks=la)
            t0, c0 = time.perf_counter(), time.process_time()
            out = pa.Table.from_batches(list(fn(iter([batch]))))
            wall = (time.perf_counter() - t0) / len(tasks)
            cpu = (time.process_time() - c0) / len(tasks)
            ref = ref or wall
            status = collections.Counter(out.column("status").to_pylist())
            print(f"  lookahead_bricks {la:2d}, download_threads {th:2d}: {1e3 * wall:6.1f} ms "
                  f"wall per task ({wall / ref:.2f} x the first case), {1e3 * cpu:5.1f} CPU-ms "
                  f"per task (moto's included), core busy {100 * min(1.0, cpu / wall):.0f} %; "
                  f"GETs per task {sum(gets.values()) / len(tasks):.1f} by pool "
                  f"{dict(sorted(gets.items()))}; statuses {dict(status)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
