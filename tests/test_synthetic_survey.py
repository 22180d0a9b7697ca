"""The synthetic DR10-like survey: layout, DR10 file facts, content, determinism and faults."""
from __future__ import annotations

import json
import os
from pathlib import Path

import fitsio
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from astropy.io import fits

from injection_pipeline import dr10
from injection_pipeline import synthetic_survey as ss
from lensing.maskbits import MASKBITS, has_any_bit

S = ss.SMALL_SIZE
SEED = 42
FAULTS = ["absent", "no_psfsize", "truncated", "corrupt:2", "nan_invvar:2", "no_maskbits:3"]


@pytest.fixture(scope="module")
def survey(tmp_path_factory):
    return ss.generate_survey(tmp_path_factory.mktemp("synth"), n_bricks=5, size="small",
                              seed=SEED, faults=FAULTS)


@pytest.fixture(scope="module")
def clean(survey):
    """(record, BrickPlanes-read planes) of the clean bricks 0 and 1."""
    out = []
    for rec in survey.bricks[:2]:
        assert rec.faults == []
        with dr10.BrickPlanes(Path(survey.root) / rec.directory, size=S) as bp:
            planes = {(p, b): bp.read(p, b).data for p, b in dr10.CACHED_PRODUCTS}
        out.append((rec, planes))
    return out


def _p(survey, rec, product, band=None) -> Path:
    return Path(survey.root) / rec.directory / dr10.product_filename(rec.spec.brickname,
                                                                     product, band)


# ----------------------------------------------------------------------------- layout
def test_layout_and_description(survey):
    root = Path(survey.root)
    assert (root / "survey-bricks.fits.gz").is_file() and (root / ss.CATALOGUE_NAME).is_file()
    assert survey.faults == {survey.bricks[4].spec.brickname: ["absent"],
                             survey.bricks[3].spec.brickname: ["no_psfsize", "no_maskbits"],
                             survey.bricks[2].spec.brickname: ["truncated", "corrupt",
                                                               "nan_invvar"]}
    for rec in survey.bricks:
        name = rec.spec.brickname
        assert dr10.validate_brickname(name) == dr10.brick_name_for(rec.spec.ra, rec.spec.dec)
        d = root / "south" / "coadd" / name[:3] / name
        assert rec.directory == dr10.brick_dir(name)
        present = sorted(os.listdir(d)) if d.exists() else []
        assert present == sorted(rec.files)                      # nothing else (no .tmp)
        expected = [n for n in dr10.brick_filenames(name)
                    if not ("no_psfsize" in rec.faults and "-psfsize-" in n)
                    and not ("no_maskbits" in rec.faults and "-maskbits" in n)]
        assert sorted(rec.files) == ([] if "absent" in rec.faults else sorted(expected))
    json.dumps(survey.to_dict())                                 # JSON-serialisable


def test_survey_bricks_table(survey):
    with fits.open(survey.survey_bricks) as h:
        names = h[1].columns.names
        assert names == ["BRICKNAME", "BRICKID", "BRICKQ", "BRICKROW", "BRICKCOL", "RA", "DEC",
                         "RA1", "RA2", "DEC1", "DEC2"]
        assert h[1].data["RA"].dtype.kind == "f" and h[1].data["RA"].dtype.itemsize == 8
    t = dr10.read_survey_bricks(survey.survey_bricks, extra_columns=["brickid"])
    assert list(t["brickname"]) == [r.spec.brickname for r in survey.bricks]   # absent listed
    assert len(set(t["brickid"])) == len(t["brickid"])
    # small-size bounds: the unique area is (S - 2*margin) px wide around the centre
    m = ss.primary_margin(S)
    half_deg = (S / 2 - m) * dr10.PIXSCALE_ARCSEC / 3600
    np.testing.assert_allclose(t["dec2"] - t["dec"], half_deg, rtol=1e-12)
    np.testing.assert_allclose((t["ra2"] - t["ra"]) * np.cos(np.radians(t["dec"])), half_deg,
                               rtol=1e-12)


