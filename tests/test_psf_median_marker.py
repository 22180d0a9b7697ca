"""The psfsize brick median: one definition (psf_fallback.brick_median_fwhm), computed once by
stage 4b and stored in ``_SUCCESS`` (``files.<psfsize file>.psf_median``), used by stage 4c
instead of reading the whole plane (docs/cache.md, docs/injection.md).

* the fast median equals ``np.median`` of the float64 valid values, bit for bit;
* 4b (coadd_cache.process_brick against a local HTTP server, verify full and header, adopt)
  records it for the 3 psfsize files, equal to brick_median_fwhm(read_plane(file));
* 4c (CachedBrick / inject_task) returns the stored value without a whole-plane read and
  gives rows identical to the computed path; a foreign valid range, a malformed field, a
  size mismatch or an unusable map fall back to what 4c did before.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as hst
from hypothesis.extra import numpy as hnp
from test_injection import control_task, make_task

from injection_pipeline import coadd_cache as cc
from injection_pipeline import dr10, storage
from injection_pipeline import injection as inj
from injection_pipeline import psf_fallback as pf
from injection_pipeline import synthetic_survey as ss
from injection_pipeline.local_services import start_survey_http_server

SIZE = 400
CFG = inj.InjectionConfig()


def ref_median(plane, lo=pf.MIN_FWHM_ARCSEC, hi=pf.MAX_FWHM_ARCSEC):
    """The definition: np.median of the float64 valid values (None if none), and their count."""
    a = np.asarray(plane, dtype=np.float64).ravel()
    with np.errstate(invalid="ignore"):
        a = a[np.isfinite(a) & (a > lo) & (a <= hi)]
    return (float(np.median(a)) if a.size else None), int(a.size)


def load_json(path):
    with open(path) as f:
        return json.load(f)


def bits(v):
    return None if v is None else struct.pack("<d", v)


# =========================================================================== the fast median
SPECIAL = [0.0, -0.0, -1.0, np.nan, np.inf, -np.inf, 10.0, 25.0, 1e-30, 1e-45,
           float(np.nextafter(np.float32(10.0), np.float32(11.0))), 9.999999, 1.3, 1.3, 1.5]


@settings(max_examples=300, deadline=None)
@given(hnp.arrays(hst.sampled_from([np.float32, np.float64]),
                  hnp.array_shapes(min_dims=1, max_dims=2, min_side=0, max_side=23),
                  elements=hst.one_of(hst.sampled_from(SPECIAL),
                                      hst.floats(0.0, 12.0, width=32))))
def test_fast_median_equals_np_median_bit_for_bit(a):
    med, n = pf.valid_fwhm_median(a)
    exp_med, exp_n = ref_median(a)
    assert n == exp_n
    assert bits(med) == bits(exp_med)
    assert bits(pf.brick_median_fwhm(a)) == bits(exp_med)


@settings(max_examples=100, deadline=None)
@given(hnp.arrays(np.float32, hst.integers(0, 40), elements=hst.floats(-1.0, 3.0, width=32)),
       hst.sampled_from([(0.1, 2.0), (0.5, 1.7), (1.3, 1.3000001), (-1.0, 0.7)]))
def test_fast_median_bounds_compared_in_float64(a, rng):
    """Bounds that are not float32 numbers: the float32 path compares in float64 as np.median
    of the float64 copy does (np.float32(0.1) > 0.1 is True in float64)."""
    lo, hi = rng
    med, n = pf.valid_fwhm_median(a, lo, hi)
    exp_med, exp_n = ref_median(a, lo, hi)
    assert (bits(med), n) == (bits(exp_med), exp_n)


def test_fast_median_explicit_cases():
    f32 = np.float32
    # odd and even counts; invalid values of every kind ignored
    assert pf.valid_fwhm_median(np.array([0, np.nan, 1.0, 2.0, 3.0], f32)) == (2.0, 3)
    assert pf.valid_fwhm_median(np.array([np.inf, -1, 1.0, 2.0, 3.0, 4.0], f32)) == (2.5, 4)
    # the even average is done in float64 of the float32 values (not in float32)
    a = np.array([1.1, 1.3], f32)
    assert pf.brick_median_fwhm(a) == (float(a[0]) + float(a[1])) / 2
    assert pf.brick_median_fwhm(a) != float((a[0] + a[1]) / f32(2))
    # bounds: min exclusive, max inclusive
    assert pf.valid_fwhm_median(np.array([0.0, 10.0, 10.0], f32)) == (10.0, 2)
    assert pf.valid_fwhm_median(np.array([10.000001, 5.0], f32)) == (5.0, 1)
    assert pf.valid_fwhm_median(np.array([0.1], f32), 0.1, 1.0) == (float(f32(0.1)), 1)
    assert pf.valid_fwhm_median(np.array([0.1], np.float64), 0.1, 1.0) == (None, 0)
    # nothing valid
    for bad in (np.zeros((5, 5), f32), np.full(3, np.nan, f32), np.array([], f32),
                np.array([-1.0, np.inf, 11.0]), np.zeros(4)):
        assert pf.valid_fwhm_median(bad) == (None, 0) and pf.brick_median_fwhm(bad) is None
    # non-float32 inputs (lists, float64, ints) take the float64 np.median path
    assert pf.brick_median_fwhm([0, 1, 2, 3]) == 2.0
    assert pf.brick_median_fwhm(np.array([0, 1, 2, 3, 4], np.int32)) == 2.5
    assert pf.brick_median_fwhm(np.array([0, np.nan, 1.0, 2.0, 3.0])) == 2.0


def test_fast_median_on_a_realistic_plane():
    rng = np.random.default_rng(3)
    plane = np.round(rng.normal(1.4, 0.1, (700, 701)) * 1000).astype(np.float32) / 1000
    plane[rng.random(plane.shape) < 0.3] = 0.0
    plane[100:200, 50:400] = np.nan
    plane[5, :] = -1.0
    for p in (plane, plane[:, :-1]):           # odd and even numbers of valid pixels
        assert bits(pf.brick_median_fwhm(p)) == bits(ref_median(p)[0])
        assert pf.valid_fwhm_median(p)[1] == ref_median(p)[1]


# =========================================================================== survey
@pytest.fixture(scope="module")
def survey(tmp_path_factory):
    """Two 400-px bricks.  Brick 0's psfsize maps get many invalid pixels: g NaN and 0 blocks
    plus -1 / 25 / exactly 10.0, r 0 over a band of rows, z a NaN block; brick 1's psfsize-r
    is 0 everywhere (no valid pixel: median None)."""
    desc = ss.generate_survey(tmp_path_factory.mktemp("psfmed_survey"), n_bricks=2, size=SIZE,
                              seed=5, n_galaxies=2)

    def rewrite(rec, band, edit):
        p = psfsize_path(desc, rec, band)
        pl = dr10.read_plane(p, product="psfsize")
        d = pl.data.copy()
        edit(d)
        ss.write_plane(p, d, "psfsize", band, rec.spec, dr10.wcs_from_header(pl.info.header))

    def edit_g(d):
        d[150:200, 100:300] = np.nan
        d[250:270, :] = 0.0
        d[10, 10], d[11, 11], d[12, 12] = -1.0, 25.0, 10.0

    def edit_r(d):
        d[140:210, :] = 0.0

    def edit_z(d):
        d[170:190, 190:210] = np.nan

    b0, b1 = desc.bricks
    rewrite(b0, "g", edit_g)
    rewrite(b0, "r", edit_r)
    rewrite(b0, "z", edit_z)
    rewrite(b1, "r", lambda d: d.__setitem__(Ellipsis, 0.0))
    return desc


def psfsize_path(desc, rec, band):
    return os.path.join(desc.root, rec.directory,
                        dr10.product_filename(rec.spec.brickname, "psfsize", band))


def expected_summary(path):
    plane = dr10.read_plane(path, product="psfsize", engine="astropy").data
    med, n = ref_median(plane)
    assert pf.brick_median_fwhm(plane) == med or (med is None and n == 0)
    return {"fwhm_arcsec": pf.brick_median_fwhm(plane), "n_valid": n,
            "valid_range_arcsec": [0.0, 10.0]}


def test_survey_planes_have_the_intended_faults(survey):
    b0, b1 = survey.bricks
    g = dr10.read_plane(psfsize_path(survey, b0, "g")).data
    assert np.isnan(g).sum() == 50 * 200 and (g == 0).sum() >= 20 * SIZE and g[12, 12] == 10.0
    r = dr10.read_plane(psfsize_path(survey, b0, "r")).data
    z = dr10.read_plane(psfsize_path(survey, b0, "z")).data
    (x0, y0), (x1, y1) = [(round(x), round(y)) for x, y in TARGETS[:2]]
    assert math.isnan(g[y0, x0]) and r[y0, x0] == 0 and math.isnan(z[y0, x0])
    assert g[y1, x1] == 0
    # both decoders give the same pixels (lossless GZIP_1): the stored value does not depend
    # on 4b's astropy vs a fitsio read
    assert np.array_equal(g, dr10.read_plane(psfsize_path(survey, b0, "g"), engine="astropy")
                          .data, equal_nan=True)
    assert pf.brick_median_fwhm(dr10.read_plane(psfsize_path(survey, b1, "r")).data) is None


# =========================================================================== stage 4b
@pytest.fixture
def server(survey):
    with start_survey_http_server(survey.root) as srv:
        yield srv


def _cfg(cache, srv, **kw):
    d = {"cache_root": cache, "base_url": srv.base_url, "brick_size": SIZE, "max_retries": 1,
         "backoff_base_s": 0.001, "backoff_max_s": 0.01, "threads": 2, "progress_every": 0,
         "code_version": "test", "run_id": "r1"}
    d.update(kw)
    return cc.CacheConfig(**d)


@pytest.mark.parametrize("verify", ["full", "header"])
def test_4b_records_psf_median_for_the_three_psfsize_files(survey, server, tmp_path, verify):
    cache = str(tmp_path / "cache")
    cfg = _cfg(cache, server, verify=verify)
    for rec in survey.bricks:
        brick = rec.spec.brickname
        assert cc.process_brick(brick, cfg)["status"] == cc.CACHED
        doc = load_json(os.path.join(cache, brick, "_SUCCESS"))
        assert cc.validate_success(doc, brick) == []
        for name, e in doc["files"].items():
            if "-psfsize-" not in name:
                assert "psf_median" not in e, name
                continue
            band = dr10.parse_product_filename(name)[2]
            exp = expected_summary(psfsize_path(survey, rec, band))
            assert e["psf_median"] == exp, name
            assert bits(e["psf_median"]["fwhm_arcsec"]) == bits(exp["fwhm_arcsec"])
            assert cc.stored_psf_median(e) == (exp["fwhm_arcsec"], exp["n_valid"], (0.0, 10.0))
            # the same summary from the cached object (the function the benchmark uses)
            assert cc.psfsize_summary(os.path.join(cache, brick, name)) == exp
    doc = load_json(os.path.join(cache, survey.bricks[1].spec.brickname, "_SUCCESS"))
    r = doc["files"][dr10.product_filename(survey.bricks[1].spec.brickname, "psfsize", "r")]
    assert r["psf_median"] == {"fwhm_arcsec": None, "n_valid": 0,
                               "valid_range_arcsec": [0.0, 10.0]}


def test_verify_file_decodes_each_psfsize_plane_once(survey, monkeypatch):
    rec = survey.bricks[0]
    calls = []
    orig = dr10.read_plane

    def counting(*a, **k):
        calls.append(k.get("engine"))
        return orig(*a, **k)

    monkeypatch.setattr(dr10, "read_plane", counting)
    for verify, product, band, n_reads in (("full", "psfsize", "g", 1), ("header", "psfsize", "g", 1),
                                           ("full", "image", "g", 1), ("header", "image", "g", 0),
                                           ("header", "maskbits", None, 0)):
        calls.clear()
        name = dr10.product_filename(rec.spec.brickname, product, band)
        cfg = cc.CacheConfig(cache_root="/unused", brick_size=SIZE, verify=verify)
        meta = cc.verify_file(os.path.join(survey.root, rec.directory, name), name, cfg)
        assert calls == ["astropy"] * n_reads, (verify, product)
        assert ("psf_median" in meta) == (product == "psfsize")


def test_header_verify_keeps_undecodable_psfsize_without_psf_median(survey, tmp_path):
    """verify='header' checks structure only: a psfsize file with a corrupt tile is still
    accepted (as before), without psf_median (4c then computes and sees the corruption);
    verify='full' rejects it as before."""
    rec = survey.bricks[0]
    name = dr10.product_filename(rec.spec.brickname, "psfsize", "g")
    p = tmp_path / name
    shutil.copy(psfsize_path(survey, rec, "g"), p)
    info = dr10.inspect_plane(p)
    with open(p, "r+b") as f:                      # garbage inside the compressed heap
        f.seek(info.data_end - 4000)
        f.write(b"\xff" * 1500)
    meta = cc.verify_file(str(p), name, cc.CacheConfig(cache_root="/x", brick_size=SIZE,
                                                       verify="header"))
    assert meta == {"shape": [SIZE, SIZE]}
    with pytest.raises(cc.CorruptFile):
        cc.verify_file(str(p), name, cc.CacheConfig(cache_root="/x", brick_size=SIZE))


def test_adopted_and_reused_entries(survey, server, tmp_path):
    """Adopted objects (no provenance) get psf_median; entries reused from an older _SUCCESS
    without it stay as they are and the marker stays valid."""
    rec = survey.bricks[0]
    brick = rec.spec.brickname
    cache = str(tmp_path / "cache")
    cfg = _cfg(cache, server)
    name = dr10.product_filename(brick, "psfsize", "g")
    storage.put_file(psfsize_path(survey, rec, "g"), storage.join_uri(cache, brick, name))
    e = cc.adopt_file(brick, name, cfg, cc._Stats())
    assert e["origin"] == "cache" and e["psf_median"] == expected_summary(psfsize_path(
        survey, rec, "g"))

    assert cc.process_brick(brick, cfg)["status"] == cc.CACHED
    succ = os.path.join(cache, brick, "_SUCCESS")
    doc = load_json(succ)
    assert doc["files"][name]["origin"] == "cache" and "psf_median" in doc["files"][name]
    for e in doc["files"].values():                      # an older 4b: no psf_median
        e.pop("psf_median", None)
    with open(succ, "w") as f:
        json.dump(doc, f)
    os.remove(os.path.join(cache, brick, dr10.product_filename(brick, "image", "r")))
    server.reset_counts()
    assert cc.process_brick(brick, cfg, "repair")["status"] == cc.REPAIRED
    assert server.total_requests() == 1                  # psfsize entries reused, not fetched
    doc = load_json(succ)
    assert cc.validate_success(doc, brick) == []
    assert not any("psf_median" in e for e in doc["files"].values())


BAD_PSF_MEDIANS = [
    "1.5", [1.5], None,
    {"fwhm_arcsec": "1.5", "n_valid": 3, "valid_range_arcsec": [0.0, 10.0]},
    {"fwhm_arcsec": -1.5, "n_valid": 3, "valid_range_arcsec": [0.0, 10.0]},
    {"fwhm_arcsec": 0.0, "n_valid": 3, "valid_range_arcsec": [0.0, 10.0]},
    {"fwhm_arcsec": float("nan"), "n_valid": 3, "valid_range_arcsec": [0.0, 10.0]},
    {"fwhm_arcsec": float("inf"), "n_valid": 3, "valid_range_arcsec": [0.0, 10.0]},
    {"fwhm_arcsec": 12.0, "n_valid": 3, "valid_range_arcsec": [0.0, 10.0]},
    {"fwhm_arcsec": True, "n_valid": 3, "valid_range_arcsec": [0.0, 10.0]},
    {"fwhm_arcsec": 1.5, "n_valid": -1, "valid_range_arcsec": [0.0, 10.0]},
    {"fwhm_arcsec": 1.5, "n_valid": 3.0, "valid_range_arcsec": [0.0, 10.0]},
    {"fwhm_arcsec": 1.5, "n_valid": True, "valid_range_arcsec": [0.0, 10.0]},
    {"fwhm_arcsec": 1.5, "n_valid": 0, "valid_range_arcsec": [0.0, 10.0]},
    {"fwhm_arcsec": None, "n_valid": 5, "valid_range_arcsec": [0.0, 10.0]},
    {"fwhm_arcsec": 1.5, "n_valid": 3},
    {"fwhm_arcsec": 1.5, "n_valid": 3, "valid_range_arcsec": [0.0, 10.0, 20.0]},
    {"fwhm_arcsec": 1.5, "n_valid": 3, "valid_range_arcsec": ["0", "10"]},
    {"fwhm_arcsec": 1.5, "n_valid": 3, "valid_range_arcsec": {"min": 0.0, "max": 10.0}},
    {"fwhm_arcsec": 1.5, "valid_range_arcsec": [0.0, 10.0]},
]


@pytest.mark.parametrize("bad", BAD_PSF_MEDIANS, ids=range(len(BAD_PSF_MEDIANS)))
def test_malformed_psf_median_never_invalidates_a_marker(bad):
    files = {n: {"size": 100 + i, "sha256": f"{i:064x}", "source_url": f"http://x/{i}"}
             for i, n in enumerate(dr10.brick_filenames("1126p222"))}
    name = dr10.product_filename("1126p222", "psfsize", "g")
    files[name]["psf_median"] = bad
    doc = cc.make_success("1126p222", files, code_version="v", stage="4b", run_id="r",
                          base_url="b")
    doc = cc.parse_json(json.dumps(doc).encode())        # NaN/inf go through JSON too
    assert cc.validate_success(doc, "1126p222") == []
    assert cc.stored_psf_median(doc["files"][name]) is None
    assert cc.stored_psf_median({"psf_median": {"fwhm_arcsec": 1.5, "n_valid": 3,
                                                "valid_range_arcsec": [0, 10]}}) == \
        (1.5, 3, (0.0, 10.0))


# =========================================================================== stage 4c
@pytest.fixture
def full_reads(monkeypatch):
    """Counts whole-plane psfsize reads (dr10._Reader.read); ``forbid`` makes them raise."""
    state = {"n": 0, "forbid": False}
    orig = dr10._Reader.read

    def read(self, rows=None, cols=None):
        ny, nx = self.info.shape
        whole = all(s is None or (s.start in (0, None) and s.stop in (n, None))
                    for s, n in ((rows, ny), (cols, nx)))
        if whole and "-psfsize-" in str(self.info.path):
            state["n"] += 1
            if state["forbid"]:
                raise AssertionError(f"whole-plane read of {self.info.path}")
        return orig(self, rows, cols)

    monkeypatch.setattr(dr10._Reader, "read", read)
    return state


def make_cache(desc, rec, root, psf_median=True, mutate=None):
    ss.cache_brick(desc, rec, root, label="test", psf_median=psf_median)
    if mutate is not None:
        uri = storage.join_uri(root, rec.spec.brickname, dr10.SUCCESS_MARKER)
        doc = json.loads(storage.get_bytes(uri))
        mutate(doc["files"], rec.spec.brickname)
        storage.put_bytes(uri, json.dumps(doc, sort_keys=True).encode())
    return root


#: brick pixels (x, y): brick 0's centre psfsize there is NaN in g and z and 0 in r; 0 in g;
#: NaN in g, 0 in r; ...
TARGETS = ((200.1, 180.2), (120.3, 260.1), (300.4, 160.3), (60.2, 300.4), (200.0, 320.0))


def fallback_tasks(desc, rec, cb):
    """Tasks (injections + a control) whose centre psfsize is 0 or NaN in >= 1 band."""
    tasks = [make_task(cb, x, y) for x, y in TARGETS]
    tasks.append(control_task(cb, *TARGETS[0]))
    return tasks


def run_tasks(desc, rec, cache, cfg=CFG):
    with inj.CachedBrick.open(cache, rec.spec.brickname) as cb:
        results = [inj.inject_task(t, cb, cfg) for t in fallback_tasks(desc, rec, cb)]
        return results, dict(getattr(cb, "_stored_median", {}))


def same_value(a, b):
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


def assert_rows_identical(res_a, res_b):
    for ra, rb in zip(res_a, res_b, strict=True):
        assert set(ra.row) == set(rb.row)
        diff = [k for k in ra.row if k != "cache_marker_sha"
                and not same_value(ra.row[k], rb.row[k])]
        assert diff == [], {k: (ra.row[k], rb.row[k]) for k in diff}
        assert inj.stamp_bytes(ra) == inj.stamp_bytes(rb)


@pytest.fixture(scope="module")
def computed(survey, tmp_path_factory):
    """Rows from caches whose markers have no psf_median (the computed path), per brick."""
    root = str(tmp_path_factory.mktemp("psfmed_plain"))
    return {rec.spec.brickname: run_tasks(survey, rec, make_cache(survey, rec, root,
                                                                  psf_median=False))[0]
            for rec in survey.bricks}


@pytest.mark.parametrize("index", [0, 1])
def test_4c_uses_the_stored_median_without_reading_the_plane(survey, computed, storage_root,
                                                             full_reads, index):
    """Local and S3 (moto) caches: the S3 objects are downloaded, the size check passes."""
    rec = survey.bricks[index]
    cache = make_cache(survey, rec, storage.join_uri(storage_root, "c"))
    exp = {b: expected_summary(psfsize_path(survey, rec, b))["fwhm_arcsec"] for b in "grz"}
    full_reads.update(n=0, forbid=True)
    with inj.CachedBrick.open(cache, rec.spec.brickname) as cb:
        for b in "grz":
            assert bits(cb.psf_median(b)) == bits(exp[b])
    res, stored = run_tasks(survey, rec, cache)
    assert full_reads["n"] == 0 and set(stored) == set("grz")
    assert all(r.status == "ok" for r in res), [r.row["status_reason"] for r in res]
    if index == 0:   # every band hits the brick-median fallback (centre 0 or NaN)
        assert all(any(r.row[f"psf_source_{b}"] == "brick_median" for r in res) for b in "grz")
    if index == 1:   # psfsize-r has no valid pixel: stored None -> bricks table / default
        assert all(r.row["psf_source_r"] == "default" for r in res)
    for r in res:
        for b in "grz":
            if r.row[f"psf_source_{b}"] == "brick_median":
                c = r.row[f"psfsize_centre_{b}"]
                assert c == 0.0 or math.isnan(c)
                assert r.row[f"psf_fwhm_used_{b}"] == stored[b][0]
    computed_rows = computed[rec.spec.brickname]
    assert_rows_identical(res, computed_rows)
    assert res[0].row["cache_marker_sha"] != computed_rows[0].row["cache_marker_sha"]


def test_4c_computed_path_reads_the_plane(survey, tmp_path, full_reads):
    rec = survey.bricks[0]
    cache = make_cache(survey, rec, str(tmp_path / "c"), psf_median=False)
    _, stored = run_tasks(survey, rec, cache)
    assert stored == {} and full_reads["n"] == 3          # once per band, cached per brick


def _set_range(files, brick):
    files[dr10.product_filename(brick, "psfsize", "g")]["psf_median"][
        "valid_range_arcsec"] = [0.0, 5.0]


def _bump_size(files, brick):
    files[dr10.product_filename(brick, "psfsize", "r")]["size"] += 1


@pytest.mark.parametrize("mutate, n_stored", [(_set_range, 3), (_bump_size, 2)])
def test_4c_foreign_range_or_other_object_is_recomputed(survey, computed, tmp_path,
                                                        full_reads, mutate, n_stored):
    """A marker median for another valid range (g) is not used; nor is one recorded for an
    object of another size (r): both computed from the plane (one whole read)."""
    rec = survey.bricks[0]
    cache = make_cache(survey, rec, str(tmp_path / "c"), mutate=mutate)
    full_reads["n"] = 0
    res, stored = run_tasks(survey, rec, cache)
    assert full_reads["n"] == 1 and len(stored) == n_stored
    assert_rows_identical(res, computed[rec.spec.brickname])


def test_4c_config_range_differs_from_the_marker(survey, tmp_path, full_reads):
    """psf_max_fwhm = 5 in the config, markers say (0, 10]: computed with (0, 5], identical
    to a cache without psf_median."""
    rec = survey.bricks[0]
    cfg = inj.InjectionConfig(psf_max_fwhm=5.0)
    cache = make_cache(survey, rec, str(tmp_path / "a"))
    full_reads["n"] = 0
    res, stored = run_tasks(survey, rec, cache, cfg)
    assert full_reads["n"] == 3 and len(stored) == 3
    plain, _ = run_tasks(survey, rec, make_cache(survey, rec, str(tmp_path / "b"),
                                                 psf_median=False), cfg)
    assert_rows_identical(res, plain)


@pytest.mark.parametrize("bad", BAD_PSF_MEDIANS[:8] + BAD_PSF_MEDIANS[10:],
                         ids=[*range(8), *range(10, len(BAD_PSF_MEDIANS))])
def test_4c_ignores_a_malformed_psf_median(survey, computed, tmp_path, full_reads, bad):
    rec = survey.bricks[0]

    def mutate(files, brick):
        files[dr10.product_filename(brick, "psfsize", "z")]["psf_median"] = bad

    cache = make_cache(survey, rec, str(tmp_path / "c"), mutate=mutate)
    full_reads["n"] = 0
    res, stored = run_tasks(survey, rec, cache)
    assert set(stored) == {"g", "r"} and full_reads["n"] == 1
    assert_rows_identical(res, computed[rec.spec.brickname])


def test_4c_unusable_map_ignores_the_stored_value(survey, tmp_path, full_reads):
    """A psfsize file absent from the cache or corrupt (in 4c's view) -> psf_median None as
    before, whatever the marker says."""
    rec = survey.bricks[0]
    brick = rec.spec.brickname
    cache = make_cache(survey, rec, str(tmp_path / "c"))
    d = os.path.join(cache, brick)
    os.remove(os.path.join(d, dr10.product_filename(brick, "psfsize", "g")))
    p = os.path.join(d, dr10.product_filename(brick, "psfsize", "r"))
    with open(p, "r+b") as f:                       # not FITS any more; same size
        f.write(b"\0" * 2880)
    full_reads["n"] = 0
    with inj.CachedBrick.open(cache, brick) as cb:
        assert set(cb._stored_median) == {"r", "z"}     # kept, but r's map is unusable
        assert "absent" in cb.psfsize_reason["g"] and "corrupt" in cb.psfsize_reason["r"]
        assert cb.psf_median("g") is None and cb.psf_median("r") is None
        assert cb.psf_median("z") is not None
    assert full_reads["n"] == 0
