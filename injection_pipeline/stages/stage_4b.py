"""Stage 4b: the DR10 coadd cache, the brick blacklist and the filtered manifests (Spark glue
around :mod:`injection_pipeline.coadd_cache`).  Stage 4b2 (:mod:`.stage_4b2`) reuses it.

Inputs: ``<out>/phase4a/<variant>/bricks.txt`` (or ``--bricks``) and 4a's manifests.
Outputs::

    <cache>/<brick>/...                                   10 files + _SUCCESS (provenance)
    <out>/phase4a/<variant>/brick_blacklist.json          404 bricks, merged across runs
    <out>/phase4a/<variant>/manifests_filtered/<exp>/     manifests minus blacklisted bricks
    <out>/phase4a/<variant>/manifests_filtered_summary.json  removed tasks per experiment
    <out>/phase4b/<variant>/runs/<run_id>/results/        one row per brick (Parquet)
    <out>/phase4b/<variant>/runs/<run_id>/summary.json    counts read back from results/

Bricks are hashed into ``ceil(n / bricks_per_task)`` Spark partitions; each task runs its
bricks on ``threads_per_task`` threads (one streaming download each).  The result rows are
written once (no count before the write) and every count comes from the written Parquet.
The driver logs progress from accumulators every ``progress_every`` bricks.  See docs/cache.md.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import hashlib
import json
import logging
import math
import os
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Mapping

from injection_pipeline import coadd_cache as cc
from injection_pipeline import dr10
from injection_pipeline import storage
from injection_pipeline.provenance import code_version
from injection_pipeline.spark_session import check_spark_filesystem, spark_path

NAME = "4b"
HELP = "coadd cache: fetch + verify the 10 DR10 files of every brick into the cache, " \
       "blacklist 404 bricks, write manifests_filtered/"
LOG = logging.getLogger("phase4.4b")

DEFAULT_CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
#: built-in defaults (conf/cache.toml overrides them, flags override both)
DEFAULTS: dict[str, Any] = {
    "base_url": dr10.DEFAULT_BASE_URL, "region": dr10.REGION, "cache": "",
    "max_retries": 5, "backoff_base_s": 1.0, "backoff_max_s": 60.0,
    "connect_timeout_s": 30.0, "read_timeout_s": 120.0, "threads_per_task": 4,
    "bricks_per_task": 50, "verify": "full", "brick_size": dr10.BRICK_SIZE,
    "progress_every": 500, "rehash_existing": True, "max_new_blacklist_frac": 0.05,
    "write_heads": True,
}
BLACKLIST_NAME = "brick_blacklist.json"
#: the new-blacklist guard applies from this many new 404 bricks in one run
BLACKLIST_GUARD_MIN = 20


# =========================================================================== CLI
def add_common_arguments(p: argparse.ArgumentParser) -> None:
    """Flags shared by 4b and 4b2 (None = conf/cache.toml value)."""
    g = p.add_argument_group("inputs / outputs")
    g.add_argument("--variant", default="default",
                   help="4a output sub-directory <out>/phase4a/<variant>/ (bricks.txt, "
                        "manifests/, blacklist)")
    g.add_argument("--cache", default=None,
                   help="cache root: s3://bucket/prefix or a local path (conf; '' = "
                        "<out>/coadd_cache)")
    g.add_argument("--break-lock", action="store_true",
                   help="take the cache's lock (<cache>/_4b.lock) even if another run holds "
                        "it (a run killed on another host); a dead process of this host's "
                        "lock is broken without it")
    g.add_argument("--base-url", default=None,
                   help=f"DR10 root URL (or local mirror); conf default {dr10.DEFAULT_BASE_URL}")
    g.add_argument("--bricks", default=None,
                   help="file of brick names (one per line; local or s3://) instead of "
                        "<out>/phase4a/<variant>/bricks.txt")
    g.add_argument("--max-bricks", type=int, default=None,
                   help="process at most this many bricks (after the blacklist; for trials)")
    g.add_argument("--retry-blacklisted", action="store_true",
                   help="also try blacklisted bricks; ones found upstream leave the blacklist")
    g.add_argument("--filter-manifests", action=argparse.BooleanOptionalAction, default=True,
                   help="write manifests_filtered/ (manifests minus blacklisted bricks)")
    g.add_argument("--max-new-blacklist-frac", type=float, default=None,
                   help=f"refuse (exit 2) to blacklist more than this fraction of the processed "
                        f"bricks in one run (from {BLACKLIST_GUARD_MIN} bricks on; DR10: ~0.1%%"
                        f" are 404); guards against a wrong --base-url (conf 0.05)")
    c = p.add_argument_group("overrides of conf/cache.toml (unset = conf value)")
    c.add_argument("--max-retries", type=int, default=None, help="retries per file")
    c.add_argument("--backoff-base", type=float, default=None, dest="backoff_base_s",
                   help="first retry delay, s (doubles per retry, jittered)")
    c.add_argument("--backoff-max", type=float, default=None, dest="backoff_max_s",
                   help="cap of the retry delay, s")
    c.add_argument("--timeout", type=float, default=None,
                   help="HTTP socket timeout, s (connect and read)")
    c.add_argument("--threads-per-task", type=int, default=None,
                   help="concurrent bricks (downloads) per Spark task")
    c.add_argument("--bricks-per-task", type=int, default=None, help="bricks per Spark task")
    c.add_argument("--verify", choices=("full", "header"), default=None,
                   help="full: decode every tile; header: FITS structure/length/dtype/shape")
    c.add_argument("--brick-size", type=int, default=None,
                   help="expected plane side in px (DR10 3600; 0 = any)")
    c.add_argument("--progress-every", type=int, default=None,
                   help="progress log line every N bricks")
    c.add_argument("--rehash-existing", action=argparse.BooleanOptionalAction, default=None,
                   help="cached objects without provenance: re-verify+hash (else re-fetch)")
    c.add_argument("--write-heads", action=argparse.BooleanOptionalAction, default=None,
                   help="write each brick's heads object _HEADS (every file's headers and "
                        "tile table: one GET instead of ten for 4c's range reads)")
    c.add_argument("--tmp-dir", default=None,
                   help="download temp dir (default /dev/shm when usable, else TMPDIR)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common_arguments(p)


def load_cache_conf(config: str | os.PathLike | None) -> dict[str, Any]:
    """DEFAULTS updated with ``[cache]`` of cache.toml in the conf dir (or next to a conf file)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    p = Path(config) if config else DEFAULT_CONF_DIR
    path = (p if p.is_dir() else p.parent) / "cache.toml"
    out = dict(DEFAULTS)
    if path.is_file():
        with open(path, "rb") as f:
            raw = tomllib.load(f).get("cache", {})
        unknown = set(raw) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"{path}: unknown [cache] key(s) {sorted(unknown)}; known: "
                             f"{sorted(DEFAULTS)}")
        out.update(raw)
    return out


