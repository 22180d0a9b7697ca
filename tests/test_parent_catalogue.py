"""The parent catalogue: DR10 column model (dr10.CATALOGUE_COLUMNS), its validator, and the
synthetic survey's catalogue in the demo configuration (conf/demo.toml): types, maskbits at
the centre pixel, extinction, photo-z, LRG-like population, shapes on the pixels, determinism.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from injection_pipeline import dr10, manifests
from injection_pipeline import synthetic_survey as ss
from lensing.maskbits import MASKBITS
from lensing.shapes import moments_shape, position_angle_difference, tractor_e1e2_to_q_phi

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover
    import tomli as tomllib  # type: ignore[no-redef]

DEMO = tomllib.loads((Path(__file__).resolve().parent.parent / "conf" / "demo.toml")
                     .read_text())["survey"]


def _demo_survey(root):
    return ss.generate_survey(root, n_bricks=DEMO["n_bricks"], size=DEMO["brick_size_px"],
                              seed=DEMO["seed"], faults=DEMO["faults"],
                              n_galaxies=DEMO["n_galaxies"] or None, layout=DEMO["layout"])


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    desc = _demo_survey(tmp_path_factory.mktemp("demo_survey"))
    return desc, pq.read_table(desc.catalogue)


@pytest.fixture(scope="module")
def cat(demo):
    return demo[1].to_pandas()


# ----------------------------------------------------------------------------- schema
def test_documented_columns_with_documented_types(demo):
    desc, table = demo
    types = {f.name: f.type for f in table.schema}
    for col in dr10.CATALOGUE_COLUMNS:
        assert types[col.name] == pa.type_for_alias(col.dtype), col.name
    assert set(types) == {c.name for c in dr10.CATALOGUE_COLUMNS} | set(ss.TRUTH_COLUMNS)
    check = dr10.validate_parent_catalogue(desc.catalogue)
    assert check.missing_optional == () and check.has_photoz
    assert set(check.extra) == set(ss.TRUTH_COLUMNS)
    # user columns are null (not NaN) where unknown; every other column is complete
    for name in table.column_names:
        nulls = table.column(name).null_count
        assert (nulls > 0) == (name in ("z", "sigma")), name
    assert table.column("z").null_count == table.column("sigma").null_count
    assert set(table.column("release").to_pylist()) == {dr10.RELEASE_DR10}


def test_required_columns_agree_with_stage_4a():
    assert dr10.REQUIRED_CATALOGUE_COLUMNS == manifests.REQUIRED_CATALOGUE_COLUMNS


def test_docs_catalogue_table_is_up_to_date():
    text = (Path(__file__).resolve().parent.parent / "docs" / "dr10.md").read_text()
    assert dr10.catalogue_markdown() in text


# ----------------------------------------------------------------------------- maskbits
def test_maskbits_column_is_the_plane_at_the_centre_pixel(demo, cat):
    desc, _ = demo
    n_file = 0
    for i, rec in enumerate(desc.bricks):
        path = Path(desc.root) / rec.directory / dr10.product_filename(rec.spec.brickname,
                                                                       "maskbits")
        if path.exists():
            plane = dr10.read_plane(path).data
            n_file += 1
        else:                                     # absent brick: the generator's own plane
            plane = ss.make_brick(rec.spec, desc.size, desc.seed, index=i).maskbits
        c = cat[cat.brickname == rec.spec.brickname]
        ix = np.rint(c.bx.to_numpy()).astype(int)
        iy = np.rint(c.by.to_numpy()).astype(int)
        np.testing.assert_array_equal(c.maskbits.to_numpy(), plane[iy, ix])
    assert n_file == len(desc.bricks) - 1


def test_centre_maskbits_make_target_selection_testable(demo, cat):
    """The demo survey has targets whose centre carries each of BRIGHT, MEDIUM, GALAXY and
    CLUSTER, and targets with none of them."""
    desc, _ = demo
    mb = cat.maskbits.to_numpy()
    for bit in ("BRIGHT", "MEDIUM", "GALAXY", "CLUSTER"):
        assert (mb & MASKBITS[bit]).any(), bit
    clean = (mb & (ss.FORCED_PSF_BITS | MASKBITS["MEDIUM"])) == 0
    assert clean.mean() > 0.5
    for rec in desc.bricks:
        c = cat[cat.brickname == rec.spec.brickname].set_index("objid")
        assert c.maskbits[rec.roles["near_bright_star"]] & MASKBITS["BRIGHT"]
        if "near_medium_star" in rec.roles:
            bits = c.maskbits[rec.roles["near_medium_star"]]
            assert bits & MASKBITS["MEDIUM"] and not bits & MASKBITS["BRIGHT"]
        for role, bit in (("in_sga_galaxy", "GALAXY"), ("in_cluster", "CLUSTER")):
            if role in rec.roles:
                assert c.maskbits[rec.roles[role]] & MASKBITS[bit]
        assert sorted(rec.forced_psf) == sorted(c.index[c.type == "PSF"])
    assert sum("near_medium_star" in r.roles for r in desc.bricks) >= 4
    assert sum("in_cluster" in r.roles for r in desc.bricks) >= 1


def test_forced_psf_inside_bright_galaxy_cluster_masks(cat):
    forced = (cat.maskbits.to_numpy() & ss.FORCED_PSF_BITS) != 0
    np.testing.assert_array_equal(cat.type.to_numpy() == "PSF", forced)
    psf = cat[forced]
    assert (psf[["sersic", "shape_r", "shape_e1", "shape_e2"]].to_numpy() == 0).all()
    assert (cat[~forced].shape_r > 0).all()


# ----------------------------------------------------------------------------- photometry
def test_mw_transmission_from_ebv(cat):
    ebv = cat.ebv.to_numpy()
    assert ((ebv >= 0.01) & (ebv <= 0.1)).all() and np.ptp(ebv) > 0.02
    for b, coeff in (("g", 3.214), ("r", 2.165), ("z", 1.211)):
        assert dr10.EXTINCTION_COEFFS[b] == coeff
        mw = cat[f"mw_transmission_{b}"].to_numpy()
        assert mw.dtype == np.float32
        np.testing.assert_allclose(mw, 10 ** (-0.4 * coeff * ebv.astype(np.float64)),
                                   rtol=1e-6)
        np.testing.assert_array_equal(mw, dr10.mw_transmission(ebv, b))
    with pytest.raises(ValueError, match="band 'i'"):
        dr10.mw_transmission(ebv, "i")


def test_population_is_lrg_like(cat):
    z = cat.z_true.to_numpy()
    assert ss.POP_Z_RANGE[0] <= z.min() and z.max() <= ss.POP_Z_RANGE[1]
    assert 0.38 < np.median(z) < 0.56
    r0 = 22.5 - 2.5 * np.log10(cat.flux_r.to_numpy() / cat.mw_transmission_r.to_numpy())
    assert 16.0 < r0.min() and r0.max() < ss.POP_R_LIMIT + 1e-5
    # brighter at low redshift (rank correlation of z with r)
    rank = lambda a: np.argsort(np.argsort(a))          # noqa: E731
    assert np.corrcoef(rank(z), rank(r0))[0, 1] > 0.5
    sig = cat.sigma_true.to_numpy()
    assert 180 < np.median(sig) < 320 and sig.min() >= 120 and sig.max() <= 420
    gal = cat[cat.type != "PSF"]
    e = np.hypot(gal.shape_e1, gal.shape_e2).to_numpy()
    assert e.max() <= 1 / 3 + 1e-6 and (e > 0.15).any()
    assert (e[gal.type.to_numpy() == "REX"] == 0).all()
    assert 0.5 < np.median(gal.shape_r) < 2.5 and gal.shape_r.max() <= 6.0


def test_population_at_scale():
    """Large draws of the generator's functions reproduce the documented numbers."""
    p = ss.lrg_population(np.random.default_rng(0), 50_000)
    lo, med, hi = np.percentile(p["z"], [1, 50, 99])
    assert 0.15 <= lo < 0.2 and 0.44 < med < 0.50 and 0.7 < hi <= 0.85
    assert np.percentile(p["r"], 1) > 16.5 and p["r"].max() < ss.POP_R_LIMIT
    q = p["q"][p["type"] != "REX"]
    assert q.min() > 0.5 and 0.75 < np.median(q) < 0.81
    pz = ss.photo_z_columns(np.random.default_rng(1), p["z"], p["r"])
    d = (pz["z_phot_median"] - p["z"]) / (1 + p["z"])
    nmad = 1.4826 * np.median(np.abs(d - np.median(d)))
    assert 0.022 < nmad < 0.027 and abs(np.median(d)) < 1e-3
    in68 = (p["z"] >= pz["z_phot_l68"]) & (p["z"] <= pz["z_phot_u68"])
    in95 = (p["z"] >= pz["z_phot_l95"]) & (p["z"] <= pz["z_phot_u95"])
    assert abs(in68.mean() - 0.6827) < 0.01 and abs(in95.mean() - 0.95) < 0.005
    assert abs(np.mean(pz["survey"] != "") - ss.POP_F_ZSPEC) < 0.01


