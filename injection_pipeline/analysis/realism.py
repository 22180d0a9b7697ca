"""Realism audit of a stage-4c training set (issue 14, point 6): is the set learnable for the
right reasons, and do its lenses and arcs look like the real population?  No Spark.

    python -m injection_pipeline.analysis.realism --out results --variant v1 \
        --experiment-id train_stamp64_bandsgrz_gridgrid_small [--report-dir DIR] \
        [--stamps PATH] [--conf conf/realism.toml] [--split train] [--fail-on-check]
    python -m injection_pipeline.qa --stamps <stamps> --out <dir> --realism yes   # same audit

Measured on the ``ok`` rows of the audited splits (``[audit] splits`` of conf/realism.toml):

1. **core-only classifier**: logistic regression (StandardScaler + LogisticRegression) on the
   central ``core_px`` x ``core_px`` pixels of the ``image`` plane in g, r, z (raw nMgy per
   pixel, no per-stamp normalisation), injections (label 1) vs their paired controls (label 0),
   ``n_folds``-fold cross-validation grouped by target (StratifiedGroupKFold, group =
   ``brickname/objid``: an injection and its control never fall in different folds); ROC AUC
   per fold, mean, and of the pooled out-of-fold scores; diagnostics: the cross-target AUC of
   those scores by bin of a distribution, and of the same model refitted on named feature
   subsets (single bands, core-box colours: ``[classifier.diagnostic_feature_sets]``);
2. **distributions** of the injections (percentiles, side by side with the references of the
   conf file): theta_E, total arc r magnitude ``22.5 - 2.5 log10 sum(arc_r)``, arc/lens r flux
   ratio, arc g-r from the arc-plane sums, source r_e, and the arc flux fraction in the core box;
3. **mass-light misalignment**: on each paired control (the plain cutout of the lens), the
   r-band light's axis ratio and position angle from :func:`lensing.shapes.moments_shape`
   about the target's exact sub-pixel position in the stamp (``target_x_pix - stamp_x0``,
   ``target_y_pix - stamp_y0``; the same point as ``lens_x_arcsec / 0.262 + (N-1)/2``), against
   the SIE ``lens_phi_rad`` of its injection: median |PA_SIE - PA_light| [deg] over lenses
   whose measured light has q < ``q_max``;
4. **checks**: each configured metric against its threshold -> pass / fail / not_measured.

Writes ``realism_audit.json`` (schema :data:`SCHEMA`, docs/realism.md) and, with matplotlib,
``realism_audit.png`` (histograms with the reference percentiles, ROC curve, misalignment
histogram).  Failed checks are reported, never raised: the exit code is 0 unless
``--fail-on-check`` is given (then 1 when a check fails or is not measured).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np
import pandas as pd

from injection_pipeline import stamps_io
from lensing.photometry import mag_to_nMgy, nMgy_to_mag
from lensing.shapes import moments_shape, position_angle_difference

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover
    import tomli as tomllib  # type: ignore[no-redef]

SCHEMA = "realism_audit/1"
DEFAULT_CONF = Path(__file__).resolve().parents[2] / "conf" / "realism.toml"
JSON_NAME, PNG_NAME = "realism_audit.json", "realism_audit.png"

#: scalar stamp columns the audit reads (docs/manifests.md, docs/injection.md)
META_COLUMNS: tuple[str, ...] = (
    "task_id", "pair_id", "is_control", "brickname", "objid", "split", "tier",
    "theta_e_arcsec", "src_reff_arcsec", "lens_mag_r", "lens_q", "lens_phi_rad",
    "target_x_pix", "target_y_pix", "stamp_x0", "stamp_y0")
#: read when the stamps have them (the conditioned lens model's manifest columns)
OPTIONAL_META_COLUMNS: tuple[str, ...] = ("lens_light_q",)

#: distribution name -> (label, unit, definition); arc_core_fraction_<band> are added per
#: classifier band by :meth:`AuditConfig.distributions`
BASE_DISTRIBUTIONS: dict[str, tuple[str, str, str]] = {
    "theta_e_arcsec": ("theta_E", "arcsec", "manifest theta_e_arcsec (SIE, circularised)"),
    "arc_mag_r": ("arc total r", "AB mag", "22.5 - 2.5 log10 sum(arc_r) over the stamp"),
    "arc_lens_flux_ratio_r": ("arc/lens flux ratio r", "",
                              "sum(arc_r) / 10^(-0.4 (lens_mag_r - 22.5))"),
    "arc_colour_gr": ("arc g-r", "mag", "-2.5 log10(sum(arc_g) / sum(arc_r))"),
    "src_reff_arcsec": ("source r_e", "arcsec", "manifest src_reff_arcsec (major axis)"),
}
CLASSIFIER_STATS = ("auc_mean", "auc_std", "auc_min", "auc_max", "auc_pooled", "n_pairs",
                    "auc_cross_target_mean", "auc_cross_target_pooled")
MISALIGNMENT_STATS = ("median_deg", "p10_deg", "p90_deg", "median_deg_all", "n", "n_all")
CHECK_OPS = (">=", "<=", "in")
ROC_GRID = np.linspace(0.0, 1.0, 51)


# =========================================================================== configuration
@dataclass(frozen=True)
class ClassifierConf:
    core_px: int
    bands: tuple[str, ...]
    n_folds: int
    random_state: int
    C: float
    max_iter: int
    max_pairs: int
    #: distribution name -> increasing bin edges: out-of-fold AUC of the injections per bin
    diagnostic_bins: tuple[tuple[str, tuple[float, ...]], ...] = ()
    #: set name -> feature items (:func:`parse_feature_item`): the same model refitted on them
    diagnostic_feature_sets: tuple[tuple[str, tuple[str, ...]], ...] = ()


@dataclass(frozen=True)
class MisalignmentConf:
    band: str
    sigma_w_px: float
    q_max: float


@dataclass(frozen=True)
class Check:
    name: str
    metric: str
    op: str
    threshold: object          # float for >= / <=, (low, high) for "in"


@dataclass(frozen=True)
class AuditConfig:
    path: str
    splits: Optional[tuple[str, ...]]
    percentiles: tuple[float, ...]
    classifier: ClassifierConf
    misalignment: MisalignmentConf
    references: Mapping[str, Mapping]
    checks: tuple[Check, ...]

    def distributions(self) -> dict[str, tuple[str, str, str]]:
        """Every distribution the audit reports: name -> (label, unit, definition)."""
        out = dict(BASE_DISTRIBUTIONS)
        k = self.classifier.core_px
        for b in self.classifier.bands:
            out[f"arc_core_fraction_{b}"] = (
                f"arc core fraction {b}", "", f"sum(arc_{b} in the central {k}x{k} px) / "
                f"sum(arc_{b})")
        return out


def _get(raw: Mapping, path: str, sec: str, key: str, kind, check=None):
    """``raw[sec][key]``, of type ``kind`` and passing ``check``, else ValueError naming it."""
    sect = raw.get(sec)
    if not isinstance(sect, Mapping) or key not in sect:
        raise ValueError(f"{path}: missing [{sec}] {key}")
    val = sect[key]
    ok = isinstance(val, kind) and not isinstance(val, bool)       # TOML true is not 1
    if not ok or (check is not None and not check(val)):
        raise ValueError(f"{path}: [{sec}] {key} = {val!r} is not valid")
    return val


def load_config(path: str | os.PathLike | None = None) -> AuditConfig:
    """Read and validate conf/realism.toml (``path``: the file or a conf directory)."""
    p = Path(path) if path else DEFAULT_CONF
    if p.is_dir():
        p = p / "realism.toml"
    if not p.is_file():
        raise FileNotFoundError(f"realism audit configuration not found: {p}")
    with open(p, "rb") as f:
        raw = tomllib.load(f)
    ps = str(p)
    splits = _get(raw, ps, "audit", "splits", list, lambda v: all(isinstance(s, str) for s in v))
    pct = _get(raw, ps, "audit", "percentiles", list,
               lambda v: len(v) > 0 and all(isinstance(q, (int, float)) and 0 <= q <= 100
                                            for q in v))
    num = (int, float)
    cl = ClassifierConf(
        core_px=_get(raw, ps, "classifier", "core_px", int, lambda v: v >= 1),
        bands=tuple(_get(raw, ps, "classifier", "bands", list,
                         lambda v: len(v) > 0 and all(isinstance(b, str) for b in v))),
        n_folds=_get(raw, ps, "classifier", "n_folds", int, lambda v: v >= 2),
        random_state=_get(raw, ps, "classifier", "random_state", int, lambda v: v >= 0),
        C=float(_get(raw, ps, "classifier", "C", num, lambda v: v > 0)),
        max_iter=_get(raw, ps, "classifier", "max_iter", int, lambda v: v >= 1),
        max_pairs=_get(raw, ps, "classifier", "max_pairs", int, lambda v: v >= 0))
    bins_raw = raw["classifier"].get("diagnostic_bins", {})
    if not isinstance(bins_raw, Mapping):
        raise ValueError(f"{ps}: [classifier.diagnostic_bins] must be a table name = [edges]")
    bins = []
    for name, edges in bins_raw.items():
        if not (isinstance(edges, list) and len(edges) >= 2
                and all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in edges)
                and all(b > a for a, b in zip(edges[:-1], edges[1:]))):
            raise ValueError(f"{ps}: [classifier.diagnostic_bins] {name} = {edges!r}: need >= 2 "
                             f"strictly increasing numbers")
        bins.append((str(name), tuple(float(e) for e in edges)))
    sets_raw = raw["classifier"].get("diagnostic_feature_sets", {})
    if not isinstance(sets_raw, Mapping):
        raise ValueError(f"{ps}: [classifier.diagnostic_feature_sets] must be a table "
                         f"name = [items]")
    sets = []
    for name, items in sets_raw.items():
        where = f"{ps}: [classifier.diagnostic_feature_sets] {name} = {items!r}"
        if not (isinstance(items, list) and items and all(isinstance(i, str) for i in items)):
            raise ValueError(f"{where}: need a non-empty list of strings; {FEATURE_ITEMS_HELP}")
        if len(set(items)) != len(items):
            raise ValueError(f"{where}: an item is listed twice")
        for item in items:
            try:
                parse_feature_item(item, cl.bands)
            except ValueError as exc:
                raise ValueError(f"{where}: {exc}") from None
        sets.append((str(name), tuple(items)))
    cl = replace(cl, diagnostic_bins=tuple(bins), diagnostic_feature_sets=tuple(sets))
    mis = MisalignmentConf(
        band=_get(raw, ps, "misalignment", "band", str),
        sigma_w_px=float(_get(raw, ps, "misalignment", "sigma_w_px", num, lambda v: v > 0)),
        q_max=float(_get(raw, ps, "misalignment", "q_max", num, lambda v: 0 < v <= 1)))
    refs = raw.get("references", {})
    if not isinstance(refs, Mapping):
        raise ValueError(f"{ps}: [references] must be a table of tables")
    for name, ref in refs.items():
        if not isinstance(ref, Mapping):
            raise ValueError(f"{ps}: [references.{name}] must be a table")
        if name not in BASE_DISTRIBUTIONS:
            raise ValueError(f"{ps}: [references.{name}]: unknown distribution; known: "
                             f"{sorted(BASE_DISTRIBUTIONS)}")
        if not isinstance(ref.get("citation"), str) or not ref["citation"].strip():
            raise ValueError(f"{ps}: [references.{name}] needs a citation")
    checks_raw = raw.get("checks", [])
    if not isinstance(checks_raw, list):
        raise ValueError(f"{ps}: checks must be an array of tables ([[checks]])")
    cfg = AuditConfig(path=ps, splits=tuple(splits) or None,
                      percentiles=tuple(float(q) for q in pct), classifier=cl,
                      misalignment=mis, references=dict(refs), checks=())
    for name, _ in cl.diagnostic_bins:
        if name not in cfg.distributions():
            raise ValueError(f"{ps}: [classifier.diagnostic_bins] {name}: unknown distribution; "
                             f"known: {sorted(cfg.distributions())}")
    checks = []
    for i, c in enumerate(checks_raw):
        where = f"{ps}: [[checks]] #{i + 1}"
        for k in ("name", "metric", "op", "threshold"):
            if k not in c:
                raise ValueError(f"{where}: missing {k}")
        if c["op"] not in CHECK_OPS:
            raise ValueError(f"{where}: op {c['op']!r} not in {CHECK_OPS}")
        thr = c["threshold"]
        if c["op"] == "in":
            if not (isinstance(thr, list) and len(thr) == 2 and thr[0] <= thr[1]):
                raise ValueError(f"{where}: op 'in' needs threshold = [low, high]")
            thr = (float(thr[0]), float(thr[1]))
        elif isinstance(thr, (int, float)) and not isinstance(thr, bool):
            thr = float(thr)
        else:
            raise ValueError(f"{where}: threshold {thr!r} must be a number")
        _validate_metric(cfg, c["metric"], where)
        checks.append(Check(str(c["name"]), str(c["metric"]), str(c["op"]), thr))
    return replace(cfg, checks=tuple(checks))


def _pkey(q: float) -> str:
    return f"p{q:g}"


def _validate_metric(cfg: AuditConfig, metric: str, where: str) -> None:
    parts = metric.split(".")
    dist_stats = {_pkey(q) for q in cfg.percentiles} | {"mean", "n"}
    ok = (len(parts) == 3 and parts[0] == "distributions" and parts[1] in cfg.distributions()
          and parts[2] in dist_stats) or \
         (len(parts) == 2 and parts[0] == "classifier" and parts[1] in CLASSIFIER_STATS) or \
         (len(parts) == 2 and parts[0] == "misalignment" and parts[1] in MISALIGNMENT_STATS)
    if not ok:
        raise ValueError(f"{where}: unknown metric {metric!r}: use distributions.<name>.<stat> "
                         f"(names {sorted(cfg.distributions())}, stats {sorted(dist_stats)}), "
                         f"classifier.<{'|'.join(CLASSIFIER_STATS)}> or "
                         f"misalignment.<{'|'.join(MISALIGNMENT_STATS)}>")


# =========================================================================== reduction
@dataclass
class Reduced:
    """Per-row scalars of the audited rows (``table``, sorted by task_id) and the core-box
    features (``features``: (rows, len(bands) * core_px**2) float32, raw nMgy per pixel)."""

    table: pd.DataFrame
    features: np.ndarray
    bands: str = ""
    stamp_size: int = 0
    source: str = ""


def core_slice(n: int, core_px: int) -> slice:
    """Rows/columns of the central ``core_px`` box of an ``n``-px stamp: start n//2 - core_px//2.

    The target sits at stamp index n//2 (+-0.5 px, ``dr10.cutout_origin``): for n = 64,
    core_px = 10 the box is pixels 27..36, centred on (n-1)/2 = 31.5.
    """
    if not 1 <= core_px <= n:
        raise ValueError(f"core box of {core_px} px does not fit a {n}-px stamp")
    start = n // 2 - core_px // 2
    return slice(start, start + core_px)


def core_features(image: np.ndarray, bands: str, cc: ClassifierConf) -> np.ndarray:
    """Core-only features: the central ``core_px`` box of ``image`` (rows, B, N, N) in the
    bands ``cc.bands``, raw nMgy per pixel, flattened to (rows, len(cc.bands) * core_px**2)
    float32 (also the shortcut finder of analysis/baseline_finder.py)."""
    sl = core_slice(image.shape[-1], cc.core_px)
    feats = image[:, [bands.index(b) for b in cc.bands], sl, sl]
    return np.ascontiguousarray(feats, dtype=np.float32).reshape(len(image), -1)


FEATURE_ITEMS_HELP = ("items: '<band>' = that band's core_px x core_px raw pixels, "
                      "'<band1>/<band2>' = the core-box flux ratio sum(core band1) / "
                      "sum(core band2) (one feature: a colour), bands from [classifier] bands")


def parse_feature_item(item: str, bands: Sequence[str]) -> tuple[str, ...]:
    """One item of a diagnostic feature set: ``'<band>'`` -> ``('pixels', band)`` (the band's
    core_px**2 raw core pixels); ``'<b1>/<b2>'`` -> ``('ratio', b1, b2)`` (the flux ratio of the
    summed core box, sum(core b1) / sum(core b2): a colour, blind to the total brightness).
    ValueError for anything else (a band not in ``bands``, b1 == b2)."""
    if item in bands:
        return ("pixels", item)
    parts = item.split("/")
    if len(parts) == 2 and parts[0] in bands and parts[1] in bands and parts[0] != parts[1]:
        return ("ratio", parts[0], parts[1])
    raise ValueError(f"unknown feature item {item!r} ({FEATURE_ITEMS_HELP}: {list(bands)})")


def feature_set_matrix(X: np.ndarray, cc: ClassifierConf,
                       items: Sequence[str]) -> tuple[np.ndarray, int]:
    """(features, n_undefined) of a diagnostic feature set from the core features ``X``
    (:func:`core_features`: band blocks of core_px**2 pixels in the order ``cc.bands``).
    A ratio whose denominator sum is <= 0 (or not finite) is undefined on that row: it takes
    the median of the defined values (label-blind), and ``n_undefined`` counts such rows."""
    k = cc.core_px ** 2
    Xf = np.asarray(X, np.float64)
    block = {b: Xf[:, i * k:(i + 1) * k] for i, b in enumerate(cc.bands)}
    cols, bad = [], np.zeros(len(Xf), bool)
    for item in items:
        kind, *bs = parse_feature_item(item, cc.bands)
        if kind == "pixels":
            cols.append(block[bs[0]])
            continue
        num, den = block[bs[0]].sum(axis=1), block[bs[1]].sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(den > 0, num / den, np.nan)
        undef = ~np.isfinite(ratio)
        if undef.any():
            ratio[undef] = np.median(ratio[~undef]) if (~undef).any() else 0.0
        bad |= undef
        cols.append(ratio[:, None])
    return np.concatenate(cols, axis=1), int(bad.sum())


def feature_set_aucs(X: np.ndarray, y: np.ndarray, groups: np.ndarray,
                     cc: ClassifierConf) -> dict:
    """The core classifier (:func:`core_model`, the same grouped folds) refitted on each
    ``cc.diagnostic_feature_sets`` subset of the core features: set name -> cross-target
    pooled out-of-fold AUC (the number to compare; also the per-fold mean and the plain
    pooled AUC), the items and the feature count.  Which part of the core pixels separates
    injections from their controls: a colour set near the full set and single bands near
    chance mean the signal is the arc's colour, not its brightness."""
    out = {}
    for name, items in cc.diagnostic_feature_sets:
        Xs, n_undef = feature_set_matrix(X, cc, items)
        res, _ = core_classifier(Xs, y, groups, cc)
        out[name] = {"features": list(items), "n_features": int(Xs.shape[1]),
                     "n_rows_undefined": n_undef, "status": res["status"],
                     **{k: res.get(k) for k in ("auc_cross_target_pooled",
                                                "auc_cross_target_mean", "auc_pooled",
                                                "converged")}}
    return out