# ----------------------------------------------------------------------------- DR10 facts
_EXPECT = {"image": ("RICE_1", "SUBTRACTIVE_DITHER_2", "nanomaggy"),
           "invvar": ("RICE_1", "NO_DITHER", "1/nanomaggy^2"),
           "psfsize": ("GZIP_1", None, "arcsec"),
           "maskbits": ("HCOMPRESS_1", None, None)}


def test_files_match_dr10_header_and_compression_facts(survey):
    rec = survey.bricks[0]
    for product, band in dr10.CACHED_PRODUCTS:
        path = str(_p(survey, rec, product, band))
        ztype, zquant, bunit = _EXPECT[product]
        with fitsio.FITS(path) as f:                              # fitsio view
            assert f[0].read_header()["NAXIS"] == 0 and f[0].get_exttype() == "IMAGE_HDU"
            assert f[1].is_compressed()
            h = f[1].read_header()
            data = f[1].read()
        assert h["ZCMPTYPE"] == ztype and h["ZTILE1"] == 100 and h["ZTILE2"] == 100
        assert h["ZBITPIX"] == dr10.PRODUCT_BITPIX[product]
        if zquant:
            assert h["ZQUANTIZ"] == zquant
        if product == "psfsize":
            assert h.get("ZQUANTIZ", "NONE") == "NONE"               # lossless float
        if product == "maskbits":
            assert h["ZNAME1"] == "SCALE" and h["ZVAL1"] == 0.0       # lossless HCOMPRESS
        assert h.get("BUNIT") == bunit and h["BRICKNAME"] == rec.spec.brickname
        assert h.get("BAND") == band and h["PRODTYPE"] == product
        if product in ("image", "invvar"):
            assert h["MAGZERO"] == 22.5
        assert h["CTYPE1"] == "RA---TAN" and h["CRPIX1"] == (S + 1) / 2
        assert h["CD1_1"] == pytest.approx(-0.262 / 3600, rel=1e-12)
        assert h["CD2_2"] == pytest.approx(0.262 / 3600, rel=1e-12) and h["CD1_2"] == 0
        assert data.dtype == dr10.PRODUCT_DTYPES[product] and data.shape == (S, S)
        with fits.open(path) as hl:                                # astropy view
            assert hl[0].header["NAXIS"] == 0 and isinstance(hl[1], fits.CompImageHDU)
            assert hl[1].header.get("BUNIT") == bunit
            np.testing.assert_array_equal(hl[1].data, data)
            assert hl[1].data.dtype.kind == data.dtype.kind
        with fits.open(path, disable_image_compression=True) as hl:
            assert hl[1].header["ZCMPTYPE"] == ztype and hl[1].header["ZTILE2"] == 100
        if product == "maskbits":
            with fitsio.FITS(path) as f:
                assert [f[i].get_extname() for i in (2, 3)] == ["WISEM1", "WISEM2"]
                w1 = f[2].read()
            np.testing.assert_array_equal(w1 > 0, has_any_bit(data, MASKBITS["WISEM1"]))


def test_compression_round_trip_precision(survey, clean):
    rec, planes = clean[0]
    bd = ss.make_brick(rec.spec, S, SEED, index=0)
    for b in dr10.BANDS:
        d_img = planes[("image", b)].astype(np.float64) - bd.image[b]
        # absolute step 1e-4 nmgy: error <= step/2 (+ float32 rounding of large values)
        ulp = np.spacing(np.abs(bd.image[b]).astype(np.float32)).astype(np.float64)
        assert (np.abs(d_img) <= 0.5e-4 + 2 * ulp).all()
        assert np.abs(d_img).max() > 1e-6                           # really quantised
        iv = bd.invvar[b]
        pos = iv > 0
        rel = np.abs(planes[("invvar", b)][pos] / iv[pos] - 1)
        assert rel.max() < 5e-3                                     # q=16: sigma_map/16
        assert (planes[("invvar", b)][~pos] == 0).all()
        np.testing.assert_array_equal(planes[("psfsize", b)], bd.psfsize[b])   # lossless
    np.testing.assert_array_equal(planes[("maskbits", None)], bd.maskbits)    # lossless


