"""Local stand-in services: the survey HTTP server (faults, counters) and moto start/stop."""

from __future__ import annotations

import http.client
import socket
import urllib.error
import urllib.request

import pytest

from injection_pipeline.local_services import (
    FaultRule,
    moto_env,
    start_moto_s3,
    start_survey_http_server,
)

REL = "south/coadd/000/0001m002/legacysurvey-0001m002-image-g.fits.fz"
DATA = bytes(range(256)) * 40  # 10240 bytes


@pytest.fixture
def served(survey_server):
    f = survey_server.root_dir + "/" + REL
    import os

    os.makedirs(os.path.dirname(f))
    with open(f, "wb") as fh:
        fh.write(DATA)
    return survey_server


def _get(url, method="GET", headers=None):
    req = urllib.request.Request(url, method=method, headers=headers or {})
    with urllib.request.urlopen(req, timeout=5) as r:
        return r.status, dict(r.headers), r.read()


def test_serves_file_with_headers(served):
    status, headers, body = _get(served.url_for(REL))
    assert status == 200 and body == DATA
    assert headers["Content-Length"] == str(len(DATA))
    assert "GMT" in headers["Last-Modified"] and headers["ETag"].startswith('"')
    # HEAD: same headers, no body
    status, h2, body = _get(served.url_for(REL), method="HEAD")
    assert status == 200 and body == b""
    assert h2["Content-Length"] == str(len(DATA)) and h2["ETag"] == headers["ETag"]
    assert h2["Last-Modified"] == headers["Last-Modified"]
    assert served.count(REL) == 2 and served.count(REL, "HEAD") == 1
    assert served.count(served.url_for(REL)) == 2  # full URLs accepted too


def test_range_request(served):
    status, headers, body = _get(served.url_for(REL), headers={"Range": "bytes=100-199"})
    assert status == 206 and body == DATA[100:200]
    assert headers["Content-Range"] == f"bytes 100-199/{len(DATA)}"


def test_404_for_missing_and_directories_and_traversal(served):
    for rel in ("south/coadd/000/nope.fits", "south/coadd/000", "../../../etc/passwd"):
        with pytest.raises(urllib.error.HTTPError) as ei:
            _get(served.url_for(rel))
        assert ei.value.code == 404
    assert served.count("south/coadd/000/nope.fits") == 1
    assert served.total_requests() == 3


def test_status_fault_first_k_then_ok(served):
    served.add_fault(FaultRule(REL, kind="status", status=503, times=2))
    for _ in range(2):
        with pytest.raises(urllib.error.HTTPError) as ei:
            _get(served.url_for(REL))
        assert ei.value.code == 503
    assert _get(served.url_for(REL))[2] == DATA
    assert served.count(REL) == 3


def test_reset_fault(served):
    served.add_fault(path=REL, kind="reset", times=1)
    conn = http.client.HTTPConnection(served.host, served.port, timeout=5)
    conn.request("GET", "/" + REL)
    with pytest.raises((ConnectionResetError, http.client.RemoteDisconnected)):
        conn.getresponse().read()
    conn.close()
    assert _get(served.url_for(REL))[2] == DATA


def test_truncate_fault(served):
    served.add_fault(FaultRule(REL, kind="truncate", truncate_to=1000, times=None, methods=("GET",)))
    conn = http.client.HTTPConnection(served.host, served.port, timeout=5)
    conn.request("GET", "/" + REL)
    resp = conn.getresponse()
    assert resp.headers["Content-Length"] == str(len(DATA))
    with pytest.raises(http.client.IncompleteRead) as ei:
        resp.read()
    assert len(ei.value.partial) == 1000
    conn.close()
    # HEAD unaffected (rule is GET-only); counters keep counting
    assert _get(served.url_for(REL), method="HEAD")[0] == 200
    served.reset_counts()
    assert served.total_requests() == 0


