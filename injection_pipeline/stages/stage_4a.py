"""Stage 4a: injection task manifests (Spark glue around :mod:`injection_pipeline.manifests`).

Inputs: a parent catalogue (Parquet: brickname, objid, ra, dec, flux_r, ...) and the DR10
survey-bricks table (FITS, local path or s3://).  Outputs under ``<out>/phase4a/<variant>/``::

    targets/classified/              every catalogue row + ``reason`` (null = valid target)
    targets/ranked/                  valid, deduplicated targets with split and ranks
    manifests/<experiment_id>/       the task manifest (Parquet, MANIFEST_COLUMNS)
    rejections/<experiment_id>/      rejected conditioned candidates (REJECTION_COLUMNS)
    summaries/<experiment_id>.json   counts computed from the written manifest
    bricks/<experiment_id>.txt       distinct bricks of one experiment (sorted)
    bricks.txt                       union over all experiments present: input of stage 4b

Spark table I/O uses plain local paths locally and ``s3://`` (EMRFS) on EMR; the small side
files go through :mod:`injection_pipeline.storage` (local or s3 anywhere).  See
docs/manifests.md and docs/storage.md.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import math
import time
from typing import Any, Iterator

from injection_pipeline import manifests as mf
from injection_pipeline import storage
from injection_pipeline.spark_session import check_spark_filesystem, spark_path

NAME = "4a"
HELP = "injection task manifests (every random choice frozen) + bricks list for 4b"
LOG = logging.getLogger("phase4.4a")

CLASSIFIED_COLUMNS = ((("brickname", "string"), ("objid", "bigint"), ("ra", "double"),
                       ("dec", "double"), ("lens_mag_r", "double"), ("healpix_cell", "bigint"),
                       ("split", "string"), ("target_key", "bigint"), ("rank_bucket", "int"),
                       ("flux_r", "double"), ("maskbits", "bigint"))
                      + tuple((c, "double") for c in mf.LENS_CATALOGUE_COLUMNS)
                      + (("reason", "string"),))
#: columns of a rejected conditioned candidate written to rejections/<experiment_id>/
REJECTION_COLUMNS = ("task_id", "split", "brickname", "objid", "reject_reason", "lens_z",
                     "lens_sigma_kms", "theta_e_arcsec", "src_z", "src_mag_r",
                     "src_reff_arcsec", "src_offset_frac", "accept_mu_est", "accept_snr_est")


# =========================================================================== CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of stage 4a (defaults None = value from the conf files)."""
    g = p.add_argument_group("inputs / outputs")
    g.add_argument("--catalogue", required=True,
                   help="parent catalogue Parquet (file or directory; Spark path)")
    g.add_argument("--survey-bricks", required=True,
                   help="DR10 survey-bricks FITS(.gz) table (local path or s3://)")
    g.add_argument("--variant", default="default",
                   help="output sub-directory <out>/phase4a/<variant>/")
    g.add_argument("--experiments", default=None,
                   help="comma-separated experiment ids or tiers (debug,grid,train); all if unset")
    g.add_argument("--rows-per-file", type=int, default=None,
                   help="target manifest rows per Parquet file (files hold whole bricks; "
                        "conf [defaults] rows_per_file)")
    c = p.add_argument_group("overrides of conf/ (unset = conf value)")
    c.add_argument("--seed", type=int, default=None, help="global seed of all frozen draws")
    c.add_argument("--split-seed", type=int, default=None, help="seed of the sky split")
    c.add_argument("--healpix-nside", type=int, default=None, help="split cell nside (power of 2)")
    c.add_argument("--guard-band", action=argparse.BooleanOptionalAction, default=None,
                   help="exclude bricks next to a cell of another split")
    c.add_argument("--guard-nside", type=int, default=None, help="guard-band cell nside")
    c.add_argument("--replicates", type=int, default=None, help="replicates per (target, point)")
    c.add_argument("--control-pairing", choices=mf.PAIRINGS, default=None,
                   help="paired controls share an injection row's cutout (pair_id)")
    for tier in ("train", "grid", "debug"):
        c.add_argument(f"--control-frac-{tier}", type=float, default=None,
                       help=f"fraction of control rows in {tier} experiments")
    for tier in ("debug", "grid"):
        c.add_argument(f"--n-per-config-{tier}", type=int, default=None,
                       help=f"targets per grid point in {tier} experiments")
    c.add_argument("--n-total-train-per-split", type=int, default=None,
                   help="rows per split of random-sampling (train) experiments")
    c.add_argument("--brightness-train", choices=mf.BRIGHTNESS_MODES, default=None,
                   help="source brightness of train experiments: relative (src_dmag) or "
                        "absolute (population prior)")
    c.add_argument("--lens-model-train", choices=mf.LENS_MODELS, default=None,
                   help="lens model of train experiments: conditioned (deflector from the "
                        "target galaxy, source population, acceptance) or independent (priors)")
    c.add_argument("--exclude-centre-maskbits", default=None,
                   help="comma-separated DR10 maskbits that exclude a target at its centre "
                        "(conf [targets]); 'none' for no exclusion")
    c.add_argument("--max-total-tasks", type=int, default=None,
                   help="refuse to plan more tasks than this (conf default 50,000,000)")


