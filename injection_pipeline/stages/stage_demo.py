"""Stage ``demo``: the main job on a laptop, the whole chain in one command.

    python spark_phase4_pipeline.py demo [--out results] [--master local[*]] [--verbose] ...
    bash scripts/run_main.sh [flags]            # sets up .venv first, then runs this

It orchestrates, it does not duplicate stage logic: every stage runs through the driver's own
command line (``spark_phase4_pipeline.main([stage, flags...])``), exactly as a user would run it
by hand.  Steps (defaults from ``conf/demo.toml``, each overridable by a flag):

1. write a synthetic DR10 South survey (a handful of small bricks scattered over the sky, one
   of them absent upstream) under ``<out>/dr10_synthetic/``;
2. start a local HTTP server over it (the NERSC stand-in) and a moto S3 server (bucket
   ``dr10-demo``);
3. build ONE SparkSession (``--master``, default ``local[*]``) with the moto endpoint and dummy
   credentials in ``spark.executorEnv.*`` BEFORE the first stage; every stage's ``build_spark``
   then gets this session (``getOrCreate``): checked after each stage;
4. ``4a`` manifests -> ``4b`` coadd cache into ``s3://<bucket>/coadd`` (404 brick blacklisted,
   ``manifests_filtered/`` written) -> ``4c`` injection (stamps + metrics) on the filtered
   manifests;
5. the cache listing (the cache lives in moto, which stops at the end), the summary
   (:mod:`injection_pipeline.summary`, from the written Parquet: JSON + table, printed), the QA
   gallery and histograms (:mod:`injection_pipeline.qa`) and, for the train experiment, the
   realism audit (:mod:`injection_pipeline.analysis.realism`, ``[qa] realism`` = auto: table
   printed, ``qa/<experiment>/realism_audit.json|png``; failed checks never fail the demo);
6. stops what it started (Spark session, both servers), also on failure, checks that their
   ports are closed, and prints where everything is.  ``<out>/demo_run.json`` records paths,
   endpoints, timings, checks and the exit code.

Exit code: 0; 1 when 4b left failed bricks (the chain stops there); 2 when 4c's error
fraction is above its threshold (summary and QA are still written); 3 when a check of the
demo itself fails (blacklist, accounting, session reuse).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import importlib
import importlib.util
import json
import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover
    import tomli as tomllib  # type: ignore[no-redef]

NAME = "demo"
HELP = ("the whole chain on a laptop: synthetic DR10 survey + local HTTP and moto S3 servers "
        "-> 4a -> 4b -> 4c -> summary + QA (defaults: conf/demo.toml)")
LOG = logging.getLogger("phase4.demo")
DEFAULT_CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
EXIT_CHECK_FAILED = 3

#: built-in defaults; conf/demo.toml overrides them, flags override both
DEFAULTS: dict[str, dict[str, Any]] = {
    "survey": {"survey_dir": "dr10_synthetic", "n_bricks": 8, "brick_size_px": 400,
               "layout": "spread", "seed": 42, "n_galaxies": 0, "faults": ["absent"]},
    "manifests": {"variant": "demo",
                  "experiments": ["debug_stamp64_bandsgrz_gridgrid_small",
                                  "train_stamp64_bandsgrz_gridgrid_small"],
                  "n_per_config_debug": 2, "replicates": 1, "n_total_train_per_split": 120,
                  "seed": 0},
    "services": {"bucket": "dr10-demo", "cache_prefix": "coadd"},
    "cache": {"max_retries": 2, "backoff_base_s": 0.2, "progress_every": 2,
              "threads_per_task": 2, "bricks_per_task": 2},
    "injection": {"tasks_per_partition": 60, "off_brick_threshold": 0.5},
    "qa": {"n_gallery": 8, "aperture_px": 5.0, "realism": "auto"},
    "completeness": {"finders": ["baseline", "core"]},
    "spark": {},
}

#: flag dest -> (section, key)
_FLAG_KEYS = {
    "survey_dir": ("survey", "survey_dir"), "n_bricks": ("survey", "n_bricks"),
    "brick_size_px": ("survey", "brick_size_px"), "layout": ("survey", "layout"),
    "survey_seed": ("survey", "seed"), "n_galaxies": ("survey", "n_galaxies"),
    "faults": ("survey", "faults"), "variant": ("manifests", "variant"),
    "experiments": ("manifests", "experiments"),
    "n_per_config_debug": ("manifests", "n_per_config_debug"),
    "replicates": ("manifests", "replicates"),
    "n_total_train_per_split": ("manifests", "n_total_train_per_split"),
    "seed": ("manifests", "seed"), "bucket": ("services", "bucket"),
    "cache_prefix": ("services", "cache_prefix"),
    "tasks_per_partition": ("injection", "tasks_per_partition"),
    "n_gallery": ("qa", "n_gallery"), "realism": ("qa", "realism"),
}


# =========================================================================== CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of the demo (None = conf/demo.toml)."""
    g = p.add_argument_group("demo (unset = conf/demo.toml, next to the other conf files)")
    g.add_argument("--demo-conf", default=None,
                   help="demo settings TOML (default: <config dir>/demo.toml)")
    g.add_argument("--fresh", action=argparse.BooleanOptionalAction, default=True,
                   help="first delete what an earlier demo left under --out (its survey, "
                        "phase4a/4b/4c/<variant>, qa/, summary, cache listing; nothing else)")
    g.add_argument("--skip-qa", action="store_true", help="no QA gallery / histograms")
    s = p.add_argument_group("synthetic survey")
    s.add_argument("--survey-dir", default=None, help="sub-directory of --out for the survey")
    s.add_argument("--n-bricks", type=int, default=None, help="bricks (incl. faulty ones)")
    s.add_argument("--brick-size-px", type=int, default=None, help="brick side, px (DR10 3600)")
    s.add_argument("--layout", choices=("contiguous", "spread"), default=None,
                   help="spread: bricks scattered over the sky (train/val/test all present)")
    s.add_argument("--survey-seed", type=int, default=None, help="seed of the synthetic survey")
    s.add_argument("--n-galaxies", type=int, default=None, help="targets per brick (0 = default)")
    s.add_argument("--faults", nargs="*", default=None,
                   help="synthetic_survey faults, e.g. absent (404 upstream) no_psfsize:1")
    m = p.add_argument_group("manifests (4a overrides)")
    m.add_argument("--variant", default=None, help="<out>/phase4a|4b|4c/<variant>/")
    m.add_argument("--experiments", default=None, help="comma-separated experiment ids")
    m.add_argument("--n-per-config-debug", type=int, default=None)
    m.add_argument("--replicates", type=int, default=None)
    m.add_argument("--n-total-train-per-split", type=int, default=None)
    m.add_argument("--seed", type=int, default=None, help="global seed of 4a (0 = conf's)")
    v = p.add_argument_group("services / 4c / QA")
    v.add_argument("--bucket", default=None, help="moto S3 bucket of the coadd cache")
    v.add_argument("--cache-prefix", default=None, help="cache = s3://<bucket>/<prefix>")
    v.add_argument("--tasks-per-partition", type=int, default=None, help="4c partitioning")
    v.add_argument("--n-gallery", type=int, default=None, help="QA gallery rows")
    v.add_argument("--realism", choices=("no", "auto", "yes"), default=None,
                   help="realism audit in QA (auto: train-tier experiments; docs/realism.md)")


