"""Stage 4b2: repair the coadd cache (shares the Spark glue of :mod:`.stage_4b`).

For every brick of the list that has something in the cache, the brick's objects are listed
and compared with its ``_SUCCESS``; only files missing from the cache are fetched (psfsize
first), objects without recorded provenance are re-verified and hashed (or re-fetched with
``--no-rehash-existing``), and ``_SUCCESS`` is rewritten.  Bricks with nothing cached are
``not_cached`` (stage 4b's job).  Without ``--repair`` the stage only reports (status
``incomplete``, exit 1 when any brick needs a repair) and changes nothing.
"""
from __future__ import annotations

import argparse

from injection_pipeline.stages import stage_4b

NAME = "4b2"
HELP = "cache repair: fetch only the files missing from cached bricks (psfsize first), " \
       "rewrite _SUCCESS; without --repair: report only"


def add_arguments(p: argparse.ArgumentParser) -> None:
    stage_4b.add_common_arguments(p)
    p.add_argument("--repair", action="store_true",
                   help="fetch what is missing and rewrite _SUCCESS (default: check only)")


def run(args) -> int:
    return stage_4b.run_from_args(args, mode="repair", stage=NAME, dry_run=not args.repair)