def test_wcs_and_catalogue(survey):
    t = pq.read_table(survey.catalogue)
    # every documented DR10/user column with its documented type, plus the truth columns
    expected = {c.name: c.dtype for c in dr10.CATALOGUE_COLUMNS}
    expected.update(dict.fromkeys(ss.TRUTH_COLUMNS, "float64"))
    assert {f.name: f.type for f in t.schema} == {k: pa.type_for_alias(v)
                                                   for k, v in expected.items()}
    cat = t.to_pydict()
    assert len(cat["ra"]) == sum(r.n_galaxies for r in survey.bricks)
    assert set(cat["brickname"]) == {r.spec.brickname for r in survey.bricks}
    assert set(cat["type"]) <= {"DEV", "SER", "EXP", "REX", "PSF"}
    bn = np.array(cat["brickname"])
    for rec in survey.bricks:
        sel = bn == rec.spec.brickname
        w = dr10.brick_wcs(rec.spec.ra, rec.spec.dec, S)
        x, y = dr10.radec_to_brick_pixel(w, np.array(cat["ra"])[sel], np.array(cat["dec"])[sel])
        assert np.abs(x - np.array(cat["bx"])[sel]).max() < 1e-6
        assert np.abs(y - np.array(cat["by"])[sel]).max() < 1e-6
        assert sorted(np.array(cat["objid"])[sel]) == list(range(rec.n_galaxies))
        # brick_primary: every galaxy within the survey-bricks bounds
        ra, dec = np.array(cat["ra"])[sel], np.array(cat["dec"])[sel]
        assert np.all((ra >= rec.spec.ra1) & (ra < rec.spec.ra2))
        assert np.all((dec >= rec.spec.dec1) & (dec < rec.spec.dec2))
        xc, yc = dr10.radec_to_brick_pixel(w, rec.spec.ra, rec.spec.dec)
        assert abs(xc - (S - 1) / 2) < 1e-9 and abs(yc - (S - 1) / 2) < 1e-9
    # LRG-like photometry (module docstring): dereddened r brighter than the selection limit,
    # red-sequence colours at the true redshift
    fr, fg, fz = (np.array(cat[k], float) / np.array(cat[f"mw_transmission_{k[-1]}"], float)
                  for k in ("flux_r", "flux_g", "flux_z"))
    rmag = 22.5 - 2.5 * np.log10(fr)
    assert 16.0 < rmag.min() and rmag.max() < ss.POP_R_LIMIT + 1e-5
    gr, rz = ss.lrg_colours(np.array(cat["z_true"]))
    assert abs(np.median(2.5 * np.log10(fr / fg) - gr)) < 0.05       # g - r
    assert abs(np.median(2.5 * np.log10(fz / fr) - rz)) < 0.05       # r - z
    types = np.array(cat["type"])
    assert np.mean(types[types != "PSF"] == "DEV") > 0.4


def test_galaxies_are_in_the_pixels(survey, clean):
    t = pq.read_table(survey.catalogue).to_pydict()
    n_peak, n_checked = 0, 0
    for rec, planes in clean:
        sel = [i for i, b in enumerate(t["brickname"]) if b == rec.spec.brickname]
        for i in sel:
            x, y = t["bx"][i], t["by"][i]
            ix, iy = int(round(x)), int(round(y))
            for b in dr10.BANDS:
                img, iv = planes[("image", b)], planes[("invvar", b)]
                win = (slice(max(iy - 2, 0), iy + 3), slice(max(ix - 2, 0), ix + 3))
                if (iv[win] == 0).any():
                    continue                                     # zero coverage / masked
                flux = img[win].sum()
                noise = np.sqrt((1 / iv[win]).sum())
                assert flux > 5 * noise, (rec.spec.brickname, i, b, flux, noise)
            # the stamp's brightest pixel of the r image is at the catalogue position
            stamp = planes[("image", "r")][iy - 3:iy + 4, ix - 3:ix + 4]
            if stamp.shape == (7, 7) and (planes[("invvar", "r")][iy - 3:iy + 4,
                                                                  ix - 3:ix + 4] > 0).all():
                py, px = np.unravel_index(np.argmax(stamp), stamp.shape)
                n_checked += 1
                n_peak += abs(px - 3) <= 1 and abs(py - 3) <= 1
    # (a neighbouring star or galaxy may outshine a few of them)
    assert n_checked >= 10 and n_peak >= 0.8 * n_checked


