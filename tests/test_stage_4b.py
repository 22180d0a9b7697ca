"""Stages 4b / 4b2 end to end: a local HTTP server over a synthetic DR10 survey -> a moto S3
cache through Spark local[2] (the session `spark` fixture gives executors the moto endpoint).

Survey: 5 small bricks; b4 absent upstream (404); b1's image-r answers 503 twice, then
succeeds; b3's invvar-g is corrupt (not FITS).  4a (debug experiment) writes the manifests
and bricks.txt the stages read.  Sequence (module fixture, each step's server counters kept):

  run1  4b: b0 b1 b2 cached, b4 blacklisted, b3 failed (9 files cached, no _SUCCESS), exit 1
  run2  4b rerun: nothing requested but b3's corrupt file, exit 1
  run3  upstream file fixed: exactly that file fetched once, b3 cached, exit 0
  run4  4b rerun: no request at all, exit 0
  check 4b2 (no --repair) after deleting 3 psfsize objects: reports 2 incomplete bricks,
        changes nothing, exit 1
  rep   4b2 --repair: exactly the 3 deleted files requested, _SUCCESS rewritten, exit 0
"""
from __future__ import annotations

import json
import os
import uuid

import pandas as pd
import pytest

from injection_pipeline import brick_heads, tile_ranges
from injection_pipeline import coadd_cache as cc
from injection_pipeline import dr10
from injection_pipeline import manifests as mf
from injection_pipeline import storage
from injection_pipeline.local_services import FaultRule, start_survey_http_server
from injection_pipeline.stages import stage_4a, stage_4b

pytestmark = pytest.mark.spark

EXP = "debug_stamp64_bandsgrz_gridgrid_small"


def _settings(cache: str, base_url: str) -> dict:
    s = dict(stage_4b.DEFAULTS)
    s.update(cache=cache, base_url=base_url, brick_size=400, max_retries=3,
             backoff_base_s=0.01, backoff_max_s=0.05, threads_per_task=2, bricks_per_task=2,
             progress_every=2)
    return s


def _gets(srv) -> dict[str, int]:
    return {p: n for (m, p), n in srv.counts.items() if m == "GET"}


@pytest.fixture(scope="module")
def flow(spark, moto_s3, tmp_path_factory):
    from injection_pipeline.synthetic_survey import generate_survey

    root = tmp_path_factory.mktemp("s4b")
    desc = generate_survey(root / "dr10", n_bricks=5, size="small", seed=42, faults=["absent"])
    b = [r.spec.brickname for r in desc.bricks]
    assert desc.faults == {b[4]: ["absent"]}
    rel = {x: f"south/coadd/{x[:3]}/{x}/" for x in b}
    corrupt = root / "dr10" / rel[b[3]] / dr10.product_filename(b[3], "invvar", "g")
    good_bytes = corrupt.read_bytes()
    corrupt.write_bytes(os.urandom(2880) + good_bytes[2880:])  # header destroyed: not FITS

    out = str(root / "out")
    cfg4a = mf.load_config(experiments=[EXP])
    stage_4a.run_stage_4a(spark, cfg4a, catalogue=desc.catalogue,
                          survey_bricks=desc.survey_bricks, out=out, variant="v1")
    bucket = f"cache4b-{uuid.uuid4().hex[:8]}"
    moto_s3.create_bucket(bucket)
    cache = f"s3://{bucket}/dr10/coadd"
    srv = start_survey_http_server(root / "dr10", faults=[FaultRule(
        path=rel[b[1]] + dr10.product_filename(b[1], "image", "r"), status=503, times=2)])
    st = _settings(cache, srv.base_url)
    f = {"b": b, "rel": rel, "out": out, "cache": cache, "srv": srv, "root": str(root),
         "vroot": os.path.join(out, "phase4a", "v1")}

    def run(key, **kw):
        srv.reset_counts()
        f[key] = stage_4b.run_cache_stage(spark, st, out=out, variant="v1", **kw)
        f[key + "_gets"] = _gets(srv)
        f[key + "_requests"] = srv.total_requests()

    run("run1")
    f["bl1"] = json.load(open(os.path.join(f["vroot"], "brick_blacklist.json")))
    f["b3_after_run1"] = sorted(o.uri.rsplit("/", 1)[1] for o in storage.list_objects(
        f"{cache}/{b[3]}/"))
    run("run2")
    corrupt.write_bytes(good_bytes)  # upstream fixed
    run("run3")
    run("run4")
    f["deleted"] = [(b[0], dr10.product_filename(b[0], "psfsize", "g")),
                    (b[0], dr10.product_filename(b[0], "psfsize", "r")),
                    (b[1], dr10.product_filename(b[1], "psfsize", "z"))]
    for brick, name in f["deleted"]:
        storage.delete(f"{cache}/{brick}/{name}", missing_ok=False)
    run("check", mode="repair", stage="4b2", dry_run=True)
    run("rep", mode="repair", stage="4b2")
    yield f
    srv.stop()
    storage.delete_prefix(f"s3://{bucket}/")


