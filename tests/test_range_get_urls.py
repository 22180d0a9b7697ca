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
    signs = []                  # keys signed, by the client or the fast presigner
    raw = client.generate_presigned_url
    raw_fast = storage._QueryPresigner.url

    def counting(*a, **k):
        if k["Params"]["Key"] != storage._QueryPresigner.PROBE_KEY:
            signs.append(k["Params"]["Key"])
        return raw(*a, **k)

    def counting_fast(self, key):
        if key != storage._QueryPresigner.PROBE_KEY:
            signs.append(key)
        return raw_fast(self, key)
    monkeypatch.setattr(client, "generate_presigned_url", counting)
    monkeypatch.setattr(storage._QueryPresigner, "url", counting_fast)
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


# ------------------------------------------------------------------ the fast SigV4 presigner
KEYS = ["k/one", "dr10cache/south/coadd/000/0001p000/legacysurvey-0001p000-image-g.fits.fz",
        "dir/with space/a+b=c&d.fits.fz", "unicode/é~x.txt", "double//slash/"]


@pytest.mark.parametrize("settings,env", [
    ({"endpoint_url": "http://127.0.0.1:9"}, {}),                     # moto-like, path style
    ({}, {"AWS_DEFAULT_REGION": "us-east-1"}),                        # AWS, virtual host
    ({}, {"AWS_DEFAULT_REGION": "us-west-2"}),
    ({"region_name": "eu-central-1"}, {"AWS_SESSION_TOKEN": "tok/en+="}),  # temporary creds
])
def test_presigner_urls_equal_the_clients_own(monkeypatch, settings, env):
    """With the clock frozen, the presigner's URL of every key is byte-identical to the
    client's generate_presigned_url (SigV4: X-Amz-Algorithm AWS4-HMAC-SHA256), for path
    and virtual-host addressing, several regions, session tokens and keys that need
    quoting; and the range getter uses it."""
    import datetime

    import botocore.auth

    for k in storage._ENV_KEYS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    fixed = datetime.datetime(2026, 12, 3, 12, 0, 0)
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda *a, **k: fixed)
    storage.clear_client_cache()
    try:
        st = storage.Storage(**settings)
        client = st.client()
        signer = storage._range_getter()._presigner(st, st._client_key(), "my-bucket")
        assert signer is not None
        for key in KEYS:
            want = client.generate_presigned_url(
                "get_object", Params={"Bucket": "my-bucket", "Key": key},
                ExpiresIn=storage._RangeGetter.URL_EXPIRES_S)
            assert "X-Amz-Algorithm=AWS4-HMAC-SHA256" in want
            assert signer.url(key) == want
        scheme, netloc, path = storage._range_getter()._url(
            st, storage.parse_uri(f"s3://my-bucket/{KEYS[2]}"), fresh=False)
        assert f"{scheme}://{netloc}{path}" == client.generate_presigned_url(
            "get_object", Params={"Bucket": "my-bucket", "Key": KEYS[2]},
            ExpiresIn=storage._RangeGetter.URL_EXPIRES_S)
    finally:
        storage.clear_client_cache()


def test_presigner_refuses_what_it_does_not_reproduce(monkeypatch):
    """An unsigned client (no X-Amz-Algorithm), a client whose URL differs from the one the
    presigner makes, or no credentials: no presigner (the client signs every URL)."""
    import datetime

    import boto3
    import botocore.auth
    from botocore import UNSIGNED
    from botocore.config import Config

    fixed = datetime.datetime(2026, 12, 3, 12, 0, 0)     # both URLs signed in the same second
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda *a, **k: fixed)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    session = boto3.session.Session()
    creds = session.get_credentials()
    unsigned = session.client("s3", config=Config(signature_version=UNSIGNED))
    assert storage._QueryPresigner.probe(unsigned, creds, "my-bucket", 900) is None
    signed = session.client("s3", config=Config(signature_version="s3v4"))
    assert storage._QueryPresigner.probe(signed, None, "my-bucket", 900) is None
    assert storage._QueryPresigner.probe(signed, creds, "my-bucket", 900) is not None

    class Shifted:     # a parameter added after signing: the presigner's signature differs
        def generate_presigned_url(self, *a, **k):
            return signed.generate_presigned_url(*a, **k).replace("?", "?extra-param=1&")
    assert storage._QueryPresigner.probe(Shifted(), creds, "my-bucket", 900) is None
    other = session.client("s3", config=Config(signature_version="s3v4"),
                           region_name="eu-west-1")

    class Mismatch:                 # the probe URL of another client (other region/host)
        def generate_presigned_url(self, *a, **k):
            return other.generate_presigned_url(*a, **k).replace("eu-west-1", "eu-west-2")
    assert storage._QueryPresigner.probe(Mismatch(), creds, "my-bucket", 900) is None


def test_wrong_region_is_a_clear_deterministic_error(fake_s3, monkeypatch):
    """S3's answer to a URL signed for another region than the bucket's names the bucket's
    region and how to set it, at once (no re-signing, no retry, not transient)."""
    st, httpd, signs = fake_s3
    body = (b"<Error><Code>AuthorizationHeaderMalformed</Code><Message>the region "
            b"'us-east-1' is wrong; expecting 'us-west-2'</Message><Region>us-west-2"
            b"</Region></Error>")

    def do_get(self):
        self.server.seen.append((self.path, ""))
        self.send_response(400)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    monkeypatch.setattr(_Handler, "do_GET", do_get)
    with pytest.raises(storage.StorageError) as ei:
        st.get_range("s3://bucket-a/k/one", 0, 10)
    assert not storage.is_transient(ei.value)
    assert "us-west-2" in str(ei.value) and "AWS_DEFAULT_REGION" in str(ei.value)
    assert len(httpd.seen) == 1