def settings_from_args(args) -> dict[str, Any]:
    """Effective settings: flag > conf/cache.toml > DEFAULTS."""
    conf = load_cache_conf(getattr(args, "config", None))
    flags = {"cache": args.cache, "base_url": args.base_url, "max_retries": args.max_retries,
             "backoff_base_s": args.backoff_base_s, "backoff_max_s": args.backoff_max_s,
             "threads_per_task": args.threads_per_task, "bricks_per_task": args.bricks_per_task,
             "verify": args.verify, "brick_size": args.brick_size,
             "progress_every": args.progress_every, "rehash_existing": args.rehash_existing,
             "max_new_blacklist_frac": args.max_new_blacklist_frac,
             "write_heads": getattr(args, "write_heads", None)}
    if args.timeout is not None:
        flags["connect_timeout_s"] = flags["read_timeout_s"] = args.timeout
    conf.update({k: v for k, v in flags.items() if v is not None})
    if not conf["cache"]:
        conf["cache"] = storage.join_uri(args.out, "coadd_cache")
    conf["tmp_dir"] = args.tmp_dir
    return conf


def make_cache_config(settings: Mapping[str, Any], *, stage: str, run_id: str,
                      dry_run: bool = False) -> cc.CacheConfig:
    return cc.CacheConfig(
        cache_root=str(settings["cache"]).rstrip("/"), base_url=settings["base_url"],
        region=settings["region"], max_retries=int(settings["max_retries"]),
        backoff_base_s=float(settings["backoff_base_s"]),
        backoff_max_s=float(settings["backoff_max_s"]),
        connect_timeout_s=float(settings["connect_timeout_s"]),
        read_timeout_s=float(settings["read_timeout_s"]),
        threads=int(settings["threads_per_task"]), verify=settings["verify"],
        brick_size=int(settings["brick_size"]), tmp_dir=settings.get("tmp_dir"),
        rehash_existing=bool(settings["rehash_existing"]),
        write_heads=bool(settings["write_heads"]),
        progress_every=int(settings["progress_every"]), dry_run=dry_run,
        code_version=code_version(), run_id=run_id, stage=stage)