def _success(f, brick):
    return json.loads(storage.get_bytes(f"{f['cache']}/{brick}/_SUCCESS"))


def _objects(f, brick):
    pre = f"{f['cache']}/{brick}/"
    return {o.uri[len(pre):]: o.size for o in storage.list_objects(pre)}


def test_first_run_statuses_and_exit(flow):
    b, s = flow["b"], flow["run1"]
    assert s["counts"][cc.CACHED] == 3 and s["counts"][cc.BLACKLISTED] == 1
    assert s["counts"][cc.FAILED] == 1 and s["exit_code"] == 1
    assert [x["brick"] for x in s["failed"]] == [b[3]]
    assert "invvar-g" in s["failed"][0]["reason"] and "corrupt" in s["failed"][0]["reason"]
    # the 503 file: two failures then success; the corrupt file: 1 + max_retries attempts
    rel = flow["rel"]
    assert flow["run1_gets"]["/" + rel[b[1]] + dr10.product_filename(b[1], "image", "r")] == 3
    assert flow["run1_gets"]["/" + rel[b[3]] + dr10.product_filename(b[3], "invvar", "g")] == 4
    # the absent brick: one request (404 is not retried) and nothing cached
    assert sum(n for p, n in flow["run1_gets"].items() if b[4] in p) == 1
    # summary is on disk and equals the returned one; counts come from the written results
    on_disk = json.load(open(os.path.join(flow["out"], "phase4b", "v1", "runs", s["run_id"],
                                          "summary.json")))
    assert on_disk["counts"] == s["counts"]
    res = pd.read_parquet(s["results"])
    assert sorted(res.brick) == sorted(b) and res.status.value_counts().to_dict() == {
        k: v for k, v in s["counts"].items() if v}
    assert int(res.bytes.sum()) == s["bytes"] > 0


def test_cached_bricks_have_valid_success(flow):
    b = flow["b"]
    for brick in b[:4]:  # after run3 b3 is complete too
        doc = _success(flow, brick)
        objs = _objects(flow, brick)
        objs.pop("_SUCCESS")
        assert cc.validate_success(doc, brick, objs) == [], brick
        # no _PARTIAL left behind; the heads object of every file, as _SUCCESS describes it
        assert set(objs) == set(dr10.brick_filenames(brick)) | {brick_heads.HEADS_NAME}
        entry = brick_heads.entry(doc, dr10.brick_filenames(brick))
        assert objs[brick_heads.HEADS_NAME] == entry["size"]
        heads = brick_heads.unpack(storage.get_bytes(
            f"{flow['cache']}/{brick}/{brick_heads.HEADS_NAME}"), entry)
        assert sorted(heads) == sorted(dr10.brick_filenames(brick))
        for name, (head, size) in heads.items():
            up = os.path.join(flow["root"], "dr10", flow["rel"][brick], name)
            with open(up, "rb") as fh:
                raw = fh.read()
            layout = tile_ranges.parse_layout(raw[:len(head)], name)
            assert size == len(raw) and head == raw[:layout.rows_end], name
        for name, e in doc["files"].items():
            up = os.path.join(flow["root"], "dr10", flow["rel"][brick], name)
            assert e["size"] == os.path.getsize(up)
            assert e["source_url"] == flow["srv"].url_for(flow["rel"][brick] + name)
            assert e["last_modified"] and e["etag"]
            # psfsize: the brick median 4c uses (also for the maps 4b2 fetched again)
            assert e.get("psf_median") == (cc.psfsize_summary(up) if "-psfsize-" in name
                                           else None), name
        assert doc["code_version"].startswith("dr10-lens-injection")
    assert not storage.exists(f"{flow['cache']}/{b[4]}/_SUCCESS")
    assert list(storage.list_objects(f"{flow['cache']}/{b[4]}/")) == []


def test_partial_brick_has_no_success_after_failure(flow):
    b3 = flow["b"][3]
    names = set(flow["b3_after_run1"])
    assert "_SUCCESS" not in names and cc.PARTIAL_MARKER in names
    assert names - {cc.PARTIAL_MARKER} == set(dr10.brick_filenames(b3)) - {
        dr10.product_filename(b3, "invvar", "g")}


def test_blacklist_has_404_brick_and_is_merged(flow):
    b = flow["b"]
    bl = flow["bl1"]
    assert [e["brick"] for e in bl["bricks"]] == [b[4]]
    assert "404" in bl["bricks"][0]["reason"] and bl["bricks"][0]["time"]
    final = json.load(open(os.path.join(flow["vroot"], "brick_blacklist.json")))
    assert [e["brick"] for e in final["bricks"]] == [b[4]]
    assert final["bricks"][0]["time"] == bl["bricks"][0]["time"]  # first time kept
    for key in ("run2", "run3", "run4", "rep"):
        assert flow[key]["bricks_skipped_blacklisted"] == 1  # never retried by default