def test_url_prefix_and_glob_fault(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.fits").write_bytes(b"xyz")
    faults = [FaultRule("/dr10/a/*.fits", status=500, times=1)]
    with start_survey_http_server(tmp_path, url_prefix="dr10", faults=faults) as srv:
        assert srv.base_url.endswith("/dr10")
        with pytest.raises(urllib.error.HTTPError) as ei:
            _get(srv.url_for("a/x.fits"))
        assert ei.value.code == 500
        assert _get(srv.url_for("a/x.fits"))[2] == b"xyz"
        with pytest.raises(urllib.error.HTTPError):
            _get(f"http://{srv.host}:{srv.port}/a/x.fits")  # outside the prefix


def _port_free(port):
    # SO_REUSEADDR like any server: ignores TIME_WAIT leftovers, still fails on a listener
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def test_http_server_stop_frees_port(tmp_path):
    srv = start_survey_http_server(tmp_path)
    port = srv.port
    assert not _port_free(port)
    srv.stop()
    srv.stop()  # idempotent
    assert _port_free(port)


def test_moto_start_stop_frees_port():
    with start_moto_s3() as moto:
        assert moto.endpoint_url == f"http://127.0.0.1:{moto.port}"
        assert moto.env == moto_env(moto.endpoint_url)
        assert set(moto.env) == {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                 "AWS_DEFAULT_REGION"}
        c = moto.client()
        c.create_bucket(Bucket="svc-test")
        c.put_object(Bucket="svc-test", Key="k", Body=b"v")
        assert c.get_object(Bucket="svc-test", Key="k")["Body"].read() == b"v"
        c.delete_object(Bucket="svc-test", Key="k")
        c.delete_bucket(Bucket="svc-test")
        port = moto.port
        assert not _port_free(port)
    assert _port_free(port)
    with start_moto_s3(port=port) as again:  # the same port can be served again at once
        assert again.client().list_buckets()["ResponseMetadata"]["HTTPStatusCode"] == 200


def test_proxy_latency_delays_every_request_and_relays_exactly(monkeypatch):
    """FaultyS3Proxy(latency_seconds=...) without faults: each request (on one kept-alive
    client connection) waits at least the latency and is relayed once upstream, and the bytes
    are the upstream's; without latency no wait."""
    import time

    import boto3

    from injection_pipeline.local_services import FaultyS3Proxy

    opened = []

    class Counted(http.client.HTTPConnection):     # the proxy's upstream connections
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            opened.append(self)
    monkeypatch.setattr(http.client, "HTTPConnection", Counted)
    with start_moto_s3() as moto:
        c = moto.client()
        c.create_bucket(Bucket="lat")
        body = bytes(range(256)) * 400
        c.put_object(Bucket="lat", Key="k", Body=body)
        with FaultyS3Proxy(moto.endpoint_url, latency_seconds=0.05) as proxy:
            pc = boto3.session.Session().client(
                "s3", endpoint_url=proxy.endpoint_url, region_name=moto.region,
                aws_access_key_id="testing", aws_secret_access_key="testing")
            times = []
            for i in range(4):
                t0 = time.perf_counter()
                got = pc.get_object(Bucket="lat", Key="k", Range=f"bytes={i}-{999 + i}")
                data = got["Body"].read()
                times.append(time.perf_counter() - t0)
                assert data == body[i:1000 + i]
            assert min(times) >= 0.05, times
            assert proxy.requests == 4 and proxy.injected == {}
            assert len(opened) == 4                   # each request relayed once
            pc.close()
        with FaultyS3Proxy(moto.endpoint_url) as fast:         # latency 0: no wait
            pc = boto3.session.Session().client(
                "s3", endpoint_url=fast.endpoint_url, region_name=moto.region,
                aws_access_key_id="testing", aws_secret_access_key="testing")
            pc.get_object(Bucket="lat", Key="k")["Body"].read()
            t0 = time.perf_counter()
            assert pc.get_object(Bucket="lat", Key="k")["Body"].read() == body
            assert time.perf_counter() - t0 < 0.05
            pc.close()