def core_model(cc: ClassifierConf):
    """The audit's core classifier: StandardScaler + LogisticRegression(C, lbfgs, max_iter)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=cc.C, max_iter=cc.max_iter))


def reduce_chunk(st: stamps_io.Stamps, cfg: AuditConfig, splits: Optional[Sequence[str]] = None,
                 source: str = "stamps") -> Reduced:
    """Reduce one :class:`stamps_io.Stamps` chunk to the audit's per-row quantities.

    Keeps rows with ``status == 'ok'`` (when the column is present) in ``splits`` (None: all).
    Adds ``arc_sum_<b>`` and ``arc_core_sum_<b>`` [nMgy] for every stamp band, the light
    shape of controls ``light_q``, ``light_phi_rad`` [rad] (NaN when moments fail, reason in
    ``light_note``) and ``group`` = ``brickname/objid``.
    """
    if st.meta is None or len(st) == 0:
        return _empty(cfg, source)
    meta = st.meta.to_pandas() if hasattr(st.meta, "to_pandas") else pd.DataFrame(st.meta)
    missing = [c for c in META_COLUMNS if c not in meta.columns]
    if missing:
        raise ValueError(f"{source}: the stamps lack column(s) {missing} needed by the realism "
                         f"audit (present: {sorted(meta.columns)})")
    if st.image is None or st.arc is None:
        raise ValueError(f"{source}: the realism audit needs the 'image' and 'arc' planes")
    keep = np.ones(len(meta), bool)
    if "status" in meta.columns:
        keep &= (meta["status"] == "ok").to_numpy()
    if splits is not None:
        keep &= meta["split"].isin(list(splits)).to_numpy()
    meta = meta.loc[keep, list(META_COLUMNS) + [c for c in OPTIONAL_META_COLUMNS
                                                 if c in meta.columns]].reset_index(drop=True)
    image, arc = st.image[keep], st.arc[keep]
    n = image.shape[-1]
    bands = st.bands
    absent = [b for b in cfg.classifier.bands if b not in bands]
    if absent:
        raise ValueError(f"{source}: classifier band(s) {absent} not in the stamps' bands "
                         f"{bands!r} ({cfg.path} [classifier] bands)")
    sl = core_slice(n, cfg.classifier.core_px)
    feats = core_features(image, bands, cfg.classifier)
    arc_sum = arc.sum(axis=(-2, -1), dtype=np.float64)                     # (rows, B)
    arc_core = arc[:, :, sl, sl].sum(axis=(-2, -1), dtype=np.float64)
    for k, b in enumerate(bands):
        meta[f"arc_sum_{b}"] = arc_sum[:, k]
        meta[f"arc_core_sum_{b}"] = arc_core[:, k]
    meta["group"] = meta["brickname"].astype(str) + "/" + meta["objid"].astype(str)
    q, phi, note = _light_shapes(meta, image, bands, cfg.misalignment, source)
    meta["light_q"], meta["light_phi_rad"], meta["light_note"] = q, phi, note
    return Reduced(table=meta, features=feats, bands=bands, stamp_size=n, source=source)


def _light_shapes(meta: pd.DataFrame, image: np.ndarray, bands: str, mc: MisalignmentConf,
                  source: str):
    """moments_shape of each control's ``mc.band`` plane about the target's exact position."""
    rows = len(meta)
    q, phi = np.full(rows, np.nan), np.full(rows, np.nan)
    note = np.full(rows, None, dtype=object)
    ctl = np.flatnonzero(meta["is_control"].to_numpy() == 1)
    if ctl.size == 0:
        return q, phi, note
    if mc.band not in bands:
        raise ValueError(f"{source}: misalignment band {mc.band!r} not in the stamps' bands "
                         f"{bands!r}")
    ib = bands.index(mc.band)
    xc = meta["target_x_pix"].to_numpy(float) - meta["stamp_x0"].to_numpy(float)
    yc = meta["target_y_pix"].to_numpy(float) - meta["stamp_y0"].to_numpy(float)
    for i in ctl:                                   # one moments measurement per control stamp
        if not (np.isfinite(xc[i]) and np.isfinite(yc[i])):
            note[i] = "no target position"
            continue
        try:
            q[i], phi[i] = moments_shape(image[i, ib], xc[i], yc[i], mc.sigma_w_px)
        except ValueError as exc:
            note[i] = str(exc)
    return q, phi, note


def _empty(cfg: AuditConfig, source: str) -> Reduced:
    nf = len(cfg.classifier.bands) * cfg.classifier.core_px ** 2
    cols = list(META_COLUMNS) + ["group", "light_q", "light_phi_rad", "light_note"]
    return Reduced(table=pd.DataFrame({c: [] for c in cols}),
                   features=np.zeros((0, nf), np.float32), source=source)


def concat_reduced(parts: Iterable[Reduced], cfg: AuditConfig, source: str = "") -> Reduced:
    """Concatenate chunks and sort by task_id (deterministic order whatever the file order)."""
    parts = [p for p in parts if len(p.table)]
    if not parts:
        return _empty(cfg, source)
    if len({(p.bands, p.stamp_size) for p in parts}) != 1:
        raise ValueError(f"{source}: rows with different bands or stamp sizes: audit one "
                         f"experiment at a time")
    table = pd.concat([p.table for p in parts], ignore_index=True)
    feats = np.concatenate([p.features for p in parts])
    order = np.argsort(table["task_id"].to_numpy(dtype=str), kind="stable")
    if table["task_id"].duplicated().any():
        dup = table.loc[table["task_id"].duplicated(), "task_id"].iloc[0]
        raise ValueError(f"{source}: task_id {dup!r} appears twice")
    return Reduced(table=table.iloc[order].reset_index(drop=True), features=feats[order],
                   bands=parts[0].bands, stamp_size=parts[0].stamp_size, source=source)


def load_reduced(stamps_path: str, cfg: AuditConfig, splits: Optional[Sequence[str]] = None,
                 batch_rows: int = 1024) -> Reduced:
    """Stream the ok rows of ``splits`` from a 4c stamps directory (bounded memory)."""
    names = stamps_io.column_names(stamps_path)
    missing = [c for c in META_COLUMNS + ("image", "arc") if c not in names]
    if missing:
        raise ValueError(f"{stamps_path}: column(s) {missing} needed by the realism audit are "
                         f"not in the stamps")
    chunks = stamps_io.iter_stamps(stamps_path, columns=("image", "arc"),
                                   meta_columns=list(META_COLUMNS) + ["status"] + [
                                       c for c in OPTIONAL_META_COLUMNS if c in names],
                                   splits=splits,
                                   status="ok", batch_rows=batch_rows)
    return concat_reduced((reduce_chunk(c, cfg, None, stamps_path) for c in chunks), cfg,
                          stamps_path)


# =========================================================================== 1. classifier
def pair_positions(table: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(injection rows, control rows) of every control whose ``pair_id`` is an injection's
    ``task_id`` in ``table``; sorted by the injection's position."""
    is_ctl = table["is_control"].to_numpy() == 1
    inj_rows = np.flatnonzero(~is_ctl)
    by_id = pd.Series(inj_rows, index=table["task_id"].to_numpy()[inj_rows])
    ctl_rows = np.flatnonzero(is_ctl & table["pair_id"].notna().to_numpy())
    match = by_id.reindex(table["pair_id"].to_numpy()[ctl_rows]).to_numpy()
    found = ~pd.isna(match)
    inj, ctl = match[found].astype(np.int64), ctl_rows[found]
    order = np.argsort(inj, kind="stable")
    return inj[order], ctl[order]


