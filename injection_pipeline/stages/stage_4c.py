"""Stage 4c: inject lensed sources into cached DR10 cutouts (Spark glue around
:mod:`injection_pipeline.injection`).

Inputs: the manifest ``<out>/phase4a/<variant>/<manifests-subdir>/<experiment_id>/`` (default
subdir ``manifests_filtered``) and the coadd cache ``<cache>/<brickname>/`` written by 4b
(local path or s3://).  Outputs under ``<out>/phase4c/<variant>/``::

    stamps/<experiment_id>/split=<split>/part-<brick>.zstd.parquet
                                             every output row: manifest columns + results +
                                             binary stamps (image, arc, invvar, maskbits),
                                             written by the Python workers (stamp_writer)
    stamps/<experiment_id>/_SUCCESS          JSON, after the stamps accounting check
    metrics/<experiment_id>/split=<split>/   the same rows without the stamp columns (Spark)
    summaries/<experiment_id>.json           accounting and summaries read from the WRITTEN
                                             metrics parquet

Data flow (docs/injection.md): the manifest is range-partitioned by ``brickname`` and sorted
by (brickname, task_id) within partitions (so a paired control, ``<injection>/ctl``, is
written right after its injection and zstd stores their shared cutout once);
``mapInArrow`` walks each partition brick by
brick, opening each brick's cached files once (S3 objects downloaded to /dev/shm, fitsio
decompressing only the tiles the stamps touch, all before the brick's per-task loop).  The
result is computed ONCE: each batch of ``out_batch_rows`` rows is written by the worker to
its stamps files (unless metrics-only; the planes are handed to Parquet without a copy,
``injection.results_to_table``) and its scalar columns are yielded to Spark, which
writes ``metrics/``; every count comes from the written metrics, and the stamps files are
checked to hold exactly one row per manifest task.  No task data is collected to the driver
(only aggregates and the list of distinct bricks when a survey-bricks table is given).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Optional

from injection_pipeline import injection as inj
from injection_pipeline import manifests as mf
from injection_pipeline import stamp_writer, storage
from injection_pipeline.provenance import code_version
from injection_pipeline.spark_session import check_spark_filesystem, spark_path

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover
    import tomli as tomllib  # type: ignore[no-redef]

NAME = "4c"
HELP = "inject lensed sources into cached DR10 cutouts -> stamps + metrics parquet"
LOG = logging.getLogger("phase4.4c")
EXIT_TOO_MANY_ERRORS = 2
#: an experiment whose 4c raised (bad manifest, accounting mismatch, storage down...): the
#: other experiments of the same ``--experiment-id a,b,c`` run still run
EXIT_FAILED = 3


# =========================================================================== configuration
def load_conf(conf: str | os.PathLike | None) -> dict:
    """conf/injection.toml as a dict (``conf``: the conf directory or the TOML itself)."""
    p = Path(conf) if conf else mf.DEFAULT_CONF_DIR
    path = p / "injection.toml" if p.is_dir() else (p.parent / "injection.toml"
                                                     if p.name != "injection.toml" else p)
    try:
        with open(path, "rb") as f:
            d = tomllib.load(f)
    except FileNotFoundError:
        raise mf.ConfigError(f"configuration file not found: {path}") from None
    d["_path"] = str(path)
    return d


def _pick(cli, conf_value):
    return conf_value if cli is None else cli


def config_from_args(args, conf: dict) -> inj.InjectionConfig:
    psf = conf.get("psf", {})
    ij = conf.get("injection", {})
    met = conf.get("metrics", {})
    ims = conf.get("images", {})
    shot = conf.get("shot_noise", {})
    ss = int(_pick(args.supersample, ij.get("supersample", 0)) or 0)
    src = conf.get("source", {})
    clump_conf = src.get("clumps", {})
    return inj.InjectionConfig(
        psf_model=_pick(args.psf_model, psf.get("model", "gaussian")),
        moffat_beta=float(_pick(args.moffat_beta, psf.get("moffat_beta", 3.5))),
        use_psfsize_maps=bool(int(_pick(args.use_psfsize_maps,
                                        int(psf.get("use_psfsize_maps", True))))),
        psf_default_fwhm=tuple(sorted((k, float(v)) for k, v in
                                      psf.get("default_fwhm_arcsec", {}).items()))
        or inj.InjectionConfig().psf_default_fwhm,
        psf_min_fwhm=float(psf.get("min_fwhm_arcsec", 0.0)),
        psf_max_fwhm=float(psf.get("max_fwhm_arcsec", 10.0)),
        on_missing_maskbits=_pick(args.on_missing_maskbits,
                                  ij.get("on_missing_maskbits", "inject")),
        store_invvar_maskbits=bool(_pick(args.store_invvar_maskbits,
                                         ij.get("store_invvar_maskbits", True))),
        supersample=ss if ss > 0 else None,
        source_model=_pick(getattr(args, "source_model", None), src.get("model", "sersic")),
        clump_model=inj.ClumpModel.from_conf(clump_conf) if clump_conf else inj.ClumpModel(),
        psf_oversample=int(_pick(args.psf_oversample,
                                 ij.get("psf_oversample", inj.PSF_OVERSAMPLE_DEFAULT))),
        arc_region_k=_pick(args.arc_region_k, met.get("arc_region_k", inj.ARC_REGION_K_DEFAULT)),
        arc_region_bands=_pick(args.arc_region_bands,
                               met.get("arc_region_bands", "".join(inj.BANDS))),
        mu_point_factor=float(ims.get("mu_point_factor", 1.1)),
        resolved_b_fac=float(ims.get("resolved_b_fac", 2.0)),
        resolved_r_fac=float(ims.get("resolved_r_fac", 2.0)),
        shot_noise=_pick(getattr(args, "arc_shot_noise", None), shot.get("mode", "auto")),
        shot_noise_tiers=tuple(shot.get("tiers", ["train"])),
        shot_zpt=_band_table(shot.get("zpt_ab_1e_per_s"), inj.DEFAULT_SHOT_ZPT),
        shot_exptime=_band_table(shot.get("exptime_s"), inj.DEFAULT_SHOT_EXPTIME),
        shot_nexp=_band_table(shot.get("nexp"), inj.DEFAULT_SHOT_NEXP),
        code_version=code_version())


def _band_table(value, default) -> tuple:
    """((band, float), ...) from a conf inline table, else the default."""
    if not value:
        return tuple(default)
    return tuple(sorted((str(k), float(v)) for k, v in dict(value).items()))


# =========================================================================== CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of stage 4c (defaults None = value from conf/injection.toml)."""
    g = p.add_argument_group("inputs / outputs")
    g.add_argument("--experiment-id", required=True,
                   help="experiment id(s), comma-separated (e.g. debug_stamp64_bandsgrz_gridgrid_small)")
    g.add_argument("--variant", default="default",
                   help="<out>/phase4a/<variant>/ (input) and <out>/phase4c/<variant>/ (output)")
    g.add_argument("--manifests-subdir", default=None,
                   help="manifest directory under <out>/phase4a/<variant>/ (conf: manifests_filtered)")
    g.add_argument("--manifests-root", default=None,
                   help="explicit parent directory of <experiment_id>/ manifests (overrides "
                        "<out>/phase4a/<variant>/<manifests-subdir>)")
    g.add_argument("--cache", default=None,
                   help="coadd cache root written by 4b: <cache>/<brickname>/ (local or s3://); "
                        "default: 4b's (conf/cache.toml [cache] cache, else <out>/coadd_cache)")
    g.add_argument("--survey-bricks", default=None,
                   help="survey-bricks(-dr10-south) FITS table for the bricks-table PSF fallback "
                        "(psfsize_g/r/z columns; local or s3://); conf [inputs] survey_bricks; "
                        "unset = the bricks_table fallback level is skipped")
    g.add_argument("--metrics-only", nargs="?", const="yes", default="auto",
                   choices=("auto", "yes", "no"),
                   help="yes: metrics without stamps; no: always stamps; auto: the manifest's "
                        "metrics_only column (grid tiers)")
    g.add_argument("--store-invvar-maskbits", action=argparse.BooleanOptionalAction,
                   default=None, help="store invvar and maskbits cutouts with each stamp")
    ph = p.add_argument_group("physics (unset = conf/injection.toml)")
    ph.add_argument("--use-psfsize-maps", type=int, choices=(0, 1), default=None,
                    help="1: FWHM from psfsize maps at the stamp centre (fallbacks recorded)")
    ph.add_argument("--psf-model", choices=inj.PSF_MODELS, default=None, help="PSF profile: gaussian "
                    "(FWHM = psfsize) | moffat (NEA-matched to the psfsize Gaussian)")
    ph.add_argument("--moffat-beta", type=float, default=None, help="Moffat index (conf 3.5)")
    ph.add_argument("--on-missing-maskbits", choices=("inject", "skip"), default=None,
                    help="inject (null mask metrics + reason) or skip (status missing_maskbits)")
    ph.add_argument("--supersample", type=int, default=None,
                    help="renderer: 0 = adaptive rule (default), s = uniform s x s")
    ph.add_argument("--source-model", choices=inj.SOURCE_MODELS, default=None,
                    help="sersic (smooth manifest Sersic) | clumpy (that Sersic + star-forming "
                         "clumps from task_seed64, conf [source.clumps]); conf [source] model")
    ph.add_argument("--psf-oversample", type=int, choices=inj.PSF_OVERSAMPLE_ALLOWED,
                    default=None, help="renderer: fine cells per pixel per axis of the "
                    "convolution grid; the PSF (which contains the pixel response) is evaluated "
                    "at pixel centres, pixel response applied once (conf 4; 1 = legacy double "
                    "pixel response, comparisons only)")
    ph.add_argument("--arc-region-k", type=float, default=None,
                    help="arc_snr_region_<b>: region = good pixels with arc > k x pixel sigma "
                         "(conf [metrics] arc_region_k = 1.0)")
    ph.add_argument("--arc-shot-noise", choices=inj.SHOT_NOISE_MODES, default=None,
                    help="Poisson noise of the arc's photons added to image: auto = on for the "
                         "tiers of conf [shot_noise] tiers (train), on, off (conf mode = auto)")
    ph.add_argument("--arc-region-bands", default=None,
                    help="bands whose best region S/N is arc_snr_region (conf: grz)")
    j = p.add_argument_group("job")
    j.add_argument("--error-threshold", type=float, default=None,
                   help="exit 2 when more than this fraction of tasks is neither ok nor "
                        "off_brick (conf 0.01)")
    j.add_argument("--off-brick-threshold", type=float, default=None,
                   help="exit 2 when more than this fraction of tasks is off_brick (real DR10 "
                        "targets never are; conf 0.001)")
    j.add_argument("--fetch", choices=("auto", "range", "whole"), default=None,
                   help="S3 cache: fetch only the compression tiles the stamps touch (range), "
                        "each file whole, or range unless a plane's stamps need more than "
                        "fetch_auto_fraction of its tiles (auto; conf [job] fetch)")
    j.add_argument("--partitions", type=int, default=None,
                   help="Spark partitions (default: tasks / tasks_per_partition, <= bricks)")
    j.add_argument("--tasks-per-partition", type=int, default=None, help="conf 2000")