def run(args) -> int:
    return run_from_args(args, mode="cache", stage=NAME)


#: exit code when another 4b/4b2 run holds the cache's lock
EXIT_LOCKED = 4
LOCK_NAME = "_4b.lock"


class CacheLocked(RuntimeError):
    """Another 4b / 4b2 run holds ``<cache>/_4b.lock``."""


def _lock_holder(uri: str) -> dict:
    try:
        return json.loads(storage.get_bytes(uri).decode("utf-8"))
    except storage.StorageNotFound:
        return {}
    except (ValueError, UnicodeDecodeError):
        return {"unreadable": True}


@contextlib.contextmanager
def cache_lock(cache_root: str, stage: str, *, break_lock: bool = False):
    """Hold ``<cache_root>/_4b.lock`` (a conditional create: one writer per cache) for the
    duration.  A lock left by a dead process of this host is broken (logged); any other held
    lock raises :class:`CacheLocked` naming its holder, unless ``break_lock``.  The lock is
    removed at the end if it is still this run's."""
    import socket

    uri = storage.join_uri(cache_root, LOCK_NAME)
    mine = {"stage": stage, "host": socket.gethostname(), "pid": os.getpid(),
            "token": uuid.uuid4().hex, "started": _now()}
    for _ in range(3):
        if storage.create_exclusive(uri, (json.dumps(mine) + "\n").encode()):
            break
        holder = _lock_holder(uri)
        dead = (holder.get("host") == mine["host"] and isinstance(holder.get("pid"), int)
                and not storage._pid_alive(holder["pid"]))
        if not (break_lock or dead):
            raise CacheLocked(f"{uri} is held by {holder or 'an unknown writer'}: another 4b/4b2 "
                              f"run is writing this cache. If none is running (a killed run "
                              f"on another host), rerun with --break-lock")
        LOG.warning("breaking the cache lock %s (%s): %s", uri,
                    "--break-lock" if break_lock else "its process is dead", holder)
        storage.delete(uri)
    else:
        raise CacheLocked(f"{uri}: could not take the lock (it keeps being re-created)")
    try:
        yield uri
    finally:
        if _lock_holder(uri).get("token") == mine["token"]:
            storage.delete(uri)


def run_from_args(args, *, mode: str, stage: str, dry_run: bool = False) -> int:
    from injection_pipeline.spark_session import build_spark

    settings = settings_from_args(args)
    lock = contextlib.nullcontext() if dry_run else cache_lock(
        str(settings["cache"]).rstrip("/"), stage, break_lock=bool(getattr(args, "break_lock",
                                                                           False)))
    try:
        with lock:                   # taken before Spark starts: a locked cache costs nothing
            spark = build_spark(args.master, app_name=f"phase4-{stage}", verbose=args.verbose)
            summary = run_cache_stage(
                spark, settings, out=args.out, variant=args.variant, mode=mode, stage=stage,
                bricks=args.bricks, max_bricks=args.max_bricks,
                retry_blacklisted=args.retry_blacklisted, write_filtered=args.filter_manifests,
                dry_run=dry_run, max_new_blacklist_frac=float(settings["max_new_blacklist_frac"]))
    except CacheLocked as exc:
        LOG.error("%s", exc)
        return EXIT_LOCKED
    return summary["exit_code"]


# =========================================================================== helpers
def variant_root(out: str, variant: str) -> str:
    return storage.join_uri(out, "phase4a", variant)


