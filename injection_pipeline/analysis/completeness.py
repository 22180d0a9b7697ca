"""Completeness and the selection function of a lens finder from its scores (stage 4d, no
Spark): the plain Python API on pandas / pyarrow tables.  docs/completeness.md.

    >>> from injection_pipeline.analysis import completeness as cp       # doctest: +SKIP
    >>> metrics = pd.read_parquet("results/phase4c/v1/metrics/<experiment_id>")
    >>> scores = pd.read_parquet("scores.parquet")          # task_id, score
    >>> res = cp.compute(metrics, scores, splits=["test"], fpr=[0.01, 0.001])
    >>> res.table                                           # completeness rows
    >>> res.summary["thresholds"], res.summary["per_split"]["test"]["roc_auc"]
    >>> cp.plot(res, "plots/")                              # PNGs (matplotlib)

Definitions (the Spark stage :mod:`injection_pipeline.stages.stage_4d` computes the same
counts distributed and finishes with :func:`table_from_counts` of this module):

* counted rows: ``status == 'ok'`` rows of the counted ``splits`` whose score is finite;
  injections (``is_control == 0``) are the denominators, controls set the FPR thresholds.
* FPR threshold: ``fpr_threshold(control_scores, f)`` = the inverted-CDF quantile of the
  control scores at ``1 - f``: the ``(k+1)``-th largest control score with ``k = floor(f n)``;
  at most ``k`` controls score above it (fewer when controls tie at it).  Detected:
  ``score > threshold``.
* bins half-open ``[lo, hi)``; values outside every bin or null are counted per variable in
  the summary, never silently dropped.
* ``completeness = n_detected / n_injections``; Wilson score interval at ``confidence``; an
  empty bin (``n_injections = 0``) has ``completeness``, ``ci_lo`` and ``ci_hi`` null (NaN).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Mapping, Optional, Sequence

import numpy as np
import pandas as pd

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover
    import tomli as tomllib  # type: ignore[no-redef]

SCHEMA = "completeness/1"
DEFAULT_CONF = Path(__file__).resolve().parents[2] / "conf" / "completeness.toml"
AB_ZEROPOINT = 22.5
DERIVES = ("ab_mag",)
#: columns of completeness.parquet, in order
TABLE_COLUMNS: tuple[str, ...] = (
    "variable", "bin_lo", "bin_hi", "variable2", "bin2_lo", "bin2_hi", "threshold_name",
    "threshold", "n_injections", "n_detected", "completeness", "ci_lo", "ci_hi", "confidence",
    "splits")
#: metrics columns every 4d input needs
REQUIRED_COLUMNS: tuple[str, ...] = ("task_id", "split", "status", "is_control")


class CompletenessError(ValueError):
    """A bad configuration or input of stage 4d (the message says what to fix)."""


# =========================================================================== configuration
@dataclass(frozen=True)
class Variable:
    name: str
    columns: tuple[str, ...]
    edges: tuple[float, ...]
    derive: Optional[str] = None


@dataclass(frozen=True)
class Map2D:
    x: str
    y: str
    x_edges: tuple[float, ...]
    y_edges: tuple[float, ...]


@dataclass(frozen=True)
class Config:
    variables: tuple[Variable, ...]
    maps: tuple[Map2D, ...] = ()
    splits: tuple[str, ...] = ("test",)
    fpr: tuple[float, ...] = (0.01, 0.001)
    confidence: float = 0.95
    score_column: str = "score"
    roc_points: int = 400
    baseline: Mapping = field(default_factory=dict)
    path: str = ""

    def variable(self, name: str) -> Variable:
        for v in self.variables:
            if v.name == name:
                return v
        raise CompletenessError(f"{self.path}: no [[variable]] named {name!r}")


def _edges(vals, where: str) -> tuple[float, ...]:
    e = tuple(float(x) for x in vals)
    if len(e) < 2 or not all(np.isfinite(e)) or any(b <= a for a, b in zip(e, e[1:])):
        raise CompletenessError(f"{where}: edges must be >= 2 finite, strictly ascending "
                                f"numbers, got {list(vals)}")
    return e


def load_config(path: str | os.PathLike | None = None) -> Config:
    """conf/completeness.toml (``path``: the TOML or a conf directory holding it)."""
    p = Path(path) if path else DEFAULT_CONF
    if p.is_dir():
        p = p / "completeness.toml"
    try:
        with open(p, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise CompletenessError(f"configuration file not found: {p}") from None
    c = raw.get("completeness", {})
    variables = []
    for i, v in enumerate(raw.get("variable", [])):
        where = f"{p} [[variable]] #{i + 1}"
        try:
            var = Variable(name=str(v["name"]), columns=tuple(str(x) for x in v["columns"]),
                           edges=_edges(v["edges"], where), derive=v.get("derive"))
        except KeyError as exc:
            raise CompletenessError(f"{where}: missing key {exc}") from None
        if var.derive is not None and var.derive not in DERIVES:
            raise CompletenessError(f"{where}: derive must be one of {DERIVES}")
        if not var.columns:
            raise CompletenessError(f"{where}: columns is empty")
        variables.append(var)
    names = [v.name for v in variables]
    if len(set(names)) != len(names):
        raise CompletenessError(f"{p}: duplicate [[variable]] names {names}")
    maps = []
    for i, m in enumerate(raw.get("map", [])):
        where = f"{p} [[map]] #{i + 1}"
        mp = Map2D(x=str(m["x"]), y=str(m["y"]), x_edges=_edges(m["x_edges"], where),
                   y_edges=_edges(m["y_edges"], where))
        for n in (mp.x, mp.y):
            if n not in names:
                raise CompletenessError(f"{where}: {n!r} is not a [[variable]] name")
        maps.append(mp)
    cfg = Config(variables=tuple(variables), maps=tuple(maps),
                 splits=tuple(c.get("splits", ["test"])),
                 fpr=tuple(float(x) for x in c.get("fpr", [0.01, 0.001])),
                 confidence=float(c.get("confidence", 0.95)),
                 score_column=str(c.get("score_column", "score")),
                 roc_points=int(c.get("roc_points", 400)),
                 baseline=dict(raw.get("baseline_finder", {})), path=str(p))
    check_options(cfg.fpr, (), cfg.confidence)
    return cfg


def check_options(fpr: Sequence[float], thresholds: Sequence[float], confidence: float) -> None:
    for f in fpr:
        if not 0.0 < f < 1.0:
            raise CompletenessError(f"--fpr values must lie in (0, 1), got {f}")
    for t in thresholds:
        if not np.isfinite(t):
            raise CompletenessError(f"--threshold values must be finite, got {t}")
    if not 0.0 < confidence < 1.0:
        raise CompletenessError(f"--confidence must lie in (0, 1), got {confidence}")
    if not fpr and not thresholds:
        raise CompletenessError("no threshold: give --fpr and/or --threshold")


def check_splits(splits: Sequence[str], allow_train: bool) -> tuple[str, ...]:
    s = tuple(dict.fromkeys(str(x).strip() for x in splits if str(x).strip()))
    if not s:
        raise CompletenessError("--splits is empty")
    if "train" in s and not allow_train:
        raise CompletenessError("the train split is the finder's training set: its "
                                "completeness is optimistic; pass --allow-train-split to "
                                "count it anyway")
    return s


def resolve_columns(cfg: Config, available: Sequence[str]) -> tuple[dict, dict]:
    """({variable name: metrics column used}, {variable name: note}) for the variables whose
    columns exist; a variable with none of its columns is reported (note), not used."""
    have = set(available)
    used, notes = {}, {}
    for v in cfg.variables:
        col = next((c for c in v.columns if c in have), None)
        if col is None:
            notes[v.name] = f"skipped: none of the columns {list(v.columns)} in the metrics"
            continue
        used[v.name] = col
        if col != v.columns[0]:
            notes[v.name] = (f"fallback: {col} used ({list(v.columns[:v.columns.index(col)])} "
                             "not in the metrics)")
    return used, notes


def output_variable_name(v: Variable, column: str) -> str:
    """The ``variable`` value of the output rows: the metrics column used, or the variable
    name for a derived quantity (e.g. arc_mag_r from arc_flux_r)."""
    return v.name if v.derive else column


# =========================================================================== statistics
def z_of(confidence: float) -> float:
    """Two-sided standard-normal quantile: Phi^-1(1 - (1 - confidence) / 2)."""
    return NormalDist().inv_cdf(1.0 - (1.0 - confidence) / 2.0)


def wilson_interval(k, n, confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval of k successes in n trials (vectorised); NaN where n == 0.

    (p + z^2/2n -+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n), p = k/n, clipped to [0, 1].
    """
    k = np.asarray(k, np.float64)
    n = np.asarray(n, np.float64)
    z = z_of(confidence)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = k / n
        den = 1.0 + z * z / n
        centre = (p + z * z / (2 * n)) / den
        half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
        lo, hi = np.clip(centre - half, 0.0, 1.0), np.clip(centre + half, 0.0, 1.0)
    empty = n <= 0
    lo, hi = np.where(empty, np.nan, lo), np.where(empty, np.nan, hi)
    # exact ends: k = 0 -> lo = 0, k = n -> hi = 1 (the formula gives them up to rounding)
    lo = np.where(~empty & (k == 0), 0.0, lo)
    hi = np.where(~empty & (k == n), 1.0, hi)
    return lo, hi


