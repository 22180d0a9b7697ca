"""Range reads of tile-compressed planes (issue 16): only the tiles the stamps touch are
fetched, and the pixels and task results are bit-identical to whole-file downloads."""
from __future__ import annotations

import glob
import os

import numpy as np
import pytest

from injection_pipeline import dr10
from injection_pipeline import injection as inj
from injection_pipeline import storage
from injection_pipeline import synthetic_survey as ss
from injection_pipeline import tile_codec
from injection_pipeline import tile_ranges as tr

from test_injection import make_task

SIZE = 1000          # 10 x 10 tiles of 100 x 100 per plane


@pytest.fixture(scope="module")
def survey(tmp_path_factory):
    root = tmp_path_factory.mktemp("tr_survey")
    return ss.generate_survey(root, n_bricks=2, size=SIZE, seed=5, faults=["truncated:1"])


def _files(survey, rec):
    return sorted(glob.glob(os.path.join(str(survey.root), "**",
                                         f"legacysurvey-{rec.spec.brickname}-*.fits.fz"),
                            recursive=True))


def test_merge_ranges_blocks_and_gaps():
    assert tr.merge_ranges([(10, 20)]) == [(0, 2880)]
    assert tr.merge_ranges([(0, 2880), (2880, 3000)]) == [(0, 5760)]        # touching
    assert tr.merge_ranges([(0, 100), (10000, 10100)]) == [(0, 2880), (8640, 11520)]
    assert tr.merge_ranges([(0, 100), (10000, 10100)], gap=6000) == [(0, 11520)]
    assert tr.merge_ranges([(5000, 6000)], limit=5500) == [(2880, 5500)]
    assert tr.merge_ranges([(3, 3)]) == []


def test_sparse_plane_reads_equal_the_whole_file_for_every_product(survey, tmp_path):
    import fitsio
    rec = survey.bricks[0]
    st = storage.Storage()
    files = _files(survey, rec)
    assert len(files) == 10
    for f in files:
        sp = tr.SparsePlane(st, f, str(tmp_path / os.path.basename(f)))
        assert sp.size == os.path.getsize(f) == os.path.getsize(sp.path)
        assert sp.layout.shape == (SIZE, SIZE) and sp.layout.tile_shape == (100, 100)
        assert sp.layout.n_tiles == 100
        # the heap descriptors agree with astropy's reading of the same table
        for rows, cols in ((slice(330, 394), slice(610, 674)), (slice(0, 64), slice(936, 1000)),
                           (slice(450, 546), slice(450, 546))):
            sp.ensure_region(rows, cols)
            ref = fitsio.FITS(f)[1][rows, cols]
            got = fitsio.FITS(sp.path)[1][rows, cols]
            assert ref.dtype == got.dtype and ref.tobytes() == got.tobytes(), (f, rows, cols)
        # only the touched tiles (plus the head GET) were fetched
        touched = {t for r, c in ((slice(330, 394), slice(610, 674)), (slice(0, 64),
                   slice(936, 1000)), (slice(450, 546), slice(450, 546)))
                   for t in sp.tiles_for(r, c)}
        assert sp._fetched[sorted(touched)].all()
        assert sp.bytes_fetched <= tr.HEAD_GUESS + 3 * 2880 * 4 + sp.needed_bytes(touched) + \
            sum(b - a for t in touched for a, b in sp._tiles[t]) + 2 * 65536


def test_tile_byte_ranges_match_astropy_heap_descriptors(survey):
    from astropy.io import fits
    f = [p for p in _files(survey, survey.bricks[0]) if "-image-r" in p][0]
    with open(f, "rb") as fh:
        head = fh.read(tr.HEAD_GUESS)
    layout = tr.parse_layout(head, f)
    ranges = tr.tile_byte_ranges(layout, head[layout.table_start:layout.rows_end])
    with fits.open(f, disable_image_compression=True) as hdul:
        hdu = hdul[1]
        assert hdu.header["NAXIS2"] == layout.n_tiles
        col = hdu.columns["COMPRESSED_DATA"]
        assert col.format.startswith(("1P", "1Q", "P", "Q"))
        lengths = [len(hdu.data["COMPRESSED_DATA"][t]) for t in range(layout.n_tiles)]
    assert [sum(b - a for a, b in r[:1]) for r in ranges] == lengths


