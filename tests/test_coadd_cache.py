"""Fast unit tests of injection_pipeline.coadd_cache (no Spark): error classification, backoff,
_SUCCESS validation, blacklist merge, and process_brick against a local HTTP server with
fault injection and a local-directory cache."""
from __future__ import annotations

import http.client
import json
import os
import random
import shutil
import socket
import urllib.error

import pytest

from injection_pipeline import brick_heads, tile_ranges
from injection_pipeline import coadd_cache as cc
from injection_pipeline import dr10
from injection_pipeline import storage as st
from injection_pipeline.local_services import start_survey_http_server

SIZE = 200  # px: small bricks keep the HTTP tests fast


# =========================================================================== classification
@pytest.mark.parametrize("exc, kind", [
    (cc.UpstreamNotFound("x"), cc.NOT_FOUND),
    (cc.UpstreamHTTPError(404, "u"), cc.NOT_FOUND),
    (cc.UpstreamHTTPError(410, "u"), cc.NOT_FOUND),
    (cc.UpstreamHTTPError(500, "u"), cc.TRANSIENT),
    (cc.UpstreamHTTPError(503, "u"), cc.TRANSIENT),
    (cc.UpstreamHTTPError(429, "u"), cc.TRANSIENT),
    (cc.UpstreamHTTPError(408, "u"), cc.TRANSIENT),
    (cc.UpstreamHTTPError(403, "u"), cc.PERMANENT),
    (urllib.error.HTTPError("u", 502, "bad gateway", {}, None), cc.TRANSIENT),
    (urllib.error.HTTPError("u", 404, "nf", {}, None), cc.NOT_FOUND),
    (urllib.error.URLError(ConnectionRefusedError()), cc.TRANSIENT),
    (ConnectionResetError(), cc.TRANSIENT),
    (socket.timeout("timed out"), cc.TRANSIENT),
    (TimeoutError(), cc.TRANSIENT),
    (http.client.IncompleteRead(b"", 10), cc.TRANSIENT),
    (http.client.RemoteDisconnected("x"), cc.TRANSIENT),
    (cc.ShortBody("x"), cc.TRANSIENT),
    (st.StorageError("put s3://b/k: SlowDown"), cc.TRANSIENT),
    (cc.CorruptFile("x"), cc.CORRUPT),
    (dr10.DR10FileError("x"), cc.CORRUPT),
    (TypeError("bug"), cc.PERMANENT),
])
def test_classify_error(exc, kind):
    assert cc.classify_error(exc) == kind


def test_backoff_exponential_capped_jittered():
    rng = random.Random(1)
    for k in range(1, 12):
        d = min(60.0, 1.0 * 2 ** (k - 1))
        vals = [cc.backoff_delay(k, 1.0, 60.0, rng) for _ in range(200)]
        assert all(d / 2 <= v <= d for v in vals)
        assert max(vals) - min(vals) > 0.3 * d / 2  # jitter really spreads the retries
    assert cc.backoff_delay(20, 1.0, 60.0, rng) <= 60.0
    with pytest.raises(ValueError):
        cc.backoff_delay(0, 1.0, 60.0)


def test_with_retries_bounded_and_not_found_never_retried():
    cfg = cc.CacheConfig(cache_root="/x", max_retries=3, backoff_base_s=0.5, backoff_max_s=2.0)
    sleeps: list[float] = []
    calls = {"n": 0}

    def flaky():
        calls["n"] += 1
        if calls["n"] <= 2:
            raise cc.UpstreamHTTPError(503, "u")
        return "ok"

    stats = cc._Stats()
    assert cc._with_retries(flaky, cfg, stats, "t", sleep=sleeps.append) == "ok"
    assert calls["n"] == 3 and stats.retries == 2 and len(sleeps) == 2
    assert 0.25 <= sleeps[0] <= 0.5 and 0.5 <= sleeps[1] <= 1.0

    def always(exc):
        def f():
            calls["n"] += 1
            raise exc
        return f

    for exc, n_calls in ((cc.UpstreamNotFound("404"), 1), (cc.UpstreamHTTPError(403, "u"), 1),
                         (cc.CorruptFile("bad"), 4), (ConnectionResetError(), 4)):
        calls["n"] = 0
        with pytest.raises(type(exc)) as ei:
            cc._with_retries(always(exc), cfg, cc._Stats(), "t", sleep=lambda s: None)
        assert calls["n"] == n_calls and ei.value.attempts == n_calls