def n_allowed_above(n_controls: int, fpr: float) -> int:
    """k = floor(fpr * n): controls allowed to score above the threshold (1e-9 guards the
    product of a decimal fraction, e.g. 0.01 * 1000, from rounding just below an integer)."""
    return int(math.floor(fpr * n_controls + 1e-9))


def fpr_threshold(control_scores, fpr: float) -> float:
    """The (k+1)-th largest control score, k = floor(fpr n) (= the inverted-CDF quantile at
    1 - fpr); NaN without controls."""
    c = np.sort(np.asarray(control_scores, np.float64))
    n = c.size
    if n == 0:
        return float("nan")
    k = n_allowed_above(n, fpr)
    return float(c[n - 1 - k]) if k < n else float("-inf")


def roc_from_counts(scores, n_pos, n_neg) -> dict:
    """Exact ROC of distinct ``scores`` with ``n_pos`` positives / ``n_neg`` negatives each.

    Returns tpr, fpr (descending thresholds, detected = score >= threshold at each point) and
    the AUC = P(score_pos > score_neg) + P(=)/2 (Mann-Whitney with ties).
    """
    s = np.asarray(scores, np.float64)
    o = np.argsort(-s, kind="stable")
    pos, neg = np.asarray(n_pos, np.float64)[o], np.asarray(n_neg, np.float64)[o]
    P, N = pos.sum(), neg.sum()
    tp, fp = np.cumsum(pos), np.cumsum(neg)
    auc = float(np.sum(neg * (tp - 0.5 * pos)) / (P * N)) if P > 0 and N > 0 else float("nan")
    return {"score": s[o], "tpr": tp / P if P else tp * np.nan,
            "fpr": fp / N if N else fp * np.nan, "auc": auc, "n_pos": int(P), "n_neg": int(N)}