@pytest.fixture(scope="module")
def s3_cache(survey, moto_s3):
    bucket = "tile-ranges"
    moto_s3.client().create_bucket(Bucket=bucket)
    cache = f"s3://{bucket}/cache"
    for rec in survey.bricks:
        ss.cache_brick(survey, rec, cache, label="test")
    return cache


def _results(cache, rec, fetch, tasks=None):
    with inj.CachedBrick.open(cache, rec.spec.brickname, fetch=fetch) as probe:
        wcs = probe.wcs
    class _B:
        pass
    b = _B()
    b.wcs, b.brickname = wcs, rec.spec.brickname
    if tasks is None:
        tasks = [make_task(b, 220.5, 640.25, task_id="t0"), make_task(b, 700.0, 300.0,
                                                                       task_id="t1")]
    box = {}

    def opener():
        cb = inj.CachedBrick.open(cache, rec.spec.brickname, fetch=fetch)
        box["brick"] = cb
        return cb
    cfg = inj.InjectionConfig()
    out = list(inj.process_brick(tasks, opener, cfg))
    return out, box["brick"]


def test_range_reads_give_bit_identical_tasks_and_fetch_only_their_tiles(s3_cache, survey):
    rec = survey.bricks[0]
    whole, bw = _results(s3_cache, rec, "whole")
    ranged, br = _results(s3_cache, rec, "range")
    assert bw.bytes_fetched is None and br.bytes_fetched is not None
    assert [r.row["status"] for r in whole] == ["ok", "ok"]
    for a, b in zip(whole, ranged):
        assert {k: v for k, v in a.row.items() if k != "cache_marker_sha"} == \
            {k: v for k, v in b.row.items() if k != "cache_marker_sha"}
        for name in ("image", "arc", "invvar", "maskbits"):
            assert a.stamps[name].tobytes() == b.stamps[name].tobytes(), name
    total = sum(os.path.getsize(p) for p in _files(survey, rec))
    per_task = br.bytes_fetched / 2
    assert per_task < 1_000_000 and br.bytes_fetched < 0.5 * total, (per_task, total)
    auto, ba = _results(s3_cache, rec, "auto")
    assert [a.row["arc_flux_r"] for a in auto] == [w.row["arc_flux_r"] for w in whole]


def test_range_read_of_a_truncated_object_is_corrupt_file(s3_cache, survey):
    rec = survey.bricks[1]                                  # image-r cut to 60 % of its bytes
    with pytest.raises(inj.BrickUnavailable) as ei:
        inj.CachedBrick.open(s3_cache, rec.spec.brickname, fetch="range")
    assert ei.value.status == "corrupt_file" and "image-r" in ei.value.reason


# --------------------------------------------------------------------------- heads object
def _fresh_cache(survey, moto_s3, prefix, heads=True):
    bucket = "tile-ranges"
    cache = f"s3://{bucket}/{prefix}"
    for rec in survey.bricks:
        ss.cache_brick(survey, rec, cache, label="test", heads=heads)
    return cache


def _rows(results):
    return [{k: v for k, v in r.row.items() if k != "cache_marker_sha"} for r in results]


