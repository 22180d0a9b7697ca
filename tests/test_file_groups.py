"""File groups of stage 4c (injection_pipeline.file_groups): which bricks share output files."""
from __future__ import annotations

import random

import pytest

from injection_pipeline import dr10
from injection_pipeline import file_groups as fg
from injection_pipeline import synthetic_survey as ss


def test_cell_tags_from_the_brick_names():
    assert fg.group_tag("2020m097", 10) == "c10r0202m010"      # 202 <= RA < 203, -10 <= Dec < -9
    assert fg.group_tag("2029m090", 10) == "c10r0202m009"      # Dec -9.0: the next cell up
    assert fg.group_tag("2030m097", 10) == "c10r0203m010"
    assert fg.group_tag("1126p222", 10) == "c10r0112p022"
    assert fg.group_tag("0000p000", 10) == fg.group_tag("0000m000", 10) == "c10r0000p000"
    assert fg.group_tag("3599m900", 10) == "c10r0359m090"
    assert fg.group_tag("2025m097", 5) == "c5r0405m020"         # 0.5 deg: 2025 // 5, -97 // 5
    assert fg.group_tag("2020m097", 0) == "2020m097"            # one group per brick
    # an invalid name is a group of its own, filename-safe
    for bad in ("2020M097", "3600p000", "0000p901", "../etc", "", None, "2020m0971"):
        tag = fg.group_tag(bad, 10)
        assert tag.startswith("x") and len(tag) == 17 and tag.isalnum(), (bad, tag)
    assert fg.group_tag(None, 10) == fg.group_tag("", 10) != fg.group_tag("../etc", 10)


def test_cell_size_is_checked():
    assert fg.cell_tenths(1.0) == 10 and fg.cell_tenths(0) == 0 and fg.cell_tenths("0.5") == 5
    for bad in (0.25, -1, 11, float("nan"), "one"):
        with pytest.raises(ValueError, match="file_cell_deg"):
            fg.cell_tenths(bad)


def test_a_one_degree_cell_holds_the_neighbouring_grid_bricks():
    """On the DR10-like grid (0.25 deg bricks): the bricks of one Dec row within one degree of
    RA share a cell, ~4 per row and ~4 rows per cell near the equator."""
    specs = [ss.grid_brick(row, col) for row in range(360, 368) for col in range(0, 1440)]
    cells: dict = {}
    for s in specs:
        cells.setdefault(fg.group_tag(s.brickname, 10), []).append(s.brickname)
    sizes = sorted(len(v) for v in cells.values())
    assert 12 <= sizes[len(sizes) // 2] <= 20, sizes[len(sizes) // 2]
    for s in specs[:50]:
        assert int(s.brickname[:4]) // 10 == int(fg.group_tag(s.brickname, 10)[4:8])


def test_spark_column_gives_the_same_tags(spark):
    rng = random.Random(3)
    names = [dr10.brick_name_for(rng.uniform(0, 360), rng.uniform(-89.9, 89.9))
             for _ in range(400)]
    names += ["0000p000", "0000m000", "3599m900", "0009m001", "0010m001", "2020m100",
              "2020M097", "3600p000", "0000p901", "../etc", "", None, "ab", "2020m0971", "é"]
    df = spark.createDataFrame([(n,) for n in names], "brickname string")
    for tenths in (0, 1, 5, 10, 25, 100):
        got = [r[0] for r in df.select(
            fg.spark_group_column(df["brickname"], tenths)).collect()]
        assert got == [fg.group_tag(n, tenths) for n in names], tenths