def roc_auc(scores, is_positive) -> float:
    """Mann-Whitney ROC AUC (ties count 1/2) of one set of scores."""
    s = pd.Series(np.asarray(scores, np.float64))
    y = np.asarray(is_positive, bool)
    g = pd.DataFrame({"s": s, "p": y.astype(np.int64), "n": (~y).astype(np.int64)}) \
        .groupby("s", sort=False).sum()
    return roc_from_counts(g.index.to_numpy(), g["p"].to_numpy(), g["n"].to_numpy())["auc"]


def thin_curve(roc: dict, max_points: int) -> dict:
    """At most ``max_points`` points of a ROC (every stride-th, always the last), and (0, 0)."""
    n = len(roc["tpr"])
    stride = max(1, math.ceil(n / max(1, max_points)))
    idx = np.unique(np.r_[np.arange(stride - 1, n, stride), n - 1]) if n else np.array([], int)
    return {"fpr": [0.0] + [float(x) for x in roc["fpr"][idx]],
            "tpr": [0.0] + [float(x) for x in roc["tpr"][idx]],
            "score": [None] + [float(x) for x in roc["score"][idx]]}


def bin_index(values, edges: Sequence[float]) -> np.ndarray:
    """Index of the half-open bin [e_i, e_i+1) holding each value; -1 outside every bin,
    -2 for null / NaN."""
    v = np.asarray(values, np.float64)
    e = np.asarray(edges, np.float64)
    idx = np.searchsorted(e, v, side="right") - 1
    idx = np.where((v >= e[0]) & (v < e[-1]), idx, -1)
    return np.where(np.isnan(v), -2, idx).astype(np.int64)