def test_heads_object_opens_a_brick_with_one_get_and_identical_results(s3_cache, survey,
                                                                        moto_s3):
    """4b's _HEADS replaces the ten head GETs; pixels and rows are bit-identical to the
    per-file head GETs of a marker without it (an older 4b), and to whole files."""
    rec = survey.bricks[0]
    old = _fresh_cache(survey, moto_s3, "no-heads", heads=False)
    with_heads, bh = _results(s3_cache, rec, "range")
    without, bo = _results(old, rec, "range")
    whole, _ = _results(s3_cache, rec, "whole")
    assert (bh.heads_from_index, bh.head_gets, bh.heads_note) == (10, 0, None)
    assert (bo.heads_from_index, bo.head_gets) == (0, 10) and "older 4b" in bo.heads_note
    assert _rows(with_heads) == _rows(without) == _rows(whole)
    for a, b in zip(with_heads, without):
        for name in ("image", "arc", "invvar", "maskbits"):
            assert a.stamps[name].tobytes() == b.stamps[name].tobytes(), name
    # GETs per file: only tile ranges with the heads object; one more (its head) without
    req_h = sum(sp.requests for sp in bh._sparse.values())
    req_o = sum(sp.requests for sp in bo._sparse.values())
    assert req_o - req_h >= 10 - sum(1 for sp in bo._sparse.values() if sp.requests == 1)
    assert bh.bytes_fetched < bo.bytes_fetched


def test_stale_or_absent_heads_object_falls_back_to_head_gets(survey, moto_s3):
    rec = survey.bricks[0]
    cache = _fresh_cache(survey, moto_s3, "stale-heads")
    uri = storage.join_uri(cache, rec.spec.brickname, "_HEADS")
    ref, _ = _results(cache, rec, "range")
    blob = bytearray(storage.get_bytes(uri))
    blob[100] ^= 1                                  # another object than _SUCCESS describes
    storage.put_bytes(uri, bytes(blob))
    res, b = _results(cache, rec, "range")
    assert (b.heads_from_index, b.head_gets) == (0, 10) and "SHA-256" in b.heads_note
    assert _rows(res) == _rows(ref)
    storage.delete(uri)
    res, b = _results(cache, rec, "range")
    assert b.head_gets == 10 and "_HEADS" in b.heads_note and "NotFound" in b.heads_note
    assert _rows(res) == _rows(ref)


def test_object_replaced_or_deleted_after_4b_is_found_by_its_first_tile_get(survey, moto_s3):
    """With the heads object no GET reads a file's head: a file replaced after 4b (another
    size) makes its plane's reads fail, naming it; a deleted psfsize map -> the PSF
    fallback, a deleted image -> corrupt_file; never pixels from another object."""
    rec = survey.bricks[0]
    brick = rec.spec.brickname
    cache = _fresh_cache(survey, moto_s3, "replaced")
    ref, _ = _results(cache, rec, "range")
    assert [r.row["psf_source_g"] for r in ref] == ["centre", "centre"]
    img = storage.join_uri(cache, brick, dr10.product_filename(brick, "image", "r"))
    storage.put_bytes(img, storage.get_bytes(img) + b"\0" * 2880)
    res, b = _results(cache, rec, "range")
    assert b.heads_from_index == 10
    assert [r.row["status"] for r in res] == ["corrupt_file"] * 2
    assert all("image-r" in r.row["status_reason"] and "replaced after 4b" in
               r.row["status_reason"] for r in res)

    cache = _fresh_cache(survey, moto_s3, "deleted")
    storage.delete(storage.join_uri(cache, brick, dr10.product_filename(brick, "psfsize", "g")))
    res, b = _results(cache, rec, "range")
    assert [r.row["status"] for r in res] == ["ok", "ok"]
    assert [r.row["psf_source_g"] for r in res] != ["centre", "centre"]
    assert [r.row["psf_source_r"] for r in res] == ["centre", "centre"]
    storage.delete(storage.join_uri(cache, brick, dr10.product_filename(brick, "image", "g")))
    res, b = _results(cache, rec, "range")
    assert [r.row["status"] for r in res] == ["corrupt_file"] * 2
    assert all("image-g" in r.row["status_reason"] for r in res)