# =========================================================================== _SUCCESS
BRICK = "1126p222"


def _entry(i: int) -> dict:
    return {"size": 100 + i, "sha256": f"{i:064x}", "source_url": f"http://x/{i}"}


def _full_doc() -> dict:
    files = {n: _entry(i) for i, n in enumerate(dr10.brick_filenames(BRICK))}
    return cc.make_success(BRICK, files, code_version="v", stage="4b", run_id="r", base_url="b")


def test_success_valid_and_lists_all_ten_files():
    doc = _full_doc()
    assert cc.validate_success(doc, BRICK) == []
    assert list(doc["files"]) == dr10.brick_filenames(BRICK) and doc["n_files"] == 10
    objects = {n: e["size"] for n, e in doc["files"].items()}
    assert cc.validate_success(doc, BRICK, objects) == []
    # round trip through JSON bytes
    assert cc.validate_success(cc.parse_json(json.dumps(doc).encode()), BRICK) == []


@pytest.mark.parametrize("sha, ok", [("0" * 64, True), ("ab" * 32, True), ("AB" * 32, False),
                                     ("a" * 63, False), ("a" * 65, False), ("a" * 63 + "\n", False),
                                     ("g" * 64, False), (None, False), (b"a" * 64, False)])
def test_sha256_check_is_64_lower_case_hex_digits(sha, ok):
    from injection_pipeline import brick_heads
    assert brick_heads.is_sha256_hex(sha) is ok
    doc = _full_doc()
    doc["files"][dr10.product_filename(BRICK, "image", "r")]["sha256"] = sha
    assert (cc.validate_success(doc, BRICK) == []) is ok


@pytest.mark.parametrize("breakage", ["missing_file", "bad_sha", "zero_size", "other_brick",
                                      "old_format", "extra", "not_json", "object_missing",
                                      "object_size"])
def test_success_invalid(breakage):
    doc = _full_doc()
    objects = {n: e["size"] for n, e in doc["files"].items()}
    name = dr10.product_filename(BRICK, "psfsize", "g")
    if breakage == "missing_file":
        del doc["files"][name]
    elif breakage == "bad_sha":
        doc["files"][name]["sha256"] = "xyz"
    elif breakage == "zero_size":
        doc["files"][name]["size"] = 0
    elif breakage == "other_brick":
        doc["brickname"] = "1126p223"
    elif breakage == "old_format":
        doc["format"] = "legacy"
    elif breakage == "extra":
        doc["files"]["legacysurvey-1126p222-depth-g.fits.fz"] = _entry(99)
    elif breakage == "not_json":
        doc = cc.parse_json(b"\x00not json")
    elif breakage == "object_missing":
        del objects[name]
    elif breakage == "object_size":
        objects[name] += 1
    assert cc.validate_success(doc, BRICK, objects)


# =========================================================================== blacklist
def test_blacklist_merge_keeps_first_time_and_removes():
    a = cc.merge_blacklist(None, [{"brick": "0002p000", "reason": "404 a", "time": "t1"},
                                  {"brick": "0001p000", "reason": "404 b", "time": "t1"}],
                           now="t1")
    assert [e["brick"] for e in a["bricks"]] == ["0001p000", "0002p000"] and a["count"] == 2
    b = cc.merge_blacklist(json.loads(json.dumps(a)),
                           [{"brick": "0002p000", "reason": "404 c", "time": "t2"},
                            {"brick": "0003p000", "reason": "404 d", "time": "t2"}], now="t2")
    e2 = {e["brick"]: e for e in b["bricks"]}
    assert set(e2) == {"0001p000", "0002p000", "0003p000"}
    assert e2["0002p000"]["time"] == "t1" and e2["0002p000"]["reason"] == "404 a"
    assert e2["0002p000"]["last_seen"] == "t2" and e2["0002p000"]["times_seen"] == 2
    assert e2["0002p000"]["last_reason"] == "404 c"
    c = cc.merge_blacklist(b, [], remove=["0001p000"], now="t3")
    assert cc.blacklisted_bricks(c) == {"0002p000", "0003p000"} and c["count"] == 2
    assert cc.merge_blacklist(c, [], now="t3")["bricks"] == c["bricks"]  # idempotent