def read_brick_list(uri: str) -> list[str]:
    """Distinct brick names of a text file (one per line, '#' comments), in file order."""
    seen: dict[str, None] = {}
    for line in storage.get_bytes(uri).decode().splitlines():
        name = line.split("#", 1)[0].strip()
        if name:
            seen.setdefault(name, None)
    return list(seen)


def _spread(bricks: list[str]) -> list[str]:
    """Deterministic hash order: neighbouring (often all-cached) bricks spread over tasks."""
    return sorted(bricks, key=lambda b: hashlib.blake2b(b.encode(), digest_size=8).digest())


def result_schema():
    from pyspark.sql import types as T

    t = {"string": T.StringType(), "bigint": T.LongType(), "double": T.DoubleType(),
         "int": T.IntegerType()}
    return T.StructType([T.StructField(n, t[k], n != "brick") for n, k in cc.RESULT_FIELDS])


def _partition_fn(cfg: cc.CacheConfig, mode: str, accs: Mapping[str, Any]):
    names = [n for n, _ in cc.RESULT_FIELDS]

    def fn(it):
        log = logging.getLogger("phase4")
        if not log.handlers:  # executor Python worker: log to its stderr (executor logs)
            h = logging.StreamHandler(sys.stderr)
            h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s",
                                             "%H:%M:%S"))
            log.addHandler(h)
            log.setLevel(logging.INFO)
            log.propagate = False

        def on_result(row: dict) -> None:
            accs[row["status"]].add(1)
            accs["bytes"].add(int(row["bytes"]))

        for row in cc.process_bricks(list(it), cfg, mode, on_result=on_result):
            yield tuple(row[n] for n in names)
    return fn