def config_from_args(args) -> mf.ManifestConfig:
    ov: dict[str, Any] = {
        "seed": args.seed, "split_seed": args.split_seed, "healpix_nside": args.healpix_nside,
        "guard_band": args.guard_band, "guard_nside": args.guard_nside,
        "replicates": args.replicates, "control_pairing": args.control_pairing,
        "max_total_tasks": args.max_total_tasks,
        "n_total_train_per_split": args.n_total_train_per_split,
        "control_frac.train": args.control_frac_train, "control_frac.grid": args.control_frac_grid,
        "control_frac.debug": args.control_frac_debug,
        "n_per_config.debug": args.n_per_config_debug, "n_per_config.grid": args.n_per_config_grid,
        "brightness.train": args.brightness_train,
        "lens_model.train": args.lens_model_train,
    }
    if args.exclude_centre_maskbits is not None:
        v = args.exclude_centre_maskbits.strip()
        ov["exclude_centre_maskbits"] = [] if v.lower() == "none" else \
            [b.strip().upper() for b in v.split(",") if b.strip()]
    exps = [e.strip() for e in args.experiments.split(",") if e.strip()] if args.experiments else None
    return mf.load_config(args.config, experiments=exps, overrides=ov)


def run(args) -> int:
    """Entry point used by spark_phase4_pipeline.py."""
    from injection_pipeline.spark_session import build_spark

    cfg = config_from_args(args)
    est = mf.check_task_budget(cfg)  # before any Spark work
    LOG.info("experiments: %s", ", ".join(f"{k} (~{v:,.0f} rows)" for k, v in est.items()))
    spark = build_spark(args.master, app_name="phase4-4a", verbose=args.verbose)
    summaries = run_stage_4a(spark, cfg, catalogue=args.catalogue,
                             survey_bricks=args.survey_bricks, out=args.out,
                             variant=args.variant,
                             rows_per_file=args.rows_per_file or cfg.rows_per_file)
    for eid, s in summaries.items():
        LOG.info("%s: %s rows (%s controls) on %s bricks", eid, f"{s['rows_total']:,}",
                 f"{s['controls']:,}", f"{s['bricks_touched']:,}")
    return 0


# =========================================================================== the stage
def _classify_batches(bricks_bc, exclude_maskbits: int):
    import pyarrow as pa

    schema = pa.schema([(n, {"string": pa.string(), "bigint": pa.int64(), "double": pa.float64(),
                             "int": pa.int32()}[t]) for n, t in CLASSIFIED_COLUMNS])

    def fn(batches: Iterator["pa.RecordBatch"]):
        look = bricks_bc.value
        for rb in batches:
            out = mf.classify_targets(rb.to_pandas(), look, exclude_maskbits)
            yield pa.RecordBatch.from_pandas(out, schema=schema, preserve_index=False)
    return fn


