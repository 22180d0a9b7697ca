"""DR10 data model: brick names, paths/URLs, survey-bricks, WCS, plane loaders and their errors."""
from __future__ import annotations

import gzip
import io
import math
import re
import shutil

import fitsio
import numpy as np
import pytest
from astropy.io import fits

from injection_pipeline import dr10
from injection_pipeline import synthetic_survey as ss

SMALL = 400


@pytest.fixture(scope="module")
def survey(tmp_path_factory):
    root = tmp_path_factory.mktemp("dr10_survey")
    desc = ss.generate_survey(root, n_bricks=3, size="small", seed=11,
                              faults=["truncated", "corrupt:1"])
    return desc


@pytest.fixture(scope="module")
def clean_brick(survey):
    rec = survey.bricks[0]
    assert rec.faults == []
    return rec, f"{survey.root}/{rec.directory}"


def _path(brick_dir, rec, product, band=None):
    return f"{brick_dir}/{dr10.product_filename(rec.spec.brickname, product, band)}"


# ----------------------------------------------------------------------------- names / paths
def test_brick_name_rule():
    assert dr10.brick_name_for(112.625, 22.25) == "1126p222"
    assert dr10.brick_name_for(0.125, 0.0) == "0001p000"
    assert dr10.brick_name_for(359.95, -0.05) == "3599m000"
    assert dr10.brick_name_for(10.0, -89.9) == "0100m899"
    assert dr10.brick_name_for(-0.05, 5.0) == "3599p050"      # RA wrapped into [0, 360)
    for name in ("1126p222", "0000m900", "3599p900"):
        assert dr10.validate_brickname(name) == name


@pytest.mark.parametrize("bad", ["1126P222", "1126x222", "126p222", "11260p222", "3600p000",
                                 "0000p901", "", "1126p222 ", 1126])
def test_invalid_brick_names(bad):
    with pytest.raises(ValueError, match="brick name"):
        dr10.validate_brickname(bad)
    with pytest.raises(ValueError):
        dr10.brick_dir(bad)


def test_paths_and_urls():
    assert dr10.brick_dir("1126p222") == "south/coadd/112/1126p222"
    assert dr10.brickname_from_dir("/x/south/coadd/112/1126p222/") == "1126p222"
    with pytest.raises(ValueError, match="under '112'"):
        dr10.brickname_from_dir("/x/south/coadd/113/1126p222")
    names = dr10.brick_filenames("1126p222")
    assert len(names) == 10 == len(set(names))
    assert names[0] == "legacysurvey-1126p222-image-g.fits.fz"
    assert "legacysurvey-1126p222-maskbits.fits.fz" in names
    assert {dr10.parse_product_filename(n) for n in names} == {
        ("1126p222", p, b) for p, b in dr10.CACHED_PRODUCTS}
    assert dr10.SUCCESS_MARKER == "_SUCCESS"
    url = dr10.product_url("1126p222", "psfsize", "z")
    assert url == ("https://portal.nersc.gov/cfs/cosmo/data/legacysurvey/dr10/south/coadd/112/"
                   "1126p222/legacysurvey-1126p222-psfsize-z.fits.fz")
    for base in ("http://localhost:9000/dr10", "http://localhost:9000/dr10/"):
        urls = dr10.brick_urls("1126p222", base_url=base)
        assert list(urls) == names
        assert all(u.startswith("http://localhost:9000/dr10/south/coadd/112/1126p222/legacy")
                   for u in urls.values())
    with pytest.raises(ValueError, match="needs a band"):
        dr10.product_filename("1126p222", "image")
    with pytest.raises(ValueError, match="has no band"):
        dr10.product_filename("1126p222", "maskbits", "g")
    with pytest.raises(ValueError, match="unknown cached DR10 product"):
        dr10.product_filename("1126p222", "model", "g")
    with pytest.raises(ValueError, match="not a DR10 coadd product"):
        dr10.parse_product_filename("legacysurvey-1126p222-image-g.fits")