def test_prefetch_fetches_the_planes_concurrently(s3_cache, survey):
    """Before the task loop, every plane's tile ranges are fetched at once (one plane per
    download thread): on S3 a GET waits ~20-50 ms, so ~13 GETs one plane after the other
    would bound a brick's wall time.  Results are identical with one thread."""
    import collections
    import threading
    import time

    class Overlap(storage.Storage):
        def get_range(self, uri, start, end):   # peak number of planes read at once
            with lock:
                active[uri] += 1
                peak[0] = max(peak[0], sum(1 for v in active.values() if v))
            try:
                time.sleep(0.02)          # long enough for the other threads to start theirs
                return super().get_range(uri, start, end)
            finally:
                with lock:
                    active[uri] -= 1

    lock = threading.Lock()
    rec = survey.bricks[0]
    rows, peaks = {}, {}
    for threads in (1, 4):
        active, peak = collections.Counter(), [0]
        cb = inj.CachedBrick.open(s3_cache, rec.spec.brickname, fetch="range",
                                  storage_obj=Overlap(), download_threads=threads)
        class _B:
            pass
        b = _B()
        b.wcs, b.brickname = cb.wcs, rec.spec.brickname
        tasks = [make_task(b, 220.5, 640.25, task_id="t0"), make_task(b, 700.0, 300.0,
                                                                       task_id="t1")]
        cfg = inj.InjectionConfig()
        peak[0] = 0                                   # the prefetch alone
        rows[threads] = _rows(inj.process_brick(tasks, lambda: cb, cfg))
        peaks[threads] = peak[0]
    assert peaks[1] == 1 and peaks[4] >= 2, peaks
    assert rows[1] == rows[4]


def test_heads_get_overlaps_the_marker_get(s3_cache, survey):
    """With download threads, the _HEADS GET starts with the _SUCCESS GET (one S3 latency
    less per brick) and is used only once the marker describes it; a brick without
    _SUCCESS is still missing_brick, its speculative GET awaited and dropped on close."""
    import collections
    import threading
    import time

    class Overlap(storage.Storage):
        def get_bytes(self, uri):
            with lock:
                active[uri] += 1
                peak[0] = max(peak[0], sum(1 for v in active.values() if v))
            try:
                time.sleep(0.02)
                return super().get_bytes(uri)
            finally:
                with lock:
                    active[uri] -= 1

    lock = threading.Lock()
    rec = survey.bricks[0]
    active, peak = collections.Counter(), [0]
    with inj.CachedBrick.open(s3_cache, rec.spec.brickname, fetch="range",
                              storage_obj=Overlap(), download_threads=4) as cb:
        assert (cb.heads_from_index, cb.head_gets, cb.heads_note) == (10, 0, None)
    assert peak[0] == 2
    active, peak = collections.Counter(), [0]
    with inj.CachedBrick.open(s3_cache, rec.spec.brickname, fetch="range",
                              storage_obj=Overlap(), download_threads=1) as cb:
        assert cb.heads_from_index == 10
    assert peak[0] == 1
    with pytest.raises(inj.BrickUnavailable) as ei:
        inj.CachedBrick.open(s3_cache, "0001p000", fetch="range", storage_obj=Overlap(),
                             download_threads=4)
    assert ei.value.status == "missing_brick"


def test_range_reads_parse_each_head_once_with_the_whole_file_checks(s3_cache, survey,
                                                                     monkeypatch):
    """The planes' facts come from the heads the range reads parsed (no second read or parse
    of the sparse files' headers) and equal :func:`dr10.inspect_plane` of the real files."""
    rec = survey.bricks[0]
    by_name = {os.path.basename(p): dr10.inspect_plane(p) for p in _files(survey, rec)}
    calls = []
    real = dr10.inspect_plane
    monkeypatch.setattr(dr10, "inspect_plane", lambda *a, **k: calls.append(a) or real(*a, **k))
    with inj.CachedBrick.open(s3_cache, rec.spec.brickname, fetch="range") as cb:
        assert len(cb._sparse) == 10
        for (product, band) in cb._sparse:
            got = cb._planes.info(product, band)
            want = by_name[dr10.product_filename(rec.spec.brickname, product, band)]
            for field in ("product", "band", "shape", "dtype", "compressed", "zcmptype",
                          "bunit", "magzero", "data_end"):
                assert getattr(got, field) == getattr(want, field), (product, band, field)
            assert dict(got.header) == dict(want.header)
    assert calls == []
    # a head that does not hold the plane the stage expects is still refused
    sp = cb._sparse[("image", "g")]
    h1, start, size = sp.parsed_head
    with pytest.raises(dr10.DR10FileError, match="truncated"):
        dr10.plane_info_from_headers("x-image-g.fits.fz", start + 10, h1, start)
    with pytest.raises(dr10.DR10FileError, match="int32"):
        dr10.plane_info_from_headers("x", size, h1, start, product="maskbits")