def _expand_batches(exp: mf.Experiment, cfg: mf.ManifestConfig, m: int, m_split: dict):
    import pyarrow.compute as pc

    def fn(batches):
        for rb in batches:
            cols = {k: rb.column(k).to_numpy(zero_copy_only=False) for k in mf.TARGET_COLUMNS}
            table = mf.expand_targets(cols, exp, cfg, m, m_split, include_rejected=True)
            accepted = table.filter(pc.is_null(table.column("reject_reason")))
            mf.validate_manifest(accepted.drop_columns(["reject_reason"]))
            yield from table.to_batches(max_chunksize=65536)
    return fn


def spark_manifest_schema():
    """Spark StructType of :data:`manifests.MANIFEST_COLUMNS`."""
    from pyspark.sql import types as T

    st = {"string": T.StringType(), "int64": T.LongType(), "int32": T.IntegerType(),
          "int16": T.ShortType(), "int8": T.ByteType(), "float64": T.DoubleType(),
          "bool": T.BooleanType()}
    return T.StructType([T.StructField(c.name, st[c.type], True) for c in mf.MANIFEST_COLUMNS])


def _with_reject_reason(schema):
    from pyspark.sql import types as T
    return T.StructType(list(schema.fields) + [T.StructField("reject_reason", T.StringType(), True)])


def _read_bricks(survey_bricks: str) -> dict:
    from injection_pipeline import dr10

    with storage.download_to_temp(survey_bricks) as path:
        return dr10.read_survey_bricks(path)


