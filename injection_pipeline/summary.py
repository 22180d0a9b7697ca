"""End-of-run summary of the chain 4a -> 4b -> 4c, computed from the WRITTEN outputs (no Spark).

    python -m injection_pipeline.summary --out results --variant demo [--experiments e1,e2]

Per experiment, from ``<out>/phase4c/<variant>/metrics/<experiment_id>/`` (Parquet, read with
pyarrow: only the scalar columns it needs) and the filtered manifest it was run on:

* task accounting: manifest rows vs written rows, distinct task ids, ids missing / extra
  (``exact`` = the two sets of task ids are identical and unique);
* tasks by status, by split (x status), injections vs controls (x status);
* quantiles (p5, p25, p50, p75, p95, exact percentiles) of ``arc_snr`` (matched filter),
  ``arc_snr_region`` (observable region S/N, best band), ``mu_total``, ``mu_point`` (outside
  the critical curve), ``image1_mu`` (brightest point image), ``n_images``,
  ``image_sep_max_arcsec`` over ok injections, and their count (a column absent from older outputs gives ``{"n": 0}``);
* PSF-source counts per band over ok rows (``psf_source_<band>``: centre, brick_median,
  bricks_table, default).

Run-level numbers (manifests from 4a's summaries, blacklist, filtered manifests, cache listing)
are added by the caller (:mod:`injection_pipeline.stages.stage_demo`) under ``run``.
:func:`format_table` renders the human-readable table that is also written as text.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from injection_pipeline.dr10 import BANDS

QUANTILE_COLUMNS: tuple[str, ...] = ("arc_snr", "arc_snr_region", "mu_total", "mu_point",
                                     "image1_mu", "n_images", "image_sep_max_arcsec")
PROBS: tuple[int, ...] = (5, 25, 50, 75, 95)
_COLUMNS = ("task_id", "status", "is_control", "split", *QUANTILE_COLUMNS,
            *(f"psf_source_{b}" for b in BANDS))


def _read_table(path: str, columns: Sequence[str]):
    import pyarrow.dataset as ds

    dset = ds.dataset(path, format="parquet", partitioning="hive")
    cols = [c for c in columns if c in dset.schema.names]
    return dset.to_table(columns=cols)


def read_metrics(metrics_path: str):
    """The summary's columns of a 4c metrics directory as a pandas DataFrame."""
    return _read_table(metrics_path, _COLUMNS).to_pandas()


def read_task_ids(manifest_path: str) -> list:
    return _read_table(manifest_path, ("task_id",)).column("task_id").to_pylist()


def _counts(values: Iterable) -> dict:
    out: dict = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: str(kv[0])))


def quantiles(values) -> dict:
    a = np.asarray(values, dtype=np.float64)
    a = a[np.isfinite(a)]
    out: dict[str, Any] = {"n": int(a.size)}
    if a.size:
        out.update({f"p{p}": float(np.percentile(a, p)) for p in PROBS})
    return out


def experiment_summary(metrics_path: str, manifest_path: str | None = None) -> dict:
    """Summary of one experiment from its written metrics (and the manifest it ran on)."""
    df = read_metrics(metrics_path)
    ids = df["task_id"].tolist()
    s: dict[str, Any] = {"metrics_path": metrics_path, "rows_written": len(ids),
                         "distinct_task_ids_written": len(set(ids))}
    if manifest_path is not None:
        man = read_task_ids(manifest_path)
        sm, so = set(man), set(ids)
        s["accounting"] = {
            "manifest_path": manifest_path, "tasks_in_manifest": len(man),
            "rows_written": len(ids), "distinct_task_ids_written": len(so),
            "manifest_tasks_missing_from_output": len(sm - so),
            "output_tasks_not_in_manifest": len(so - sm),
            "exact": len(man) == len(sm) == len(ids) == len(so) and sm == so}
    ctrl = df["is_control"].astype(int).to_numpy() == 1
    s["by_status"] = _counts(df["status"])
    role = np.where(ctrl, "controls", "injections")
    s["by_role"] = {r: {"total": int((role == r).sum()),
                        "by_status": _counts(df["status"][role == r])}
                    for r in ("injections", "controls")}
    by_split = {}
    split_of = df["split"].astype(str)
    for split in sorted(split_of.unique()):
        m = (split_of == split).to_numpy()
        by_split[split] = {"total": int(m.sum()), "injections": int((m & ~ctrl).sum()),
                           "controls": int((m & ctrl).sum()),
                           "by_status": _counts(df["status"][m])}
    s["by_split"] = by_split
    ok = (df["status"] == "ok").to_numpy()
    ok_inj = df[ok & ~ctrl]
    s["ok_injections"] = len(ok_inj)
    s["quantiles_ok_injections"] = {c: quantiles(ok_inj[c]) if c in ok_inj else {"n": 0}
                                    for c in QUANTILE_COLUMNS}
    s["psf_source_counts_ok_rows"] = {
        b: _counts(df[f"psf_source_{b}"][ok]) if f"psf_source_{b}" in df else {}
        for b in BANDS}
    return s