def run(args) -> int:
    """Entry point used by spark_phase4_pipeline.py."""
    from injection_pipeline.spark_session import build_spark

    conf = load_conf(args.config)
    cfg = config_from_args(args, conf)
    spark = build_spark(args.master, app_name="phase4-4c", verbose=args.verbose)
    outcomes: dict = {}
    for eid in [e.strip() for e in args.experiment_id.split(",") if e.strip()]:
        try:
            outcomes[eid] = _run_one(spark, cfg, conf, args, eid)
        except Exception as exc:  # noqa: BLE001 - one experiment's failure; the others still run
            LOG.exception("%s: stage 4c FAILED (exit %d): %s: %s", eid, EXIT_FAILED,
                          type(exc).__name__, exc)
            outcomes[eid] = EXIT_FAILED
    if len(outcomes) > 1:
        LOG.info("stage 4c per experiment: %s", ", ".join(
            f"{e} {'ok' if c == 0 else f'exit {c}'}" for e, c in outcomes.items()))
    return max(outcomes.values(), default=0)


def _run_one(spark, cfg, conf, args, eid: str) -> int:
    """Stage 4c for one experiment of ``--experiment-id``; its exit code."""
    summary = run_stage_4c(
        spark, cfg, experiment_id=eid, out=args.out, variant=args.variant,
        cache=_cache_root(args),
        manifests_subdir=_pick(args.manifests_subdir,
                               conf.get("inputs", {}).get("manifests_subdir",
                                                          "manifests_filtered")),
        manifests_root=args.manifests_root,
        survey_bricks=_pick(args.survey_bricks,
                            conf.get("inputs", {}).get("survey_bricks") or None),
        metrics_only=args.metrics_only,
        error_threshold=float(_pick(args.error_threshold,
                                    conf.get("job", {}).get("error_threshold", 0.01))),
        off_brick_threshold=float(_pick(args.off_brick_threshold,
                                        conf.get("job", {}).get("off_brick_threshold", 0.001))),
        partitions=args.partitions,
        tasks_per_partition=int(_pick(args.tasks_per_partition,
                                      conf.get("job", {}).get("tasks_per_partition", 2000))),
        out_batch_rows=int(conf.get("job", {}).get("out_batch_rows", 128)),
        download_threads=int(conf.get("job", {}).get("download_threads", 4)),
        fetch=str(_pick(args.fetch, conf.get("job", {}).get("fetch", "auto"))),
        fetch_auto_fraction=float(conf.get("job", {}).get("fetch_auto_fraction", 0.5)),
        range_merge_gap=int(conf.get("job", {}).get("range_merge_gap_bytes", 65536)),
        stamps_zstd_level=int(conf.get("job", {}).get("stamps_zstd_level", 3)))
    return int(summary["exit_code"])


