"""BASELINE lens finders that write a stage-4d SCORES file (NOT science; docs/completeness.md).

They exist so that a first run ends with completeness plots, and to show what a shortcut looks
like in completeness.  Both read the 4c stamps (``image`` plane only, never ``arc``), train on
the ok rows of the **train** split only (injections = 1, controls = 0) and score the ok rows
of every other split:

* ``baseline``: scikit-learn HistGradientBoostingClassifier on ring features: per band, the
  image flux in circular annuli about the stamp centre ``conf/completeness.toml
  [baseline_finder] annuli_px``, divided by the r-band flux inside the outermost radius (scale
  free), and the g-r, r-z colours of each annulus (NaN where a flux is <= 0; the model
  handles NaN).  A crude stand-in for "a blue ring around a red galaxy".
* ``core``: the realism audit's core-only classifier (raw nMgy of the central core box,
  StandardScaler + LogisticRegression, conf/realism.toml [classifier];
  :func:`injection_pipeline.analysis.realism.core_features` / ``core_model``).  A finder a
  real survey must not have: it scores by the extra core light of the injection.

Output: Parquet with ``task_id``, ``score`` (float64, P(lens)), ``split``, ``finder``; the
schema metadata holds the finder's settings and training counts (key ``baseline_finder``).
"""
from __future__ import annotations

import io
import json
from typing import Optional, Sequence

import numpy as np

from injection_pipeline import stamps_io, storage

FINDERS = ("baseline", "core")
META = ("task_id", "split", "is_control", "status")
LABEL = "BASELINE finder, not science"


def annulus_matrix(n: int, edges_px: Sequence[float]) -> np.ndarray:
    """(K, n*n) 0/1 membership of the annuli [e_k, e_k+1) in radius from the stamp centre
    ((n-1)/2, (n-1)/2) (the target's position to +-0.5 px)."""
    c = (n - 1) / 2.0
    yy, xx = np.mgrid[0:n, 0:n]
    r = np.hypot(xx - c, yy - c).ravel()
    e = np.asarray(edges_px, np.float64)
    if e.size < 2 or np.any(np.diff(e) <= 0) or e[-1] > n / 2 * np.sqrt(2):
        raise ValueError(f"annuli_px must be >= 2 ascending radii inside the stamp, got {e}")
    return np.stack([((r >= lo) & (r < hi)).astype(np.float64) for lo, hi in zip(e, e[1:])])


def ring_features(image: np.ndarray, bands: str, edges_px: Sequence[float]) -> np.ndarray:
    """Ring features of (rows, B, N, N) images: (rows, B*K + 2*K) float64 (see module doc).
    Needs the bands g, r, z."""
    for b in "grz":
        if b not in bands:
            raise ValueError(f"the baseline finder needs band {b} (stamps have {bands!r})")
    rows, nb, n, _ = image.shape
    M = annulus_matrix(n, edges_px)
    flux = np.nan_to_num(image.reshape(rows, nb, n * n).astype(np.float64)) @ M.T   # (rows,B,K)
    g, r, z = (flux[:, bands.index(b)] for b in "grz")
    norm = r.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(norm[:, None] > 0, flux / norm[:, None], np.nan).reshape(rows, -1)
        gr = np.where((g > 0) & (r > 0), -2.5 * np.log10(np.where(g > 0, g, 1) /
                                                         np.where(r > 0, r, 1)), np.nan)
        rz = np.where((r > 0) & (z > 0), -2.5 * np.log10(np.where(r > 0, r, 1) /
                                                         np.where(z > 0, z, 1)), np.nan)
    return np.concatenate([rel, gr, rz], axis=1)


def _features(finder: str, image, bands, conf: dict, cc) -> np.ndarray:
    if finder == "baseline":
        return ring_features(image, bands, conf["annuli_px"])
    from injection_pipeline.analysis import realism

    return realism.core_features(image, bands, cc).astype(np.float64)


