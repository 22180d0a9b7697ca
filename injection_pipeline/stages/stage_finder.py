"""``finder``: run a BASELINE lens finder (not science) on 4c stamps -> a 4d SCORES file.

    spark_phase4_pipeline.py finder --out OUT --variant V --experiment-id E \
        [--finder baseline|core] [--scores-out URI]

No Spark (scikit-learn on stamp features streamed with stamps_io): see
:mod:`injection_pipeline.analysis.baseline_finder`.  Default output
``OUT/phase4d/V/E/scores_<finder>.parquet``; then run ``4d --scores`` on it.
"""
from __future__ import annotations

import argparse
import json
import logging

from injection_pipeline import storage

NAME = "finder"
HELP = "BASELINE lens finder (not science) on 4c stamps -> scores parquet for 4d"
LOG = logging.getLogger("phase4.finder")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--variant", default="default", help="<out>/phase4c/<variant>/stamps/")
    p.add_argument("--experiment-id", required=True)
    p.add_argument("--finder", choices=("baseline", "core"), default="baseline",
                   help="baseline: ring features + gradient boosting; core: the realism "
                        "audit's core-only shortcut classifier")
    p.add_argument("--stamps", default=None, help="explicit 4c stamps directory")
    p.add_argument("--scores-out", default=None,
                   help="output parquet (default <out>/phase4d/<variant>/<experiment>/"
                        "scores_<finder>.parquet)")


def default_scores_path(out: str, variant: str, experiment_id: str, finder: str) -> str:
    return storage.join_uri(out, "phase4d", variant, experiment_id, f"scores_{finder}.parquet")


def run(args) -> int:
    import os

    from injection_pipeline.analysis import baseline_finder as bf

    stamps = args.stamps or storage.join_uri(args.out, "phase4c", args.variant, "stamps",
                                             args.experiment_id)
    dest = args.scores_out or default_scores_path(args.out, args.variant, args.experiment_id,
                                                  args.finder)
    conf_dir = args.config if os.path.isdir(args.config) else os.path.dirname(args.config)
    try:
        rep = bf.run_finder(stamps, dest, args.finder,
                            completeness_conf=os.path.join(conf_dir, "completeness.toml"),
                            realism_conf=os.path.join(conf_dir, "realism.toml"))
    except ValueError as exc:
        LOG.error("finder: %s", exc)
        return 1
    print(f"{bf.LABEL}: {args.finder} trained on {rep['n_train']} train rows "
          f"({rep['n_train_injections']} injections), scored {rep['n_scored']} rows "
          f"{rep['scored_by_split']} -> {dest}", flush=True)
    if rep.get("note"):
        LOG.warning("finder %s: %s", args.finder, rep["note"])
    LOG.debug("finder report: %s", json.dumps(rep))
    return 0