def load_demo_conf(config: str | None, demo_conf: str | None = None) -> dict:
    """DEFAULTS updated with demo.toml (``demo_conf``, else demo.toml in the conf dir)."""
    if demo_conf:
        path = Path(demo_conf)
    else:
        c = Path(config) if config else DEFAULT_CONF_DIR
        path = (c if c.is_dir() else c.parent) / "demo.toml"
    out = {k: dict(v) for k, v in DEFAULTS.items()}
    if path.is_file():
        with open(path, "rb") as f:
            raw = tomllib.load(f)
        for sec, vals in raw.items():
            if sec not in out:
                raise ValueError(f"{path}: unknown section [{sec}]; known: {sorted(out)}")
            if sec != "spark":
                unknown = set(vals) - set(DEFAULTS[sec])
                if unknown:
                    raise ValueError(f"{path}: unknown key(s) {sorted(unknown)} in [{sec}]")
            out[sec].update(vals)
    elif demo_conf:
        raise FileNotFoundError(f"demo configuration not found: {path}")
    out["_path"] = str(path) if path.is_file() else None
    return out


def settings_from_args(args) -> dict:
    conf = load_demo_conf(getattr(args, "config", None), getattr(args, "demo_conf", None))
    for dest, (sec, key) in _FLAG_KEYS.items():
        val = getattr(args, dest, None)
        if val is None:
            continue
        if dest == "experiments":
            val = [e.strip() for e in val.split(",") if e.strip()]
        conf[sec][key] = val
    if isinstance(conf["manifests"]["experiments"], str):
        conf["manifests"]["experiments"] = [e.strip() for e in
                                            conf["manifests"]["experiments"].split(",") if e]
    return conf