class _Progress(threading.Thread):
    """Driver-side progress line every ``every`` finished bricks, from accumulators."""

    def __init__(self, accs: Mapping[str, Any], total: int, every: int, label: str):
        super().__init__(daemon=True, name="progress-4b")
        self.accs, self.total, self.every, self.label = accs, total, max(1, every), label
        self.stop_event = threading.Event()
        self.t0 = time.perf_counter()
        self.next_mark = self.every

    def snapshot(self) -> dict[str, int]:
        return {k: int(a.value) for k, a in self.accs.items()}

    def line(self, v: Mapping[str, int]) -> str:
        n = sum(v[s] for s in cc.STATUSES)
        dt = max(time.perf_counter() - self.t0, 1e-9)
        return (f"{self.label}: {n}/{self.total} bricks | done {v[cc.CACHED] + v[cc.REPAIRED]} "
                f"skipped {v[cc.SKIPPED] + v[cc.NOT_CACHED]} failed {v[cc.FAILED]} "
                f"blacklisted {v[cc.BLACKLISTED]}"
                + (f" incomplete {v[cc.INCOMPLETE]}" if v[cc.INCOMPLETE] else "")
                + f" | {v['bytes'] / cc.MiB / dt:.1f} MB/s, {n / dt:.2f} bricks/s")

    def run(self) -> None:
        while not self.stop_event.wait(1.0):
            v = self.snapshot()
            n = sum(v[s] for s in cc.STATUSES)
            if n >= self.next_mark:
                LOG.info("%s", self.line(v))
                self.next_mark = (n // self.every + 1) * self.every
                self.logged = n

    logged = -1


def run_cache_job(spark, bricks: list[str], cfg: cc.CacheConfig, mode: str, results_path: str,
                  bricks_per_task: int, progress_every: int) -> None:
    """mapPartitions over the bricks -> result rows written ONCE to ``results_path``."""
    sc = spark.sparkContext
    accs = {s: sc.accumulator(0) for s in cc.STATUSES}
    accs["bytes"] = sc.accumulator(0)
    n_parts = max(1, math.ceil(len(bricks) / max(1, bricks_per_task)))
    rdd = sc.parallelize(bricks, n_parts).mapPartitions(_partition_fn(cfg, mode, accs))
    df = spark.createDataFrame(rdd, result_schema())
    prog = _Progress(accs, len(bricks), progress_every, f"{cfg.stage} progress")
    sc.setJobDescription(f"{cfg.stage} {mode}: {len(bricks)} bricks in {n_parts} tasks")
    prog.start()
    try:
        # a tiny shuffle: the fetch runs in n_parts tasks, the rows land in <= 16 files
        df.repartition(min(n_parts, 16)).write.mode("overwrite").parquet(results_path)
    finally:
        prog.stop_event.set()
        prog.join(timeout=5)
        sc.setJobDescription(None)
    final = prog.snapshot()
    if sum(final[s] for s in cc.STATUSES) != prog.logged:
        LOG.info("%s", prog.line(final))


def summarise_results(spark, results_path: str, watch: set[str] = frozenset(),
                      max_listed: int = 1000) -> dict[str, Any]:
    """Counts, bytes, blacklisted and failed rows read back from the written results.

    ``ok_bricks``: the bricks of ``watch`` (the old blacklist) that are now cached.  Failed /
    incomplete rows are listed up to ``max_listed`` each (counts are always complete).
    """
    from pyspark.sql import functions as F

    df = spark.read.parquet(results_path)
    agg = df.groupBy("status").agg(F.count(F.lit(1)).alias("n"), F.sum("bytes").alias("bytes"),
                                   F.sum("files_fetched").alias("files"),
                                   F.sum("http_requests").alias("req"),
                                   F.sum("retries").alias("retries"),
                                   F.sum("seconds").alias("brick_seconds")).collect()
    counts = {s: 0 for s in cc.STATUSES}
    tot = {"bytes": 0, "files_fetched": 0, "http_requests": 0, "retries": 0,
           "brick_seconds": 0.0}
    for r in agg:
        counts[r["status"]] = int(r["n"])
        tot["bytes"] += int(r["bytes"] or 0)
        tot["files_fetched"] += int(r["files"] or 0)
        tot["http_requests"] += int(r["req"] or 0)
        tot["retries"] += int(r["retries"] or 0)
        tot["brick_seconds"] += float(r["brick_seconds"] or 0.0)
    bad = (cc.BLACKLISTED, cc.FAILED, cc.INCOMPLETE)
    cond = F.col("status").isin(*bad)
    if watch:
        cond = cond | F.col("brick").isin(sorted(watch))
    rows = sorted(df.filter(cond).select("brick", "status", "reason").collect(),
                  key=lambda r: r["brick"])
    listed = [r for r in rows if r["status"] == cc.BLACKLISTED]
    for st_ in (cc.FAILED, cc.INCOMPLETE):
        listed += [r for r in rows if r["status"] == st_][:max_listed]
    ok = [r["brick"] for r in rows
          if r["brick"] in watch and r["status"] in (cc.CACHED, cc.REPAIRED, cc.SKIPPED)]
    return {"counts": counts, "bricks_total": sum(counts.values()), **tot,
            "blacklisted": [(r["brick"], r["reason"]) for r in listed
                            if r["status"] == cc.BLACKLISTED],
            "failed": [(r["brick"], r["reason"]) for r in listed if r["status"] == cc.FAILED],
            "incomplete": [(r["brick"], r["reason"]) for r in listed
                           if r["status"] == cc.INCOMPLETE],
            "ok_bricks": ok}


def list_experiments(manifests_root: str) -> list[str]:
    """Experiment ids = sub-directories of manifests/ holding Parquet files."""
    pre = manifests_root.rstrip("/") + "/"
    exps = set()
    for o in storage.list_objects(pre, recursive=True):
        rel = o.uri[len(pre):] if o.uri.startswith(pre) else None
        if rel and "/" in rel and rel.endswith(".parquet"):
            exps.add(rel.split("/", 1)[0])
    return sorted(exps)


def filter_manifests(spark, root: str, blacklist: set[str]) -> dict[str, Any]:
    """manifests/<exp>/ minus blacklisted bricks -> manifests_filtered/<exp>/.

    Per experiment: tasks in, tasks out (both counted from Parquet: the input and the WRITTEN
    output), removed tasks and removed tasks per blacklisted brick.  File layout and row order
    are kept (a narrow filter: whole bricks per file, sorted).
    """
    from pyspark.sql import functions as F

    man_root = storage.join_uri(root, "manifests")
    exps = list_experiments(man_root)
    out: dict[str, Any] = {}
    bl = sorted(blacklist)
    for exp in exps:
        src = spark_path(storage.join_uri(man_root, exp))
        dst = spark_path(storage.join_uri(root, "manifests_filtered", exp))
        df = spark.read.parquet(src)
        if len(bl) <= 20000:
            kept = df.filter(~F.col("brickname").isin(bl)) if bl else df
        else:
            bdf = spark.createDataFrame([(b,) for b in bl], "brickname string")
            kept = df.join(F.broadcast(bdf), "brickname", "left_anti").select(*df.columns)
        kept.write.mode("overwrite").option("compression", "zstd").parquet(dst)
        n_in = spark.read.parquet(src).count()
        n_out = spark.read.parquet(dst).count()
        by_brick = ({r["brickname"]: int(r["count"]) for r in
                     df.filter(F.col("brickname").isin(bl)).groupBy("brickname").count()
                     .collect()} if bl else {})
        removed = n_in - n_out
        if removed != sum(by_brick.values()):
            raise RuntimeError(f"{dst}: {n_in} - {n_out} = {removed} removed tasks, but "
                               f"{sum(by_brick.values())} tasks on blacklisted bricks")
        out[exp] = {"tasks_in": n_in, "tasks_out": n_out, "tasks_removed": removed,
                    "bricks_removed": len(by_brick), "removed_by_brick": dict(sorted(
                        by_brick.items())), "path": dst}
        LOG.info("manifests_filtered/%s: %d tasks, %d removed on %d blacklisted brick(s)",
                 exp, n_out, removed, len(by_brick))
    return out


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# =========================================================================== the stage
def run_cache_stage(spark, settings: Mapping[str, Any], *, out: str, variant: str = "default",
                    mode: str = "cache", stage: str = "4b", bricks: str | None = None,
                    max_bricks: int | None = None, retry_blacklisted: bool = False,
                    write_filtered: bool = True, dry_run: bool = False,
                    max_new_blacklist_frac: float = 0.05) -> dict[str, Any]:
    """Run 4b (mode "cache") or 4b2 (mode "repair"); returns the summary (with exit_code)."""
    t0 = time.perf_counter()
    root = variant_root(out, variant)
    run_id = f"{stage}-{_dt.datetime.now(_dt.timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"
    run_root = storage.join_uri(out, "phase4b", variant, "runs", run_id)
    check_spark_filesystem(spark, run_root)
    cfg = make_cache_config(settings, stage=stage, run_id=run_id, dry_run=dry_run)
    bricks_uri = bricks or storage.join_uri(root, "bricks.txt")
    names = read_brick_list(bricks_uri)
    bl_uri = storage.join_uri(root, BLACKLIST_NAME)
    bl_doc = cc.read_blacklist(bl_uri)
    bl_old = cc.blacklisted_bricks(bl_doc)
    todo = [b for b in names if retry_blacklisted or b not in bl_old]
    skipped_bl = len(names) - len(todo)
    todo = _spread(todo)
    if max_bricks is not None:
        todo = todo[:max_bricks]
    LOG.info("==== stage %s (%s%s): %d bricks from %s (%d skipped: blacklisted), cache %s, "
             "upstream %s, run %s ====", stage, mode, " dry-run" if dry_run else "", len(todo),
             bricks_uri, skipped_bl, cfg.cache_root, cfg.base_url, run_id)
    results_path = spark_path(storage.join_uri(run_root, "results"))
    if todo:
        run_cache_job(spark, todo, cfg, mode, results_path, int(settings["bricks_per_task"]),
                      int(settings["progress_every"]))
    else:
        spark.createDataFrame([], result_schema()).write.mode("overwrite").parquet(results_path)
    res = summarise_results(spark, results_path, watch=bl_old if retry_blacklisted else set())
    counts = res["counts"]
    wall = time.perf_counter() - t0

    # blacklist: merged (first time and reason kept), bricks found again removed
    new_bl = [{"brick": b, "reason": r, "time": _now(), "stage": stage, "run_id": run_id}
              for b, r in res["blacklisted"]]
    back = sorted(bl_old & set(res["ok_bricks"]))
    bl_changed = bool(new_bl or back)
    frac = len(new_bl) / max(1, res["bricks_total"])
    if len(new_bl) >= BLACKLIST_GUARD_MIN and frac > max_new_blacklist_frac:
        # e.g. a wrong --base-url: every brick 404 would empty the manifests
        LOG.error("%d of %d bricks (%.1f%%) are 404 upstream, above --max-new-blacklist-frac "
                  "%.3f: NOT adding them to the blacklist, manifests not filtered. Check "
                  "--base-url (%s); first: %s", len(new_bl), res["bricks_total"], 100 * frac,
                  max_new_blacklist_frac, cfg.base_url, res["blacklisted"][0])
        new_bl, bl_changed, guard_tripped = [], bool(back), True
    else:
        guard_tripped = False
    if bl_changed and not dry_run:
        bl_doc = cc.merge_blacklist(bl_doc, new_bl, remove=back)
        storage.put_bytes(bl_uri, (json.dumps(bl_doc, indent=1) + "\n").encode())
    for b, r in res["blacklisted"]:
        LOG.warning("blacklisted %s: %s", b, r)
    if back:
        LOG.warning("removed from the blacklist (found upstream): %s", ", ".join(back))
    blacklist_now = cc.blacklisted_bricks(bl_doc)

    filtered = None
    if write_filtered and not dry_run and not guard_tripped:
        if list_experiments(storage.join_uri(root, "manifests")):
            filtered = filter_manifests(spark, root, blacklist_now)
            storage.put_bytes(storage.join_uri(root, "manifests_filtered_summary.json"),
                              (json.dumps({"written_at": _now(), "run_id": run_id,
                                           "blacklist": bl_uri,
                                           "blacklisted_bricks": len(blacklist_now),
                                           "experiments": filtered}, indent=1)
                               + "\n").encode())
        else:
            LOG.warning("no manifests under %s: manifests_filtered/ not written",
                        storage.join_uri(root, "manifests"))

    failed = counts[cc.FAILED] + (counts[cc.INCOMPLETE] if dry_run else 0)
    exit_code = 2 if guard_tripped else (1 if failed else 0)
    summary = {
        "stage": stage, "mode": mode, "dry_run": dry_run, "run_id": run_id,
        "written_at": _now(), "code_version": cfg.code_version, "cache": cfg.cache_root,
        "base_url": cfg.base_url, "bricks_file": bricks_uri, "bricks_listed": len(names),
        "bricks_skipped_blacklisted": skipped_bl, "bricks_processed": res["bricks_total"],
        "counts": counts, "bytes": res["bytes"], "files_fetched": res["files_fetched"],
        "http_requests": res["http_requests"], "retries": res["retries"],
        "wall_seconds": round(wall, 3),
        "mb_per_s": round(res["bytes"] / cc.MiB / wall, 3) if wall > 0 else None,
        "failed": [{"brick": b, "reason": r} for b, r in res["failed"]],
        "incomplete": [{"brick": b, "reason": r} for b, r in res["incomplete"]],
        "blacklisted_this_run": [{"brick": b, "reason": r} for b, r in res["blacklisted"]],
        "unblacklisted": back, "blacklist_guard_tripped": guard_tripped, "blacklist": bl_uri,
        "blacklist_size": len(blacklist_now),
        "manifests_filtered": filtered, "results": results_path,
        "settings": {k: v for k, v in settings.items()}, "exit_code": exit_code,
    }
    storage.put_bytes(storage.join_uri(run_root, "summary.json"),
                      (json.dumps(summary, indent=1, default=str) + "\n").encode())
    LOG.info("==== stage %s done in %.1f s: %s | %.1f MB in %d files (%.1f MB/s), %d HTTP "
             "requests, %d retries | summary %s ====", stage, wall,
             ", ".join(f"{k} {v}" for k, v in counts.items() if v) or "nothing to do",
             res["bytes"] / cc.MiB, res["files_fetched"], summary["mb_per_s"] or 0.0,
             res["http_requests"], res["retries"], storage.join_uri(run_root, "summary.json"))
    for b, r in res["failed"][:20]:
        LOG.error("failed %s: %s", b, r)
    if res["failed"]:
        LOG.error("%d brick(s) failed (not blacklisted): rerun the stage to retry them "
                  "(exit code 1)", len(res["failed"]))
    if dry_run and res["incomplete"]:
        LOG.warning("%d brick(s) incomplete: run 4b2 --repair", len(res["incomplete"]))
    return summary