def derive_values(frame: pd.DataFrame, v: Variable, column: str) -> np.ndarray:
    x = pd.to_numeric(frame[column], errors="coerce").to_numpy(np.float64, na_value=np.nan)
    if v.derive == "ab_mag":
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(x > 0, AB_ZEROPOINT - 2.5 * np.log10(np.where(x > 0, x, 1.0)),
                            np.nan)
    return x


# =========================================================================== thresholds
@dataclass(frozen=True)
class Threshold:
    name: str
    value: float
    source: str                 # "fpr" | "fixed"
    target_fpr: Optional[float] = None


def threshold_name(source: str, x: float) -> str:
    return f"{'fpr' if source == 'fpr' else 'fixed'}_{x:g}"


def make_thresholds(control_scores, fpr: Sequence[float], fixed: Sequence[float]) -> list:
    out = [Threshold(threshold_name("fpr", f), fpr_threshold(control_scores, f), "fpr", f)
           for f in fpr]
    out += [Threshold(threshold_name("fixed", t), float(t), "fixed") for t in fixed]
    names = [t.name for t in out]
    if len(set(names)) != len(names):
        raise CompletenessError(f"duplicate thresholds {names}")
    return out


def threshold_report(t: Threshold, n_controls: int, n_above: int) -> dict:
    d = {"name": t.name, "source": t.source, "threshold": t.value,
         "target_fpr": t.target_fpr, "n_controls": n_controls,
         "n_controls_above": n_above,
         "achieved_fpr": n_above / n_controls if n_controls else None}
    if t.source == "fpr":
        d["n_controls_allowed_above"] = n_allowed_above(n_controls, t.target_fpr)
        if n_controls == 0:
            d["note"] = "no scored ok control in the counted splits: threshold undefined (NaN)"
        elif t.target_fpr * n_controls < 1:
            d["note"] = (f"fpr {t.target_fpr:g} x {n_controls} controls < 1: the threshold is "
                         "the highest control score (no control above it)")
    return d


# =========================================================================== the table
def table_from_counts(counts: pd.DataFrame, cfg: Config, used: Mapping[str, str],
                      thresholds: Sequence[Threshold], confidence: float,
                      splits: Sequence[str]) -> pd.DataFrame:
    """completeness.parquet rows from per-bin counts.

    ``counts`` columns: ``key`` (a 1-D variable name, or ``"x|y"`` for a map), ``bin``,
    ``bin2`` (-1 for 1-D), ``threshold_name``, ``n_injections``, ``n_detected``; bins
    absent from ``counts`` are written with n_injections = 0 (empty).
    """
    rows = []
    look = {}
    if len(counts):
        for r in counts.itertuples(index=False):
            look[(r.key, int(r.bin), int(r.bin2), r.threshold_name)] = (int(r.n_injections),
                                                                        int(r.n_detected))
    split_s = ",".join(splits)

    def emit(key, vname, e, v2name, e2, i, j):
        for t in thresholds:
            n, k = look.get((key, i, j, t.name), (0, 0))
            rows.append((vname, e[i], e[i + 1], v2name, e2[j] if e2 else np.nan,
                         e2[j + 1] if e2 else np.nan, t.name, t.value, n, k))

    for v in cfg.variables:
        if v.name not in used:
            continue
        name = output_variable_name(v, used[v.name])
        for i in range(len(v.edges) - 1):
            emit(v.name, name, v.edges, None, None, i, -1)
    for m in cfg.maps:
        if m.x not in used or m.y not in used:
            continue
        nx = output_variable_name(cfg.variable(m.x), used[m.x])
        ny = output_variable_name(cfg.variable(m.y), used[m.y])
        for i in range(len(m.x_edges) - 1):
            for j in range(len(m.y_edges) - 1):
                emit(f"{m.x}|{m.y}", nx, m.x_edges, ny, m.y_edges, i, j)
    t = pd.DataFrame(rows, columns=["variable", "bin_lo", "bin_hi", "variable2", "bin2_lo",
                                    "bin2_hi", "threshold_name", "threshold", "n_injections",
                                    "n_detected"])
    t["n_injections"] = t["n_injections"].astype(np.int64)
    t["n_detected"] = t["n_detected"].astype(np.int64)
    n = t["n_injections"].to_numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        t["completeness"] = np.where(n > 0, t["n_detected"].to_numpy() / np.maximum(n, 1),
                                     np.nan)
    t["ci_lo"], t["ci_hi"] = wilson_interval(t["n_detected"].to_numpy(), n, confidence)
    t["confidence"] = float(confidence)
    t["splits"] = split_s
    return t[list(TABLE_COLUMNS)]