# =========================================================================== helpers
def _driver():
    """The driver module (spark_phase4_pipeline.py at the repository root)."""
    try:
        return importlib.import_module("spark_phase4_pipeline")
    except ImportError:
        path = Path(__file__).resolve().parents[2] / "spark_phase4_pipeline.py"
        spec = importlib.util.spec_from_file_location("spark_phase4_pipeline", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)  # type: ignore[union-attr]
        return mod


def port_is_open(host: str, port: int, timeout: float = 0.5) -> bool:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.settimeout(timeout)
        return s.connect_ex((host, int(port))) == 0


def _banner(text: str) -> None:
    LOG.info("")
    LOG.info("=" * 20 + " demo: %s " + "=" * 20, text)


class _SparkProgress(threading.Thread):
    """Every ``every`` s: the progress of the running Spark stages (tasks done / total, rate)."""

    def __init__(self, sc, every: float = 5.0):
        super().__init__(daemon=True, name="demo-spark-progress")
        self.sc, self.every = sc, every
        self.label = ""
        self.stop_event = threading.Event()
        self.first_seen: dict[int, float] = {}

    def run(self) -> None:
        while not self.stop_event.wait(self.every):
            try:
                tr = self.sc.statusTracker()
                for sid in tr.getActiveStageIds():
                    info = tr.getStageInfo(sid)
                    if info is None:
                        continue
                    t0 = self.first_seen.setdefault(sid, time.perf_counter())
                    dt = time.perf_counter() - t0
                    if dt < self.every:
                        continue
                    LOG.info("[%s] spark stage %d: %d/%d tasks done, %d running, %.1f s "
                             "(%.2f tasks/s)", self.label, sid, info.numCompletedTasks,
                             info.numTasks, info.numActiveTasks, dt,
                             info.numCompletedTasks / max(dt, 1e-9))
            except Exception:
                LOG.debug("progress poll failed", exc_info=True)


#: JVM loggers whose WARN lines are expected in the demo (stages reuse the session by design;
#: a long plan string is truncated in a debug string): ERROR unless --verbose
_QUIET_JVM_LOGGERS = ("org.apache.spark.sql.SparkSession",
                      "org.apache.spark.sql.catalyst.util.SparkStringUtils")