# ----------------------------------------------------------------------------- survey-bricks
def test_read_survey_bricks_path_and_fileobj(survey):
    t = dr10.read_survey_bricks(survey.survey_bricks, extra_columns=["brickid"])
    assert list(t)[:7] == list(dr10.SURVEY_BRICKS_COLUMNS)
    assert list(t["brickname"]) == [b.spec.brickname for b in survey.bricks]
    assert t["ra"].dtype == np.float64 and t["brickid"].dtype.kind == "i"
    assert np.all(t["ra1"] < t["ra"]) and np.all(t["ra"] < t["ra2"])
    assert np.all(t["dec1"] < t["dec"]) and np.all(t["dec"] < t["dec2"])
    with open(survey.survey_bricks, "rb") as f:            # gzipped bytes in a file object
        t2 = dr10.read_survey_bricks(io.BytesIO(f.read()))
    np.testing.assert_array_equal(t2["dec2"], t["dec2"])


@pytest.mark.filterwarnings("ignore::astropy.io.fits.verify.VerifyWarning")
def test_read_survey_bricks_case_insensitive_and_errors(tmp_path):
    cols = [fits.Column("brickName", "8A", array=np.array(["1126p222"])),
            fits.Column("Ra", "D", array=[112.6]), fits.Column("dec", "E", array=[22.25])]
    cols += [fits.Column(k, "D", array=[v]) for k, v in
             (("RA1", 112.5), ("ra2", 112.75), ("DEC1", 22.125), ("Dec2", 22.375))]
    p = tmp_path / "sb.fits"
    fits.BinTableHDU.from_columns(cols).writeto(p)
    t = dr10.read_survey_bricks(p)
    assert t["brickname"][0] == "1126p222" and t["dec"].dtype == np.float64
    bad = tmp_path / "sb-missing.fits.gz"
    fits.BinTableHDU.from_columns(cols[:4] + cols[5:]).writeto(bad)
    with pytest.raises(ValueError, match=r"sb-missing\.fits\.gz.*'ra2'"):
        dr10.read_survey_bricks(bad)
    with pytest.raises(FileNotFoundError, match="nope.fits"):
        dr10.read_survey_bricks(tmp_path / "nope.fits")
    junk = tmp_path / "junk.fits.gz"
    junk.write_bytes(gzip.compress(b"not fits at all" * 300))
    with pytest.raises(ValueError, match="junk.fits.gz"):
        dr10.read_survey_bricks(junk)


# ----------------------------------------------------------------------------- WCS
def test_full_size_wcs_facts():
    w = dr10.brick_wcs(112.625, 22.25)
    np.testing.assert_allclose(w.wcs.crpix, [1800.5, 1800.5])
    np.testing.assert_allclose(w.wcs.cd, [[-0.262 / 3600, 0], [0, 0.262 / 3600]])
    assert list(w.wcs.ctype) == ["RA---TAN", "DEC--TAN"] and w.pixel_shape == (3600, 3600)
    x, y = dr10.radec_to_brick_pixel(w, 112.625, 22.25)
    assert abs(x - 1799.5) < 1e-9 and abs(y - 1799.5) < 1e-9
    # east left, north up, 0.262"/px
    x1, _ = dr10.radec_to_brick_pixel(w, 112.635, 22.25)
    _, y1 = dr10.radec_to_brick_pixel(w, 112.625, 22.26)
    assert x1 < 1799.5 and y1 > 1799.5
    ra, dec = dr10.brick_pixel_to_radec(w, [1799.5, 1800.5], [1799.5, 1799.5])
    d1, d2 = np.radians(dec)
    hav = (np.sin((d2 - d1) / 2) ** 2 +
           np.cos(d1) * np.cos(d2) * np.sin(np.radians(ra[1] - ra[0]) / 2) ** 2)
    sep = math.degrees(2 * math.asin(math.sqrt(hav))) * 3600
    assert abs(sep - 0.262) < 1e-6


@pytest.mark.parametrize("size", [400, 64, 65, 3600])
def test_small_wcs_centre_consistent(size):
    w = dr10.brick_wcs(200.0, -5.0, size)
    assert w.wcs.crpix[0] == w.wcs.crpix[1] == (size + 1) / 2
    x, y = dr10.radec_to_brick_pixel(w, 200.0, -5.0)
    assert abs(x - (size - 1) / 2) < 1e-9 and abs(y - (size - 1) / 2) < 1e-9


@pytest.mark.parametrize("ra_c,dec_c", [(112.6, 22.25), (0.05, 1.0), (359.95, -8.0),
                                        (180.0, 85.0)])