# ----------------------------------------------------------------------------- redshifts
def test_photo_z_columns(cat):
    q = cat[["z_phot_l95", "z_phot_l68", "z_phot_median", "z_phot_u68", "z_phot_u95"]]
    assert (np.diff(q.to_numpy(), axis=1) >= 0).all()                 # ordered quantiles
    assert ((cat.z_phot_l68 <= cat.z_phot_mean) & (cat.z_phot_mean <= cat.z_phot_u68)).all()
    z = cat.z_true.to_numpy()
    dz = (cat.z_phot_median.to_numpy() - z) / (1 + z)
    nmad = 1.4826 * np.median(np.abs(dz - np.median(dz)))
    assert 0.015 < nmad < 0.035                    # documented 0.02-0.03 (1 + z), ~80 objects
    width = cat.z_phot_std.to_numpy() / (1 + cat.z_phot_median.to_numpy())
    assert (width > 0.0199).all() and (width < 0.0302).all()
    in68 = (z >= cat.z_phot_l68) & (z <= cat.z_phot_u68)
    assert 0.5 < in68.mean() < 0.85
    # spectroscopic columns of the photo-z file: -99 / '' / False when there is none
    has = cat.survey.to_numpy() != ""
    assert has.any() and (~has).any()
    assert (cat.z_spec[~has] == dr10.PHOTOZ_FILL).all() and not cat.training[~has].any()
    assert set(cat.survey[has]) <= {"BOSS", "SDSS", "DESI"}
    np.testing.assert_allclose(cat.z_spec[has], z[has], atol=2e-4)
    assert cat.training.dtype == bool and (cat.training <= has).all()


