"""Presigned-URL reuse of storage's fast range GETs (issue 16: per-GET CPU).

``_RangeGetter`` signs one URL per object and reuses it for ``URL_REUSE_S``; a reused URL
that S3 refuses (400/403: credentials expired or rotated since it was signed) is signed again
once; a refusal of a freshly signed URL is a deterministic :class:`storage.StorageError`.
The S3 stand-in is a plain HTTP server on 127.0.0.1 that answers ranged GETs and refuses
what the test tells it to; it is stopped by the fixture.
"""
from __future__ import annotations

import http.server
import threading
import urllib.parse

import pytest

from injection_pipeline import storage

DATA = bytes(range(256)) * 64                     # 16 kB object


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):                    # quiet
        pass

    def do_GET(self):
        u = urllib.parse.urlsplit(self.path)
        q = urllib.parse.parse_qs(u.query)
        self.server.seen.append((u.path, q.get("X-Amz-Signature", [""])[0]))
        if u.path.endswith("/denied") or q.get("X-Amz-Signature", [""])[0] == "stale":
            body = b"<Error><Code>ExpiredToken</Code></Error>"
            self.send_response(403)
        else:
            rng = self.headers.get("Range", "")
            a, b = rng.removeprefix("bytes=").split("-")
            body = DATA[int(a):int(b) + 1]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {a}-{int(a) + len(body) - 1}/{len(DATA)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def fake_s3(monkeypatch):
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.seen = []
    t = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True)
    t.start()
    for k in storage._ENV_KEYS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    storage.clear_client_cache()
    st = storage.Storage(endpoint_url=f"http://127.0.0.1:{httpd.server_address[1]}",
                         max_attempts=2)
    client = st.client()
    signs = []
    raw = client.generate_presigned_url

    def counting(*a, **k):
        signs.append(k["Params"]["Key"])
        return raw(*a, **k)
    monkeypatch.setattr(client, "generate_presigned_url", counting)
    try:
        yield st, httpd, signs
    finally:
        httpd.shutdown()
        httpd.server_close()
        t.join(timeout=5)
        storage.clear_client_cache()


def test_one_signature_per_object_is_reused(fake_s3):
    st, httpd, signs = fake_s3
    assert st.get_range("s3://bucket-a/k/one", 0, 100) == (DATA[:100], len(DATA))
    assert st.get_range("s3://bucket-a/k/one", 5000, 5100) == (DATA[5000:5100], len(DATA))
    assert st.get_range("s3://bucket-a/k/two", 10, 20) == (DATA[10:20], len(DATA))
    assert signs == ["k/one", "k/two"]            # one signing per object, not per GET
    assert len(httpd.seen) == 3
    assert httpd.seen[0][1] == httpd.seen[1][1]   # the same signed URL


def test_an_old_url_is_signed_again(fake_s3, monkeypatch):
    st, httpd, signs = fake_s3
    st.get_range("s3://bucket-a/k/one", 0, 10)
    monkeypatch.setattr(storage._RangeGetter, "URL_REUSE_S", 0.0)
    st.get_range("s3://bucket-a/k/one", 0, 10)
    assert signs == ["k/one", "k/one"]


def test_a_refused_reused_url_is_signed_again_once(fake_s3):
    st, httpd, signs = fake_s3
    st.get_range("s3://bucket-a/k/one", 0, 10)
    # the cached URL now carries a signature the server refuses (as S3 refuses a URL signed
    # with a session token that has expired since)
    (key, (t, (scheme, netloc, path))), = storage._CACHE.urls.items()
    storage._CACHE.urls[key] = (t, (scheme, netloc,
                                    path.split("?")[0] + "?X-Amz-Signature=stale"))
    assert st.get_range("s3://bucket-a/k/one", 100, 110) == (DATA[100:110], len(DATA))
    assert [s for _, s in httpd.seen[1:]][0] == "stale"
    assert len(httpd.seen) == 3 and signs == ["k/one", "k/one"]


def test_a_refused_fresh_url_is_a_deterministic_error(fake_s3):
    st, httpd, signs = fake_s3
    with pytest.raises(storage.StorageError) as ei:
        st.get_range("s3://bucket-a/k/denied", 0, 10)
    assert not isinstance(ei.value, storage.StorageTransient)
    assert not storage.is_transient(ei.value)
    assert "ExpiredToken" in str(ei.value)
    assert len(httpd.seen) == 2                   # the first answer, then one re-signed try