def arrow_table(table: pd.DataFrame):
    """completeness.parquet as a pyarrow Table with explicit types (variable2 nullable)."""
    import pyarrow as pa

    schema = pa.schema([("variable", pa.string()), ("bin_lo", pa.float64()),
                        ("bin_hi", pa.float64()), ("variable2", pa.string()),
                        ("bin2_lo", pa.float64()), ("bin2_hi", pa.float64()),
                        ("threshold_name", pa.string()), ("threshold", pa.float64()),
                        ("n_injections", pa.int64()), ("n_detected", pa.int64()),
                        ("completeness", pa.float64()), ("ci_lo", pa.float64()),
                        ("ci_hi", pa.float64()), ("confidence", pa.float64()),
                        ("splits", pa.string())])
    return pa.Table.from_pandas(table, schema=schema, preserve_index=False)


# =========================================================================== the API
@dataclass
class Result:
    table: pd.DataFrame
    summary: dict
    roc: dict              # split -> thinned curve {fpr, tpr, score}


def _as_pandas(t) -> pd.DataFrame:
    if isinstance(t, pd.DataFrame):
        return t
    if hasattr(t, "to_pandas"):
        return t.to_pandas()
    return pd.DataFrame(t)


def compute(metrics, scores, cfg: Optional[Config] = None, *, splits=None, fpr=None,
            threshold: Sequence[float] = (), confidence: Optional[float] = None,
            score_column: Optional[str] = None, allow_train_split: bool = False) -> Result:
    """Completeness table, summary and ROC curves from a 4c metrics table and a scores table
    (pandas or pyarrow; ``scores``: ``task_id`` + ``score_column``).  Options default to
    conf/completeness.toml; see the module docstring for the definitions."""
    cfg = cfg or load_config()
    splits = check_splits(cfg.splits if splits is None else splits, allow_train_split)
    fpr = tuple(cfg.fpr if fpr is None else fpr)
    threshold = tuple(float(x) for x in threshold)
    confidence = cfg.confidence if confidence is None else float(confidence)
    score_column = score_column or cfg.score_column
    check_options(fpr, threshold, confidence)
    m = _as_pandas(metrics)
    s = _as_pandas(scores)
    miss = [c for c in REQUIRED_COLUMNS if c not in m.columns]
    if miss:
        raise CompletenessError(f"the metrics lack column(s) {miss}")
    for c in ("task_id", score_column):
        if c not in s.columns:
            raise CompletenessError(f"the scores lack column {c!r} (have {list(s.columns)})")
    if m["task_id"].duplicated().any():
        raise CompletenessError("task_id is not unique in the metrics")
    dup = int(s["task_id"].duplicated().sum())
    if dup:
        raise CompletenessError(f"{dup} duplicate task_id row(s) in the scores: ambiguous")
    used, notes = resolve_columns(cfg, list(m.columns))
    s = s[["task_id", score_column]].rename(columns={score_column: "_score"})
    s["_score"] = pd.to_numeric(s["_score"], errors="coerce").astype(np.float64)
    j = m.merge(s, on="task_id", how="left", indicator=True)
    has_score = (j["_merge"] == "both").to_numpy()
    score = j["_score"].to_numpy(np.float64)
    finite = has_score & np.isfinite(score)
    ok = (j["status"] == "ok").to_numpy()
    counted = j["split"].isin(list(splits)).to_numpy()
    ctl = (pd.to_numeric(j["is_control"]).to_numpy() == 1)
    scores_without_task = int((~s["task_id"].isin(m["task_id"])).sum())

    groups = pd.DataFrame({"split": j["split"].astype(str), "status": j["status"].astype(str),
                           "is_control": ctl.astype(np.int64), "has_score": has_score,
                           "finite": finite}).value_counts(dropna=False).rename("n") \
        .reset_index()
    acc = accounting_from_groups(groups, splits, scores_without_task, len(s))
    base = ok & counted & finite
    ctl_scores = score[base & ctl]
    thresholds = make_thresholds(ctl_scores, fpr, threshold)
    th_rep = [threshold_report(t, int(ctl_scores.size), int(np.sum(ctl_scores > t.value)))
              for t in thresholds]

    injm = base & ~ctl
    inj_score = score[injm]
    sub = j.loc[injm]
    bins, var_rep = {}, {}
    for v in cfg.variables:
        if v.name not in used:
            var_rep[v.name] = {"column": None, "note": notes[v.name]}
            continue
        b = bin_index(derive_values(sub, v, used[v.name]), v.edges)
        bins[v.name] = b
        var_rep[v.name] = {"column": used[v.name], "variable": output_variable_name(
            v, used[v.name]), "derive": v.derive, "edges": list(v.edges),
            "n_null": int(np.sum(b == -2)), "n_outside_bins": int(np.sum(b == -1)),
            "n_in_bins": int(np.sum(b >= 0)), "note": notes.get(v.name)}
    parts = []
    det = {t.name: inj_score > t.value for t in thresholds}

    def add(key, b1, b2):
        keep = (b1 >= 0) & (b2 >= 0 if b2 is not None else True)
        if not np.any(keep):
            return
        d = pd.DataFrame({"bin": b1[keep], "bin2": b2[keep] if b2 is not None else -1})
        for t in thresholds:
            d[t.name] = det[t.name][keep].astype(np.int64)
        g = d.groupby(["bin", "bin2"])
        n = g.size()
        for t in thresholds:
            k = g[t.name].sum()
            parts.append(pd.DataFrame({"key": key, "bin": n.index.get_level_values(0),
                                       "bin2": n.index.get_level_values(1),
                                       "threshold_name": t.name, "n_injections": n.to_numpy(),
                                       "n_detected": k.to_numpy()}))

    for v in cfg.variables:
        if v.name in bins:
            add(v.name, bins[v.name], None)
    map_rep = []
    for mp in cfg.maps:
        if mp.x in bins and mp.y in bins:
            vx, vy = cfg.variable(mp.x), cfg.variable(mp.y)
            bx = bin_index(derive_values(sub, vx, used[mp.x]), mp.x_edges)
            by = bin_index(derive_values(sub, vy, used[mp.y]), mp.y_edges)
            add(f"{mp.x}|{mp.y}", bx, by)
            map_rep.append({"x": mp.x, "y": mp.y, "n_in_bins": int(np.sum((bx >= 0) & (by >= 0)))})
        else:
            map_rep.append({"x": mp.x, "y": mp.y, "note": "skipped: a variable is missing"})
    counts = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(
        columns=["key", "bin", "bin2", "threshold_name", "n_injections", "n_detected"])
    table = table_from_counts(counts, cfg, used, thresholds, confidence, splits)

    per_split, roc = {}, {}
    okf = ok & finite
    for sp in sorted(pd.unique(j["split"][okf].astype(str))):
        msk = okf & (j["split"].astype(str).to_numpy() == sp)
        g = pd.DataFrame({"s": score[msk], "p": (~ctl[msk]).astype(np.int64),
                          "n": ctl[msk].astype(np.int64)}).groupby("s", sort=False).sum()
        r = roc_from_counts(g.index.to_numpy(), g["p"].to_numpy(), g["n"].to_numpy())
        per_split[sp] = split_report(sp, r, splits)
        roc[sp] = thin_curve(r, cfg.roc_points)
    summary = make_summary(score_column=score_column, splits=splits, confidence=confidence,
                           accounting=acc, thresholds=th_rep, per_split=per_split,
                           variables=var_rep, maps=map_rep, roc=roc,
                           n_injections_counted=int(injm.sum()))
    return Result(table=table, summary=summary, roc=roc)


