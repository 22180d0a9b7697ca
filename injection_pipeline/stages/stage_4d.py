"""Stage 4d: completeness and the selection function of a lens finder from its scores
(Spark glue around :mod:`injection_pipeline.analysis.completeness`; docs/completeness.md).

    spark_phase4_pipeline.py 4d --out OUT --variant V --experiment-id E --scores SCORES \
        [--tag NAME] [--score-column score] [--splits test] [--fpr 0.01,0.001] [--threshold T,...] \
        [--confidence 0.95] [--allow-train-split] [--no-plots]

Inputs: the 4c metrics ``OUT/phase4c/V/metrics/E/`` and SCORES (Parquet: ``task_id`` and the
score column; local path or s3://).  Outputs under ``OUT/phase4d/V/E/`` (``.../E/<tag>/``
with ``--tag``):
``completeness.parquet``, ``summary.json`` and the PNGs of
:func:`injection_pipeline.analysis.completeness.plot`.

Every count is a Spark aggregation (nothing per task is collected to the driver): the
exclusion accounting (one groupBy), the FPR thresholds (the (k+1)-th largest control score by
a sort + offset, exact), the per-bin counts (one groupBy per variable and map), the exact ROC
AUC per split (distinct scores, cumulative window sums per split) and at most
``roc_points`` ROC points per split.  The table is finished by the pure API's
:func:`~injection_pipeline.analysis.completeness.table_from_counts` (one definition).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import io
import json
import logging
import math
import os
import tempfile
import time
from typing import Optional, Sequence

import pandas as pd

from injection_pipeline import storage
from injection_pipeline.analysis import completeness as cp
from injection_pipeline.provenance import code_version
from injection_pipeline.spark_session import check_spark_filesystem, spark_path

NAME = "4d"
HELP = "completeness vs theta_E, arc S/N, magnitudes... from a lens finder's scores"
LOG = logging.getLogger("phase4.4d")


def _floats(s: Optional[str]) -> Optional[tuple]:
    if s is None:
        return None
    return tuple(float(x) for x in s.split(",") if x.strip())


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("inputs / outputs")
    g.add_argument("--variant", default="default", help="<out>/phase4c/<variant>/ (input) and "
                   "<out>/phase4d/<variant>/ (output)")
    g.add_argument("--experiment-id", required=True, help="experiment id of the 4c metrics")
    g.add_argument("--scores", required=True, help="Parquet file/directory with task_id and "
                   "the score column (local or s3://)")
    g.add_argument("--score-column", default=None, help="score column (conf: score)")
    g.add_argument("--tag", default=None, help="write into <out>/phase4d/<variant>/"
                   "<experiment-id>/<tag>/ (e.g. the finder's name; default: no sub-folder)")
    g.add_argument("--metrics", default=None, help="explicit 4c metrics directory (default "
                   "<out>/phase4c/<variant>/metrics/<experiment-id>)")
    s = p.add_argument_group("statistics (unset = conf/completeness.toml)")
    s.add_argument("--splits", default=None, help="comma-separated splits counted (conf: test)")
    s.add_argument("--fpr", default=None, help="comma-separated false-positive rates of the "
                   "thresholds (conf: 0.01,0.001); '' for none")
    s.add_argument("--threshold", default=None, help="comma-separated fixed score thresholds "
                   "(detected = score > threshold)")
    s.add_argument("--confidence", type=float, default=None, help="Wilson interval confidence "
                   "(conf: 0.95)")
    s.add_argument("--allow-train-split", action="store_true", help="allow counting the "
                   "train split (optimistic for a finder trained on it)")
    s.add_argument("--no-plots", action="store_true", help="skip the PNGs")


def run(args) -> int:
    from injection_pipeline.spark_session import build_spark

    cfg = cp.load_config(args.config)
    spark = build_spark(args.master, app_name="phase4-4d", verbose=args.verbose)
    try:
        s = run_stage_4d(
            spark, cfg, out=args.out, variant=args.variant, experiment_id=args.experiment_id,
            scores=args.scores, score_column=args.score_column, metrics=args.metrics,
            tag=args.tag,
            splits=None if args.splits is None else args.splits.split(","),
            fpr=_floats(args.fpr), thresholds=_floats(args.threshold) or (),
            confidence=args.confidence, allow_train_split=args.allow_train_split,
            plots=not args.no_plots)
    except cp.CompletenessError as exc:
        LOG.error("stage 4d: %s", exc)
        return 1
    print(format_summary(s), flush=True)
    return 0


# =========================================================================== Spark
def _bin_expr(F, x, edges: Sequence[float]):
    """Spark twin of completeness.bin_index: -2 null/NaN, -1 outside, else the bin."""
    idx = sum((x >= float(e)).cast("int") for e in edges[1:-1]) if len(edges) > 2 else F.lit(0)
    return (F.when(x.isNull() | F.isnan(x), F.lit(-2))
            .when((x >= float(edges[0])) & (x < float(edges[-1])), idx)
            .otherwise(F.lit(-1)))


def _value_expr(F, v: cp.Variable, column: str):
    x = F.col(column).cast("double")
    if v.derive == "ab_mag":
        return F.when(x > 0, F.lit(cp.AB_ZEROPOINT) - 2.5 * F.log10(x))
    return x


#: above this many rows the (k+1)-th largest control score is found by a sort + offset
#: instead of collecting the top k+1 scores (TakeOrderedAndProject, no full sort)
TOPK_COLLECT_MAX = 200_000


def _kth_largest(F, df, k: int) -> float:
    """The (k+1)-th largest ``_score`` of ``df`` (k = 0: the maximum), exact."""
    if k + 1 <= TOPK_COLLECT_MAX:
        top = df.orderBy(F.desc("_score")).limit(k + 1).collect()
        return float(top[-1][0])
    return float(df.orderBy(F.desc("_score")).offset(k).limit(1).first()[0])


def run_stage_4d(spark, cfg: cp.Config, *, out: str, variant: str, experiment_id: str,
                 scores: str, score_column: Optional[str] = None,
                 metrics: Optional[str] = None, tag: Optional[str] = None,
                 splits=None, fpr=None,
                 thresholds: Sequence[float] = (), confidence: Optional[float] = None,
                 allow_train_split: bool = False, plots: bool = True) -> dict:
    """Run 4d for one experiment; returns the summary (also written as summary.json)."""
    from pyspark.sql import functions as F

    t0 = time.perf_counter()
    splits = cp.check_splits(cfg.splits if splits is None else splits, allow_train_split)
    fpr = tuple(cfg.fpr if fpr is None else fpr)
    thresholds = tuple(float(x) for x in thresholds)
    confidence = cfg.confidence if confidence is None else float(confidence)
    score_column = score_column or cfg.score_column
    cp.check_options(fpr, thresholds, confidence)
    metrics_uri = metrics or storage.join_uri(out, "phase4c", variant, "metrics", experiment_id)
    root = storage.join_uri(out, "phase4d", variant, experiment_id, *([tag] if tag else []))
    for uri in (root, metrics_uri, scores):       # s3:// through EMRFS (docs/storage.md)
        check_spark_filesystem(spark, uri)
    LOG.info("==== stage 4d %s: metrics %s, scores %s[%s] -> %s ====", experiment_id,
             metrics_uri, scores, score_column, root)
    try:
        m = spark.read.parquet(spark_path(metrics_uri))
    except Exception as exc:  # noqa: BLE001 - a missing input is a clear error, not a trace
        raise cp.CompletenessError(f"cannot read the 4c metrics {metrics_uri}: "
                                   f"{type(exc).__name__}: {str(exc)[:200]}") from None
    try:
        sc = spark.read.parquet(spark_path(scores))
    except Exception as exc:  # noqa: BLE001
        raise cp.CompletenessError(f"cannot read the scores {scores}: "
                                   f"{type(exc).__name__}: {str(exc)[:200]}") from None
    miss = [c for c in cp.REQUIRED_COLUMNS if c not in m.columns]
    if miss:
        raise cp.CompletenessError(f"{metrics_uri}: the metrics lack column(s) {miss}")
    for c in ("task_id", score_column):
        if c not in sc.columns:
            raise cp.CompletenessError(f"{scores}: no column {c!r} (have {sc.columns})")
    used, notes = cp.resolve_columns(cfg, m.columns)
    sc = sc.select(F.col("task_id").cast("string").alias("task_id"),
                   F.col(score_column).cast("double").alias("_score"))
    cnt = sc.agg(F.count(F.lit(1)).alias("n"), F.countDistinct("task_id").alias("ids")).first()
    if cnt["n"] != cnt["ids"]:
        raise cp.CompletenessError(f"{scores}: {cnt['n'] - cnt['ids']} duplicate task_id "
                                   "row(s): ambiguous")
    # metrics task_ids are unique by construction: 4c's summary checks its written metrics
    # against the manifest (accounting "exact") before it writes them; not re-checked here

    cols = list(dict.fromkeys(list(cp.REQUIRED_COLUMNS) + list(used.values())))
    j = (m.select(*cols).join(sc.withColumn("_has", F.lit(True)), "task_id", "left")
         .withColumn("_has", F.coalesce(F.col("_has"), F.lit(False)))
         .withColumn("_fin", F.col("_has") & F.col("_score").isNotNull()
                     & ~F.isnan("_score") & (F.abs(F.col("_score")) != float("inf")))
         .withColumn("is_control", F.col("is_control").cast("int")))
    vals = {name: _value_expr(F, cfg.variable(name), col).alias(f"_v_{name}")
            for name, col in used.items()}
    j = j.select("task_id", "split", "status", "is_control", "_score", "_has", "_fin",
                 *vals.values()).persist()
    tphase = {"read_checks": time.perf_counter() - t0}
    t1 = time.perf_counter()
    groups = pd.DataFrame([r.asDict() for r in j.groupBy(
        "split", "status", "is_control", F.col("_has").alias("has_score"),
        F.col("_fin").alias("finite")).count().withColumnRenamed("count", "n").collect()],
        columns=["split", "status", "is_control", "has_score", "finite", "n"])
    # task_ids are unique on both sides: the scores not matched by a metrics row are the rest
    scores_without_task = int(cnt["n"]) - int(groups.loc[groups["has_score"], "n"].sum())
    acc = cp.accounting_from_groups(groups, splits, scores_without_task, int(cnt["n"]))
    tphase["join_accounting"] = time.perf_counter() - t1
    t1 = time.perf_counter()

    base = (F.col("status") == "ok") & F.col("split").isin(*splits) & F.col("_fin")
    ctl = j.filter(base & (F.col("is_control") == 1)).select("_score")
    n_ctl = acc["scored_ok_controls_counted"]
    ths = []
    for f in fpr:
        k = cp.n_allowed_above(n_ctl, f)
        if n_ctl == 0:
            v = float("nan")
        elif k >= n_ctl:
            v = float("-inf")
        else:
            v = _kth_largest(F, ctl, k)
        ths.append(cp.Threshold(cp.threshold_name("fpr", f), v, "fpr", f))
    ths += [cp.Threshold(cp.threshold_name("fixed", t), t, "fixed") for t in thresholds]
    if len({t.name for t in ths}) != len(ths):
        raise cp.CompletenessError(f"duplicate thresholds {[t.name for t in ths]}")
    above = ctl.agg(*[F.sum((F.col("_score") > F.lit(t.value)).cast("long")).alias(f"a{i}")
                      for i, t in enumerate(ths)]).first() if ths else None
    th_rep = [cp.threshold_report(t, n_ctl, int((above[f"a{i}"] or 0) if above else 0))
              for i, t in enumerate(ths)]

    tphase["thresholds"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    # ---- per-bin counts of the counted, scored ok injections
    inj = j.filter(base & (F.col("is_control") == 0))
    bexprs, keys = [], []
    for v in cfg.variables:
        if v.name in used:
            bexprs.append(_bin_expr(F, F.col(f"_v_{v.name}"), v.edges).alias(f"_b_{v.name}"))
            keys.append((v.name, f"_b_{v.name}", None))
    map_rep = []
    for i, mp in enumerate(cfg.maps):
        if mp.x in used and mp.y in used:
            bexprs.append(_bin_expr(F, F.col(f"_v_{mp.x}"), mp.x_edges).alias(f"_mx{i}"))
            bexprs.append(_bin_expr(F, F.col(f"_v_{mp.y}"), mp.y_edges).alias(f"_my{i}"))
            keys.append((f"{mp.x}|{mp.y}", f"_mx{i}", f"_my{i}"))
        else:
            map_rep.append({"x": mp.x, "y": mp.y, "note": "skipped: a variable is missing"})
    dets = [(F.col("_score") > F.lit(t.value)).cast("long").alias(f"_d{i}")
            for i, t in enumerate(ths)]
    parts, var_rep = [], {}
    for v in cfg.variables:
        if v.name not in used:
            var_rep[v.name] = {"column": None, "note": notes[v.name]}
    # one aggregation for every variable and map: unpivot (key, bin, bin2) with stack()
    allrows = []
    if keys:
        stack = "stack({}, {}) as (_key, _bin, _bin2)".format(len(keys), ", ".join(
            f"'{key}', {b1}, {b2 or 'cast(-1 as int)'}" for key, b1, b2 in keys))
        allrows = (inj.select(*bexprs, *dets)
                   .select(F.expr(stack), *[f"_d{i}" for i in range(len(ths))])
                   .groupBy("_key", "_bin", "_bin2")
                   .agg(F.count(F.lit(1)).alias("n"),
                        *[F.sum(f"_d{i}").alias(f"k{i}") for i in range(len(ths))]).collect())
    every = pd.DataFrame([r.asDict() for r in allrows], columns=["_key", "_bin", "_bin2", "n"]
                         + [f"k{i}" for i in range(len(ths))])
    for key, b1, b2 in keys:
        g = every[every["_key"] == key].copy()
        g["bin"] = g["_bin"].astype("int64")
        g["bin2"] = g["_bin2"].astype("int64") if b2 else -1
        if b2 is None:
            v = cfg.variable(key)
            n_of = lambda code: int(g.loc[g["bin"] == code, "n"].sum())  # noqa: E731
            var_rep[key] = {"column": used[key], "variable": cp.output_variable_name(
                v, used[key]), "derive": v.derive, "edges": list(v.edges), "n_null": n_of(-2),
                "n_outside_bins": n_of(-1), "n_in_bins": int(g.loc[g["bin"] >= 0, "n"].sum()),
                "note": notes.get(key)}
        else:
            x, y = key.split("|")
            map_rep.append({"x": x, "y": y, "n_in_bins": int(
                g.loc[(g["bin"] >= 0) & (g["bin2"] >= 0), "n"].sum())})
        g = g[(g["bin"] >= 0) & ((g["bin2"] >= 0) if b2 else True)]
        for i, t in enumerate(ths):
            parts.append(pd.DataFrame({"key": key, "bin": g["bin"], "bin2": g["bin2"],
                                       "threshold_name": t.name, "n_injections": g["n"],
                                       "n_detected": g[f"k{i}"].fillna(0).astype("int64")}))
    var_rep = {v.name: var_rep[v.name] for v in cfg.variables}
    counts = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(
        columns=["key", "bin", "bin2", "threshold_name", "n_injections", "n_detected"])
    table = cp.table_from_counts(counts, cfg, used, ths, confidence, splits)

    tphase["bins"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    # ---- exact ROC AUC per split, thinned curves
    # one Python task per split gets that split's (distinct score, n_pos, n_neg) rows and
    # runs the pure API's roc_from_counts (the same code as cp.compute); memory ~24 bytes per
    # distinct score of the largest split
    okf = j.filter((F.col("status") == "ok") & F.col("_fin"))
    g = okf.groupBy("split", "_score").agg(
        F.sum(1 - F.col("is_control")).cast("long").alias("pos"),
        F.sum("is_control").cast("long").alias("neg"))
    roc_schema = ("split string, i long, fpr double, tpr double, score double, auc double, "
                  "P long, N long")
    roc_rows = g.groupBy("split").applyInPandas(_roc_fn(cfg.roc_points), roc_schema).collect()
    j.unpersist()
    per_split, roc = {}, {}
    for sp in sorted({r["split"] for r in roc_rows}):
        ps = sorted((r for r in roc_rows if r["split"] == sp), key=lambda r: r["i"])
        P, N, auc = int(ps[0]["P"]), int(ps[0]["N"]), ps[0]["auc"]
        auc = float("nan") if auc is None else float(auc)
        per_split[sp] = cp.split_report(sp, {"auc": auc, "n_pos": P, "n_neg": N}, splits)
        roc[sp] = {"fpr": [r["fpr"] for r in ps], "tpr": [r["tpr"] for r in ps],
                   "score": [r["score"] for r in ps]}
    tphase["roc"] = time.perf_counter() - t1
    LOG.info("4d phases [s]: %s", {k: round(v, 2) for k, v in tphase.items()})
    summary = cp.make_summary(score_column=score_column, splits=splits, confidence=confidence,
                              accounting=acc, thresholds=th_rep, per_split=per_split,
                              variables=var_rep, maps=map_rep, roc=roc,
                              n_injections_counted=acc["scored_ok_injections_counted"])
    res = cp.Result(table=table, summary=summary, roc=roc)

    # ---- outputs
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(cp.arrow_table(table), buf, compression="zstd")
    storage.put_bytes(storage.join_uri(root, "completeness.parquet"), buf.getvalue())
    pngs = []
    if plots:
        try:
            with tempfile.TemporaryDirectory() as td:
                for p in cp.plot(res, td, title=experiment_id):
                    uri = storage.join_uri(root, os.path.basename(p))
                    storage.put_file(p, uri)
                    pngs.append(uri)
        except ImportError as exc:     # matplotlib is the qa extra, not a runtime dependency
            summary["plots_skipped"] = f"{type(exc).__name__}: {exc}"
            LOG.warning("4d plots skipped: %s", exc)
    summary.update({
        "experiment_id": experiment_id, "variant": variant, "metrics_path": metrics_uri,
        "scores_path": scores, "output": root, "tag": tag, "pngs": pngs,
        "completeness_path": storage.join_uri(root, "completeness.parquet"),
        "allow_train_split": bool(allow_train_split), "code_version": code_version(),
        "config_path": cfg.path,
        "written_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "seconds_by_phase": {k: round(v, 3) for k, v in tphase.items()},
        "seconds_total": round(time.perf_counter() - t0, 3)})
    storage.put_bytes(storage.join_uri(root, "summary.json"), (json.dumps(
        _nan_to_none(summary), indent=1, default=_json_default, allow_nan=False) + "\n").encode())
    return summary


def _roc_fn(max_points: int):
    def fn(pdf: pd.DataFrame) -> pd.DataFrame:
        r = cp.roc_from_counts(pdf["_score"].to_numpy(), pdf["pos"].to_numpy(),
                               pdf["neg"].to_numpy())
        c = cp.thin_curve(r, max_points)
        n = len(c["fpr"])
        return pd.DataFrame({"split": str(pdf["split"].iloc[0]), "i": range(n),
                             "fpr": c["fpr"], "tpr": c["tpr"],
                             "score": [float("nan") if x is None else x for x in c["score"]],
                             "auc": r["auc"], "P": r["n_pos"], "N": r["n_neg"]})
    return fn


def _nan_to_none(o):
    """Strict JSON: NaN / inf (e.g. an AUC without both classes) are written as null."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _nan_to_none(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_nan_to_none(v) for v in o]
    return o