def test_read_blacklist_missing_and_bad(tmp_path):
    assert cc.read_blacklist(str(tmp_path / "none.json"))["bricks"] == []
    p = tmp_path / "bad.json"
    p.write_text('{"x": 1}')
    with pytest.raises(ValueError):
        cc.read_blacklist(str(p))


# =========================================================================== process_brick
@pytest.fixture(scope="module")
def survey(tmp_path_factory):
    from injection_pipeline.synthetic_survey import generate_survey

    root = tmp_path_factory.mktemp("cc_survey")
    desc = generate_survey(root, n_bricks=3, size=SIZE, seed=7, faults=["absent"],
                           n_galaxies=2)
    return desc


@pytest.fixture
def server(survey):
    with start_survey_http_server(survey.root) as srv:
        yield srv


def _cfg(cache: str, srv, **kw) -> cc.CacheConfig:
    d = dict(cache_root=cache, base_url=srv.base_url, brick_size=SIZE, max_retries=2,
             backoff_base_s=0.001, backoff_max_s=0.01, threads=2, progress_every=0,
             code_version="test", run_id="r1")
    d.update(kw)
    return cc.CacheConfig(**d)


def test_process_brick_cache_skip_repair_local(survey, server, tmp_path):
    good = survey.bricks[0].spec.brickname
    absent = survey.bricks[2].spec.brickname
    cache = str(tmp_path / "cache")
    cfg = _cfg(cache, server)
    # connection reset once, a body cut short once: both retried transparently
    base = f"south/coadd/{good[:3]}/{good}/"
    server.add_fault(path=base + dr10.product_filename(good, "image", "g"), kind="reset", times=1)
    server.add_fault(path=base + dr10.product_filename(good, "invvar", "z"), kind="truncate",
                     times=1)
    rows = {r["brick"]: r for r in cc.process_bricks([good, absent], cfg)}
    assert rows[good]["status"] == cc.CACHED and rows[good]["files_fetched"] == 10
    assert rows[good]["retries"] == 2 and rows[good]["http_requests"] == 12
    assert rows[absent]["status"] == cc.BLACKLISTED and "404" in rows[absent]["reason"]
    assert rows[absent]["http_requests"] == 1  # a 404 is never retried, the brick stops
    doc = json.load(open(os.path.join(cache, good, "_SUCCESS")))
    objects = {n: os.path.getsize(os.path.join(cache, good, n)) for n in os.listdir(
        os.path.join(cache, good)) if n.endswith(".fits.fz")}
    assert cc.validate_success(doc, good, objects) == []
    for n, e in doc["files"].items():
        assert e["source_url"] == server.url_for(base + n) and e["last_modified"] and e["etag"]
        assert open(os.path.join(survey.root, base, n), "rb").read() == \
            open(os.path.join(cache, good, n), "rb").read()
    assert not os.path.exists(os.path.join(cache, absent, "_SUCCESS"))

    server.reset_counts()
    row = cc.process_brick(good, cfg)
    assert row["status"] == cc.SKIPPED and server.total_requests() == 0
    # repair: remove two psfsize maps; only they are fetched, psfsize first
    for b in "gz":
        os.remove(os.path.join(cache, good, dr10.product_filename(good, "psfsize", b)))
    assert cc.process_brick(good, cfg, "repair")["status"] == cc.REPAIRED
    assert {p for (m, p) in server.counts} == {
        "/" + base + dr10.product_filename(good, "psfsize", b) for b in "gz"}
    assert cc.validate_success(json.load(open(os.path.join(cache, good, "_SUCCESS"))), good) == []
    assert cc.process_brick(good, cfg, "repair")["status"] == cc.SKIPPED
    assert cc.process_brick(absent, cfg, "repair")["status"] == cc.NOT_CACHED