def _cache_root(args) -> str:
    """--cache, else the cache stage 4b writes by default (one definition: stage_4b's)."""
    if args.cache:
        return args.cache
    from injection_pipeline.stages.stage_4b import load_cache_conf
    configured = load_cache_conf(args.config).get("cache")
    return configured or storage.join_uri(args.out, "coadd_cache")


# =========================================================================== executors
def _partition_fn(cfg: inj.InjectionConfig, cache: str, table_bc, with_stamps: bool,
                  out_batch_rows: int, download_threads: int, stamps_uri: Optional[str] = None,
                  stamps_zstd_level: int = 3, fetch: str = "whole",
                  fetch_auto_fraction: float = 0.5, range_merge_gap: int = 65536):
    """mapInArrow function: group consecutive rows by brick, one brick open at a time.

    Yields the metrics rows (manifest columns + results) to Spark.  With stamps, the full rows
    (+ the binary planes) are written by this Python worker to ``stamps_uri``
    (:class:`injection_pipeline.stamp_writer.StampFileWriter`, one file per split, tagged
    with the partition's first brick) and never cross into the JVM.
    """

    def fn(batches):
        from injection_pipeline import injection as inj_mod
        from injection_pipeline import stamp_writer

        schema = inj_mod.output_arrow_schema(with_stamps)
        metric_names = inj_mod.output_arrow_schema(False).names
        table = table_bc.value if table_bc is not None else {}
        buf: list = []
        state: dict = {"writer": None}

        def flush():
            t = inj_mod.results_to_table(buf, schema, with_stamps)   # planes not copied
            buf.clear()
            if with_stamps:
                state["writer"].write(t)
                t = t.select(metric_names)
            return t.combine_chunks().to_batches()   # scalar columns: one chunk, no copy

        def run_brick(brick, tasks):
            bands = sorted({c for t in tasks for c in str(t.get("bands") or "")
                            if c in inj_mod.BANDS}, key=inj_mod.BANDS.index) or list(inj_mod.BANDS)

            def opener():
                try:
                    inj_mod.dr10.validate_brickname(brick)
                except ValueError as exc:
                    raise inj_mod.BrickUnavailable("invalid_task", str(exc)) from None
                return inj_mod.CachedBrick.open(cache, brick, bands,
                                                use_psfsize_maps=cfg.use_psfsize_maps,
                                                table_psf=table.get(brick),
                                                download_threads=download_threads,
                                                fetch=fetch,
                                                fetch_auto_fraction=fetch_auto_fraction,
                                                range_merge_gap=range_merge_gap)
            yield from inj_mod.process_brick(tasks, opener, cfg)

        def rows():
            current, tasks = None, []
            for rb in batches:
                for t in rb.to_pylist():
                    b = t.get("brickname")
                    if tasks and b != current:
                        yield from run_brick(current, tasks)
                        tasks = []
                    elif not tasks and with_stamps and state["writer"] is None:
                        state["writer"] = stamp_writer.StampFileWriter(
                            stamps_uri, _file_tag(b), schema,
                            compression_level=stamps_zstd_level,
                            binary_columns=inj_mod.STAMP_COLUMN_NAMES,
                            code_version=cfg.code_version)
                    current = b
                    tasks.append(t)
            if tasks:
                yield from run_brick(current, tasks)

        try:
            for r in rows():
                buf.append(r)
                if len(buf) >= out_batch_rows:
                    yield from flush()
            if buf:
                yield from flush()
            if state["writer"] is not None:
                state["writer"].close()
        except BaseException:
            if state["writer"] is not None:
                state["writer"].abort()
            raise
    return fn