def split_report(split: str, r: dict, counted: Sequence[str]) -> dict:
    d = {"roc_auc": r["auc"], "n_injections": r["n_pos"], "n_controls": r["n_neg"],
         "counted": split in counted}
    if split == "train":
        d["note"] = "the train split: optimistic for a finder trained on it"
    return d


def accounting_from_groups(g: pd.DataFrame, splits: Sequence[str], scores_without_task: int,
                           n_scores: int) -> dict:
    """Where every metrics row and every score went, from row counts ``n`` grouped by
    (``split``, ``status``, ``is_control``, ``has_score``, ``finite``) (the pure API groups
    with pandas, stage_4d with Spark: one definition of every count)."""
    status = g["status"].astype(str)
    ok = (status == "ok").to_numpy()
    counted = g["split"].isin(list(splits)).to_numpy()
    ctl = (pd.to_numeric(g["is_control"]).to_numpy() == 1)
    has = g["has_score"].to_numpy(bool)
    fin = g["finite"].to_numpy(bool)
    n = g["n"].to_numpy(np.int64)

    def S(mask) -> int:
        return int(n[mask].sum())

    by_status = pd.Series(n[~ok], index=status[~ok]).groupby(level=0).sum().sort_index()
    return {
        "metrics_rows": S(np.ones_like(ok)), "score_rows": int(n_scores),
        "tasks_not_ok": S(~ok),
        "tasks_not_ok_by_status": {str(k): int(v) for k, v in by_status.items()},
        "tasks_not_ok_in_counted_splits": S(~ok & counted),
        "scores_for_tasks_not_ok": S(~ok & has),
        "ok_tasks_in_other_splits": S(ok & ~counted),
        "ok_tasks_in_counted_splits": S(ok & counted),
        "ok_tasks_without_score_in_counted_splits": S(ok & counted & ~has),
        "ok_tasks_with_nonfinite_score_in_counted_splits": S(ok & counted & has & ~fin),
        "scored_ok_injections_counted": S(ok & counted & fin & ~ctl),
        "scored_ok_controls_counted": S(ok & counted & fin & ctl),
        "scores_without_task": int(scores_without_task),
    }