# --------------------------------------------------------------------------- in memory
def test_range_reads_open_no_file_and_no_fits_handle(s3_cache, survey, monkeypatch, tmp_path):
    """A brick read by range reads is decoded in memory: no temporary file is made and
    fitsio is never called; its task results equal the whole-file download's bit for bit."""
    import fitsio

    rec = survey.bricks[0]
    whole, _ = _results(s3_cache, rec, "whole")

    def refuse(*a, **k):
        raise AssertionError("fitsio opened a file during a range read")
    made = []
    real_mkstemp = inj.tempfile.mkstemp

    def mkstemp(*a, **k):
        made.append(k.get("suffix"))
        return real_mkstemp(*a, **k)
    monkeypatch.setattr(fitsio, "FITS", refuse)
    monkeypatch.setattr(inj.tempfile, "mkstemp", mkstemp)
    ranged, br = _results(s3_cache, rec, "range")
    assert made == []
    assert all(sp.path is None for sp in br._sparse.values()) and len(br._sparse) == 10
    assert all(not sp._chunks for sp in br._sparse.values())      # released by close()
    assert br.bytes_fetched > 0                                    # the counters stay
    assert _rows(ranged) == _rows(whole)
    for a, b in zip(whole, ranged):
        for name in ("image", "arc", "invvar", "maskbits"):
            assert a.stamps[name].tobytes() == b.stamps[name].tobytes(), name


def test_a_layout_the_codec_refuses_is_read_through_a_sparse_file(s3_cache, survey,
                                                                   monkeypatch):
    """Planes whose layout tile_codec does not decode go to fitsio on a sparse file, with
    the same pixels."""
    rec = survey.bricks[0]
    ref, _ = _results(s3_cache, rec, "range")
    real = tile_codec.TileCodec.__init__

    def refuse_hcompress(self, header, columns, rows):
        if str(header.get("ZCMPTYPE")).strip() == "HCOMPRESS_1":
            raise tile_codec.UnsupportedTiles("test: HCOMPRESS_1 refused")
        real(self, header, columns, rows)
    monkeypatch.setattr(tile_codec.TileCodec, "__init__", refuse_hcompress)
    res, b = _results(s3_cache, rec, "range")
    files = {k: sp.path for k, sp in b._sparse.items() if sp.path is not None}
    assert list(files) == [("maskbits", None)]
    assert _rows(res) == _rows(ref)
    for x, y in zip(ref, res):
        assert x.stamps["maskbits"].tobytes() == y.stamps["maskbits"].tobytes()