def grouped_folds(y: np.ndarray, groups: np.ndarray, n_folds: int, random_state: int):
    """StratifiedGroupKFold(n_folds, shuffle, random_state) folds: list of (train, test)
    index arrays; every group lies in exactly one test fold."""
    from sklearn.model_selection import StratifiedGroupKFold

    cv = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=random_state)
    return list(cv.split(np.zeros((len(y), 1)), y, groups))


def classifier_rows(table: pd.DataFrame, cc: ClassifierConf) -> tuple[np.ndarray, np.ndarray, int]:
    """(rows, y, n_pairs_total): table positions of the paired injections (y = 1) followed by
    their controls (y = 0); at most ``max_pairs`` pairs (deterministic subsample)."""
    inj, ctl = pair_positions(table)
    n_total = int(inj.size)
    if cc.max_pairs and n_total > cc.max_pairs:
        pick = np.sort(np.random.default_rng(cc.random_state).choice(n_total, cc.max_pairs,
                                                                     replace=False))
        inj, ctl = inj[pick], ctl[pick]
    y = np.concatenate([np.ones(inj.size, np.int8), np.zeros(ctl.size, np.int8)])
    return np.concatenate([inj, ctl]), y, n_total


def classifier_inputs(red: Reduced, cc: ClassifierConf):
    """(X, y, groups, n_pairs_total) of :func:`classifier_rows`."""
    rows, y, n_total = classifier_rows(red.table, cc)
    groups = red.table["group"].to_numpy(dtype=str)[rows]
    return red.features[rows], y, groups, n_total