def test_wcs_round_trip(ra_c, dec_c):
    w = dr10.brick_wcs(ra_c, dec_c)
    rng = np.random.default_rng(1)
    x = rng.uniform(-50, 3650, 2000)
    y = rng.uniform(-50, 3650, 2000)
    ra, dec = dr10.brick_pixel_to_radec(w, x, y)
    assert np.all((ra >= 0) & (ra < 360))
    x2, y2 = dr10.radec_to_brick_pixel(w, ra, dec)
    assert np.max(np.abs(x2 - x)) < 1e-6 and np.max(np.abs(y2 - y)) < 1e-6
    xs, ys = dr10.radec_to_brick_pixel(w, ra[0], dec[0])         # scalar input
    assert abs(float(xs) - x[0]) < 1e-6 and abs(float(ys) - y[0]) < 1e-6


def test_wcs_from_file_header_matches(clean_brick):
    rec, d = clean_brick
    info = dr10.inspect_plane(_path(d, rec, "image", "g"))
    w_file = info.wcs()
    w_ref = dr10.brick_wcs(rec.spec.ra, rec.spec.dec, SMALL)
    assert w_file.pixel_shape == (SMALL, SMALL)
    pts = np.array([[0, 0], [199.5, 199.5], [399, 17]], float)
    np.testing.assert_allclose(w_file.all_pix2world(pts, 0), w_ref.all_pix2world(pts, 0),
                               rtol=0, atol=1e-10)


# ----------------------------------------------------------------------------- loaders
def test_read_plane_all_products_both_engines(clean_brick):
    rec, d = clean_brick
    for product, band in dr10.CACHED_PRODUCTS:
        p = _path(d, rec, product, band)
        a = dr10.read_plane(p, engine="fitsio", expected_shape=(SMALL, SMALL))
        b = dr10.read_plane(p, engine="astropy")
        c = dr10.read_plane(p)
        for pl in (a, b, c):
            assert pl.data.dtype == dr10.PRODUCT_DTYPES[product]       # native-endian
            assert pl.data.dtype.isnative and pl.data.shape == (SMALL, SMALL)
            assert pl.info.band == band and pl.info.product == product
            assert pl.bunit == dr10.PRODUCT_BUNIT[product]
        np.testing.assert_array_equal(a.data, b.data)
        np.testing.assert_array_equal(a.data, c.data)
        if product == "image":
            assert a.magzero == 22.5
        with open(p, "rb") as f:                                        # bytes: astropy
            np.testing.assert_array_equal(dr10.read_plane(io.BytesIO(f.read()),
                                                          product=product).data, a.data)


def test_subregion_and_cutout_reads(clean_brick):
    rec, d = clean_brick
    p = _path(d, rec, "invvar", "r")
    full = dr10.read_plane(p).data
    for eng in ("fitsio", "astropy"):
        part = dr10.read_plane(p, rows=(37, 141), cols=slice(250, 400), engine=eng)
        np.testing.assert_array_equal(part.data, full[37:141, 250:400])
        assert part.rows == slice(37, 141) and part.cols == slice(250, 400)
    # interior cutout: exact sub-pixel convention
    c = dr10.read_cutout(p, 120.4, 300.6, 64)
    assert (c.x0, c.y0) == (120 - 32, 301 - 32) and c.valid.all()
    np.testing.assert_array_equal(c.data, full[269:333, 88:152])
    assert 31.5 <= 120.4 - c.x0 < 32.5 and 31.5 <= 300.6 - c.y0 < 32.5
    # edge cutout: out-of-brick pixels are fill and invalid
    c = dr10.read_cutout(p, 3.2, 398.9, 96, fill=-1.0, engine="astropy")
    assert c.data.shape == (96, 96) and c.x0 == 3 - 48 and c.y0 == 399 - 48
    np.testing.assert_array_equal(c.data[:49, 45:], full[351:400, 0:51])
    assert (c.data[~c.valid] == -1).all() and c.valid.sum() == 49 * 51
    with pytest.raises(ValueError, match="outside the plane"):
        dr10.read_plane(p, rows=(300, 401))
    with pytest.raises(ValueError, match="step 1"):
        dr10.read_plane(p, cols=slice(0, 10, 2))
    with pytest.raises(ValueError, match="file path"):
        dr10.read_plane(io.BytesIO(b""), engine="fitsio")


def test_tiles_touched():
    assert dr10.tiles_touched(slice(130, 194), slice(205, 269), (400, 400)) == [6]
    assert dr10.tiles_touched(slice(90, 110), slice(90, 110), (400, 400)) == [0, 1, 4, 5]
    assert len(dr10.tiles_touched(slice(0, 3600), slice(0, 3600), (3600, 3600))) == 1296