def test_heads_object_written_by_4b_and_added_by_4b2_repair(survey, server, tmp_path):
    """4b writes <brick>/_HEADS (each file's exact head, as _SUCCESS describes it) before
    _SUCCESS; 4b2 --repair adds it to a complete brick of an older 4b without fetching any
    file; the check mode (no --repair) names what is missing and changes nothing."""
    good = survey.bricks[0].spec.brickname
    cache = str(tmp_path / "cache")
    cfg = _cfg(cache, server)
    assert cc.process_brick(good, cfg)["status"] == cc.CACHED
    d = os.path.join(cache, good)
    doc = json.load(open(os.path.join(d, "_SUCCESS")))
    entry = brick_heads.entry(doc, dr10.brick_filenames(good))
    heads = brick_heads.unpack(open(os.path.join(d, brick_heads.HEADS_NAME), "rb").read(), entry)
    assert list(heads) == list(dr10.brick_filenames(good))
    for name, (head, size) in heads.items():
        raw = open(os.path.join(d, name), "rb").read()
        layout = tile_ranges.parse_layout(raw, name)
        assert head == raw[:layout.rows_end] and size == len(raw) == doc["files"][name]["size"]
    # an older 4b: the same brick without heads
    del doc["heads"]
    with open(os.path.join(d, "_SUCCESS"), "w") as fh:
        json.dump(doc, fh)
    os.remove(os.path.join(d, brick_heads.HEADS_NAME))
    server.reset_counts()
    assert cc.process_brick(good, cfg)["status"] == cc.SKIPPED      # 4b: valid, untouched
    chk = cc.process_brick(good, dataclasses_replace(cfg, dry_run=True), "repair")
    assert chk["status"] == cc.SKIPPED and "older 4b" in chk["reason"]
    assert not os.path.exists(os.path.join(d, brick_heads.HEADS_NAME))
    row = cc.process_brick(good, cfg, "repair")
    assert row["status"] == cc.REPAIRED and brick_heads.HEADS_NAME in row["reason"]
    assert server.total_requests() == 0 and row["files_fetched"] == 0
    doc2 = json.load(open(os.path.join(d, "_SUCCESS")))
    assert doc2["heads"] == entry and doc2["files"] == doc["files"]
    assert cc.process_brick(good, cfg, "repair")["status"] == cc.SKIPPED
    # a _HEADS that is not the object _SUCCESS describes is rewritten by the repair
    with open(os.path.join(d, brick_heads.HEADS_NAME), "ab") as fh:
        fh.write(b"x")
    assert cc.process_brick(good, cfg, "repair")["status"] == cc.REPAIRED
    assert cc.heads_problem(json.load(open(os.path.join(d, "_SUCCESS"))), good, {
        n: os.path.getsize(os.path.join(d, n)) for n in os.listdir(d)}) is None
    # write_heads = false: nothing written, nothing repaired
    off = dataclasses_replace(cfg, write_heads=False)
    cache2 = str(tmp_path / "cache2")
    row = cc.process_brick(good, dataclasses_replace(off, cache_root=cache2))
    assert row["status"] == cc.CACHED and row["reason"] is None
    assert "heads" not in json.load(open(os.path.join(cache2, good, "_SUCCESS")))
    assert not os.path.exists(os.path.join(cache2, good, brick_heads.HEADS_NAME))


def test_failed_heads_object_still_caches_the_brick_and_says_why(survey, server, tmp_path,
                                                                 monkeypatch):
    """_HEADS is an optimisation: when writing it fails the brick is cached without it
    (4c reads each head itself) and the result row's reason names the failure."""
    good = survey.bricks[0].spec.brickname
    cache = str(tmp_path / "cache")

    def refuse(heads):
        raise PermissionError("no write access to _HEADS")
    monkeypatch.setattr(brick_heads, "pack", refuse)
    row = cc.process_brick(good, _cfg(cache, server))
    assert row["status"] == cc.CACHED and "no _HEADS" in row["reason"]
    assert "no write access" in row["reason"]
    doc = json.load(open(os.path.join(cache, good, "_SUCCESS")))
    assert "heads" not in doc and cc.validate_success(doc, good) == []