def _quiet_loggers(sc) -> None:
    for name in ("botocore", "boto3", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        jvm = sc._jvm
        level = jvm.org.apache.logging.log4j.Level.ERROR
        for name in _QUIET_JVM_LOGGERS:
            jvm.org.apache.logging.log4j.core.config.Configurator.setLevel(name, level)
    except Exception:
        LOG.debug("could not lower JVM logger levels", exc_info=True)


def _clean(out: str, survey_dir: str, variant: str) -> list[str]:
    removed = []
    for rel in (survey_dir, f"phase4a/{variant}", f"phase4b/{variant}", f"phase4c/{variant}",
                "qa", "summary.json", "summary.txt", "cache_listing.json", "cache_listing.txt",
                "demo_run.json"):
        p = os.path.join(out, rel)
        if os.path.isdir(p):
            shutil.rmtree(p)
            removed.append(p)
        elif os.path.exists(p):
            os.remove(p)
            removed.append(p)
    return removed


def write_cache_listing(cache_uri: str, out: str) -> dict:
    """List the cache objects (JSON + an `aws s3 ls`-like text) and check each brick's
    _SUCCESS against the objects; returns the listing dict."""
    from injection_pipeline import coadd_cache as cc
    from injection_pipeline import dr10, storage

    prefix = cache_uri.rstrip("/") + "/"
    objs = list(storage.list_objects(prefix, recursive=True))
    bricks: dict[str, dict] = {}
    for o in objs:
        rel = o.uri[len(prefix):]
        brick, _, name = rel.partition("/")
        d = bricks.setdefault(brick, {"files": {}, "success": False})
        d["files"][name] = int(o.size)
    for brick, d in sorted(bricks.items()):
        d["success"] = dr10.SUCCESS_MARKER in d["files"]
        if d["success"]:
            doc = cc.parse_json(storage.get_bytes(cc.success_uri(cache_uri, brick)))
            objects = {k: v for k, v in d["files"].items() if not k.startswith("_")}
            d["success_problems"] = cc.validate_success(doc, brick, objects)
        d["n_data_files"] = sum(1 for k in d["files"] if not k.startswith("_"))
    listing = {
        "cache": cache_uri, "listed_at": _dt.datetime.now(_dt.timezone.utc)
        .isoformat(timespec="seconds"),
        "note": "the cache lives in the demo's moto S3 server, which stops at the end of the "
                "run: this listing is what it held",
        "n_objects": len(objs), "bytes": int(sum(o.size for o in objs)),
        "bricks": dict(sorted(bricks.items())),
        "objects": [{"uri": o.uri, "size": int(o.size), "etag": o.etag} for o in objs],
    }
    with open(os.path.join(out, "cache_listing.json"), "w") as f:
        json.dump(listing, f, indent=1, default=str)
        f.write("\n")
    with open(os.path.join(out, "cache_listing.txt"), "w") as f:
        f.write(f"# {cache_uri}: {len(objs)} objects, {listing['bytes']} bytes\n")
        for o in objs:
            f.write(f"{int(o.size):>12d}  {o.uri}\n")
    return listing


# =========================================================================== the demo
class _Chain:
    """State of one demo run (what was started, timings, checks)."""

    def __init__(self, args, conf: dict):
        self.args, self.conf = args, conf
        from injection_pipeline import storage

        self.out = os.path.abspath(storage.parse_uri(args.out).key)   # a path or file:// URI
        self.variant = conf["manifests"]["variant"]
        self.experiments = list(conf["manifests"]["experiments"])
        self.timings: dict[str, float] = {}
        self.checks: dict[str, Any] = {}
        self.codes: dict[str, int] = {}
        self.servers: dict[str, dict] = {}
        self.spark = None
        self.app_id = None
        self.progress: _SparkProgress | None = None
        self.driver = _driver()
        self.rates_4c: dict[str, dict] = {}      # 4c tasks/s per experiment
        self.qa: dict[str, dict] = {}            # QA gallery per experiment
        self.completeness: dict[str, dict] = {}  # baseline finders + 4d per experiment

    # ------------------------------------------------------------------ stages
    def common(self) -> list[str]:
        a = self.args
        flags = ["--master", a.master, "--out", self.out, "--config", a.config]
        return flags + (["--verbose"] if a.verbose else [])

    def stage(self, name: str, flags: Sequence[str]) -> int:
        """Run one stage through the driver's command line; check the session was reused."""
        from pyspark import SparkContext

        if self.progress is not None:
            self.progress.label = name
        t0 = time.perf_counter()
        code = int(self.driver.main([name, *self.common(), *flags]))
        self.timings[f"stage_{name}"] = round(time.perf_counter() - t0, 2)
        self.codes[name] = code
        sc = SparkContext._active_spark_context
        reused = (sc is not None and sc is self.spark.sparkContext
                  and sc.applicationId == self.app_id)
        self.checks.setdefault("session_reused_by", {})[name] = reused
        if not reused:
            raise RuntimeError(f"stage {name} did not reuse the demo's SparkSession "
                               f"(application {self.app_id}); executors may lack the moto "
                               f"endpoint")
        return code


def run(args) -> int:
    """Entry point used by spark_phase4_pipeline.py."""
    conf = settings_from_args(args)
    if "://" in args.out and not args.out.startswith("file://"):
        raise SystemExit("the demo writes a local results folder: --out must be a local path")
    ch = _Chain(args, conf)
    t_all = time.perf_counter()
    code = 0
    error: BaseException | None = None
    try:
        with contextlib.ExitStack() as stack:
            code = _run_chain(ch, stack)
    except BaseException as exc:  # recorded, servers already stopped by the ExitStack
        error = exc
        raise
    finally:
        ch.timings["total"] = round(time.perf_counter() - t_all, 2)
        _finish(ch, code, error)
    return code


def _run_chain(ch: _Chain, stack: contextlib.ExitStack) -> int:
    from injection_pipeline import storage
    from injection_pipeline import synthetic_survey as ss
    from injection_pipeline.local_services import (
        AWS_ENV_TO_CLEAR,
        patched_environ,
        start_moto_s3,
        start_survey_http_server,
    )
    from injection_pipeline.spark_session import build_spark

    args, conf, out = ch.args, ch.conf, ch.out
    sv, mc = conf["survey"], conf["manifests"]
    os.makedirs(out, exist_ok=True)
    if args.fresh:
        removed = _clean(out, sv["survey_dir"], ch.variant)
        if removed:
            LOG.info("--fresh: removed %d output(s) of an earlier demo under %s", len(removed),
                     out)
    LOG.info("demo settings: %s", {k: v for k, v in conf.items() if k != "_path"})
    LOG.info("demo config file: %s", conf.get("_path") or "(built-in defaults)")

    # 1. synthetic survey ----------------------------------------------------------------
    _banner(f"1/8 synthetic DR10 survey ({sv['n_bricks']} bricks of {sv['brick_size_px']} px, "
            f"layout {sv['layout']}, faults {sv['faults']})")
    t0 = time.perf_counter()
    survey_root = os.path.join(out, sv["survey_dir"])
    desc = ss.generate_survey(survey_root, n_bricks=int(sv["n_bricks"]),
                              size=int(sv["brick_size_px"]), seed=int(sv["seed"]),
                              faults=list(sv["faults"]),
                              n_galaxies=int(sv["n_galaxies"]) or None, layout=sv["layout"])
    ch.timings["survey"] = round(time.perf_counter() - t0, 2)
    absent = sorted(b for b, f in desc.faults.items() if "absent" in f)
    ch.survey = {"root": survey_root, "bricks": len(desc.bricks), "size_px": desc.size,
                 "absent_upstream": absent,
                 "galaxies": int(sum(b.n_galaxies for b in desc.bricks))}
    for r in desc.bricks:
        LOG.info("  brick %s: %d galaxies, %d files%s", r.spec.brickname, r.n_galaxies,
                 len(r.files), f" (faults: {','.join(r.faults)})" if r.faults else "")
    LOG.info("survey written in %.1f s: %s", ch.timings["survey"], survey_root)

    # 2. services ------------------------------------------------------------------------
    _banner("2/8 local services: HTTP server (NERSC stand-in) + moto S3")
    http = stack.enter_context(start_survey_http_server(survey_root))
    ch.servers["http"] = {"url": http.base_url, "host": http.host, "port": int(http.port)}
    moto = stack.enter_context(start_moto_s3())
    ch.servers["moto_s3"] = {"url": moto.endpoint_url, "host": moto.host, "port": moto.port}
    stack.callback(LOG.info, "stopping the HTTP and moto S3 servers")
    bucket = conf["services"]["bucket"]
    moto.create_bucket(bucket)
    cache = f"s3://{bucket}/{conf['services']['cache_prefix'].strip('/')}"
    LOG.info("HTTP %s serving %s; moto S3 %s, cache %s", http.base_url, survey_root,
             moto.endpoint_url, cache)
    stack.enter_context(patched_environ(moto.env, unset=AWS_ENV_TO_CLEAR))
    storage.clear_client_cache()
    stack.callback(storage.clear_client_cache)

    # 3. Spark ---------------------------------------------------------------------------
    _banner(f"3/8 SparkSession {args.master} (moto endpoint + credentials in "
            f"spark.executorEnv.*)")
    from pyspark import SparkContext

    preexisting = SparkContext._active_spark_context is not None
    t0 = time.perf_counter()
    ch.spark = build_spark(args.master, app_name="phase4-demo", executor_env=moto.env,
                           verbose=args.verbose,
                           conf={k: str(v) for k, v in conf["spark"].items()})
    sc = ch.spark.sparkContext
    ch.app_id = sc.applicationId
    got = sc.getConf().get("spark.executorEnv.AWS_ENDPOINT_URL")
    if got != moto.endpoint_url:
        raise RuntimeError(f"a SparkSession already existed with spark.executorEnv."
                           f"AWS_ENDPOINT_URL={got!r} (not {moto.endpoint_url}): run the demo "
                           f"in a fresh process")
    if not preexisting:
        stack.callback(ch.spark.stop)
        stack.callback(LOG.info, "stopping the SparkSession")
    ch.timings["spark_start"] = round(time.perf_counter() - t0, 2)
    ch.checks["executor_env_endpoint"] = got
    LOG.info("Spark %s master %s app %s, default parallelism %d, started in %.1f s",
             ch.spark.version, sc.master, ch.app_id, sc.defaultParallelism,
             ch.timings["spark_start"])
    if not args.verbose:
        _quiet_loggers(sc)
    ch.progress = _SparkProgress(sc)
    ch.progress.start()
    stack.callback(ch.progress.stop_event.set)

    # 4. stage 4a ------------------------------------------------------------------------
    _banner(f"4/8 stage 4a: manifests of {', '.join(ch.experiments)}")
    flags = ["--catalogue", desc.catalogue, "--survey-bricks", desc.survey_bricks,
             "--variant", ch.variant, "--experiments", ",".join(ch.experiments),
             "--n-per-config-debug", str(mc["n_per_config_debug"]),
             "--replicates", str(mc["replicates"]),
             "--n-total-train-per-split", str(mc["n_total_train_per_split"])]
    if int(mc["seed"] or 0):
        flags += ["--seed", str(mc["seed"])]
    if ch.stage("4a", flags):
        raise RuntimeError(f"stage 4a failed (exit {ch.codes['4a']})")
    p4a = os.path.join(out, "phase4a", ch.variant)
    ch.manifests = {}
    for eid in ch.experiments:
        with open(os.path.join(p4a, "summaries", f"{eid}.json")) as f:
            s = json.load(f)
        ch.manifests[eid] = {"rows": s["rows_total"], "controls": s["controls"],
                             "bricks": s["bricks_touched"],
                             "by_split": {k: v["total"] for k, v in s["rows_by_split"].items()}}

    # 5. stage 4b ------------------------------------------------------------------------
    _banner(f"5/8 stage 4b: coadd cache {http.base_url} -> {cache}")
    cc_conf = conf["cache"]
    flags = ["--variant", ch.variant, "--cache", cache, "--base-url", http.base_url + "/",
             "--brick-size", str(desc.size), "--max-retries", str(cc_conf["max_retries"]),
             "--backoff-base", str(cc_conf["backoff_base_s"]),
             "--progress-every", str(cc_conf["progress_every"]),
             "--threads-per-task", str(cc_conf["threads_per_task"]),
             "--bricks-per-task", str(cc_conf["bricks_per_task"])]
    if ch.stage("4b", flags):
        LOG.error("stage 4b left failed bricks (exit %d): the chain stops here; rerun to "
                  "resume", ch.codes["4b"])
        return 1
    with open(os.path.join(p4a, "brick_blacklist.json")) as f:
        bl = json.load(f)
    ch.blacklist = sorted(b["brick"] for b in bl["bricks"])
    ch.checks["blacklist_is_absent_bricks"] = ch.blacklist == absent
    if ch.blacklist != absent:
        LOG.error("blacklist %s != bricks absent upstream %s", ch.blacklist, absent)
    with open(os.path.join(p4a, "manifests_filtered_summary.json")) as f:
        fs = json.load(f)["experiments"]
    ch.filtered = {eid: {"tasks": fs[eid]["tasks_out"], "removed": fs[eid]["tasks_removed"]}
                   for eid in ch.experiments}
    _banner("6/8 cache listing (the cache lives in moto, which stops at the end)")
    listing = write_cache_listing(cache, out)
    ok_bricks = [b for b, d in listing["bricks"].items()
                 if d["success"] and not d.get("success_problems") and d["n_data_files"] == 10]
    ch.cache = {"uri": cache, "objects": listing["n_objects"],
                "MB": round(listing["bytes"] / 2 ** 20, 2), "bricks_complete": len(ok_bricks)}
    expected = sorted(b.spec.brickname for b in desc.bricks if b.spec.brickname not in absent)
    ch.checks["cache_complete_for_present_bricks"] = ok_bricks == expected
    LOG.info("cache: %d objects, %.1f MB, %d complete bricks (10 files + valid _SUCCESS) -> "
             "%s", listing["n_objects"], ch.cache["MB"], len(ok_bricks),
             os.path.join(out, "cache_listing.json"))

    # 7. stage 4c ------------------------------------------------------------------------
    _banner(f"7/8 stage 4c: injection of {', '.join(ch.experiments)}")
    flags = ["--variant", ch.variant, "--experiment-id", ",".join(ch.experiments),
             "--cache", cache,
             "--tasks-per-partition", str(conf["injection"]["tasks_per_partition"]),
             "--off-brick-threshold", str(conf["injection"]["off_brick_threshold"])]
    code4c = ch.stage("4c", flags)
    p4c = os.path.join(out, "phase4c", ch.variant)
    rates, s4c_of = {}, {}
    for eid in ch.experiments:
        with open(os.path.join(p4c, "summaries", f"{eid}.json")) as f:
            s4c = s4c_of[eid] = json.load(f)
        n = s4c["accounting"]["rows_written"]
        t = s4c["seconds_inject_and_write"]
        rates[eid] = {"tasks": n, "seconds_inject_and_write": t,
                      "tasks_per_s": round(n / t, 1) if t else None}
        LOG.info("4c %s: %d tasks injected and written in %.1f s (%.1f tasks/s)", eid, n, t,
                 n / t if t else float("nan"))
    ch.rates_4c = rates

    # 8. summary + QA --------------------------------------------------------------------
    _banner("8/8 summary (from the written parquet) and QA")
    from injection_pipeline import summary as summ

    t0 = time.perf_counter()
    run_info = {"survey": {"bricks": ch.survey["bricks"], "size_px": ch.survey["size_px"],
                           "absent_upstream": absent},
                "manifests": {e: m["rows"] for e, m in ch.manifests.items()},
                "blacklist": ch.blacklist,
                "filtered": {e: f"{d['tasks']} (-{d['removed']})" for e, d in ch.filtered.items()},
                "cache": {"bricks": ch.cache["bricks_complete"], "objects": ch.cache["objects"],
                          "MB": ch.cache["MB"]},
                "timings_s": dict(ch.timings)}
    summary = summ.summarise(out, ch.variant, ch.experiments, run=run_info)
    text = summ.write_summary(summary, os.path.join(out, "summary.json"),
                              os.path.join(out, "summary.txt"))
    ch.checks["accounting_exact"] = summary["accounting_exact"]
    ch.checks["summary_matches_4c_summaries"] = True
    for eid, s4c in s4c_of.items():
        if s4c["by_status"] != summary["experiments"][eid]["by_status"]:
            ch.checks["summary_matches_4c_summaries"] = False
            LOG.error("%s: summary by_status %s != 4c's %s", eid,
                      summary["experiments"][eid]["by_status"], s4c["by_status"])
    ch.timings["summary"] = round(time.perf_counter() - t0, 2)
    print(text, flush=True)
    if not args.skip_qa:
        from injection_pipeline import qa

        t0 = time.perf_counter()
        for eid in ch.experiments:
            stamps = os.path.join(p4c, "stamps", eid)
            if not os.path.isdir(stamps):
                LOG.info("QA %s: no stamps (metrics-only experiment)", eid)
                continue
            qdir = os.path.join(out, "qa", eid)
            q = qa.run_qa(stamps, qdir, n_gallery=int(conf["qa"]["n_gallery"]),
                          aperture_px=float(conf["qa"]["aperture_px"]),
                          realism=str(conf["qa"]["realism"]))
            ch.qa[eid] = {"dir": qdir, "pngs": q["pngs"], "skipped": q["pngs_skipped"],
                          "realism": q["realism"]}
            LOG.info("QA %s: %d ok stamps -> %s", eid, q["rows_ok"],
                     ", ".join(q["pngs"]) or "(no matplotlib: JSON only)")
            r = q["realism"]
            if r["status"] == "ran":
                LOG.info("realism audit %s: %d/%d checks pass, %d fail, %d not measured -> %s, "
                         "%s", eid, r["n_pass"], r["n_checks"], r["n_fail"],
                         r["n_not_measured"], r["json"], r["png"] or "(no PNG)")
            elif r["status"] == "error":
                LOG.error("realism audit %s raised %s (reported; the demo goes on)", eid,
                          r["error"])
        ch.timings["qa"] = round(time.perf_counter() - t0, 2)
        _completeness(ch, p4c)
    checks_ok = all(v for k, v in ch.checks.items()
                    if k not in ("session_reused_by", "executor_env_endpoint"))
    if not checks_ok:
        LOG.error("demo checks failed: %s", ch.checks)
        return max(code4c, EXIT_CHECK_FAILED)
    return code4c


def _completeness(ch: _Chain, p4c: str) -> None:
    """BASELINE finders (not science) on each train-tier experiment with stamps, then stage
    4d on their scores (docs/completeness.md); a failure is logged and recorded, not fatal."""
    from injection_pipeline.stages.stage_finder import default_scores_path

    t0 = time.perf_counter()
    for eid in ch.experiments:
        if not eid.startswith("train") or not os.path.isdir(os.path.join(p4c, "stamps", eid)):
            continue
        for finder in ch.conf["completeness"]["finders"]:
            scores = default_scores_path(ch.out, ch.variant, eid, finder)
            rec = ch.completeness.setdefault(f"{eid}:{finder}", {"scores": scores})
            base = ["--variant", ch.variant, "--experiment-id", eid]
            rec["finder_exit"] = ch.stage("finder", base + ["--finder", finder])
            if rec["finder_exit"] == 0:
                rec["4d_exit"] = ch.stage("4d", base + ["--scores", scores, "--tag", finder])
                rec["dir"] = os.path.join(ch.out, "phase4d", ch.variant, eid, finder)
            if rec.get("4d_exit", 1):
                LOG.error("completeness %s %s failed: %s (the demo goes on)", eid, finder, rec)
    ch.timings["completeness"] = round(time.perf_counter() - t0, 2)


def _finish(ch: _Chain, code: int, error: BaseException | None) -> None:
    """After the ExitStack closed: ports closed?  demo_run.json, and where everything is."""
    stopped = {name: not port_is_open(s["host"], s["port"]) for name, s in ch.servers.items()}
    ch.checks["servers_stopped"] = stopped
    out, v = ch.out, ch.variant
    paths = {
        "survey": os.path.join(out, ch.conf["survey"]["survey_dir"]),
        "manifests": os.path.join(out, "phase4a", v, "manifests"),
        "manifests_filtered": os.path.join(out, "phase4a", v, "manifests_filtered"),
        "manifest_summaries": os.path.join(out, "phase4a", v, "summaries"),
        "blacklist": os.path.join(out, "phase4a", v, "brick_blacklist.json"),
        "cache_runs_4b": os.path.join(out, "phase4b", v, "runs"),
        "cache_listing": os.path.join(out, "cache_listing.json"),
        "stamps": os.path.join(out, "phase4c", v, "stamps"),
        "metrics": os.path.join(out, "phase4c", v, "metrics"),
        "summaries_4c": os.path.join(out, "phase4c", v, "summaries"),
        "summary_json": os.path.join(out, "summary.json"),
        "summary_table": os.path.join(out, "summary.txt"),
        "qa": os.path.join(out, "qa"),
        "demo_run": os.path.join(out, "demo_run.json"),
    }
    doc = {
        "written_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "exit_code": code if error is None else None,
        "error": None if error is None else f"{type(error).__name__}: {error}",
        "master": ch.args.master, "variant": v, "experiments": ch.experiments,
        "settings": {k: val for k, val in ch.conf.items() if k != "_path"},
        "settings_file": ch.conf.get("_path"),
        "servers": ch.servers, "stage_exit_codes": ch.codes, "timings_s": ch.timings,
        "checks": ch.checks, "paths": paths, "qa": ch.qa, "rates_4c": ch.rates_4c,
        "completeness": ch.completeness,
    }
    if os.path.isdir(out):
        with open(paths["demo_run"], "w") as f:
            json.dump(doc, f, indent=1, default=str)
            f.write("\n")
    if not all(stopped.values()):
        LOG.error("a server port is still open after the demo: %s", stopped)
    if error is not None:
        LOG.error("demo failed after %.1f s: %s: %s (servers stopped: %s; record %s)",
                  ch.timings.get("total", 0.0), type(error).__name__, error, stopped,
                  paths["demo_run"])
        return
    lines = [f"demo finished in {ch.timings['total']:.1f} s (exit {code}); results in {out}:"]
    for key, p in paths.items():
        if os.path.exists(p):
            lines.append(f"  {key:20s} {p}")
    for q in ch.qa.values():
        for png in q["pngs"]:
            lines.append(f"  {'qa png':20s} {png}")
        r = q.get("realism", {})
        if r.get("status") == "ran":
            lines.append(f"  {'realism audit json':20s} {r['json']} ({r['n_pass']}/"
                         f"{r['n_checks']} checks pass)")
            if r.get("png"):
                lines.append(f"  {'realism audit png':20s} {r['png']}")
    for key, rec in ch.completeness.items():
        if rec.get("dir"):
            lines.append(f"  {'completeness plots':20s} {rec['dir']}/ ({key}; BASELINE "
                         "finder, not science)")
    lines.append("  timings [s]: " + ", ".join(f"{k} {t}" for k, t in ch.timings.items()))
    lines.append(f"  servers stopped (ports closed): {stopped}")
    print("\n".join(lines), flush=True)