def _json_default(o):
    import numpy as np

    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    return str(o)


def format_summary(s: dict) -> str:
    a = s["accounting"]
    lines = [f"stage 4d {s.get('experiment_id', '')}: score column {s['score_column']!r}, "
             f"splits counted {','.join(s['splits'])}; accounting "
             f"{'EXACT' if a['exact'] else 'MISMATCH'}",
             f"  scored ok injections {a['scored_ok_injections_counted']}, controls "
             f"{a['scored_ok_controls_counted']}; excluded: not ok {a['tasks_not_ok']}, "
             f"ok without score {a['ok_tasks_without_score_in_counted_splits']}, non-finite "
             f"score {a['ok_tasks_with_nonfinite_score_in_counted_splits']}, scores without "
             f"task {a['scores_without_task']}, other splits {a['ok_tasks_in_other_splits']}"]
    for sp, d in s["per_split"].items():
        lines.append(f"  ROC AUC {sp}: {d['roc_auc']:.4f} ({d['n_injections']} injections, "
                     f"{d['n_controls']} controls{', counted' if d['counted'] else ''})")
    for t in s["thresholds"]:
        af = t["achieved_fpr"]
        lines.append(f"  threshold {t['name']}: {t['threshold']:.6g} (FPR on controls "
                     f"{'n/a' if af is None else f'{af:.4g}'}, {t['n_controls_above']}/"
                     f"{t['n_controls']})")
    if s.get("pngs"):
        lines.append("  completeness plots: " + ", ".join(s["pngs"]))
    return "\n".join(lines)