def binned_auc(y: np.ndarray, score: np.ndarray, groups: np.ndarray, values: np.ndarray,
               edges: Sequence[float]) -> list[dict]:
    """Cross-target AUC of the out-of-fold ``score`` over the pairs whose injection's value
    lies in each bin [lo, hi): those injections against their own paired controls (each
    control a target's plain cutout; only pairs of different targets count), so a bin that
    selects a kind of target (e.g. large theta_E: massive, bright lenses) compares like with
    like.  ``y``/``score``/``groups``: the classifier rows, n paired injections then their n
    controls in the same order (:func:`classifier_rows`); ``values``: the pair's value (n).
    One classifier, not refitted per bin."""
    n = int(y.size // 2)
    if y.size != 2 * n or not ((y[:n] == 1).all() and (y[n:] == 0).all()) or values.size != n:
        raise ValueError("binned_auc: rows must be n injections then their n paired controls")
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        with np.errstate(invalid="ignore"):
            m = (values >= lo) & (values < hi)
        sel = np.concatenate([m, m])
        k = int(m.sum())
        auc = cross_target_auc(y[sel], score[sel], groups[sel]) \
            if k and len(np.unique(groups[sel])) > 1 else float("nan")
        out.append({"low": float(lo), "high": float(hi), "n_pairs": k,
                    "auc_cross_target": float(auc)})
    return out


def _mann_whitney_u(pos: np.ndarray, neg: np.ndarray) -> float:
    """Number of (pos, neg) pairs with pos > neg, ties counted 1/2 (average ranks)."""
    s = np.concatenate([pos, neg])
    order = np.argsort(s, kind="stable")
    ranks = np.empty(s.size)
    sorted_s = s[order]
    _, first, counts = np.unique(sorted_s, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0                 # 1-based average rank of each tie block
    ranks[order] = np.repeat(avg, counts)
    return float(ranks[:pos.size].sum() - pos.size * (pos.size + 1) / 2.0)


def cross_target_auc(y: np.ndarray, score: np.ndarray, groups: np.ndarray) -> float:
    """ROC AUC over (injection, control) pairs of DIFFERENT targets only.

    With paired controls every target's controls are its own cutout: an injection outranks
    the controls of its own target whenever the classifier's weights see any positive arc
    flux, however faint, so the plain AUC grows with the fraction of same-target pairs (few
    targets, many passes each) and not with what a finder could use on a new galaxy, which
    it never sees with and without an arc.  This AUC leaves those pairs out:
    (U_all - sum_g U_g) / (n1 n0 - sum_g n1_g n0_g), U the Mann-Whitney count.
    """
    y = np.asarray(y).astype(bool)
    score = np.asarray(score, np.float64)
    groups = np.asarray(groups)
    u_all = _mann_whitney_u(score[y], score[~y])
    n_all = float(y.sum()) * float((~y).sum())
    u_same = n_same = 0.0
    for g in np.unique(groups):
        m = groups == g
        p, n = score[m & y], score[m & ~y]
        if p.size and n.size:
            u_same += _mann_whitney_u(p, n)
            n_same += float(p.size) * float(n.size)
    return (u_all - u_same) / (n_all - n_same) if n_all > n_same else float("nan")


def core_classifier(X: np.ndarray, y: np.ndarray, groups: np.ndarray, cc: ClassifierConf,
                    core_box: Optional[Sequence[int]] = None) -> tuple[dict, dict]:
    """Grouped-CV ROC AUC of StandardScaler + LogisticRegression on the core features.

    Returns (result, arrays): ``result`` for the JSON (AUC per fold, mean, std, pooled
    out-of-fold AUC, ROC curve on a 51-point FPR grid, ...), ``arrays`` the out-of-fold scores
    and the raw ROC curve for the figure.
    """
    res: dict = {"n_pairs": int(y.sum()), "n_rows": int(len(y)), "n_features": int(X.shape[1]),
                 "core_px": cc.core_px, "core_box_px": list(core_box) if core_box else None,
                 "bands": list(cc.bands), "n_folds": cc.n_folds,
                 "random_state": cc.random_state,
                 "normalisation": "none: raw nMgy per pixel; StandardScaler per feature fitted "
                                  "on each training fold",
                 "model": f"StandardScaler + LogisticRegression(C={cc.C:g}, lbfgs, "
                          f"max_iter={cc.max_iter})",
                 "cv": "StratifiedGroupKFold(shuffle=True), group = brickname/objid"}
    n_groups = len(np.unique(groups))
    res["n_groups"] = n_groups
    if len(np.unique(y)) < 2 or n_groups < cc.n_folds:
        res.update(status="not_measured",
                   reason=f"{int(y.sum())} injection/control pairs on {n_groups} targets: "
                          f"need both classes and >= {cc.n_folds} targets")
        return res, {}
    try:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression  # noqa: F401 - availability
        from sklearn.metrics import roc_auc_score, roc_curve
    except ImportError as exc:
        res.update(status="not_measured", reason=f"scikit-learn is not installed ({exc}); "
                                                 f"pip install -e .[qa]")
        return res, {}
    folds = grouped_folds(y, groups, cc.n_folds, cc.random_state)
    oof = np.full(len(y), np.nan)
    aucs, cross, sizes, converged = [], [], [], True
    Xf = np.asarray(X, dtype=np.float64)
    for train, test in folds:
        model = core_model(cc)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            model.fit(Xf[train], y[train])
        converged &= not any(issubclass(w.category, ConvergenceWarning) for w in caught)
        oof[test] = model.predict_proba(Xf[test])[:, 1]
        yt = y[test]
        aucs.append(float(roc_auc_score(yt, oof[test])) if len(np.unique(yt)) == 2
                    else float("nan"))
        cross.append(cross_target_auc(yt, oof[test], groups[test]) if len(np.unique(yt)) == 2
                     else float("nan"))
        sizes.append({"test_rows": int(len(test)), "test_injections": int(yt.sum())})
    a = np.asarray(aucs)
    c = np.asarray(cross)
    fpr, tpr, _ = roc_curve(y, oof)
    res.update(status="measured", auc_cross_target_per_fold=cross,
               auc_cross_target_mean=float(np.nanmean(c)),
               auc_cross_target_pooled=float(cross_target_auc(y, oof, groups)),
               auc_per_fold=aucs, auc_mean=float(np.nanmean(a)),
               auc_std=float(np.nanstd(a)), auc_min=float(np.nanmin(a)),
               auc_max=float(np.nanmax(a)), auc_pooled=float(roc_auc_score(y, oof)),
               fold_sizes=sizes, converged=bool(converged),
               roc_curve={"fpr": ROC_GRID.tolist(),
                          "tpr": np.interp(ROC_GRID, fpr, tpr).round(6).tolist()})
    return res, {"oof_score": oof, "y": y, "fpr": fpr, "tpr": tpr}


# =========================================================================== 2. distributions
def percentiles(values, qs: Sequence[float]) -> dict:
    """n, n_nonfinite, mean and p<q> (numpy linear interpolation) of the finite values."""
    v = np.asarray(values, dtype=np.float64)
    fin = v[np.isfinite(v)]
    out = {"n": int(fin.size), "n_nonfinite": int(v.size - fin.size)}
    if fin.size:
        out["mean"] = float(fin.mean())
        out.update({_pkey(q): float(p) for q, p in zip(qs, np.percentile(fin, list(qs)))})
    else:
        out["mean"] = None
        out.update({_pkey(q): None for q in qs})
    return out


def distribution_values(table: pd.DataFrame, bands: Sequence[str],
                        injections_only: bool = True) -> dict[str, np.ndarray]:
    """Per-injection values of every distribution (NaN where undefined, e.g. arc sum <= 0);
    ``injections_only=False``: one value per table row (meaningless for controls)."""
    inj = table[table["is_control"].to_numpy() == 0] if injections_only else table
    col = lambda c: inj[c].to_numpy(dtype=np.float64) if c in inj else \
        np.full(len(inj), np.nan)
    arc_r, arc_g = col("arc_sum_r"), col("arc_sum_g")
    with np.errstate(divide="ignore", invalid="ignore"):
        out = {"theta_e_arcsec": col("theta_e_arcsec"),
               "arc_mag_r": nMgy_to_mag(arc_r),
               "arc_lens_flux_ratio_r": np.where(arc_r > 0, arc_r, np.nan)
               / mag_to_nMgy(col("lens_mag_r")),
               "arc_colour_gr": nMgy_to_mag(arc_g) - nMgy_to_mag(arc_r),
               "src_reff_arcsec": col("src_reff_arcsec")}
        for b in bands:
            tot = col(f"arc_sum_{b}")
            out[f"arc_core_fraction_{b}"] = np.where(tot > 0, col(f"arc_core_sum_{b}") / tot,
                                                     np.nan)
    return out


def distributions(table: pd.DataFrame, cfg: AuditConfig) -> tuple[dict, dict]:
    """(result, arrays): percentiles of every distribution with its reference (if any)."""
    vals = distribution_values(table, cfg.classifier.bands)
    res = {}
    for name, (label, unit, definition) in cfg.distributions().items():
        d = {"label": label, "unit": unit, "definition": definition,
             **percentiles(vals[name], cfg.percentiles)}
        d["reference"] = dict(cfg.references[name]) if name in cfg.references else None
        res[name] = d
    return res, vals


# =========================================================================== 3. misalignment
def misalignment(table: pd.DataFrame, mc: MisalignmentConf,
                 qs: Sequence[float] = (10, 50, 90)) -> tuple[dict, dict]:
    """|PA_SIE - PA_light| [deg] per (injection, paired control) from the control's measured
    light (``light_q``, ``light_phi_rad``) and the injection's ``lens_phi_rad``."""
    inj, ctl = pair_positions(table)
    res: dict = {"band": mc.band, "sigma_w_px": mc.sigma_w_px, "q_max": mc.q_max,
                 "centre": "target_x_pix - stamp_x0, target_y_pix - stamp_y0 (exact sub-pixel "
                           "target position in the stamp)",
                 "n_pairs": int(inj.size), "isotropic_expectation_deg": 45.0}
    light_q = table["light_q"].to_numpy(np.float64)[ctl]
    light_phi = table["light_phi_rad"].to_numpy(np.float64)[ctl]
    sie_phi = table["lens_phi_rad"].to_numpy(np.float64)[inj]
    sie_q = table["lens_q"].to_numpy(np.float64)[inj]
    ok = np.isfinite(light_q) & np.isfinite(light_phi) & np.isfinite(sie_phi)
    notes = Counter(str(n) for n in table["light_note"].to_numpy()[ctl] if n is not None)
    dpa = np.full(inj.size, np.nan)
    dpa[ok] = np.degrees(position_angle_difference(sie_phi[ok], light_phi[ok]))
    # which lenses are elongated: the catalogue's (Tractor, PSF-deconvolved) axis ratio of
    # the light where the manifest carries it (lens_light_q, conditioned model), else the
    # measured moments q (rounded by the PSF and the weight: a weaker selection)
    cat_q = (table["lens_light_q"].to_numpy(np.float64)[inj] if "lens_light_q" in table
             else np.full(inj.size, np.nan))
    use_cat = np.isfinite(cat_q)
    sel_q = np.where(use_cat, cat_q, light_q)
    res["q_selection"] = {"catalogue_lens_light_q": int((ok & use_cat).sum()),
                          "measured_moments_q": int((ok & ~use_cat).sum())}
    sel = ok & (sel_q < mc.q_max)
    res.update(n_measured=int(ok.sum()), n_failed=int((~ok).sum()),
               failure_reasons=dict(notes.most_common(5)), n=int(sel.sum()),
               n_all=int(ok.sum()),
               median_deg=float(np.median(dpa[sel])) if sel.any() else None,
               p10_deg=float(np.percentile(dpa[sel], 10)) if sel.any() else None,
               p90_deg=float(np.percentile(dpa[sel], 90)) if sel.any() else None,
               median_deg_all=float(np.median(dpa[ok])) if ok.any() else None,
               light_q=percentiles(light_q, qs), sie_q=percentiles(sie_q[ok], qs))
    res["status"] = "measured" if sel.any() else "not_measured"
    if not sel.any():
        res["reason"] = (f"no paired control with light q < {mc.q_max:g} "
                         f"({inj.size} pairs, {int(ok.sum())} measured)")
    return res, {"dpa_deg": dpa, "selected": sel, "light_q": light_q}


# =========================================================================== 4. checks
def metric_value(results: Mapping, metric: str):
    """The value at dotted path ``metric`` of the results (None when absent)."""
    node = results
    for part in metric.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def evaluate_checks(results: Mapping, checks: Sequence[Check]) -> list[dict]:
    """Each check: name, metric, op, threshold, value, status ('pass' | 'fail' |
    'not_measured') and pass (bool)."""
    out = []
    for c in checks:
        v = metric_value(results, c.metric)
        v = float(v) if isinstance(v, (int, float, np.number)) and not isinstance(v, bool) \
            else None
        if v is None or not math.isfinite(v):
            status = "not_measured"
        elif c.op == ">=":
            status = "pass" if v >= c.threshold else "fail"
        elif c.op == "<=":
            status = "pass" if v <= c.threshold else "fail"
        else:
            lo, hi = c.threshold
            status = "pass" if lo <= v <= hi else "fail"
        out.append({"name": c.name, "metric": c.metric, "op": c.op,
                    "threshold": list(c.threshold) if c.op == "in" else c.threshold,
                    "value": v, "status": status, "pass": status == "pass"})
    return out


# =========================================================================== the audit
@dataclass
class AuditResult:
    report: dict                 # what realism_audit.json holds
    arrays: dict                 # per-row values for the figure (not written)


def run_audit(red: Reduced, cfg: AuditConfig) -> AuditResult:
    """Every measurement and check on reduced rows (no I/O)."""
    t = red.table
    is_ctl = t["is_control"].to_numpy() == 1 if len(t) else np.zeros(0, bool)
    inj_pos, _ = pair_positions(t) if len(t) else (np.zeros(0, int), None)
    tiers = t["tier"].value_counts().to_dict() if len(t) else {}
    report: dict = {
        "schema": SCHEMA, "stamps": red.source, "config": cfg.path,
        "splits": list(cfg.splits) if cfg.splits else None,
        "stamp_size_px": red.stamp_size, "bands": red.bands,
        "percentiles": list(cfg.percentiles),
        "counts": {"rows_ok": int(len(t)), "injections_ok": int((~is_ctl).sum()),
                   "controls_ok": int(is_ctl.sum()), "pairs_ok": int(len(inj_pos)),
                   "targets": int(t["group"].nunique()) if len(t) else 0,
                   "tiers": {str(k): int(v) for k, v in tiers.items()}},
    }
    rows, y, n_total = classifier_rows(t, cfg.classifier)
    X, groups = red.features[rows], t["group"].to_numpy(dtype=str)[rows]
    box = core_slice(red.stamp_size, cfg.classifier.core_px) if red.stamp_size else None
    clf, clf_arr = core_classifier(X, y, groups, cfg.classifier,
                                   [box.start, box.stop - 1] if box else None)
    clf["n_pairs_total"] = n_total
    if clf.get("status") == "measured" and cfg.classifier.diagnostic_bins:
        vals = distribution_values(t, cfg.classifier.bands, injections_only=False)
        inj_rows = rows[: rows.size // 2]
        clf["auc_by_bin"] = {name: binned_auc(y, clf_arr["oof_score"], groups,
                                              vals[name][inj_rows], edges)
                             for name, edges in cfg.classifier.diagnostic_bins}
    if clf.get("status") == "measured" and cfg.classifier.diagnostic_feature_sets:
        clf["auc_by_feature_set"] = feature_set_aucs(X, y, groups, cfg.classifier)
    dist, dist_arr = distributions(t, cfg)
    mis, mis_arr = misalignment(t, cfg.misalignment, cfg.percentiles)
    report.update(classifier=clf, distributions=dist, misalignment=mis)
    checks = evaluate_checks(report, cfg.checks)
    n = Counter(c["status"] for c in checks)
    report["checks"] = checks
    report["summary"] = {"n_checks": len(checks), "n_pass": n["pass"], "n_fail": n["fail"],
                         "n_not_measured": n["not_measured"],
                         "all_pass": bool(checks) and n["pass"] == len(checks)}
    return AuditResult(report=report, arrays={"classifier": clf_arr, "distributions": dist_arr,
                                              "misalignment": mis_arr})


def _fmt(v, spec: str = ".3g") -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else \
        format(v, spec)


def format_table(report: Mapping) -> str:
    """The audit as a readable text table."""
    c = report["counts"]
    qs = [_pkey(q) for q in report["percentiles"]]
    lines = [f"realism audit of {report['stamps']} (splits {report['splits']}): "
             f"{c['injections_ok']} injections, {c['controls_ok']} controls, {c['pairs_ok']} "
             f"pairs on {c['targets']} targets",
             "",
             f"{'distribution (injections)':30s} {'n':>5s} " + " ".join(f"{q:>7s}" for q in qs)
             + "   reference"]
    for name, d in report["distributions"].items():
        ref = d["reference"]
        rtxt = ""
        if ref:
            vals = [f"{k}={ref[k]:g}" for k in ("p10", "p50", "p90", "min", "max") if k in ref]
            rtxt = " ".join(vals)
        label = d["label"] + (f" [{d['unit']}]" if d["unit"] else "")
        lines.append(f"{label[:30]:30s} {d['n']:5d} " + " ".join(f"{_fmt(d[q]):>7s}" for q in qs)
                     + f"   {rtxt}")
    cl = report["classifier"]
    lines.append("")
    if cl.get("status") == "measured":
        lines.append(f"core-only classifier ({cl['core_px']}x{cl['core_px']} px x "
                     f"{''.join(cl['bands'])}, {cl['n_folds']}-fold grouped CV, "
                     f"{cl['n_pairs']} pairs, {cl['n_groups']} targets): ROC AUC mean "
                     f"{cl['auc_mean']:.3f} +- {cl['auc_std']:.3f} (cross-target pairs "
                     f"{cl['auc_cross_target_mean']:.3f}), folds "
                     + " ".join(f"{a:.3f}" for a in cl["auc_per_fold"])
                     + f", pooled out-of-fold {cl['auc_pooled']:.3f}")
        labels = report["distributions"]
        for name, bins in cl.get("auc_by_bin", {}).items():
            lab = labels[name]["label"] if name in labels else name
            lines.append(f"  cross-target AUC of the injections by {lab}: " + "; ".join(
                f"[{b['low']:g}, {b['high']:g}) {_fmt(b['auc_cross_target'], '.3f')} "
                f"(n={b['n_pairs']})" for b in bins))
        sets = cl.get("auc_by_feature_set", {})
        if sets:
            lines.append(f"  cross-target pooled AUC by feature set (same model and folds): all "
                         f"{''.join(cl['bands'])} pixels {cl['auc_cross_target_pooled']:.3f}; "
                         + "; ".join(f"{name} [{','.join(s['features'])}] "
                                     f"{_fmt(s['auc_cross_target_pooled'], '.3f')}"
                                     for name, s in sets.items()))
    else:
        lines.append(f"core-only classifier: not measured ({cl.get('reason')})")
    m = report["misalignment"]
    if m.get("status") == "measured":
        lines.append(f"mass-light misalignment |PA_SIE - PA_light| ({m['band']}, light q < "
                     f"{m['q_max']:g}): median {m['median_deg']:.1f} deg (n={m['n']}; "
                     f"p10 {m['p10_deg']:.1f}, p90 {m['p90_deg']:.1f}); all measured lenses "
                     f"{_fmt(m['median_deg_all'], '.1f')} deg (n={m['n_all']}); isotropic "
                     f"expectation 45 deg")
    else:
        lines.append(f"mass-light misalignment: not measured ({m.get('reason')})")
    lines += ["", f"{'check':48s} {'value':>9s}  {'threshold':16s} result"]
    for ch in report["checks"]:
        thr = f"in [{ch['threshold'][0]:g}, {ch['threshold'][1]:g}]" if ch["op"] == "in" \
            else f"{ch['op']} {ch['threshold']:g}"
        lines.append(f"{ch['name'][:48]:48s} {_fmt(ch['value'], '.4g'):>9s}  {thr:16s} "
                     f"{ch['status'].upper()}")
    s = report["summary"]
    lines.append(f"{s['n_checks']} checks: {s['n_pass']} pass, {s['n_fail']} fail, "
                 f"{s['n_not_measured']} not measured")
    return "\n".join(lines)


# =========================================================================== figure
def plot_audit(result: AuditResult, path: str) -> None:
    """Histograms of the distributions with the reference (red dashed) and measured (black
    dotted) percentiles, the ROC curve of the core classifier and the misalignment histogram."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rep, arr = result.report, result.arrays
    names = list(BASE_DISTRIBUTIONS) + (["arc_core_fraction_r"] if "arc_core_fraction_r" in
                                        rep["distributions"] else [])
    fig, axes = plt.subplots(3, 3, figsize=(13, 11))
    flat = axes.ravel()
    for ax, name in zip(flat, names):
        d = rep["distributions"][name]
        v = np.asarray(arr["distributions"][name], np.float64)
        v = v[np.isfinite(v)]
        log = name == "arc_lens_flux_ratio_r"
        if log:
            v = np.log10(v[v > 0])
        tr = (lambda x: math.log10(x)) if log else (lambda x: x)
        if v.size:
            ax.hist(v, bins=min(30, max(5, v.size // 3)), color="0.7")
        for k in [_pkey(q) for q in rep["percentiles"]]:
            if d[k] is not None:
                ax.axvline(tr(d[k]), color="k", ls=":", lw=1.2)
        ref = d["reference"]
        if ref:
            for k in ("p10", "p50", "p90"):
                if k in ref:
                    ax.axvline(tr(ref[k]), color="tab:red", ls="--", lw=1.2)
            if "min" in ref and "max" in ref:
                ax.axvspan(tr(ref["min"]), tr(ref["max"]), color="tab:red", alpha=0.08)
        unit = f" [{d['unit']}]" if d["unit"] else ""
        ax.set_xlabel(("log10 " if log else "") + d["label"] + unit + ": " + d["definition"],
                      fontsize=7)
        ax.set_title(f"n={d['n']}; black: measured, red: reference", fontsize=8)
    ax = flat[6]
    cl = rep["classifier"]
    if cl.get("status") == "measured":
        ax.plot(arr["classifier"]["fpr"], arr["classifier"]["tpr"], color="tab:blue",
                label=f"pooled out-of-fold AUC {cl['auc_pooled']:.3f}")
        ax.set_title(f"core-only classifier: AUC cross-target {cl['auc_cross_target_mean']:.3f}, "
                     f"plain {cl['auc_mean']:.3f} +- {cl['auc_std']:.3f} ({cl['n_folds']} folds)",
                     fontsize=8)
        ax.legend(fontsize=7, loc="lower right")
    else:
        ax.set_title("core classifier not measured", fontsize=8)
    ax.plot([0, 1], [0, 1], color="0.5", ls="--", lw=0.8)
    ax.set_xlabel("false positive rate", fontsize=8)
    ax.set_ylabel("true positive rate", fontsize=8)
    ax = flat[7]
    m, ma = rep["misalignment"], arr["misalignment"]
    dpa = ma.get("dpa_deg", np.zeros(0))
    sel = ma.get("selected", np.zeros(0, bool))
    bins = np.linspace(0, 90, 19)
    fin = np.isfinite(dpa)
    if fin.any():
        ax.hist(dpa[fin], bins=bins, color="0.8", label=f"all measured (n={int(fin.sum())})")
        ax.hist(dpa[sel], bins=bins, color="tab:purple", alpha=0.7,
                label=f"light q < {m['q_max']:g} (n={int(sel.sum())})")
        ax.legend(fontsize=7)
    if m.get("median_deg") is not None:
        ax.axvline(m["median_deg"], color="k", ls=":")
    ax.set_xlabel("|PA_SIE - PA_light| [deg]", fontsize=8)
    ax.set_title(f"mass-light misalignment: median {_fmt(m.get('median_deg'), '.1f')} deg",
                 fontsize=8)
    ax = flat[8]
    ax.axis("off")
    txt = "\n".join(f"{'PASS' if c['pass'] else c['status'].upper():12s} {c['name'][:34]}: "
                    f"{_fmt(c['value'], '.3g')}" for c in rep["checks"])
    ax.text(0.0, 1.0, txt, va="top", ha="left", family="monospace", fontsize=7)
    fig.suptitle(f"realism audit: {os.path.basename(str(rep['stamps']).rstrip('/'))} "
                 f"(splits {rep['splits']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _jsonable(obj):
    """NumPy scalars -> Python; non-finite floats -> None (strict JSON)."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def audit_stamps(stamps_path: str, out_dir: str, conf: str | os.PathLike | None = None,
                 splits: Optional[Sequence[str]] = None,
                 stamps: Optional[stamps_io.Stamps] = None, png: bool = True) -> dict:
    """Run the audit on a 4c stamps directory and write ``realism_audit.json`` (+ PNG).

    ``splits``: None = the conf's ``[audit] splits``; ``stamps``: already loaded rows (e.g.
    by the QA step) reduced instead of reading ``stamps_path`` again.  Returns the report
    (with ``json`` and ``png`` paths).
    """
    cfg = load_config(conf)
    splits = list(splits) if splits else (list(cfg.splits) if cfg.splits else None)
    cfg = replace(cfg, splits=tuple(splits) if splits else None)
    if stamps is not None:
        red = concat_reduced([reduce_chunk(stamps, cfg, splits, stamps_path)], cfg, stamps_path)
    else:
        red = load_reduced(stamps_path, cfg, splits)
    result = run_audit(red, cfg)
    rep = result.report
    os.makedirs(out_dir, exist_ok=True)
    rep["json"] = os.path.join(out_dir, JSON_NAME)
    rep["png"] = None
    if png:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            rep["png_skipped"] = "matplotlib is not installed (pip install -e .[qa])"
        else:
            rep["png"] = os.path.join(out_dir, PNG_NAME)
            plot_audit(result, rep["png"])
    with open(rep["json"], "w") as f:
        json.dump(_jsonable(rep), f, indent=1, allow_nan=False)
        f.write("\n")
    return rep


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="pipeline results root (<out>/phase4c/...)")
    ap.add_argument("--variant", default=None, help="<out>/phase4c/<variant>/")
    ap.add_argument("--experiment-id", default=None, help="e.g. train_stamp64_bandsgrz_gridgrid_small")
    ap.add_argument("--stamps", default=None,
                    help="stamps directory (default <out>/phase4c/<variant>/stamps/<experiment>)")
    ap.add_argument("--report-dir", default=None,
                    help="where the JSON and PNG go (default <out>/qa/<experiment>)")
    ap.add_argument("--conf", default=None, help=f"audit settings (default {DEFAULT_CONF})")
    ap.add_argument("--split", action="append", default=None,
                    help="split(s) to audit (default: the conf's [audit] splits)")
    ap.add_argument("--no-png", action="store_true", help="JSON and table only")
    ap.add_argument("--fail-on-check", action="store_true",
                    help="exit 1 when a check fails or is not measured (default: report only)")
    a = ap.parse_args(argv)
    stamps = a.stamps
    if stamps is None:
        if not (a.out and a.variant and a.experiment_id):
            ap.error("give --stamps, or --out, --variant and --experiment-id")
        stamps = os.path.join(a.out, "phase4c", a.variant, "stamps", a.experiment_id)
    report_dir = a.report_dir
    if report_dir is None:
        if not a.out:
            ap.error("give --report-dir (or --out)")
        report_dir = os.path.join(a.out, "qa", a.experiment_id or os.path.basename(
            stamps.rstrip("/")))
    rep = audit_stamps(stamps, report_dir, a.conf, a.split, png=not a.no_png)
    print(format_table(rep))
    print(f"realism audit JSON: {rep['json']}")
    print(f"realism audit PNG:  {rep['png'] or '(skipped: ' + rep.get('png_skipped', '') + ')'}")
    if a.fail_on_check and not rep["summary"]["all_pass"]:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
