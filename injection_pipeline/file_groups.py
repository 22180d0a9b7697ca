"""Which bricks share stage 4c's output files: sky cells read off the DR10 brick names.

At the shipped density a 4c pass opens ~88k bricks for ~2 tasks each (docs/performance.md),
so one stamps file and one metrics file per (experiment, brick) made Parquet files of 1-3
rows: ~10^5 tiny objects per dataset, each costing ~4 CPU-ms of Parquet footer and column
chunks whatever its rows.  Bricks are therefore grouped into square cells of ``cell_deg``
degrees (conf/injection.toml ``[job] file_cell_deg``, CLI ``--file-cell-deg``); a cell's
bricks share one file per (experiment, split) and one completion marker, and ``--resume``
keeps or redoes a whole cell (docs/injection.md "Output files and resume").

The cell comes from the brick NAME only (``RRRR[pm]DDD``: RRRR = int(RA x 10), DDD =
int(|Dec| x 10); :func:`injection_pipeline.dr10.validate_brickname`), so it does not depend
on the manifest, the partitioning or any table: the same brick is in the same cell in every
run.  With c = round(10 cell_deg) (tenths of a degree) and dec10 = +-DDD:
i = RRRR // c, j = floor(dec10 / c), tag ``c<c>r<i:04d><p|m><|j|:03d>`` (e.g. cell_deg = 1:
``2020m097`` -> ``c10r0202m010``, the cell 202 <= RA < 203, -10 <= Dec < -9 in name units).
A DR10 brick is 0.25 deg on a side, so a 1-deg cell holds ~16 cos(Dec) bricks, about half of
them opened at the shipped density.  ``cell_deg = 0`` keeps one group per brick (tag = the
brick name).  A name that is not a valid brick name (its tasks fail as ``invalid_task``) is a
group of its own, tag ``x`` + the first 16 hex digits of SHA-256 of its UTF-8 bytes (null:
of the empty string).  :func:`spark_group_column` computes the same tags in Spark SQL (the
driver partitions and sorts by them); tests/test_file_groups.py checks they agree.
"""
from __future__ import annotations

import hashlib
import math
import re

_VALID = re.compile(r"^[0-9]{4}[pm][0-9]{3}$")
#: the largest cell accepted [deg]: ~2600 bricks (~1300 opened) per file at the equator
MAX_CELL_DEG = 10.0


def cell_tenths(cell_deg) -> int:
    """``cell_deg`` [deg] as whole tenths of a degree (0 = one group per brick); ValueError
    unless 0 or a multiple of 0.1 in [0.1, MAX_CELL_DEG]."""
    try:
        v = float(cell_deg)
    except (TypeError, ValueError):
        raise ValueError(f"file_cell_deg = {cell_deg!r}: expected a number of degrees") from None
    c = int(round(v * 10)) if math.isfinite(v) else -1
    if c < 0 or abs(v * 10 - c) > 1e-6 or not (c == 0 or 1 <= c <= 10 * MAX_CELL_DEG):
        raise ValueError(f"file_cell_deg = {cell_deg!r}: expected 0 (one file per brick) or a "
                         f"multiple of 0.1 deg between 0.1 and {MAX_CELL_DEG:g}")
    return c


def _is_valid(name: str) -> bool:
    return bool(_VALID.match(name)) and int(name[:4]) < 3600 and int(name[5:8]) <= 900


def invalid_tag(name) -> str:
    """Tag of the group of one invalid brick name (``None`` = the empty string)."""
    s = "" if name is None else str(name)
    return "x" + hashlib.sha256(s.encode("utf-8")).hexdigest()[:16]


def group_tag(brickname, tenths: int) -> str:
    """File-group tag of ``brickname`` for cells of ``tenths`` tenths of a degree (0: the brick
    itself); filename-safe ([0-9a-z])."""
    if brickname is None or not isinstance(brickname, str) or not _is_valid(brickname):
        return invalid_tag(brickname)
    if not tenths:
        return brickname
    ra10 = int(brickname[:4])
    dec10 = int(brickname[5:8]) * (-1 if brickname[4] == "m" else 1)
    i, j = ra10 // tenths, dec10 // tenths
    return f"c{tenths}r{i:04d}{'p' if j >= 0 else 'm'}{abs(j):03d}"


def spark_group_column(col, tenths: int):
    """Spark Column of :func:`group_tag` of the string column ``col`` (same tags)."""
    from pyspark.sql import functions as F

    name = F.coalesce(col, F.lit(""))
    ra10 = F.substring(name, 1, 4).cast("int")
    d10 = F.substring(name, 6, 3).cast("int")
    valid = name.rlike(r"^[0-9]{4}[pm][0-9]{3}$") & (ra10 < 3600) & (d10 <= 900)
    bad = F.concat(F.lit("x"), F.substring(F.sha2(name, 256), 1, 16))
    if not tenths:
        return F.when(valid, name).otherwise(bad)
    dec10 = F.when(F.substring(name, 5, 1) == "m", -d10).otherwise(d10)
    i = F.floor(ra10 / F.lit(tenths))
    j = F.floor(dec10 / F.lit(tenths))
    tag = F.concat(F.lit(f"c{tenths}r"), F.lpad(i.cast("string"), 4, "0"),
                   F.when(j >= 0, F.lit("p")).otherwise(F.lit("m")),
                   F.lpad(F.abs(j).cast("string"), 3, "0"))
    return F.when(valid, tag).otherwise(bad)


def describe(tenths: int) -> str:
    """The grouping as recorded in the markers (a change of it redoes every group)."""
    return "brick" if not tenths else f"cell {tenths / 10:g} deg"