def test_user_redshift_and_velocity_dispersion(cat):
    known = cat.z.notna().to_numpy()
    np.testing.assert_array_equal(known, cat.sigma.notna().to_numpy())
    assert 0.15 < known.mean() < 0.45                                 # ~30 %
    np.testing.assert_allclose(cat.z[known], cat.z_true[known], atol=5e-4)
    ratio = cat.sigma[known] / cat.sigma_true[known]
    assert (np.abs(np.log10(ratio)) < 0.15).all()
    assert cat.z.dtype == np.float64 and cat.sigma.dtype == np.float64


# ----------------------------------------------------------------------------- pixels
def test_pixels_follow_each_galaxys_catalogue_shape():
    """Moments PA of isolated bright galaxies on the noisy r-band brick image equals the
    catalogue's Tractor PA (and not another galaxy's): each galaxy is rendered with its own
    catalogue shape.  More galaxies per brick than the demo, for statistics; "bright" is a
    weighted S/N >= 100 (the PA noise is ~1/(2 e_moments S/N) rad, several degrees at S/N
    60 for these PSF-rounded shapes)."""
    size, seed = 600, 42
    meas, cat_phi = [], []
    for i, spec in enumerate(ss.choose_bricks(3, seed, size)):
        bd = ss.make_brick(spec, size, seed, index=i, n_galaxies=30)
        c = pd.DataFrame(bd.catalogue)
        img, iv = bd.image["r"], bd.invvar["r"]
        for _, g in c.iterrows():
            if g.type in ("PSF", "REX") or math.hypot(g.shape_e1, g.shape_e2) <= 0.15:
                continue
            d_gal = np.hypot(c.bx - g.bx, c.by - g.by).to_numpy()
            if np.sort(d_gal)[1] < 40:
                continue                                   # a neighbour's light
            if any(math.hypot(s["x"] - g.bx, s["y"] - g.by) < (80 if s["G"] < 16 else 25)
                   for s in bd.record.stars):
                continue                                   # a star's core, wing or mask
            sw = float(np.clip(g.shape_r / dr10.PIXSCALE_ARCSEC, 3.0, 8.0))
            h = int(4 * sw)
            ix, iy = int(round(g.bx)), int(round(g.by))
            if min(ix, iy) < h or max(ix, iy) + h >= size:
                continue
            win = (slice(iy - h, iy + h + 1), slice(ix - h, ix + h + 1))
            if not (iv[win] > 0).all():
                continue
            yy, xx = np.mgrid[win]
            w = np.exp(-0.5 * ((xx - g.bx) ** 2 + (yy - g.by) ** 2) / sw ** 2)
            if (w * img[win]).sum() < 100 * np.sqrt((w * w / iv[win]).sum()):
                continue                                   # bright: weighted S/N >= 100
            meas.append(moments_shape(img[win], g.bx - (ix - h), g.by - (iy - h), sw)[1])
            cat_phi.append(tractor_e1e2_to_q_phi(g.shape_e1, g.shape_e2)[1])
    meas, cat_phi = np.array(meas), np.array(cat_phi)
    diff = np.degrees(position_angle_difference(meas, cat_phi))
    assert len(diff) >= 5, len(diff)
    assert diff.max() < 5.0 and np.median(diff) < 2.5, diff
    other = np.degrees(position_angle_difference(meas, np.roll(cat_phi, 1)))
    assert np.median(other) > 15.0, other