# --------------------------------------------------------------------------- look-ahead
def test_bricks_opened_ahead_overlap_and_change_no_output(s3_cache, survey, monkeypatch):
    """Stage 4c's worker begins the next bricks' openings (open + tile GETs) while it works on
    the current one ([job] lookahead_bricks): the GETs of two bricks overlap with look-ahead
    and never without, and the output rows (a good brick, and a truncated one whose tasks are
    corrupt_file) are identical whatever the look-ahead."""
    import collections
    import threading
    import time

    import pyarrow as pa

    from injection_pipeline import file_groups
    from injection_pipeline.stages import stage_4c

    class Overlap(storage.Storage):
        def _timed(self, uri, call):         # peak number of bricks being read at once
            brick = uri.split("/")[-2]
            with lock:
                active[brick] += 1
                peak[0] = max(peak[0], sum(1 for v in active.values() if v))
            try:
                time.sleep(0.02)
                return call()
            finally:
                with lock:
                    active[brick] -= 1

        def get_bytes(self, uri):
            return self._timed(uri, lambda: storage.Storage.get_bytes(self, uri))

        def get_range(self, uri, start, end):
            return self._timed(uri, lambda: storage.Storage.get_range(self, uri, start, end))

    lock = threading.Lock()
    good, bad = survey.bricks[0], survey.bricks[1]              # bad: image-r truncated
    with inj.CachedBrick.open(s3_cache, good.spec.brickname, fetch="range") as probe:
        wcs = probe.wcs

    class _B:
        pass
    tasks = []
    for rec in (good, bad):
        b = _B()
        b.wcs, b.brickname = wcs, rec.spec.brickname
        tasks += [make_task(b, 220.5 + 300 * i, 640.25, task_id=f"{rec.spec.brickname}-{i}")
                  for i in range(3)]
    tasks.sort(key=lambda t: (file_groups.group_tag(t["brickname"], 10), t["brickname"],
                              t["task_id"]))
    monkeypatch.setattr(storage, "_DEFAULT", Overlap())
    rows, peaks = {}, {}
    for ahead in (0, 8):
        active, peak = collections.Counter(), [0]
        fn = stage_4c._partition_fn(inj.InjectionConfig(), s3_cache, None, False, 128, 4,
                                    fetch="range", lookahead_bricks=ahead)
        out = pa.Table.from_batches(list(fn(iter([pa.RecordBatch.from_pylist(tasks)]))))
        rows[ahead] = out.to_pylist()
        peaks[ahead] = peak[0]
    assert peaks[0] == 1 and peaks[8] == 2, peaks
    assert repr(rows[0]) == repr(rows[8])              # repr: nan equals nan
    status = {(r["brickname"], r["status"]) for r in rows[0]}
    assert len(rows[0]) == 6 and status == {(good.spec.brickname, "ok"),
                                             (bad.spec.brickname, "corrupt_file")}


def test_lookahead_order_bounds_and_close():
    """stage_4c._Lookahead: events come out in their order; at most ``bricks`` openings and
    (beyond the first) ``tasks`` tasks are begun ahead of the consumer; ``close`` closes the
    bricks of openings already begun and never begins the others."""
    import threading

    from injection_pipeline.stages.stage_4c import _Lookahead, _PassEvent

    class Brick:
        closed = 0

        def close(self):
            with lock:
                Brick.closed += 1
    lock = threading.Lock()
    begun = []

    def start(ev):
        with lock:
            begun.append(ev.brick)
        return Brick(), None, [1, 0, 0], None

    def events(n, tasks_each):
        yield _PassEvent("group", "g")
        for i in range(n):
            yield _PassEvent("open", "g", brick=f"b{i}", n_tasks=tasks_each)
        yield _PassEvent("end", "g")

    for bricks, tasks, each, want in ((3, 100, 2, 3), (8, 32, 2, 8), (8, 32, 10, 4),
                                      (8, 32, 170, 1)):
        begun.clear()
        la = _Lookahead(events(20, each), start, bricks, tasks)
        seen = []
        for ev in la:
            seen.append((ev.kind, ev.brick))
            if ev.kind == "open":
                shared = ev.result()[0]
                shared.close()
        assert seen == [("group", None)] + [("open", f"b{i}") for i in range(20)] + \
            [("end", None)]
        assert la.peak == want, (bricks, tasks, each, la.peak)
        assert sorted(begun) == sorted(f"b{i}" for i in range(20))
    # abandoned after the first opening: the others begun are closed, none is begun after
    begun.clear()
    Brick.closed = 0
    la = _Lookahead(events(20, 1), start, 4, 32)
    it = iter(la)
    assert next(it).kind == "group"
    first = next(it)
    first.result()[0].close()
    la.close()
    assert Brick.closed == len(begun) and 2 <= len(begun) <= 5, (Brick.closed, begun)
    # no look-ahead: each opening made when its turn comes, in the caller's thread
    begun.clear()
    la = _Lookahead(events(3, 1), start, 0, 32)
    for ev in la:
        if ev.kind == "open":
            assert begun == [f"b{i}" for i in range(int(ev.brick[1:]))]
            ev.result()
    assert begun == ["b0", "b1", "b2"]