def make_summary(**kw) -> dict:
    d = {"schema": SCHEMA, "interval": "wilson", "detected": "score > threshold",
         "bins": "half-open [bin_lo, bin_hi)",
         "empty_bin": "n_injections = 0: completeness, ci_lo, ci_hi null (NaN)"}
    d.update(kw)
    a = d["accounting"]
    a["exact"] = (a["ok_tasks_in_counted_splits"] == a["scored_ok_injections_counted"]
                  + a["scored_ok_controls_counted"]
                  + a["ok_tasks_without_score_in_counted_splits"]
                  + a["ok_tasks_with_nonfinite_score_in_counted_splits"])
    return d


# =========================================================================== plots
def plot(result: Result, outdir: str, title: str = "") -> list[str]:
    """completeness_1d.png (one panel per variable, a line + Wilson band per threshold),
    completeness_2d_<threshold>.png (the maps) and roc.png; returns the paths written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(outdir, exist_ok=True)
    t = result.table
    paths = []
    one = t[t["variable2"].isna()]
    names = list(dict.fromkeys(one["variable"]))
    if names:
        nc = min(4, len(names))
        nr = math.ceil(len(names) / nc)
        fig, axes = plt.subplots(nr, nc, figsize=(4.2 * nc, 3.3 * nr), squeeze=False)
        for ax, name in zip(axes.ravel(), names):
            d = one[one["variable"] == name]
            for tn, dd in d.groupby("threshold_name", sort=False):
                x = 0.5 * (dd["bin_lo"].to_numpy() + dd["bin_hi"].to_numpy())
                line, = ax.plot(x, dd["completeness"], "o-", ms=3, label=tn)
                ax.fill_between(x, dd["ci_lo"], dd["ci_hi"], color=line.get_color(),
                                alpha=0.2, step=None)
            ax.set_xlabel(name)
            ax.set_ylabel("completeness")
            ax.set_ylim(-0.02, 1.02)
            if name in ("arc_snr_region", "arc_snr", "mu_total"):
                ax.set_xscale("symlog", linthresh=1.0)
            ax.set_xlim(d["bin_lo"].min(), d["bin_hi"].max())      # every bin, empty or not
            ax.legend(fontsize=7)
        for ax in axes.ravel()[len(names):]:
            ax.axis("off")
        fig.suptitle(f"{title} completeness ({t['confidence'].iloc[0]:.0%} Wilson bands; "
                     f"splits {t['splits'].iloc[0]})", fontsize=10)
        fig.tight_layout()
        p = os.path.join(outdir, "completeness_1d.png")
        fig.savefig(p, dpi=90)
        plt.close(fig)
        paths.append(p)
    two = t[t["variable2"].notna()]
    for (vx, vy, tn), d in two.groupby(["variable", "variable2", "threshold_name"], sort=False):
        xe = np.unique(np.r_[d["bin_lo"], d["bin_hi"]])
        ye = np.unique(np.r_[d["bin2_lo"], d["bin2_hi"]])
        grid = np.full((ye.size - 1, xe.size - 1), np.nan)
        nn = np.zeros_like(grid, dtype=np.int64)
        for r in d.itertuples(index=False):
            i, jj = np.searchsorted(xe, r.bin_lo), np.searchsorted(ye, r.bin2_lo)
            grid[jj, i], nn[jj, i] = r.completeness, r.n_injections
        fig, ax = plt.subplots(figsize=(6, 4.5))
        im = ax.imshow(grid, origin="lower", vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for jj in range(grid.shape[0]):
            for i in range(grid.shape[1]):
                ax.text(i, jj, f"{grid[jj, i]:.2f}\n{nn[jj, i]}" if nn[jj, i] else "-",
                        ha="center", va="center", fontsize=6, color="w")
        ax.set_xticks(np.arange(xe.size) - 0.5, [f"{x:g}" for x in xe], fontsize=7)
        ax.set_yticks(np.arange(ye.size) - 0.5, [f"{y:g}" for y in ye], fontsize=7)
        ax.set_xlabel(vx)
        ax.set_ylabel(vy)
        fig.colorbar(im, ax=ax, label="completeness")
        ax.set_title(f"{title} {tn} (cell: completeness / n_injections)", fontsize=9)
        fig.tight_layout()
        p = os.path.join(outdir, f"completeness_2d_{vx}_{vy}_{tn}.png")
        fig.savefig(p, dpi=90)
        plt.close(fig)
        paths.append(p)
    if result.roc:
        fig, ax = plt.subplots(figsize=(5, 4.5))
        for sp, c in result.roc.items():
            auc = result.summary["per_split"].get(sp, {}).get("roc_auc", float("nan"))
            ax.plot(c["fpr"], c["tpr"], label=f"{sp}: AUC {auc:.3f}")
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        for th in result.summary["thresholds"]:
            if th.get("achieved_fpr"):
                ax.axvline(th["achieved_fpr"], color="grey", lw=0.6, ls="--")
        ax.set_xscale("log")
        ax.set_xlim(1e-4, 1)
        ax.set_xlabel("false-positive rate (controls)")
        ax.set_ylabel("true-positive rate (injections)")
        ax.set_title(f"{title} ROC (dashed: thresholds)", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        p = os.path.join(outdir, "roc.png")
        fig.savefig(p, dpi=90)
        plt.close(fig)
        paths.append(p)
    return paths