def test_rerun_downloads_nothing_for_complete_bricks(flow):
    b, rel = flow["b"], flow["rel"]
    bad = "/" + rel[b[3]] + dr10.product_filename(b[3], "invvar", "g")
    # run2: only the failed file of the partial brick (still corrupt: 1 + 3 retries)
    assert flow["run2_gets"] == {bad: 4} and flow["run2_requests"] == 4
    assert flow["run2"]["counts"][cc.SKIPPED] == 3 and flow["run2"]["exit_code"] == 1
    # run3: upstream fixed -> exactly that file, once; the brick completes
    assert flow["run3_gets"] == {bad: 1} and flow["run3_requests"] == 1
    assert flow["run3"]["counts"][cc.CACHED] == 1 and flow["run3"]["exit_code"] == 0
    # run4: nothing at all
    assert flow["run4_requests"] == 0 and flow["run4"]["counts"][cc.SKIPPED] == 4
    assert flow["run4"]["exit_code"] == 0 and flow["run4"]["bytes"] == 0


def test_repair_fetches_exactly_the_missing_files(flow):
    chk = flow["check"]
    assert flow["check_requests"] == 0 and chk["exit_code"] == 1
    assert chk["counts"][cc.INCOMPLETE] == 2 and chk["counts"][cc.SKIPPED] == 2
    rep = flow["rep"]
    expected = {"/" + flow["rel"][brick] + name: 1 for brick, name in flow["deleted"]}
    assert flow["rep_gets"] == expected and flow["rep_requests"] == 3
    assert rep["counts"][cc.REPAIRED] == 2 and rep["counts"][cc.SKIPPED] == 2
    assert rep["exit_code"] == 0 and rep["files_fetched"] == 3
    for brick in {x for x, _ in flow["deleted"]}:
        doc = _success(flow, brick)
        objs = _objects(flow, brick)
        objs.pop("_SUCCESS")
        assert cc.validate_success(doc, brick, objs) == [] and doc["stage"] == "4b2"
        for name, e in doc["files"].items():
            assert e["run_id"] == (rep["run_id"] if (brick, name) in flow["deleted"]
                                   else flow["run1"]["run_id"])


def test_filtered_manifests_exclude_exactly_blacklisted_tasks(flow):
    b4 = flow["b"][4]
    man = pd.read_parquet(os.path.join(flow["vroot"], "manifests", EXP))
    filt = pd.read_parquet(os.path.join(flow["vroot"], "manifests_filtered", EXP))
    assert (man.brickname == b4).sum() > 0
    expected = man[man.brickname != b4]
    assert sorted(filt.task_id) == sorted(expected.task_id)
    assert list(filt.columns) == list(man.columns)
    summ = json.load(open(os.path.join(flow["vroot"], "manifests_filtered_summary.json")))
    e = summ["experiments"][EXP]
    assert e["tasks_in"] == len(man) and e["tasks_out"] == len(filt)
    assert e["tasks_removed"] == (man.brickname == b4).sum() == e["removed_by_brick"][b4]
    assert flow["run1"]["manifests_filtered"][EXP]["tasks_removed"] == e["tasks_removed"]


def test_cli_parses_both_stages(tmp_path):
    import spark_phase4_pipeline as drv

    p = drv.build_parser()
    a = p.parse_args(["4b", "--out", str(tmp_path), "--cache", "s3://b/p", "--max-retries", "2",
                      "--timeout", "7", "--brick-size", "400"])
    s = stage_4b.settings_from_args(a)
    assert s["cache"] == "s3://b/p" and s["max_retries"] == 2 and s["read_timeout_s"] == 7
    assert s["base_url"] == dr10.DEFAULT_BASE_URL and s["threads_per_task"] >= 1
    a2 = p.parse_args(["4b2", "--out", str(tmp_path), "--repair"])
    assert a2.repair and stage_4b.settings_from_args(a2)["cache"] == storage.join_uri(
        str(tmp_path), "coadd_cache")


def test_mass_404_guard_refuses_to_blacklist(spark, tmp_path):
    """A wrong --base-url makes every brick 404: the run exits 2 and blacklists nothing."""
    with start_survey_http_server(tmp_path) as srv:  # an empty tree: everything is 404
        out = str(tmp_path / "out")
        vroot = os.path.join(out, "phase4a", "v")
        os.makedirs(vroot)
        names = [f"{1000 + i:04d}p100" for i in range(25)]
        open(os.path.join(vroot, "bricks.txt"), "w").write("\n".join(names) + "\n")
        st = dict(_settings(str(tmp_path / "cache"), srv.base_url), bricks_per_task=25)
        s = stage_4b.run_cache_stage(spark, st, out=out, variant="v")
        assert s["exit_code"] == 2 and s["blacklist_guard_tripped"]
        assert s["counts"][cc.BLACKLISTED] == 25 and srv.total_requests() == 25
        assert not os.path.exists(os.path.join(vroot, "brick_blacklist.json"))
        s = stage_4b.run_cache_stage(spark, st, out=out, variant="v",
                                     max_new_blacklist_frac=1.0)
        assert s["exit_code"] == 0 and s["blacklist_size"] == 25