def _file_tag(brickname) -> str:
    """File-name-safe tag of a partition from its first brickname (brick names are
    [0-9pm]; anything else, e.g. an invalid manifest value, is hex-encoded)."""
    import hashlib

    s = str(brickname)
    if s and s.isascii() and s.isalnum() and len(s) <= 32:
        return s
    return "x" + hashlib.blake2b(s.encode("utf-8", "replace"), digest_size=8).hexdigest()


# =========================================================================== driver
def _bricks_table_psf(survey_bricks: Optional[str], bricks: list) -> tuple[dict, str]:
    """{brick: {band: psfsize}} from survey-bricks psfsize_<band> columns, and a status note."""
    if not survey_bricks:
        return {}, "no survey-bricks table given: bricks_table level skipped"
    import numpy as np

    from injection_pipeline import dr10

    with storage.download_to_temp(survey_bricks) as path:
        try:
            t = dr10.read_survey_bricks(path, extra_columns=[f"psfsize_{b}" for b in dr10.BANDS])
        except ValueError as exc:
            LOG.warning("%s: no psfsize_<band> columns (%s): bricks_table PSF level skipped",
                        survey_bricks, str(exc).splitlines()[0][:200])
            return {}, f"{survey_bricks}: no psfsize_<band> columns"
    want = set(bricks)
    out = {}
    for i, name in enumerate(t["brickname"]):
        if name in want:
            out[str(name)] = {b: (float(t[f"psfsize_{b}"][i])
                                  if np.isfinite(t[f"psfsize_{b}"][i]) else None)
                              for b in dr10.BANDS}
    return out, f"{survey_bricks}: psfsize_<band> for {len(out)} of {len(want)} bricks"


