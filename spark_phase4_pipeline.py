#!/usr/bin/env python
"""Phase-4 driver: DR10 lens-injection stages as sub-commands (4a, later 4b, 4b2, 4c, ...).

    python spark_phase4_pipeline.py --help              # every stage and flag, with defaults
    python spark_phase4_pipeline.py 4a --catalogue CAT.parquet --survey-bricks survey-bricks.fits.gz \
        --out results --variant v1 [--master local[*]] [--experiments debug,train]
    spark-submit --py-files pipeline.zip spark_phase4_pipeline.py 4a --out s3://bucket/prefix ...

The driver only parses flags and dispatches: each stage module listed in
``injection_pipeline.stages.STAGE_MODULES`` provides ``add_arguments(parser)`` and
``run(args) -> int``.  Common flags (every stage): --master, --out, --verbose, --config.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from injection_pipeline.stages import STAGE_MODULES  # noqa: E402

LOG = logging.getLogger("phase4")
DEFAULT_CONF = os.path.join(os.path.dirname(os.path.abspath(__file__)), "conf")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def _common_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("common flags")
    g.add_argument("--master", default="local[*]",
                   help="Spark master (ignored under spark-submit, whose --master wins)")
    g.add_argument("--out", default="results",
                   help="output root: local path, or s3://bucket/prefix on EMR (EMRFS)")
    g.add_argument("--config", default=DEFAULT_CONF,
                   help="conf directory (experiments.toml, grids.toml, priors.toml) or the path "
                        "of an experiments TOML")
    g.add_argument("--verbose", "-v", action="store_true",
                   help="DEBUG logging and Spark INFO logs")
    return p


def build_parser() -> argparse.ArgumentParser:
    common = _common_parser()
    parser = argparse.ArgumentParser(
        prog="spark_phase4_pipeline.py", formatter_class=_Formatter,
        description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="stage", metavar="STAGE", required=True)
    stage_help = []
    for name, modname in STAGE_MODULES.items():
        mod = importlib.import_module(modname)
        sp = sub.add_parser(name, parents=[common], help=mod.HELP, formatter_class=_Formatter,
                            description=f"stage {name}: {mod.HELP}")
        mod.add_arguments(sp)
        sp.set_defaults(_stage_module=modname)
        stage_help.append(sp.format_help())
    parser.epilog = "stages and their flags\n======================\n\n" + "\n\n".join(stage_help)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    if not args.verbose:
        logging.getLogger("py4j").setLevel(logging.WARNING)
    mod = importlib.import_module(args._stage_module)
    if getattr(args, "out", None):
        from injection_pipeline.spark_session import absolute_out, effective_master
        try:
            args.out = absolute_out(args.out, effective_master(args.master))
        except ValueError as exc:
            LOG.error("%s", exc)
            return 2
    t0 = time.perf_counter()
    LOG.info("######## phase 4 stage %s: %s ########", args.stage, mod.HELP)
    LOG.info("flags: %s", {k: v for k, v in vars(args).items() if not k.startswith("_")})
    code = int(mod.run(args) or 0)
    LOG.info("######## stage %s finished (exit %d) in %.1f s ########", args.stage, code,
             time.perf_counter() - t0)
    return code


if __name__ == "__main__":
    sys.exit(main())