# ----------------------------------------------------------------------------- pixels
def _source_free(rec, survey, size=S):
    """Pixels > 40 px from every galaxy and clear of every star's core/wing."""
    t = pq.read_table(survey.catalogue).to_pydict()
    yy, xx = np.mgrid[0:size, 0:size]
    ok = np.ones((size, size), bool)
    for x, y, b in zip(t["bx"], t["by"], t["brickname"]):
        if b == rec.spec.brickname:
            ok &= (xx - x) ** 2 + (yy - y) ** 2 > 40 ** 2
    for st in rec.stars:
        r = 25 if st["G"] > 16 else 60
        ok &= (xx - st["x"]) ** 2 + (yy - st["y"]) ** 2 > r ** 2
    return ok


def test_noise_consistent_with_invvar(survey, clean):
    for rec, planes in clean:
        free = _source_free(rec, survey)
        mb = planes[("maskbits", None)]
        free &= (mb & ~MASKBITS["NPRIMARY"] & ~MASKBITS["SUB_BLOB"]) == 0
        for b in dr10.BANDS:
            iv = planes[("invvar", b)]
            sel = free & (iv > 0)
            assert sel.sum() > 20000
            chi = planes[("image", b)][sel] * np.sqrt(iv[sel])
            assert abs(np.std(chi) - 1) < 0.03, (b, np.std(chi))
            assert abs(np.mean(chi)) < 0.1                 # faint source wings
        # per-band depths in the DR10 ballpark (median pixel sigma, nanomaggy)
        for b, (lo, hi) in {"g": (0.003, 0.009), "r": (0.004, 0.012),
                            "z": (0.010, 0.030)}.items():
            iv = planes[("invvar", b)]
            assert lo < np.median(1 / np.sqrt(iv[iv > 0])) < hi


def test_zero_coverage_pixels(survey, clean):
    for k, (rec, planes) in enumerate(clean):
        (zc,) = rec.zero_coverage
        assert zc["band"] == dr10.BANDS[k]
        region = (slice(zc["y0"], zc["y1"]), slice(zc["x0"], zc["x1"]))
        assert (planes[("invvar", zc["band"])][region] == 0).all()
        for b in dr10.BANDS:
            iv, ps, img = (planes[(p, b)] for p in ("invvar", "psfsize", "image"))
            zero = iv == 0
            assert zero.any()                             # saturation / ALLMASK / strip
            assert (ps[zero] == 0).all() and (ps[~zero] > 0).all()
            assert (img[zero] != 0).all() and np.isfinite(img).all()
        # the catalogue galaxy placed in the strip has no data in that band only
        t = pq.read_table(survey.catalogue).to_pydict()
        i = [j for j, (bn, o) in enumerate(zip(t["brickname"], t["objid"]))
             if bn == rec.spec.brickname and o == rec.roles["zero_coverage_" + zc["band"]]][0]
        ix, iy = int(round(t["bx"][i])), int(round(t["by"][i]))
        assert planes[("psfsize", zc["band"])][iy, ix] == 0


def test_psfsize_maps(clean):
    for rec, planes in clean:
        for b, nominal in ss.PSF_FWHM.items():
            ps = planes[("psfsize", b)]
            good = ps > 0
            assert abs(np.median(ps[good]) - nominal) < 0.2 * nominal
            assert 0.7 * nominal < ps[good].min() and ps[good].max() < 1.3 * nominal
            both = good[:, 1:] & good[:, :-1]
            assert np.abs(np.diff(ps, axis=1))[both].max() < 0.005          # smooth
            assert np.ptp(ps[good]) > 0.02                                    # but varies