def metrics_columns() -> list:
    return list(mf.MANIFEST_COLUMN_NAMES) + list(inj.RESULT_COLUMN_NAMES)


def check_manifest_schema(spark_schema, where: str) -> None:
    """Names and types of a manifest against ``manifests.manifest_schema()``, before any
    work: ValueError naming every missing column and every column of another type (the
    Spark type found and the one expected), instead of an Arrow cast error on an executor
    that names neither.  Extra columns are allowed (they are not read)."""
    from pyspark.sql.pandas.types import from_arrow_type

    found = {f.name: f.dataType for f in spark_schema.fields}
    missing, wrong = [], []
    for field in mf.manifest_schema():
        if field.name not in found:
            missing.append(field.name)
            continue
        want = from_arrow_type(field.type)
        if found[field.name] != want:
            wrong.append(f"{field.name}: {found[field.name].simpleString()} (expected "
                         f"{want.simpleString()})")
    if missing or wrong:
        parts = ([f"missing column(s) {missing}"] if missing else []) + \
                ([f"column(s) of the wrong type: {'; '.join(wrong)}"] if wrong else [])
        raise ValueError(f"{where}: not a phase-4a manifest: {'; '.join(parts)} "
                         f"(docs/manifests.md)")


def run_stage_4c(spark, cfg: inj.InjectionConfig, *, experiment_id: str, out: str,
                 cache: str, variant: str = "default",
                 manifests_subdir: str = "manifests_filtered",
                 manifests_root: Optional[str] = None, survey_bricks: Optional[str] = None,
                 metrics_only: str = "auto", error_threshold: float = 0.01,
                 off_brick_threshold: float = 0.001, partitions: Optional[int] = None, tasks_per_partition: int = 2000,
                 out_batch_rows: int = 128, download_threads: int = 4, fetch: str = "auto",
                 fetch_auto_fraction: float = 0.5, range_merge_gap: int = 65536,
                 output_variant: Optional[str] = None, stamps_zstd_level: int = 3) -> dict:
    """Run 4c for one experiment; returns the summary (also written as JSON).

    ``summary["exit_code"]`` is 0, or 2 when the error fraction exceeds ``error_threshold``
    or the off_brick fraction exceeds ``off_brick_threshold``.
    Raises RuntimeError when the task accounting of the written output is not exact.
    ``output_variant`` (default ``variant``) names <out>/phase4c/<output_variant>/.
    """
    from pyspark.sql import functions as F
    from pyspark.sql.pandas.types import from_arrow_schema

    t0 = time.perf_counter()
    in_root = manifests_root or storage.join_uri(out, "phase4a", variant, manifests_subdir)
    manifest_uri = storage.join_uri(in_root, experiment_id)
    root = storage.join_uri(out, "phase4c", output_variant or variant)
    check_spark_filesystem(spark, root)
    LOG.info("==== stage 4c %s: %s -> %s (cache %s) ====", experiment_id, manifest_uri, root,
             cache)
    man = spark.read.parquet(spark_path(manifest_uri))
    check_manifest_schema(man.schema, manifest_uri)
    man = man.select(*mf.MANIFEST_COLUMN_NAMES)
    head = man.agg(F.count(F.lit(1)).alias("n"), F.countDistinct("task_id").alias("ids"),
                   F.countDistinct("brickname").alias("bricks"),
                   F.collect_set("metrics_only").alias("mo")).first()
    n_tasks, n_bricks = int(head["n"]), int(head["bricks"])
    if n_tasks == 0:
        raise RuntimeError(f"{manifest_uri}: empty manifest")
    if head["ids"] != n_tasks:
        raise RuntimeError(f"{manifest_uri}: task_id not unique ({n_tasks} rows, "
                           f"{head['ids']} ids)")
    if metrics_only == "auto":
        with_stamps = not any(bool(x) for x in head["mo"])
    else:
        with_stamps = metrics_only == "no"
    cfg = dataclasses.replace(cfg, store_stamps=with_stamps)
    # one brick never spans two partitions; at least one partition per core when bricks allow
    n_parts = partitions or max(1, min(n_bricks, max(
        spark.sparkContext.defaultParallelism, math.ceil(n_tasks / max(1, tasks_per_partition)))))
    LOG.info("%d tasks on %d bricks -> %d partitions; stamps %s; PSF %s%s; config %s",
             n_tasks, n_bricks, n_parts, "stored" if with_stamps else "NOT stored (metrics only)",
             cfg.psf_model, f" beta={cfg.moffat_beta} (NEA-matched to the psfsize Gaussian)"
             if cfg.psf_model == "moffat" else " (FWHM = psfsize)",
             cfg.config_sha())

    table_bc, table_note = None, "psfsize maps only"
    if survey_bricks:
        bricks = [r[0] for r in man.select("brickname").distinct().collect()]
        table, table_note = _bricks_table_psf(survey_bricks, bricks)
        table_bc = spark.sparkContext.broadcast(table)
    else:
        table_note = "no survey-bricks table given: bricks_table level skipped"
    LOG.info("PSF fallback table: %s", table_note)

    metrics_schema = inj.output_arrow_schema(False)
    stamps_uri = storage.join_uri(root, "stamps", experiment_id)
    metrics_uri = storage.join_uri(root, "metrics", experiment_id)
    # overwrite semantics for the stamps the Python workers write (and no stale stamps when
    # this run is metrics-only)
    stamp_writer.clear(stamps_uri)
    # range partitioning on brickname: every brick in one partition (as with hash
    # partitioning) but partitions balanced by task count from a sample (hashing k bricks into
    # n partitions collides: 2 bricks in 2 partitions share one with probability 1/2, and at
    # ~12 bricks per partition counts vary by ~30 %); neighbouring bricks (same split) share a
    # partition.  Output rows are identical on any partitioning.  docs/performance.md
    result = (man.repartitionByRange(n_parts, "brickname")
              .sortWithinPartitions("brickname", "task_id")
              .mapInArrow(_partition_fn(cfg, cache, table_bc, with_stamps, out_batch_rows,
                                        download_threads, stamps_uri, stamps_zstd_level,
                                        fetch, fetch_auto_fraction, range_merge_gap),
                          from_arrow_schema(metrics_schema)))
    t1 = time.perf_counter()
    _write(spark, result, metrics_uri)          # the one and only computation
    t_inject = time.perf_counter() - t1
    stamps_check = _check_stamps(spark, stamps_uri, n_tasks) if with_stamps else None
    if table_bc is not None:
        table_bc.unpersist()

    summary = summarise(spark, manifest_uri, metrics_uri, man, n_tasks, error_threshold,
                        off_brick_threshold)
    if stamps_check is not None:
        summary["accounting"].update(stamps_check)
        if not stamps_check["stamps_exact"]:
            raise RuntimeError(f"task accounting of {stamps_uri} is not exact: {stamps_check}")
        storage.put_bytes(storage.join_uri(stamps_uri, "_SUCCESS"), (json.dumps(
            {"format": stamp_writer.FORMAT, "experiment_id": experiment_id,
             "rows": stamps_check["stamps_rows_written"], "code_version": cfg.code_version,
             "injection_config_sha": cfg.config_sha()}, indent=1) + "\n").encode())
    summary.update({
        "experiment_id": experiment_id,
        "written_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "manifest_path": manifest_uri, "cache": cache,
        "stamps_path": stamps_uri if with_stamps else None, "metrics_path": metrics_uri,
        "stamps_stored": with_stamps, "partitions": n_parts, "bricks": n_bricks,
        "code_version": cfg.code_version, "injection_config": cfg.hashed_dict(),
        "injection_config_sha": cfg.config_sha(), "psf_table": table_note,
        "seconds_inject_and_write": round(t_inject, 3),
        "seconds_total": round(time.perf_counter() - t0, 3),
    })
    storage.put_bytes(storage.join_uri(root, "summaries", f"{experiment_id}.json"),
                      (json.dumps(summary, indent=1, default=str) + "\n").encode())
    print(format_summary(summary), flush=True)
    if summary["error_fraction"] > error_threshold:
        LOG.error("%s: %.2f%% of tasks failed (> threshold %.2f%%); top reasons:\n%s",
                  experiment_id, 100 * summary["error_fraction"], 100 * error_threshold,
                  "\n".join(f"  {r['count']:8d}  {r['status']}: {r['status_reason']}"
                            for r in summary["top_failure_reasons"]))
    if summary["off_brick_fraction"] > off_brick_threshold:
        LOG.error("%s: %.2f%% of tasks are off_brick (> threshold %.2f%%): real DR10 targets "
                  "lie well inside their brick; check the manifest's brickname/ra/dec and the "
                  "stamp size (--off-brick-threshold)", experiment_id,
                  100 * summary["off_brick_fraction"], 100 * off_brick_threshold)
    return summary


