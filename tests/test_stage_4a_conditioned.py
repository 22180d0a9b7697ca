"""Stage 4a with the conditioned lens model on local[2] Spark, over the synthetic survey's
parent catalogue (DR10 columns: photo-z, spectroscopic z/sigma for some, Tractor shapes,
centre maskbits).

Exact accounting: every candidate unit is either an accepted injection (with its paired
control) or a row of rejections/ with its reason; the summary's acceptance block equals the
written data; centre-maskbit exclusions equal the catalogue rows with an excluded bit;
bit-identical rows on another partitioning; provenance columns filled.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from injection_pipeline import manifests as mf
from injection_pipeline import synthetic_survey as ss
from injection_pipeline.population.acceptance import REJECT_REASONS
from injection_pipeline.stages import stage_4a

TRAIN = "train_stamp64_bandsgrz_gridgrid_small"
N_TRAIN = 4000


@pytest.fixture(scope="module")
def survey(tmp_path_factory):
    root = tmp_path_factory.mktemp("cond4a")
    return ss.generate_survey(root, n_bricks=6, size="small", seed=42, layout="spread")


def _cfg():
    return mf.load_config(experiments=[TRAIN], overrides={"n_total_train_per_split": N_TRAIN})


@pytest.fixture(scope="module")
def run(spark, survey, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cond_out"))
    cfg = _cfg()
    summaries = stage_4a.run_stage_4a(spark, cfg, catalogue=survey.catalogue,
                                      survey_bricks=survey.survey_bricks, out=out, variant="c")
    root = os.path.join(out, "phase4a", "c")
    return {"cfg": cfg, "s": summaries[TRAIN], "root": root,
            "man": pd.read_parquet(os.path.join(root, "manifests", TRAIN)),
            "rej": pd.read_parquet(os.path.join(root, "rejections", TRAIN))}


def test_accounting_is_exact(run):
    cfg, s, man, rej = run["cfg"], run["s"], run["man"], run["rej"]
    exp = cfg.experiment(TRAIN)
    inj = man[man.is_control == 0]
    splits = sorted(s["input"]["valid_by_split"])
    units = exp.train_units_per_split()
    for sp in splits:
        n_inj = (inj.split == sp).sum()
        assert n_inj + (rej.split == sp).sum() == units, sp      # every unit decided once
        assert ((man.split == sp) & (man.is_control == 1)).sum() == n_inj   # f = 0.5: paired
    a = s["acceptance"]
    assert a["applies"] and a["candidates"] == units * len(splits)
    assert a["accepted"] == len(inj) and a["rejected"] == len(rej)
    assert a["rejected_by_reason"] == {k: int((rej.reject_reason == k).sum()) for k in REJECT_REASONS}
    assert 0 < a["acceptance_rate"] < 1 and len(inj) > 50
    assert not set(rej.task_id) & set(man.task_id)
    on_disk = json.load(open(os.path.join(run["root"], "summaries", f"{TRAIN}.json")))
    assert on_disk["acceptance"] == a
    assert set(man.pair_id.dropna()) == set(inj.task_id)


def test_accepted_rows_obey_the_floors_and_carry_provenance(run):
    man, pop = run["man"], run["cfg"].population
    inj = man[man.is_control == 0]
    assert (inj.accept_mu_est >= pop.acceptance.mu_min).all()
    assert (inj.accept_snr_est >= pop.acceptance.snr_min).all()
    assert (inj.src_z >= inj.lens_z + pop.acceptance.dz_min).all()
    assert set(inj.lens_model) == {"conditioned"} and set(man.lens_model) == {"conditioned"}
    assert set(inj.lens_z_source) <= {"spectroscopic", "photometric"}
    assert set(inj.lens_sigma_source) <= {"spectroscopic", "zahid2016_mstar_rz",
                                          "zahid2016_mstar_r", "zahid2016_mstar_rz_noext",
                                          "zahid2016_mstar_r_noext"}
    assert "spectroscopic" in set(inj.lens_sigma_source)     # the survey gives some sigma
    assert set(inj.lens_shape_source) <= {"light", "prior"}
    ctl = man[man.is_control == 1]
    assert ctl.lens_z.isna().all() and ctl.lens_z_source.isna().all()
    np.testing.assert_allclose(np.hypot(inj.src_x_arcsec, inj.src_y_arcsec),
                               inj.src_offset_frac * inj.theta_e_arcsec, rtol=1e-12)


def test_centre_maskbit_exclusion_counted(run, survey):
    cat = pd.read_parquet(survey.catalogue)
    mask = run["cfg"].exclude_maskbits_mask
    assert mask and run["cfg"].exclude_centre_maskbits == ("BRIGHT", "MEDIUM", "GALAXY", "CLUSTER")
    hit = (cat.maskbits.astype(np.int64) & mask) != 0
    excluded = run["s"]["input"]["excluded_by_reason"]
    assert hit.sum() > 0 and excluded["bad_centre_maskbits"] == int(hit.sum())
    used = set(zip(run["man"].brickname, run["man"].objid))
    bad = set(zip(cat.brickname[hit], cat.objid[hit].astype(np.int64)))
    assert not used & bad
    assert run["s"]["input"]["centre_maskbits"]["rows_without_maskbits"] == 0


def test_bit_identical_on_another_partitioning(spark, run, survey, tmp_path):
    cat = pd.read_parquet(survey.catalogue).sample(frac=1.0, random_state=3)
    cdir = tmp_path / "cat3"
    cdir.mkdir()
    for i, part in enumerate(np.array_split(cat, 3)):
        pq.write_table(pa.Table.from_pandas(part, preserve_index=False), cdir / f"p{i}.parquet")
    stage_4a.run_stage_4a(spark, _cfg(), catalogue=str(cdir), survey_bricks=survey.survey_bricks,
                          out=str(tmp_path / "o"), variant="c", rows_per_file=200)
    root = tmp_path / "o" / "phase4a" / "c"
    for sub, ref in (("manifests", run["man"]), ("rejections", run["rej"])):
        b = pd.read_parquet(root / sub / TRAIN).sort_values("task_id").reset_index(drop=True)
        a = ref.sort_values("task_id").reset_index(drop=True)
        pd.testing.assert_frame_equal(a, b, check_exact=True)


def test_catalogue_without_lens_columns_rejects_everything_loudly(spark, survey, tmp_path):
    cat = pd.read_parquet(survey.catalogue)[["brickname", "objid", "ra", "dec", "flux_r"]]
    path = tmp_path / "bare.parquet"
    cat.to_parquet(path)
    s = stage_4a.run_stage_4a(spark, _cfg(), catalogue=str(path),
                              survey_bricks=survey.survey_bricks, out=str(tmp_path / "o2"),
                              variant="c")[TRAIN]
    assert s["rows_total"] == 0
    assert s["acceptance"]["rejected_by_reason"]["no_lens_redshift"] == s["acceptance"]["candidates"]
    assert "z_phot_median" in s["input"]["optional_columns_absent"]
    assert s["input"]["centre_maskbits"]["rows_without_maskbits"] == len(cat)