def test_maskbits_where_expected(survey, clean):
    for k, (rec, planes) in enumerate(clean):
        mb = planes[("maskbits", None)]
        assert mb.dtype == np.int32
        allowed = 0
        for v in MASKBITS.values():
            allowed |= v
        assert (mb & ~allowed).max() == 0
        # NPRIMARY exactly outside the survey-bricks bounds
        w = dr10.brick_wcs(rec.spec.ra, rec.spec.dec, S)
        yy, xx = np.mgrid[0:S, 0:S]
        ra, dec = dr10.brick_pixel_to_radec(w, xx.ravel(), yy.ravel())
        inside = ((ra >= rec.spec.ra1) & (ra < rec.spec.ra2) & (dec >= rec.spec.dec1) &
                  (dec < rec.spec.dec2)).reshape(S, S)
        np.testing.assert_array_equal(has_any_bit(mb, MASKBITS["NPRIMARY"]), ~inside)
        m = ss.primary_margin(S)
        assert has_any_bit(mb[:, :m - 1], MASKBITS["NPRIMARY"]).all()
        assert not has_any_bit(mb[m + 1:S - m - 1, m + 1:S - m - 1], MASKBITS["NPRIMARY"]).any()
        n_sat = 0
        for st in rec.stars:
            ix, iy = int(round(st["x"])), int(round(st["y"]))
            bits = int(mb[iy, ix])
            if st["G"] < 13:
                assert bits & MASKBITS["BRIGHT"] and bits & MASKBITS["WISEM2"]
            if st["G"] < 16:
                assert bits & MASKBITS["MEDIUM"] and bits & MASKBITS["WISEM1"]
            for b, sat in st["saturated"].items():
                n_sat += 1
                assert bits & MASKBITS[f"SATUR_{b.upper()}"]
                assert planes[("invvar", b)][iy, ix] == 0
                assert planes[("image", b)][iy, ix] >= ss.SATURATION[b] * 0.99
                x0, x1, y0, y1 = sat["trail"]
                assert has_any_bit(mb[y0:y1, x0:x1], MASKBITS[f"SATUR_{b.upper()}"]).all()
        assert n_sat > 0
        assert any(st["G"] < 13 for st in rec.stars)
        for p in rec.allmask:
            region = (slice(p["y0"], p["y1"]), slice(p["x0"], p["x1"]))
            assert has_any_bit(mb[region], MASKBITS[f"ALLMASK_{p['band'].upper()}"]).all()
            assert (planes[("invvar", p["band"])][region] == 0).all()
        assert {b for p in rec.allmask for b in p["band"]} == set(dr10.BANDS)
        # the galaxy placed near the bright star is inside its BRIGHT mask
        t = pq.read_table(survey.catalogue).to_pydict()
        i = [j for j, (bn, o) in enumerate(zip(t["brickname"], t["objid"]))
             if bn == rec.spec.brickname and o == rec.roles["near_bright_star"]][0]
        assert mb[int(round(t["by"][i])), int(round(t["bx"][i]))] & MASKBITS["BRIGHT"]
        assert has_any_bit(mb, MASKBITS["SUB_BLOB"]).any()
        assert has_any_bit(mb, MASKBITS["GALAXY"]).any() == (k % 2 == 1)


# ----------------------------------------------------------------------------- determinism
def test_deterministic_from_seed(survey, clean, tmp_path):
    one = ss.generate_survey(tmp_path / "again", n_bricks=1, size="small", seed=SEED)
    rec, planes = clean[0]
    assert one.bricks[0].spec == rec.spec                     # independent of n_bricks
    for p, b in dr10.CACHED_PRODUCTS:
        a = _p(survey, rec, p, b).read_bytes()
        c = _p(one, one.bricks[0], p, b).read_bytes()
        assert a == c                                         # byte-identical files
        np.testing.assert_array_equal(dr10.read_plane(_p(one, one.bricks[0], p, b)).data,
                                      planes[(p, b)])
    other = ss.make_brick(rec.spec, S, SEED + 1, index=0)
    assert not np.array_equal(other.image["r"], planes[("image", "r")])