def load_features(stamps_path: str, finder: str, conf: dict, cc=None,
                  batch_rows: int = 1024) -> tuple[dict, np.ndarray]:
    """Stream the ok rows of a 4c stamps directory to ({meta column: array}, features)."""
    metas, feats = {k: [] for k in META}, []
    for st in stamps_io.iter_stamps(stamps_path, columns=("image",), meta_columns=list(META),
                                    status="ok", batch_rows=batch_rows):
        if st.image is None:
            continue
        feats.append(_features(finder, st.image, st.bands, conf, cc))
        for k in META:
            metas[k].append(np.asarray(st.meta.column(k).to_pylist(), dtype=object))
    if not feats:
        return {k: np.array([], dtype=object) for k in META}, np.zeros((0, 0))
    meta = {k: np.concatenate(v) for k, v in metas.items()}
    order = np.argsort(meta["task_id"].astype(str), kind="stable")   # deterministic order
    return {k: v[order] for k, v in meta.items()}, np.concatenate(feats)[order]


def make_model(finder: str, conf: dict, cc=None):
    if finder == "baseline":
        from sklearn.ensemble import HistGradientBoostingClassifier

        return HistGradientBoostingClassifier(
            max_iter=int(conf["max_iter"]), learning_rate=float(conf["learning_rate"]),
            max_leaf_nodes=int(conf["max_leaf_nodes"]),
            min_samples_leaf=int(conf.get("min_samples_leaf", 20)), early_stopping=False,
            random_state=int(conf["random_state"]))
    from injection_pipeline.analysis import realism

    return realism.core_model(cc)


def run_finder(stamps_path: str, scores_out: str, finder: str = "baseline",
               completeness_conf: Optional[str] = None,
               realism_conf: Optional[str] = None) -> dict:
    """Train ``finder`` on the train split, score the other splits, write ``scores_out``.
    Returns a report (counts, settings, train-split AUC in-sample as a sanity number)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from injection_pipeline.analysis import completeness as cp
    from injection_pipeline.analysis import realism

    if finder not in FINDERS:
        raise ValueError(f"finder must be one of {FINDERS}, got {finder!r}")
    conf = cp.load_config(completeness_conf).baseline
    cc = realism.load_config(realism_conf).classifier if finder == "core" else None
    meta, X = load_features(stamps_path, finder, conf, cc)
    split = meta["split"].astype(str)
    y = (meta["is_control"].astype(np.int64) == 0).astype(np.int64)
    tr = split == "train"
    if tr.sum() == 0 or len(np.unique(y[tr])) < 2:
        raise ValueError(f"{stamps_path}: the train split has {int(tr.sum())} ok rows "
                         f"({int(y[tr].sum())} injections): cannot train the {finder} finder")
    model = make_model(finder, conf, cc)
    model.fit(X[tr], y[tr])
    te = ~tr
    score = model.predict_proba(X[te])[:, 1].astype(np.float64) if te.any() else \
        np.zeros(0)
    settings = ({k: conf.get(k) for k in ("annuli_px", "max_iter", "learning_rate",
                                          "max_leaf_nodes", "min_samples_leaf",
                                          "random_state")}
                if finder == "baseline" else {"core_px": cc.core_px, "bands": list(cc.bands),
                                              "C": cc.C, "max_iter": cc.max_iter})
    report = {"label": LABEL, "finder": finder, "stamps": stamps_path, "scores": scores_out,
              "settings": settings, "n_features": int(X.shape[1]),
              "n_train": int(tr.sum()), "n_train_injections": int(y[tr].sum()),
              "n_scored": int(te.sum()),
              "note": (f"all {int(te.sum())} scores equal {score[0]:.6g}: the finder learned "
                       f"nothing (train split of {int(tr.sum())} rows too small?)")
              if te.sum() > 1 and np.all(score == score[0]) else None,
              "scored_by_split": {str(s): int(np.sum(split[te] == s)) for s in
                                  sorted(set(split[te]))}}
    t = pa.table({"task_id": pa.array(meta["task_id"][te].astype(str)),
                  "score": pa.array(score, pa.float64()),
                  "split": pa.array(split[te]),
                  "finder": pa.array([finder] * int(te.sum()), pa.string())})
    t = t.replace_schema_metadata({"baseline_finder": json.dumps(report)})
    buf = io.BytesIO()
    pq.write_table(t, buf, compression="zstd")
    storage.put_bytes(scores_out, buf.getvalue())
    return report