# --- proof that a cutout decompresses only the tiles it touches ---------------------------
_FSIZE = {"L": 1, "X": 1, "B": 1, "I": 2, "J": 4, "K": 8, "A": 1, "E": 4, "D": 8, "C": 8, "M": 16}


def _damage_other_tiles(path, keep: set[int]) -> int:
    """Destroy every tile not in ``keep``: garbage in its heap bytes and a descriptor that
    points 1 GiB past the heap.  Any attempt to decompress such a tile must fail."""
    info = dr10.inspect_plane(path)
    h = info.header
    nrow, rowlen = int(h["NAXIS2"]), int(h["NAXIS1"])
    assert nrow == (SMALL // 100) ** 2 and int(h["ZTILE1"]) == int(h["ZTILE2"]) == 100
    data_start = info.data_end - (rowlen * nrow + int(h.get("PCOUNT", 0)))
    heap = data_start + int(h.get("THEAP", rowlen * nrow))
    table = np.fromfile(path, np.uint8, count=rowlen * nrow, offset=data_start)
    table = table.reshape(nrow, rowlen)
    off, damaged = 0, 0
    with open(path, "r+b") as f:
        for i in range(1, int(h["TFIELDS"]) + 1):
            m = re.fullmatch(r"(\d*)([PQ]?)([A-Z])(\(\d+\))?", h[f"TFORM{i}"].strip())
            rep = int(m.group(1) or 1)
            if not m.group(2):
                off += rep * _FSIZE[m.group(3)]
                continue
            nb = 4 if m.group(2) == "P" else 8
            dt = ">i4" if nb == 4 else ">i8"
            desc = np.frombuffer(table[:, off:off + 2 * nb].tobytes(), dt).reshape(nrow, 2)
            for t in range(nrow):
                if t in keep or desc[t, 0] == 0:
                    continue
                f.seek(heap + int(desc[t, 1]))
                f.write(b"\xff" * (int(desc[t, 0]) * _FSIZE[m.group(3)]))
                f.seek(data_start + t * rowlen + off + nb)
                f.write(np.array([1 << 30], dt).tobytes())
                damaged += 1
            off += 2 * nb * rep
    return damaged


@pytest.mark.parametrize("product,band", [("image", "r"), ("invvar", "g"), ("psfsize", "z"),
                                          ("maskbits", None)])
def test_cutout_decompresses_only_needed_tiles(clean_brick, tmp_path, product, band):
    rec, d = clean_brick
    src = _path(d, rec, product, band)
    full = dr10.read_plane(src).data
    dst = tmp_path / dr10.product_filename(rec.spec.brickname, product, band)
    shutil.copy(src, dst)
    x, y = 190.3, 111.8            # a 64 px stamp around it spans tiles 1, 2, 5, 6
    x0, y0 = dr10.cutout_origin(x, y, 64)
    keep = set(dr10.tiles_touched(slice(y0, y0 + 64), slice(x0, x0 + 64), (SMALL, SMALL)))
    assert keep == {1, 2, 5, 6}
    assert _damage_other_tiles(dst, keep) == 16 - 4
    for engine in ("fitsio", "astropy"):
        c = dr10.read_cutout(dst, x, y, 64, engine=engine)
        np.testing.assert_array_equal(c.data, full[y0:y0 + 64, x0:x0 + 64])
        with pytest.raises(dr10.DR10FileError, match="cannot decompress"):
            dr10.read_plane(dst, engine=engine)            # the other tiles really are broken
        with pytest.raises(dr10.DR10FileError, match=dst.name):
            dr10.read_plane(dst, rows=(0, 10), cols=(0, 10), engine=engine)


# ----------------------------------------------------------------------------- errors
def test_missing_truncated_corrupt_files(survey, tmp_path):
    bad = next(b for b in survey.bricks if "corrupt" in b.faults)
    trunc = next(b for b in survey.bricks if "truncated" in b.faults)
    d = f"{survey.root}/{trunc.directory}"
    with pytest.raises(dr10.DR10FileError, match=r"image-r\.fits\.fz: truncated"):
        dr10.read_plane(_path(d, trunc, "image", "r"))
    with pytest.raises(FileNotFoundError, match="legacysurvey-0000p000-image-g"):
        dr10.read_plane(tmp_path / "legacysurvey-0000p000-image-g.fits.fz")
    d = f"{survey.root}/{bad.directory}"
    with pytest.raises(dr10.DR10FileError, match=r"invvar-g\.fits\.fz: not a FITS file"):
        dr10.read_cutout(_path(d, bad, "invvar", "g"), 100, 100, 64)
    empty = tmp_path / "legacysurvey-0000p000-image-g.fits.fz"
    empty.write_bytes(b"")
    with pytest.raises(dr10.DR10FileError, match="empty file"):
        dr10.read_plane(empty)
    # header-only file: HDU 1 missing
    hdr_only = tmp_path / "legacysurvey-0000p000-image-r.fits.fz"
    fits.PrimaryHDU().writeto(hdr_only)
    with pytest.raises(dr10.DR10FileError, match="missing HDU 1"):
        dr10.read_plane(hdr_only)


def test_wrong_shape_and_dtype(clean_brick, tmp_path):
    rec, d = clean_brick
    p = _path(d, rec, "image", "g")
    with pytest.raises(dr10.DR10FileError, match=r"shape \(400, 400\), expected \(3600, 3600\)"):
        dr10.read_plane(p, expected_shape=(3600, 3600))
    with pytest.raises(dr10.DR10FileError, match="maskbits data are float32.*expected int32"):
        dr10.read_plane(p, product="maskbits")
    # an int16 "image" file, named like DR10
    bad = tmp_path / "legacysurvey-0000p000-image-g.fits.fz"
    with fitsio.FITS(str(bad), "rw", clobber=True) as f:
        f.write(np.zeros((200, 200), np.int16), compress="RICE", tile_dims=(100, 100))
    with pytest.raises(dr10.DR10FileError, match="image data are int16.*expected float32"):
        dr10.read_plane(bad)
    with dr10.BrickPlanes(d, size=SMALL) as bp:
        with pytest.raises(dr10.DR10FileError, match="expected"):
            dr10.BrickPlanes(d, size=3600).read("image", "g")
        assert bp.missing() == []
        stamps = bp.cutouts(10.0, 200.0, 32)
        assert len(stamps) == 10 and all(c.data.shape == (32, 32) for c in stamps.values())
        assert stamps[("maskbits", None)].data.dtype == np.int32
        assert not stamps[("image", "g")].valid[:, :6].any()


def test_wcs_from_header_direct_route_matches_astropy_header_parser(clean_brick):
    """The direct TAN route equals astropy's WCS built from the file's own header (HDU 1 of
    the .fits.fz, as astropy decompresses it) to 1e-9 px, in both directions."""
    from astropy.io import fits
    from astropy.wcs import WCS

    rec, d = clean_brick
    p = _path(d, rec, "image", "g")
    info = dr10.inspect_plane(p)
    w_fast = dr10.wcs_from_header(info.header)
    with fits.open(p) as hdul:
        w_ref = WCS(hdul[1].header, naxis=2)
    assert w_fast.pixel_shape == (SMALL, SMALL)
    assert list(w_fast.wcs.ctype) == list(w_ref.wcs.ctype)
    assert w_fast.wcs.radesys == w_ref.wcs.radesys == "ICRS"
    rng = np.random.default_rng(3)
    xy = rng.uniform(-20, SMALL + 20, (500, 2))
    rd = w_ref.all_pix2world(xy, 0)
    np.testing.assert_allclose(w_fast.all_pix2world(xy, 0), rd, rtol=0, atol=1e-12)
    np.testing.assert_allclose(w_fast.all_world2pix(rd, 0), xy, rtol=0, atol=1e-9)


def test_wcs_from_header_other_headers_use_astropy_parser():
    """A header outside the direct route (no full CD matrix; another projection) is parsed
    by astropy: CDELT scale, CD defaults, SIN projection all honoured."""
    from astropy.io import fits
    from astropy.wcs import WCS

    s = 0.262 / 3600
    base = {"CRVAL1": 150.0, "CRVAL2": 2.0, "CRPIX1": 50.5, "CRPIX2": 50.5,
            "NAXIS1": 100, "NAXIS2": 100}
    partial_cd = dict(base, CTYPE1="RA---TAN", CTYPE2="DEC--TAN", CD1_1=-s, CD2_2=s)
    sin = dict(base, CTYPE1="RA---SIN", CTYPE2="DEC--SIN", CD1_1=-s, CD1_2=0.0,
               CD2_1=0.0, CD2_2=s)
    for hdr in (partial_cd, sin):
        w = dr10.wcs_from_header(hdr)
        ref = WCS(fits.Header({k: v for k, v in hdr.items() if not k.startswith("NAXIS")}),
                  naxis=2)
        assert w.pixel_shape == (100, 100)
        assert list(w.wcs.ctype) == [hdr["CTYPE1"], hdr["CTYPE2"]]
        pts = np.array([[0.0, 0.0], [99.0, 40.0], [49.5, 49.5]])
        np.testing.assert_allclose(w.all_pix2world(pts, 0), ref.all_pix2world(pts, 0),
                                   rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- header cards
def _card(key, value_field):
    return f"{key:<8}= {value_field}".ljust(80)[:80]


def test_header_cards_match_astropy_on_every_header_of_a_brick(clean_brick):
    """parse_header_cards (lazy: a keyword's card is found on first access) gives astropy's
    value for every value card of both headers of every product file of a brick, and the
    same keyword list (first card of a repeated keyword wins; commentary cards excluded)."""
    rec, d = clean_brick
    checked = 0
    for prod, band in dr10.CACHED_PRODUCTS:
        raw_file = open(_path(d, rec, prod, band), "rb").read()
        offset = 0
        for _ in range(2):
            end = dr10.end_card_offset(raw_file, offset)
            text = raw_file[offset:end].decode("ascii")
            cards = dr10.parse_header_cards(text)
            ref = fits.Header.fromstring(text)
            keys = [k for k in dict.fromkeys(ref.keys())
                    if k not in ("COMMENT", "HISTORY", "") and len(k) <= 8]
            assert list(cards) == keys and len(cards) == len(keys)
            for k in keys:
                assert k in cards
                v, want = cards[k], ref[k]
                assert type(v) is type(want) and v == want, (prod, band, k, v, want)
                checked += 1
            assert "NOSUCHKEY" not in cards and cards.get("NOSUCHKEY", 7) == 7
            with pytest.raises(KeyError):
                cards["NOSUCHKEY"]
            offset = end + -(-dr10.hdu_data_size(cards) // 2880) * 2880     # the next HDU
    assert checked > 200


def test_header_cards_grid_end_duplicates_and_value_syntax():
    """Only cards on the 80-character grid count (a 'KEY     = ' inside another card's value
    is not a card); nothing after END; the first of a repeated keyword wins; strings with
    doubled quotes and comments, T/F, D exponents, integers and reals as astropy reads them;
    keywords longer than 8 characters and empty keys are never found."""
    inner = "'text with NAXIS   = 3 inside' / comment"
    text = "".join([
        _card("SIMPLE", "T"),
        _card("LABEL", inner),
        _card("NAXIS", "2 / number of axes"),
        _card("NAXIS", "5 / repeated: the first wins"),
        _card("QUOTE", "'it''s  ' / doubled quote, trailing blanks dropped"),
        _card("EMPTY", "''"),
        _card("BIG", "1.5D+03"),
        _card("NEG", "-42"),
        _card("FLAG", "F / false"),
        "COMMENT   NOTAKEY = 1".ljust(80),
        "END".ljust(80),
        _card("AFTER", "1"),
    ])
    cards = dr10.parse_header_cards(text)
    ref = fits.Header.fromstring(text[:-80])
    assert cards["LABEL"] == ref["LABEL"] == "text with NAXIS   = 3 inside"
    assert cards["NAXIS"] == 2
    assert cards["QUOTE"] == ref["QUOTE"] == "it's"
    assert cards["EMPTY"] == ref["EMPTY"] == ""
    assert cards["BIG"] == 1500.0 and isinstance(cards["BIG"], float)
    assert cards["NEG"] == -42 and cards["FLAG"] is False and cards["SIMPLE"] is True
    assert "AFTER" not in cards and "NOTAKEY" not in cards
    assert "TOOLONGKEY" not in cards and "" not in cards
    assert list(cards) == ["SIMPLE", "LABEL", "NAXIS", "QUOTE", "EMPTY", "BIG", "NEG", "FLAG"]
    # a header text without an END card: every whole card counts
    assert dr10.parse_header_cards(text[:160] + "NAXIS2 ")["LABEL"] == cards["LABEL"]