# ----------------------------------------------------------------------------- faults
def test_faults_present(survey):
    absent, nopsf, broken = survey.bricks[4], survey.bricks[3], survey.bricks[2]
    root = Path(survey.root)
    assert not (root / absent.directory).exists()
    assert absent.spec.brickname in pq.read_table(survey.catalogue)["brickname"].to_pylist()
    with dr10.BrickPlanes(root / nopsf.directory, size=S) as bp:
        assert sorted(bp.missing()) == sorted(
            dr10.product_filename(nopsf.spec.brickname, p, b) for p, b in dr10.CACHED_PRODUCTS
            if p in ("psfsize", "maskbits"))
        with pytest.raises(FileNotFoundError, match="psfsize-g"):
            bp.cutout("psfsize", "g", 100, 100, 64)
        assert bp.cutout("image", "g", 100, 100, 64).data.shape == (64, 64)
    with pytest.raises(dr10.DR10FileError, match="truncated"):
        dr10.read_plane(_p(survey, broken, "image", "r"))
    with pytest.raises(dr10.DR10FileError, match="not a FITS file"):
        dr10.read_plane(_p(survey, broken, "invvar", "g"))
    for patch in broken.nan_invvar:
        if patch["band"] == "g":
            continue                                          # invvar-g is the corrupt file
        iv = dr10.read_plane(_p(survey, broken, "invvar", patch["band"])).data
        nan = np.isnan(iv)
        region = (slice(patch["y0"], patch["y1"]), slice(patch["x0"], patch["x1"]))
        assert nan[region].all() and nan.sum() == nan[region].size


def test_fault_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown fault"):
        ss.generate_survey(tmp_path, 2, faults=["melted"])
    with pytest.raises(ValueError, match="too many faults"):
        ss.generate_survey(tmp_path, 2, faults=["absent", "no_psfsize"])
    with pytest.raises(ValueError, match="only 2 bricks"):
        ss.generate_survey(tmp_path, 2, faults=["absent:5"])
    with pytest.raises(ValueError, match="size"):
        ss.generate_survey(tmp_path, 1, size="huge")


def test_cli(tmp_path, capsys):
    rc = ss.main(["--root", str(tmp_path), "--n-bricks", "2", "--size", "160", "--seed", "3",
                  "--n-galaxies", "3", "--faults", "no_maskbits", "--json"])
    assert rc == 0
    desc = json.loads(capsys.readouterr().out)
    assert desc["size"] == 160 and len(desc["bricks"]) == 2
    assert desc["bricks"][1]["faults"] == ["no_maskbits"]
    rec = desc["bricks"][0]
    d = tmp_path / rec["directory"]
    assert sorted(os.listdir(d)) == sorted(dr10.brick_filenames(rec["spec"]["brickname"]))
    assert dr10.read_plane(d / rec["files"][0], expected_shape=(160, 160)).data.shape == (160, 160)


def test_spread_layout_puts_bricks_in_distinct_sky_cells():
    """layout='spread' scatters bricks so that HEALPix (nside 32) split cells differ."""
    from astropy_healpix import HEALPix
    import astropy.units as u
    from injection_pipeline.synthetic_survey import choose_bricks

    specs = choose_bricks(8, 42, 400, "spread")
    assert len({s.brickname for s in specs}) == 8
    cells = HEALPix(nside=32, order="nested").lonlat_to_healpix(
        [s.ra for s in specs] * u.deg, [s.dec for s in specs] * u.deg)
    assert len(set(cells.tolist())) == 8, "spread bricks must not share a 1.8-deg HEALPix cell"
    assert all(-10 <= s.dec <= 30 for s in specs)
    with pytest.raises(ValueError, match="layout"):
        choose_bricks(2, 1, 400, "diagonal")


def test_pixel_noise_adds_source_photon_noise_to_the_sky_noise():
    """sigma^2 = (1 + model/sky)/invvar: sky-only where the model is 0, photon noise on top."""
    iv = np.array([[400.0, 400.0, 0.0], [100.0, 100.0, 100.0]], np.float32)
    for b in dr10.BANDS:
        sky = ss.SKY_PIX_NMGY[b]
        model = np.array([[0.0, sky, 5.0], [-1.0, 3 * sky, 0.0]], np.float32)
        sig = ss.pixel_noise_sigma(model, iv, b, 0.5)
        expect = np.array([[1 / 20, np.sqrt(2) / 20, 0.5], [0.1, 0.2, 0.1]], np.float32)
        np.testing.assert_allclose(sig, expect, rtol=2e-6)
        # the effective gain: photon variance of the model alone is model / (sky invvar)
        np.testing.assert_allclose(sig[1, 1] ** 2 - 1 / iv[1, 1], model[1, 1] / (sky * iv[1, 1]),
                                   rtol=1e-5)