def test_partial_brick_never_has_success_and_resumes(survey, server, tmp_path):
    good = survey.bricks[1].spec.brickname
    base = f"south/coadd/{good[:3]}/{good}/"
    bad = dr10.product_filename(good, "maskbits")
    server.add_fault(path=base + bad, kind="status", status=500, times=None)
    cache = str(tmp_path / "cache")
    cfg = _cfg(cache, server)
    row = cc.process_brick(good, cfg)
    assert row["status"] == cc.FAILED and "maskbits" in row["reason"] and "transient" in row["reason"]
    assert server.count(base + bad) == 3  # 1 + max_retries
    d = os.path.join(cache, good)
    assert not os.path.exists(os.path.join(d, "_SUCCESS"))
    assert len([n for n in os.listdir(d) if n.endswith(".fits.fz")]) == 9  # the others cached
    assert os.path.exists(os.path.join(d, cc.PARTIAL_MARKER))
    # rerun after the fault is gone: only the missing file is requested
    server.clear_faults()
    server.reset_counts()
    row = cc.process_brick(good, cfg)
    assert row["status"] == cc.CACHED and row["files_fetched"] == 1 and row["files_adopted"] == 0
    assert dict(server.counts) == {("GET", "/" + base + bad): 1}
    assert not os.path.exists(os.path.join(d, cc.PARTIAL_MARKER))
    assert cc.validate_success(json.load(open(os.path.join(d, "_SUCCESS"))), good) == []


def test_unrecorded_and_corrupt_cached_objects(survey, server, tmp_path):
    """Objects without provenance (an older cache) are re-verified + hashed; a corrupt one is
    fetched again; a stale _SUCCESS is removed before anything changes."""
    good = survey.bricks[0].spec.brickname
    base = os.path.join(survey.root, f"south/coadd/{good[:3]}/{good}")
    cache = tmp_path / "cache"
    d = cache / good
    d.mkdir(parents=True)
    names = dr10.brick_filenames(good)
    for n in names:
        if "-psfsize-" not in n:
            shutil.copy(os.path.join(base, n), d / n)
    (d / names[0]).write_bytes(b"garbage" * 100)  # image-g corrupt in the cache
    (d / "_SUCCESS").write_text("")                # legacy marker: empty
    cfg = _cfg(str(cache), server)
    chk = cc.process_brick(good, dataclasses_replace(cfg, dry_run=True), "repair")
    assert chk["status"] == cc.INCOMPLETE and "psfsize-g" in chk["reason"]
    assert (d / "_SUCCESS").exists() and server.total_requests() == 0  # check changes nothing
    row = cc.process_brick(good, cfg, "repair")
    assert row["status"] == cc.REPAIRED
    assert row["files_adopted"] == 6 and row["files_fetched"] == 4  # 3 psfsize + image-g
    fetched = {p.rsplit("/", 1)[1] for (_, p) in server.counts}
    assert fetched == {names[0]} | {n for n in names if "-psfsize-" in n}
    doc = json.load(open(d / "_SUCCESS"))
    assert cc.validate_success(doc, good) == []
    assert doc["files"][names[1]]["origin"] == "cache"
    assert doc["files"][names[0]]["origin"] == "download"


def dataclasses_replace(cfg, **kw):
    import dataclasses

    return dataclasses.replace(cfg, **kw)


def test_local_mirror_base_url(survey, tmp_path):
    good = survey.bricks[0].spec.brickname
    cfg = cc.CacheConfig(cache_root=str(tmp_path / "c"), base_url=survey.root, brick_size=SIZE,
                         max_retries=0, progress_every=0, verify="header")
    assert cc.process_brick(good, cfg)["status"] == cc.CACHED
    assert cc.process_brick(survey.bricks[2].spec.brickname, cfg)["status"] == cc.BLACKLISTED
    assert cc.process_brick("notabrick", cfg)["status"] == cc.BLACKLISTED


def test_wrong_shape_is_corrupt(survey, server, tmp_path):
    cfg = _cfg(str(tmp_path / "c"), server, brick_size=3600, max_retries=1, verify="header")
    row = cc.process_brick(survey.bricks[0].spec.brickname, cfg)
    assert row["status"] == cc.FAILED and "corrupt" in row["reason"] and "shape" in row["reason"]
