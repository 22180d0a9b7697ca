"""Driver sub-command ``emr-submit``: run stages on AWS EMR (new cluster or existing one).

    python spark_phase4_pipeline.py emr-submit --dry-run                # print the request JSON
    python spark_phase4_pipeline.py emr-submit --stages 4a,4b,4c        # create a cluster
    python spark_phase4_pipeline.py emr-submit --cluster-id j-XXXX --stages 4c   # add steps

Settings from ``conf/cluster.toml`` (``--config`` directory, or ``--cluster-conf``); logic in
:mod:`injection_pipeline.emr`; docs/emr.md.  Runs on the submitting machine (no Spark here).
stdout carries only the result: the cluster id, or with ``--dry-run`` the JSON document
{"action", "region", "request", "uploads", ...} whose ``request`` is exactly what boto3 sends.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

NAME = "emr-submit"
HELP = "AWS EMR: create a cluster (or add steps) running the stages; --dry-run prints the request"
#: the driver leaves --out as given: emr-submit runs no Spark here and reads "results" (the
#: driver's default) as "use the cluster conf's s3 out"
OUT_IS_SPARK_PATH = False
LOG = logging.getLogger("phase4.emr")


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("EMR submission (defaults: conf/cluster.toml)")
    g.add_argument("--cluster-conf", default=None,
                   help="cluster TOML (default: <--config>/cluster.toml)")
    g.add_argument("--cluster-id", default=None,
                   help="add the steps to this existing cluster (j-...) instead of creating one")
    g.add_argument("--stages", default=None,
                   help="comma-separated [steps.*] of cluster.toml, run in this order "
                        "(default: [submit].default_steps)")
    g.add_argument("--s3-root", default=None,
                   help="replaces [paths].root (s3://bucket[/prefix]): code, logs, out, cache "
                        "and inputs all follow it unless given explicitly")
    g.add_argument("--code-uri", default=None,
                   help="s3:// prefix for the code artefacts (version sub-folder added)")
    g.add_argument("--log-uri", default=None, help="EMR LogUri (s3://...)")
    g.add_argument("--region", default=None, help="AWS region")
    g.add_argument("--name", default=None, help="cluster name")
    g.add_argument("--task-nodes", type=int, default=None, help="number of spot TASK nodes")
    g.add_argument("--keep-alive", action=argparse.BooleanOptionalAction, default=None,
                   help="keep the cluster after its last step (idle auto-termination applies)")
    g.add_argument("--dry-run", action="store_true",
                   help="print the exact request as JSON; upload and send nothing")
    g.add_argument("--endpoint-url", default=None,
                   help="AWS endpoint for EMR and S3 (tests: a local moto server)")
    g.add_argument("--no-validate", dest="validate", action="store_false",
                   help="do not check step flags against the driver's parser")


def _cluster_conf_path(args) -> str:
    if args.cluster_conf:
        return args.cluster_conf
    c = args.config
    return os.path.join(c, "cluster.toml") if os.path.isdir(c) else \
        os.path.join(os.path.dirname(os.path.abspath(c)), "cluster.toml")


def run(args) -> int:
    from injection_pipeline import emr, storage

    out = args.out
    if not storage.is_s3_uri(out):
        if out != "results":  # "results" = the driver's local default: use the conf's out
            LOG.error("emr-submit: --out must be s3://... (got %r)", out)
            return 2
        out = None
    steps = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else None
    try:
        conf = emr.load_cluster_conf(_cluster_conf_path(args))
        result = emr.submit(conf, steps=steps, cluster_id=args.cluster_id, region=args.region,
                            root=args.s3_root, code_uri=args.code_uri, log_uri=args.log_uri, out=out,
                            name=args.name, task_nodes=args.task_nodes,
                            keep_alive=args.keep_alive, dry_run=args.dry_run,
                            endpoint_url=args.endpoint_url, validate=args.validate)
    except (ValueError, FileNotFoundError) as exc:  # configuration errors: a clear message
        LOG.error("emr-submit: %s", exc)
        return 2
    if args.dry_run:
        sys.stdout.write(emr.to_json(result) + "\n")
    else:
        sys.stdout.write(result["cluster_id"] + "\n")
        LOG.info("cluster %s (%s, region %s): steps %s", result["cluster_id"], result["action"],
                 result["region"], ", ".join(result["step_ids"]))
    sys.stdout.flush()
    return 0