# ----------------------------------------------------------------------------- determinism
def test_catalogue_bytes_deterministic(demo, cat, tmp_path):
    desc, _ = demo
    again = _demo_survey(tmp_path / "again")
    assert Path(again.catalogue).read_bytes() == Path(desc.catalogue).read_bytes()
    spec = desc.bricks[0].spec
    other = ss.make_brick(spec, desc.size, desc.seed + 1, index=0).catalogue
    assert not np.array_equal(other["z_true"], cat.z_true[cat.brickname == spec.brickname])


# ----------------------------------------------------------------------------- validation
def _write(tmp_path, df, name="cat.parquet"):
    path = tmp_path / name
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), path)
    return path


def _minimal():
    return pd.DataFrame({"brickname": ["1126p222"], "objid": np.array([0], np.int64),
                         "ra": [112.6], "dec": [22.2], "flux_r": [10.0]})


def test_validate_minimal_catalogue_lists_missing_optional(tmp_path):
    path = _write(tmp_path, _minimal().assign(my_flag=[1]))
    check = dr10.validate_parent_catalogue(path)
    assert check.columns == dr10.REQUIRED_CATALOGUE_COLUMNS
    assert check.missing_optional == dr10.OPTIONAL_CATALOGUE_COLUMNS
    assert check.extra == ("my_flag",) and not check.has_photoz
    # a directory of Parquet parts (Spark output) and in-memory inputs work the same way
    d = tmp_path / "parts"
    d.mkdir()
    _write(d, _minimal(), "part-0.parquet")
    _write(d, _minimal(), "part-1.parquet")
    assert dr10.validate_parent_catalogue(d).columns == dr10.REQUIRED_CATALOGUE_COLUMNS
    assert dr10.validate_parent_catalogue(_minimal()).source == "<DataFrame>"
    table = dr10.read_parent_catalogue(path, columns=["objid", "flux_r", "my_flag"])
    assert table.schema.field("objid").type == pa.int32()
    assert table.schema.field("flux_r").type == pa.float32()
    assert table.schema.field("my_flag").type == pa.int64()


def test_validate_errors_name_file_column_and_expectation(tmp_path):
    path = _write(tmp_path, _minimal().drop(columns=["flux_r"]), "nofluxr.parquet")
    with pytest.raises(dr10.CatalogueError,
                       match=r"nofluxr\.parquet: .*required column 'flux_r' is missing "
                             r"\(expected float32, nanomaggy"):
        dr10.validate_parent_catalogue(path)
    bad = _minimal().assign(objid=["a"], sigma=["250"], training=[1])
    path = _write(tmp_path, bad, "types.parquet")
    with pytest.raises(dr10.CatalogueError) as ei:
        dr10.validate_parent_catalogue(path)
    msg = str(ei.value)
    assert msg.startswith(str(path))
    assert "required column 'objid' has type string, expected int32" in msg
    assert "optional column 'sigma' has type string, expected float64 (km/s)" in msg
    assert "optional column 'training' has type int64, expected bool" in msg
    upper = _minimal().rename(columns={"flux_r": "FLUX_R"}).assign(Z_PHOT_MEAN=[0.4])
    with pytest.raises(dr10.CatalogueError, match=r"'FLUX_R' must be named 'flux_r'.*"
                                                  r"'Z_PHOT_MEAN' must be named 'z_phot_mean'"):
        dr10.validate_parent_catalogue(upper, label="sweep.parquet")
    with pytest.raises(FileNotFoundError, match="nowhere.parquet"):
        dr10.validate_parent_catalogue(tmp_path / "nowhere.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(dr10.CatalogueError, match="junk.parquet: not a readable Parquet"):
        dr10.validate_parent_catalogue(tmp_path / "junk.parquet")
    with pytest.raises(dr10.CatalogueError, match=r"no column\(s\) \['sersic'\]"):
        dr10.read_parent_catalogue(_write(tmp_path, _minimal()), columns=["sersic"])


def test_validate_accepts_compatible_types():
    df = _minimal().assign(flux_r=np.array([10], np.int64), maskbits=np.array([2], np.int16),
                           z=[np.nan], sigma=[None], type=pd.Categorical(["DEV"]))
    check = dr10.validate_parent_catalogue(df)
    assert {"maskbits", "z", "sigma", "type"} <= set(check.columns)
    assert check.all_null == ("sigma",)
