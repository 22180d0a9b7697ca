"""Throughput of the coadd cache (stage 4b) against the local survey HTTP server.

    .venv/bin/python benchmarks/bench_stage_4b.py [--root /dev/shm/bench4b_dr10] [--n-bricks 4]
        [--reps 2] [--cache-kind local|moto] [--master local[2]] [--skip-spark]

Full-size (3600 x 3600, ~79 MB, 10 files) synthetic bricks are generated once under --root
(tmpfs by default; reused when present) and served by
``local_services.start_survey_http_server``.  Measured:

A. one Python process, ``coadd_cache.process_bricks`` (the code a Spark task runs), for
   verify = header / full and 1 / 2 threads: wall MB/s, bricks/min, and CPU seconds per brick
   (process CPU time: download + sha256 + verify + upload, server thread included), from which
   MB/s and bricks/min per busy core follow;
B. the stage on Spark (``stage_4b.run_cache_stage``, --master local[2]): wall MB/s and
   bricks/min, and the same divided by the number of executor cores.

The HTTP server, the client and the cache share this machine's cores, so the numbers are a
lower bound of what an executor core does against a remote server (where the CPU cost is the
client's only).  Each measurement writes into a fresh cache root.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from injection_pipeline import coadd_cache as cc  # noqa: E402
from injection_pipeline import dr10, storage  # noqa: E402
from injection_pipeline.local_services import start_survey_http_server  # noqa: E402

MiB = 1024 * 1024


def existing_bricks(root: str) -> list[str]:
    """Complete full-size bricks already under ``root`` (all 10 files present)."""
    base = os.path.join(root, "south", "coadd")
    out = []
    if os.path.isdir(base):
        for aaa in sorted(os.listdir(base)):
            for b in sorted(os.listdir(os.path.join(base, aaa))):
                d = os.path.join(base, aaa, b)
                if all(os.path.exists(os.path.join(d, n)) for n in dr10.brick_filenames(b)):
                    info = dr10.inspect_plane(os.path.join(d, dr10.brick_filenames(b)[0]))
                    if info.shape == (dr10.BRICK_SIZE, dr10.BRICK_SIZE):
                        out.append(b)
    return out


def ensure_survey(root: str, n: int) -> list[str]:
    from injection_pipeline.synthetic_survey import generate_survey

    have = existing_bricks(root)
    if len(have) >= n:
        return have[:n]
    t0 = time.perf_counter()
    desc = generate_survey(root, n_bricks=n, size="full", seed=42)
    print(f"generated {n} full-size bricks in {time.perf_counter() - t0:.1f} s under {root}")
    return [r.spec.brickname for r in desc.bricks]


def brick_bytes(root: str, bricks: list[str]) -> int:
    return sum(os.path.getsize(os.path.join(root, dr10.brick_dir(b), n))
               for b in bricks for n in dr10.brick_filenames(b))


def new_cache(kind: str, moto=None) -> str:
    if kind == "moto":
        name = f"bench-{uuid.uuid4().hex[:8]}"
        moto.create_bucket(name)
        return f"s3://{name}/cache"
    return tempfile.mkdtemp(prefix="bench4b-cache-", dir="/dev/shm" if os.path.isdir(
        "/dev/shm") else None)


def drop_cache(uri: str) -> None:
    if storage.is_s3_uri(uri):
        storage.delete_prefix(uri.rstrip("/") + "/")
    else:
        shutil.rmtree(uri, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default="/dev/shm/bench4b_dr10")
    ap.add_argument("--n-bricks", type=int, default=4)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--cache-kind", choices=("local", "moto"), default="local")
    ap.add_argument("--master", default="local[2]")
    ap.add_argument("--skip-spark", action="store_true")
    args = ap.parse_args(argv)

    bricks = ensure_survey(args.root, args.n_bricks)
    total = brick_bytes(args.root, bricks)
    print(f"{len(bricks)} bricks, {total / MiB:.1f} MB ({total / MiB / len(bricks):.1f} MB per "
          f"brick), cache: {args.cache_kind}, cores here: {os.cpu_count()}")
    moto = None
    if args.cache_kind == "moto":
        from injection_pipeline.local_services import start_moto_s3

        moto = start_moto_s3()
        os.environ.update(moto.env)
        storage.clear_client_cache()
    srv = start_survey_http_server(args.root)
    rows = []
    try:
        # ---------------------------------------------------------------- A: one process
        for verify in ("header", "full"):
            for threads in (1, 2):
                walls, cpus = [], []
                for _ in range(args.reps):
                    cache = new_cache(args.cache_kind, moto)
                    cfg = cc.CacheConfig(cache_root=cache, base_url=srv.base_url, verify=verify,
                                         threads=threads, progress_every=0, max_retries=0)
                    c0, t0 = time.process_time(), time.perf_counter()
                    res = list(cc.process_bricks(bricks, cfg))
                    walls.append(time.perf_counter() - t0)
                    cpus.append(time.process_time() - c0)
                    assert all(r["status"] == cc.CACHED for r in res), res
                    drop_cache(cache)
                w, c = min(walls), min(cpus)
                rows.append((f"process, verify={verify}, threads={threads}", w, c, 1))
        # ---------------------------------------------------------------- B: Spark stage
        if not args.skip_spark:
            from injection_pipeline.spark_session import build_spark
            from injection_pipeline.stages import stage_4b

            env = moto.env if moto else None
            spark = build_spark(args.master, app_name="bench-4b", executor_env=env)
            cores = spark.sparkContext.defaultParallelism
            work = tempfile.mkdtemp(prefix="bench4b-out-")
            vroot = os.path.join(work, "phase4a", "v")
            os.makedirs(vroot)
            open(os.path.join(vroot, "bricks.txt"), "w").write("\n".join(bricks) + "\n")
            for threads in (1, 2):
                walls = []
                for _ in range(args.reps):
                    cache = new_cache(args.cache_kind, moto)
                    s = dict(stage_4b.DEFAULTS, cache=cache, base_url=srv.base_url,
                             threads_per_task=threads, bricks_per_task=max(
                                 1, len(bricks) // cores), progress_every=1000)
                    t0 = time.perf_counter()
                    summ = stage_4b.run_cache_stage(spark, s, out=work, variant="v",
                                                    write_filtered=False)
                    walls.append(time.perf_counter() - t0)
                    assert summ["counts"][cc.CACHED] == len(bricks), summ["counts"]
                    drop_cache(cache)
                rows.append((f"spark {args.master} stage 4b, verify=full, threads/task="
                             f"{threads}", min(walls), None, cores))
            spark.stop()
            shutil.rmtree(work, ignore_errors=True)
    finally:
        srv.stop()
        if moto:
            moto.stop()

    n = len(bricks)
    print(f"\n{'measurement':58s} {'wall s':>7s} {'MB/s':>7s} {'bricks/min':>10s} "
          f"{'per core: MB/s':>14s} {'bricks/min':>10s}")
    for label, wall, cpu, cores in rows:
        mbs, bpm = total / MiB / wall, n / wall * 60
        if cpu is not None:  # per busy core = per CPU-second
            pc_mbs, pc_bpm = total / MiB / cpu, n / cpu * 60
        else:
            pc_mbs, pc_bpm = mbs / cores, bpm / cores
        print(f"{label:58s} {wall:7.2f} {mbs:7.1f} {bpm:10.1f} {pc_mbs:14.1f} {pc_bpm:10.1f}")
    print("\nper core: process rows = per CPU-second of the process (client + server thread); "
          "spark rows = wall throughput / executor cores (server, driver and moto share them)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