def prepare_targets(spark, cfg: mf.ManifestConfig, catalogue: str, survey_bricks: str,
                    root: str) -> dict:
    """Classify, deduplicate and rank the catalogue; write targets/classified and ranked.

    Returns counts read back from the written data: rows_in, excluded_by_reason,
    valid_targets, valid_by_split.
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    bricks = _read_bricks(survey_bricks)
    look = mf.brick_lookup(bricks, cfg.split)
    LOG.info("survey-bricks: %d bricks (%d in the guard band); split cells nside=%d",
             len(look), int(look["guard"].sum()), cfg.split.nside)
    cat = spark.read.parquet(spark_path(catalogue))
    mf.check_required_columns(cat.columns, catalogue)
    # names and types of every documented DR10 column, up front (docs/dr10.md)
    from pyspark.sql.pandas.types import to_arrow_schema

    from injection_pipeline import dr10
    dr10.validate_parent_catalogue(to_arrow_schema(cat.schema), label=catalogue)
    have = {c.lower(): c for c in cat.columns}
    optional = ("maskbits",) + mf.LENS_CATALOGUE_COLUMNS
    absent = [c for c in optional if c not in have]
    if absent:
        LOG.warning("%s: optional column(s) %s absent: null for every target (maskbits: no "
                    "centre-maskbit selection; lens columns: the conditioned model records "
                    "its fallbacks per row)", catalogue, absent)
    cat = cat.select(F.col("brickname").cast("string"), F.col("objid").cast("double"),
                     F.col("ra").cast("double"), F.col("dec").cast("double"),
                     F.col("flux_r").cast("double"),
                     *[(F.col(have[c]) if c in have else F.lit(None)).cast(
                         "bigint" if c == "maskbits" else "double").alias(c) for c in optional])
    ddl = ", ".join(f"{n} {t}" for n, t in CLASSIFIED_COLUMNS)
    bc = spark.sparkContext.broadcast(look)
    classified = cat.mapInArrow(_classify_batches(bc, cfg.exclude_maskbits_mask), ddl)
    # dedup: one row per (brickname, objid), the first valid one (then by ra, dec, mag);
    # every further copy is excluded as duplicate_target whatever its own validity
    w = Window.partitionBy("brickname", "objid").orderBy(
        F.col("reason").isNotNull(), "ra", "dec", "lens_mag_r", "reason")
    is_dup = (F.col("_rn") > 1) & (F.coalesce(F.col("reason"), F.lit("")) != "missing_id")
    classified = (classified.withColumn("_rn", F.row_number().over(w))
                  .withColumn("reason", F.when(is_dup, F.lit("duplicate_target"))
                              .otherwise(F.col("reason")))
                  .drop("_rn"))
    cls_path = spark_path(storage.join_uri(root, "targets", "classified"))
    classified.write.mode("overwrite").parquet(cls_path)
    bc.unpersist()

    written = spark.read.parquet(cls_path)
    reasons = {r["reason"]: r["count"] for r in written.groupBy("reason").count().collect()}
    rows_in = int(sum(reasons.values()))
    valid_n = int(reasons.pop(None, 0))
    excluded = {k: int(reasons.get(k, 0)) for k in mf.EXCLUSION_REASONS}
    for k, v in excluded.items():
        if v:
            LOG.warning("excluded %d catalogue row(s): %s", v, k)

    valid = written.filter(F.col("reason").isNull()).drop("reason")
    counts = valid.groupBy("split", "rank_bucket").count().collect()
    nb = 1 << mf.RANK_BUCKET_BITS
    by_b = [0] * nb
    by_sb: dict[tuple[str, int], int] = {}
    for r in counts:
        by_b[r["rank_bucket"]] += r["count"]
        by_sb[(r["split"], r["rank_bucket"])] = r["count"]
    off_g = [sum(by_b[:b]) for b in range(nb)]
    splits = sorted({s for s, _ in by_sb})
    offs = [(s, b, off_g[b], sum(by_sb.get((s, bb), 0) for bb in range(b)))
            for s in splits for b in range(nb)]
    off_df = spark.createDataFrame(offs, "split string, rank_bucket int, off_g long, off_s long")
    order = ("target_key", "brickname", "objid")
    wb = Window.partitionBy("rank_bucket").orderBy(*order)
    wsb = Window.partitionBy("split", "rank_bucket").orderBy(*order)
    ranked = (valid.join(F.broadcast(off_df), ["split", "rank_bucket"])
              .withColumn("rank_global", F.col("off_g") + F.row_number().over(wb) - 1)
              .withColumn("rank_split", F.col("off_s") + F.row_number().over(wsb) - 1)
              .select(*mf.TARGET_COLUMNS))
    ranked.write.mode("overwrite").parquet(spark_path(storage.join_uri(root, "targets", "ranked")))
    by_split = {s: sum(v for (ss, _), v in by_sb.items() if ss == s) for s in splits}
    LOG.info("targets: %d catalogue rows, %d valid (%s)", rows_in, valid_n,
             ", ".join(f"{s} {n}" for s, n in sorted(by_split.items())))
    n_mask_null = written.filter(F.col("maskbits") < 0).count()
    return {"rows_in": rows_in, "valid_targets": valid_n, "valid_by_split": by_split,
            "excluded_by_reason": excluded, "bricks_in_table": int(len(look)),
            "bricks_in_guard_band": int(look["guard"].sum()),
            "centre_maskbits": {"excluded_bits": list(cfg.exclude_centre_maskbits),
                                "rows_without_maskbits": int(n_mask_null)},
            "optional_columns_absent": absent}


def write_manifest(spark, cfg: mf.ManifestConfig, exp: mf.Experiment, root: str,
                   targets_info: dict, rows_per_file: int = 500_000) -> str:
    """Expand one experiment from targets/ranked and write its manifest; returns its path.

    Targets are range-partitioned by brickname BEFORE the fan-out (sampling the small target
    table, not the tasks), so each output file holds whole bricks, sorted by brick, objid,
    task_id; the number of files is ~ rows / rows_per_file.
    """
    m, m_split = targets_info["valid_targets"], dict(targets_info["valid_by_split"])
    n_splits = sum(1 for _, f in cfg.split.fractions if f > 0)
    if exp.sampling == "random":
        for s, f in cfg.split.fractions:
            if f > 0 and not m_split.get(s):
                LOG.warning("%s: split %r has no valid target: it gets no rows",
                            exp.experiment_id, s)
    n_files = max(1, math.ceil(exp.expected_tasks(n_splits) / max(1, rows_per_file)))
    targets = spark.read.parquet(spark_path(storage.join_uri(root, "targets", "ranked")))
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    path = spark_path(storage.join_uri(root, "manifests", exp.experiment_id))
    rej_path = rejections_path(path, exp.experiment_id)
    expanded = (targets.repartitionByRange(n_files, "brickname")
                .mapInArrow(_expand_batches(exp, cfg, m, m_split),
                            _with_reject_reason(spark_manifest_schema())))
    # one expansion feeds both outputs (accepted rows -> manifest, rejected -> rejections)
    expanded = expanded.persist(StorageLevel.MEMORY_AND_DISK)
    tasks = (expanded.filter(F.col("reject_reason").isNull()).drop("reject_reason")
             .sortWithinPartitions("brickname", "objid", "task_id"))
    tasks.write.mode("overwrite").option("compression", "zstd").parquet(path)
    (expanded.filter(F.col("reject_reason").isNotNull()).select(*REJECTION_COLUMNS)
     .write.mode("overwrite").option("compression", "zstd").parquet(rej_path))
    expanded.unpersist()
    return path


def summarise_manifest(spark, cfg: mf.ManifestConfig, exp: mf.Experiment, path: str,
                       targets_info: dict) -> tuple[dict, list[str]]:
    """Summary dict and sorted distinct bricks, computed from the WRITTEN manifest."""
    from pyspark.sql import functions as F

    df = spark.read.parquet(path)
    agg = df.groupBy("split", "is_control").agg(
        F.count(F.lit(1)).alias("n"),
        F.sum(F.when(F.col("pair_id").isNotNull(), 1).otherwise(0)).alias("paired")).collect()
    tot = df.agg(F.count(F.lit(1)).alias("n"), F.countDistinct("task_id").alias("ids"),
                 F.countDistinct("brickname", "objid").alias("targets")).first()
    if tot["n"] != tot["ids"]:
        raise RuntimeError(f"{path}: task_id not unique ({tot['n']} rows, {tot['ids']} ids)")
    bricks = sorted(r[0] for r in df.select("brickname").distinct().collect())
    by_split: dict[str, dict[str, int]] = {}
    ctrl = paired = 0
    for r in agg:
        d = by_split.setdefault(r["split"], {"injections": 0, "controls": 0, "total": 0})
        d["controls" if r["is_control"] else "injections"] += r["n"]
        d["total"] += r["n"]
        if r["is_control"]:
            ctrl += r["n"]
            paired += r["paired"]
    n_splits = sum(1 for _, f in cfg.split.fractions if f > 0)
    summary = {
        "experiment_id": exp.experiment_id,
        "written_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "manifest_path": path,
        "config_sha": cfg.config_sha(exp), "seed": cfg.seed,
        "experiment": exp.to_dict(), "split_config": {
            "split_seed": cfg.split.split_seed, "fractions": dict(cfg.split.fractions),
            "healpix_nside": cfg.split.nside, "guard_band": cfg.split.guard_band,
            "guard_nside": cfg.split.guard_nside},
        "config_files": list(cfg.sources),
        "rows_total": int(tot["n"]), "rows_expected": exp.expected_tasks(n_splits),
        "injections": int(tot["n"] - ctrl), "controls": int(ctrl),
        "paired_controls": int(paired),
        "control_fraction": (ctrl / tot["n"]) if tot["n"] else None,
        "rows_by_split": dict(sorted(by_split.items())),
        "targets_used": int(tot["targets"]), "bricks_touched": len(bricks),
        "lens_model": exp.lens_model,
        "acceptance": _acceptance_summary(spark, exp, path, int(tot["n"] - ctrl)),
        "input": targets_info,
    }
    return summary, bricks


def rejections_path(manifest_path: str, experiment_id: str) -> str:
    """``<root>/rejections/<experiment_id>`` next to ``<root>/manifests/<experiment_id>``."""
    tail = f"/manifests/{experiment_id}"
    if not manifest_path.rstrip("/").endswith(tail):
        raise ValueError(f"{manifest_path}: not a manifest path ending in {tail}")
    return manifest_path.rstrip("/")[:-len(tail)] + f"/rejections/{experiment_id}"


def _acceptance_summary(spark, exp: mf.Experiment, manifest_path: str, injections: int) -> dict:
    """Candidates, accepted and rejected-by-reason counts, from the WRITTEN rejections."""
    rej_path = rejections_path(manifest_path, exp.experiment_id)
    rej = spark.read.parquet(rej_path)
    by_reason = {r["reject_reason"]: int(r["count"])
                 for r in rej.groupBy("reject_reason").count().collect()}
    from injection_pipeline.population.acceptance import REJECT_REASONS
    n_rej = sum(by_reason.values())
    cand = injections + n_rej
    return {"candidates": cand, "accepted": injections, "rejected": n_rej,
            "rejected_by_reason": {k: by_reason.get(k, 0) for k in REJECT_REASONS},
            "acceptance_rate": (injections / cand) if cand else None,
            "rejections_path": rej_path,
            "applies": exp.lens_model == "conditioned"}


def run_stage_4a(spark, cfg: mf.ManifestConfig, *, catalogue: str, survey_bricks: str, out: str,
                 variant: str = "default", rows_per_file: int = 500_000) -> dict[str, dict]:
    """Run stage 4a for every experiment of ``cfg``; returns {experiment_id: summary}."""
    mf.check_task_budget(cfg)
    root = storage.join_uri(out, "phase4a", variant)
    check_spark_filesystem(spark, root)
    t0 = time.perf_counter()
    LOG.info("==== stage 4a: manifests -> %s (%d experiment(s)) ====", root, len(cfg.experiments))
    info = prepare_targets(spark, cfg, catalogue, survey_bricks, root)
    if info["valid_targets"] == 0:
        raise RuntimeError(f"{catalogue}: no valid target left (excluded: "
                           f"{ {k: v for k, v in info['excluded_by_reason'].items() if v} })")
    info.update(catalogue=catalogue, survey_bricks=survey_bricks)
    summaries = {}
    for exp in cfg.experiments:
        t1 = time.perf_counter()
        LOG.info("---- 4a %s ----", exp.experiment_id)
        path = write_manifest(spark, cfg, exp, root, info, rows_per_file)
        summary, bricks = summarise_manifest(spark, cfg, exp, path, info)
        summary["seconds"] = round(time.perf_counter() - t1, 3)
        storage.put_bytes(storage.join_uri(root, "summaries", f"{exp.experiment_id}.json"),
                          (json.dumps(summary, indent=1, default=str) + "\n").encode())
        storage.put_bytes(storage.join_uri(root, "bricks", f"{exp.experiment_id}.txt"),
                          ("\n".join(bricks) + "\n").encode())
        summaries[exp.experiment_id] = summary
        LOG.info("%s: %d rows in %.1f s", exp.experiment_id, summary["rows_total"],
                 summary["seconds"])
    all_bricks = write_bricks_union(root)
    LOG.info("==== stage 4a done in %.1f s: %d bricks for 4b in %s ====",
             time.perf_counter() - t0, len(all_bricks), storage.join_uri(root, "bricks.txt"))
    return summaries


def write_bricks_union(root: str) -> list[str]:
    """bricks.txt = union of bricks/<experiment>.txt of every experiment under ``root``."""
    names: set[str] = set()
    for obj in storage.list_objects(storage.join_uri(root, "bricks") + "/", recursive=False):
        if obj.uri.endswith(".txt"):
            names.update(x for x in storage.get_bytes(obj.uri).decode().split() if x)
    out = sorted(names)
    storage.put_bytes(storage.join_uri(root, "bricks.txt"), ("\n".join(out) + "\n").encode())
    return out