def summarise(out: str, variant: str, experiments: Sequence[str], *,
              manifests_subdir: str = "manifests_filtered",
              run: Mapping[str, Any] | None = None) -> dict:
    """Summary of every experiment of a run under ``<out>`` (local paths)."""
    res: dict[str, Any] = {"out": os.path.abspath(out), "variant": variant, "experiments": {}}
    for eid in experiments:
        metrics = os.path.join(out, "phase4c", variant, "metrics", eid)
        manifest = os.path.join(out, "phase4a", variant, manifests_subdir, eid)
        res["experiments"][eid] = experiment_summary(
            metrics, manifest if os.path.isdir(manifest) else None)
    tot = {"tasks": 0, "ok": 0, "injections": 0, "controls": 0}
    for e in res["experiments"].values():
        tot["tasks"] += e["rows_written"]
        tot["ok"] += e["by_status"].get("ok", 0)
        tot["injections"] += e["by_role"]["injections"]["total"]
        tot["controls"] += e["by_role"]["controls"]["total"]
    res["totals"] = tot
    res["accounting_exact"] = all(e.get("accounting", {}).get("exact", False)
                                  for e in res["experiments"].values())
    if run:
        res["run"] = dict(run)
    return res


# =========================================================================== table
def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], indent: str = "  ") -> list[str]:
    cells = [[str(h) for h in header]] + [[_fmt(c) for c in r] for r in rows]
    w = [max(len(r[i]) for r in cells) for i in range(len(header))]
    out = []
    for k, r in enumerate(cells):
        out.append(indent + "  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i])
                                      for i, c in enumerate(r)).rstrip())
        if k == 0:
            out.append(indent + "  ".join("-" * x for x in w))
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.4g}"
    return "-" if v is None else str(v)


def format_experiment(eid: str, s: Mapping[str, Any]) -> list[str]:
    lines = [f"experiment {eid}"]
    a = s.get("accounting")
    if a:
        lines.append(f"  task accounting {'EXACT' if a['exact'] else 'MISMATCH'}: filtered "
                     f"manifest {a['tasks_in_manifest']}, written {a['rows_written']} "
                     f"({a['distinct_task_ids_written']} distinct), missing "
                     f"{a['manifest_tasks_missing_from_output']}, extra "
                     f"{a['output_tasks_not_in_manifest']}")
    statuses = list(s["by_status"])
    rows = [["all", sum(s["by_status"].values())] + [s["by_status"][k] for k in statuses]]
    for r in ("injections", "controls"):
        d = s["by_role"][r]
        rows.append([r, d["total"]] + [d["by_status"].get(k, 0) for k in statuses])
    for split, d in s["by_split"].items():
        rows.append([f"split {split}", d["total"]] + [d["by_status"].get(k, 0) for k in statuses])
    lines += _table(["tasks", "total", *statuses], rows)
    lines.append("")
    split_rows = [[split, d["injections"], d["controls"], d["total"]]
                  for split, d in s["by_split"].items()]
    lines += _table(["split", "injections", "controls", "total"], split_rows)
    lines.append("")
    qrows = [[c, q.get("n", 0)] + [q.get(f"p{p}") for p in PROBS]
             for c, q in s["quantiles_ok_injections"].items()]
    lines += _table([f"ok injections ({s['ok_injections']})", "n", *(f"p{p}" for p in PROBS)],
                    qrows)
    lines.append("")
    srcs = sorted({k for d in s["psf_source_counts_ok_rows"].values() for k in d}, key=str)
    prow = [[src] + [s["psf_source_counts_ok_rows"][b].get(src, 0) for b in BANDS]
            for src in srcs]
    lines += _table(["PSF source (ok rows)", *BANDS], prow)
    return lines


def format_table(summary: Mapping[str, Any]) -> str:
    """The human-readable summary (what the demo prints and writes as summary.txt)."""
    lines = ["=" * 78, f"SUMMARY  {summary['out']}  (variant {summary['variant']})", "=" * 78]
    run = summary.get("run") or {}
    if run:
        for key, label in (("survey", "survey"), ("manifests", "manifests (4a)"),
                           ("blacklist", "blacklist"), ("filtered", "filtered manifests"),
                           ("cache", "coadd cache"), ("timings_s", "timings [s]")):
            if key in run:
                lines.append(f"{label:20s} {_inline(run[key])}")
        lines.append("")
    t = summary["totals"]
    lines.append(f"all experiments: {t['tasks']} tasks, {t['ok']} ok, {t['injections']} "
                 f"injections, {t['controls']} controls; task accounting "
                 f"{'EXACT' if summary['accounting_exact'] else 'NOT EXACT'}")
    for eid, s in summary["experiments"].items():
        lines.append("")
        lines += format_experiment(eid, s)
    lines.append("=" * 78)
    return "\n".join(lines)


def _inline(v: Any) -> str:
    if isinstance(v, Mapping):
        return ", ".join(f"{k} {_inline(x)}" for k, x in v.items())
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_inline(x) for x in v) + "]"
    return _fmt(v)


def write_summary(summary: Mapping[str, Any], json_path: str, txt_path: str) -> str:
    """Write JSON and text; returns the text."""
    text = format_table(summary)
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    with open(json_path, "w") as f:
        json.dump(summary, f, indent=1, default=str)
        f.write("\n")
    with open(txt_path, "w") as f:
        f.write(text + "\n")
    return text


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="results")
    ap.add_argument("--variant", default="default")
    ap.add_argument("--experiments", default=None,
                    help="comma-separated ids (default: every metrics/<id>/ of the variant)")
    ap.add_argument("--json", default=None, help="write the JSON here (and .txt beside it)")
    a = ap.parse_args(argv)
    if a.experiments:
        exps = [e for e in a.experiments.split(",") if e]
    else:
        root = os.path.join(a.out, "phase4c", a.variant, "metrics")
        exps = sorted(os.listdir(root)) if os.path.isdir(root) else []
    s = summarise(a.out, a.variant, exps)
    if a.json:
        print(write_summary(s, a.json, os.path.splitext(a.json)[0] + ".txt"))
    else:
        print(format_table(s))
    return 0 if s["accounting_exact"] else 1


if __name__ == "__main__":
    sys.exit(main())