def _check_stamps(spark, stamps_uri: str, n_tasks: int) -> dict:
    """Row and task_id counts of the stamps the workers wrote (Parquet footers + one column).
    Each row of the metrics dataset was yielded right after its stamps row was written, so
    equal counts of distinct task ids (checked against the manifest by :func:`summarise`)
    mean the two datasets hold the same tasks."""
    from pyspark.sql import functions as F

    try:
        st = spark.read.parquet(spark_path(stamps_uri))
    except Exception as exc:  # noqa: BLE001 - no file at all: reported as a mismatch
        return {"stamps_rows_written": 0, "stamps_distinct_task_ids": 0, "stamps_exact": False,
                "stamps_error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    r = st.agg(F.count(F.lit(1)).alias("n"), F.countDistinct("task_id").alias("ids")).first()
    out = {"stamps_rows_written": int(r["n"]), "stamps_distinct_task_ids": int(r["ids"])}
    out["stamps_exact"] = out["stamps_rows_written"] == n_tasks == out["stamps_distinct_task_ids"]
    return out


def _write(spark, df, uri: str) -> None:
    """Parquet (zstd) partitioned by split.  The rows arrive grouped by brick, and each brick
    lies in one split, so Spark's per-task sort on the partition column is disabled
    (concurrent writers instead: at most 3 splits open per task)."""
    conf = spark.conf
    keys = {"spark.sql.maxConcurrentOutputFileWriters": "4",
            "spark.sql.optimizer.plannedWrite.enabled": "false"}
    old = {k: conf.get(k, None) for k in keys}
    for k, v in keys.items():
        conf.set(k, v)
    try:
        (df.write.mode("overwrite").option("compression", "zstd").partitionBy("split")
         .parquet(spark_path(uri)))
    finally:
        for k, v in old.items():
            if v is None:
                conf.unset(k)
            else:
                conf.set(k, v)


def status_fractions(by_status: dict, n_tasks: int) -> tuple[float, float]:
    """(fraction of tasks neither ok nor off_brick, fraction off_brick); (0, 0) for none."""
    if not n_tasks:
        return 0.0, 0.0
    failed = sum(v for k, v in by_status.items() if k not in inj.TOLERATED_STATUSES)
    return failed / n_tasks, by_status.get("off_brick", 0) / n_tasks


def exit_code_for(by_status: dict, n_tasks: int, error_threshold: float,
                  off_brick_threshold: float) -> int:
    """2 when the fraction of tasks neither ok nor off_brick exceeds ``error_threshold`` or
    the off_brick fraction exceeds ``off_brick_threshold``; else 0."""
    frac, off_frac = status_fractions(by_status, n_tasks)
    return EXIT_TOO_MANY_ERRORS if (frac > error_threshold or
                                    off_frac > off_brick_threshold) else 0


def summarise(spark, manifest_uri: str, metrics_uri: str, man, n_tasks: int,
              error_threshold: float, off_brick_threshold: float = 0.001) -> dict:
    """Accounting and summaries from the WRITTEN metrics parquet (never re-computed)."""
    from pyspark.sql import functions as F

    m = spark.read.parquet(spark_path(metrics_uri))
    tot = m.agg(F.count(F.lit(1)).alias("n"), F.countDistinct("task_id").alias("ids")).first()
    ids_out = m.select("task_id")
    ids_in = man.select("task_id")
    missing = ids_in.join(ids_out, "task_id", "left_anti").count()
    extra = ids_out.join(ids_in, "task_id", "left_anti").count()
    accounting = {"tasks_in_manifest": n_tasks, "rows_written": int(tot["n"]),
                  "distinct_task_ids_written": int(tot["ids"]),
                  "manifest_tasks_missing_from_output": int(missing),
                  "output_tasks_not_in_manifest": int(extra)}
    accounting["exact"] = (accounting["rows_written"] == n_tasks
                           and accounting["distinct_task_ids_written"] == n_tasks
                           and missing == 0 and extra == 0)
    by = m.groupBy("split", "is_control", "status").count().collect()
    by_status: dict = {}
    by_split: dict = {}
    for r in by:
        by_status[r["status"]] = by_status.get(r["status"], 0) + r["count"]
        d = by_split.setdefault(r["split"], {})
        key = f"{'control' if r['is_control'] else 'injection'}:{r['status']}"
        d[key] = d.get(key, 0) + r["count"]
    frac, off_frac = status_fractions(by_status, n_tasks)
    top = (m.filter(~F.col("status").isin(*inj.TOLERATED_STATUSES))
           .groupBy("status", "status_reason").count()
           .orderBy(F.desc("count"), "status", "status_reason").limit(10).collect())
    psf = {}
    for b in inj.BANDS:
        psf[b] = {r[0]: r[1] for r in m.filter(F.col("status") == "ok")
                  .groupBy(f"psf_source_{b}").count().collect()}
    ok_inj = m.filter((F.col("status") == "ok") & (F.col("is_control") == 0))
    probs = [0.05, 0.25, 0.5, 0.75, 0.95]
    quant = {}
    for c in ("arc_snr", "arc_snr_region", "mu_total", "mu_point", "image1_mu", "n_images",
              "image_sep_max_arcsec", "psf_fwhm_used_g",
              "psf_fwhm_used_r", "psf_fwhm_used_z"):
        q = ok_inj.select(c).na.drop().approxQuantile(c, probs, 1e-3)
        quant[c] = dict(zip([f"p{int(p * 100)}" for p in probs], q)) if q else {}
    nonnull_mu = ok_inj.agg(F.count(F.lit(1)).alias("n"),
                            F.count("mu_total").alias("mu")).first()
    summary = {
        "accounting": accounting, "by_status": dict(sorted(by_status.items())),
        "by_split": {k: dict(sorted(v.items())) for k, v in sorted(by_split.items())},
        "error_fraction": frac, "error_threshold": error_threshold,
        "off_brick_fraction": off_frac, "off_brick_threshold": off_brick_threshold,
        "top_failure_reasons": [{"status": r["status"], "status_reason": r["status_reason"],
                                 "count": int(r["count"])} for r in top],
        "psf_source_counts_ok_rows": psf, "quantiles_ok_injections": quant,
        "ok_injections": int(nonnull_mu["n"]), "ok_injections_with_mu_total": int(nonnull_mu["mu"]),
    }
    if not accounting["exact"]:
        raise RuntimeError(f"task accounting of {metrics_uri} is not exact: {accounting}")
    summary["exit_code"] = exit_code_for(by_status, n_tasks, error_threshold,
                                         off_brick_threshold)
    return summary


def format_summary(s: dict) -> str:
    """Human-readable table of a 4c summary."""
    a = s["accounting"]
    lines = [f"stage 4c {s.get('experiment_id', '')}: task accounting "
             f"{'EXACT' if a['exact'] else 'MISMATCH'}: manifest {a['tasks_in_manifest']}, "
             f"written {a['rows_written']} ({a['distinct_task_ids_written']} distinct), "
             f"missing {a['manifest_tasks_missing_from_output']}, "
             f"extra {a['output_tasks_not_in_manifest']}"]
    lines.append("  status counts: " + ", ".join(f"{k} {v}" for k, v in s["by_status"].items()))
    for split, d in s["by_split"].items():
        lines.append(f"  {split}: " + ", ".join(f"{k} {v}" for k, v in d.items()))
    lines.append(f"  failed fraction {100 * s['error_fraction']:.2f}% (threshold "
                 f"{100 * s['error_threshold']:.2f}%), off_brick "
                 f"{100 * s.get('off_brick_fraction', 0.0):.2f}% (threshold "
                 f"{100 * s.get('off_brick_threshold', 0.0):.2f}%) -> exit {s['exit_code']}")
    for r in s["top_failure_reasons"][:5]:
        lines.append(f"    {r['count']:7d} {r['status']}: {str(r['status_reason'])[:150]}")
    for b, d in s["psf_source_counts_ok_rows"].items():
        lines.append(f"  psf_source_{b}: " + ", ".join(f"{k} {v}" for k, v in sorted(
            d.items(), key=lambda kv: str(kv[0]))))
    for c, q in s["quantiles_ok_injections"].items():
        if q:
            lines.append(f"  {c}: " + " ".join(f"{k}={v:.3g}" for k, v in q.items()))
    return "\n".join(lines)
