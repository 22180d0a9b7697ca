"""injection_pipeline.storage against a real moto server and a local directory (same tests)."""

from __future__ import annotations

import hashlib
import io
import os
import pickle

import pytest

from injection_pipeline import storage
from injection_pipeline.local_services import FaultRule
from injection_pipeline.storage import Storage, StorageError, StorageNotFound, join_uri


# --------------------------------------------------------------------------- URIs
def test_parse_uri():
    assert storage.parse_uri("s3://b/k/x.fits") == ("s3", "b", "k/x.fits")
    assert storage.parse_uri("s3a://b/k") == ("s3", "b", "k")
    assert storage.parse_uri("s3://b") == ("s3", "b", "")
    assert storage.parse_uri("file:///tmp/a") == ("file", "", "/tmp/a")
    assert storage.parse_uri("file:/tmp/a") == ("file", "", "/tmp/a")
    assert storage.parse_uri("rel/a") == ("file", "", "rel/a")
    for bad in ("http://x/y", "s3:///k", ""):
        with pytest.raises(ValueError):
            storage.parse_uri(bad)
    assert join_uri("s3://b", "a/", "/c") == "s3://b/a/c"


def test_exceptions_hierarchy_and_pickle():
    e = StorageNotFound("get_bytes s3://b/k: not found", "s3://b/k")
    assert isinstance(e, FileNotFoundError) and isinstance(e, StorageError)
    assert not issubclass(StorageError, FileNotFoundError)
    e2 = pickle.loads(pickle.dumps(e))
    assert type(e2) is StorageNotFound and e2.uri == "s3://b/k" and "s3://b/k" in str(e2)
    assert pickle.loads(pickle.dumps(Storage(max_attempts=3))) == Storage(max_attempts=3)


# --------------------------------------------------------------------------- both backends
def test_put_get_exists_stat_delete(storage_root):
    uri = join_uri(storage_root, "a/b/obj.bin")
    assert not storage.exists(uri)
    storage.put_bytes(uri, b"hello")
    assert storage.exists(uri)
    assert storage.get_bytes(uri) == b"hello"
    assert storage.stat(uri).size == 5
    storage.put_bytes(uri, b"overwritten")  # overwrite
    assert storage.get_bytes(uri) == b"overwritten"
    storage.delete(uri)
    assert not storage.exists(uri)
    storage.delete(uri)  # idempotent by default
    with pytest.raises(StorageNotFound):
        storage.delete(uri, missing_ok=False)


def test_not_found_contract(storage_root):
    uri = join_uri(storage_root, "missing/thing.fits")
    for call in (storage.get_bytes, storage.stat, storage.open_read):
        with pytest.raises(StorageNotFound) as ei:
            call(uri)
        assert uri in str(ei.value) and ei.value.uri == uri
    with pytest.raises(StorageNotFound):
        with storage.download_to_temp(uri):
            pass
    assert list(storage.list_objects(join_uri(storage_root, "missing/"))) == []


def test_list_prefix_recursive(storage_root):
    keys = ["d/a.txt", "d/b/c.txt", "d/b/e/f.txt", "d2/x.txt", "top.txt"]
    for i, k in enumerate(keys):
        storage.put_bytes(join_uri(storage_root, k), b"x" * (i + 1))

    def rel(objs):
        return [(o.uri[len(storage_root) + 1:], o.size) for o in objs]

    assert rel(storage.list_objects(storage_root + "/d/")) == [("d/a.txt", 1), ("d/b/c.txt", 2), ("d/b/e/f.txt", 3)]
    assert rel(storage.list_objects(storage_root + "/d/", recursive=False)) == [("d/a.txt", 1)]
    # string-prefix semantics, like S3: "d" matches d/ and d2/
    assert [r for r, _ in rel(storage.list_objects(storage_root + "/d"))] == [
        "d/a.txt", "d/b/c.txt", "d/b/e/f.txt", "d2/x.txt"]
    assert [r for r, _ in rel(storage.list_objects(storage_root + "/"))] == sorted(keys)
    assert [r for r, _ in rel(storage.list_objects(storage_root + "/", recursive=False))] == ["top.txt"]
    assert storage.delete_prefix(storage_root + "/d/") == 3
    assert [r for r, _ in rel(storage.list_objects(storage_root + "/"))] == ["d2/x.txt", "top.txt"]


def test_download_to_temp_and_cleanup(storage_root, tmp_path):
    uri = join_uri(storage_root, "south/coadd/000/0001m002/img.fits.fz")
    storage.put_bytes(uri, b"FITS" * 100)
    with storage.download_to_temp(uri) as path:
        assert os.path.isfile(path)
        with open(path, "rb") as f:
            assert f.read() == b"FITS" * 100
    if storage_root.startswith("s3://"):
        assert path.endswith("img.fits.fz") and not os.path.exists(path)
        if os.access("/dev/shm", os.W_OK):
            assert path.startswith("/dev/shm/")
    else:  # local: the original file is handed out, not copied, not deleted
        assert path == uri and os.path.exists(path)
        with storage.download_to_temp(uri, copy_local=True) as p2:
            assert p2 != uri and os.path.isfile(p2)
        assert not os.path.exists(p2)
    # cleaned up on error too
    with pytest.raises(RuntimeError):
        with Storage(tmp_dir=str(tmp_path)).download_to_temp(uri, copy_local=True) as p3:
            raise RuntimeError("reader failed")
    assert not os.path.exists(p3)


def test_streaming_read_and_put_stream(storage_root):
    data = os.urandom(3 * 1024 * 1024 + 17)
    src = join_uri(storage_root, "big/src.bin")
    storage.put_stream(src, io.BytesIO(data))
    h = hashlib.sha256()
    n_reads = 0
    with storage.open_read(src) as f:
        while chunk := f.read(256 * 1024):
            h.update(chunk)
            n_reads += 1
    assert h.hexdigest() == hashlib.sha256(data).hexdigest() and n_reads == 13
    # stream straight from one object into another (what a 4b copy does)
    dst = join_uri(storage_root, "big/dst.bin")
    with storage.open_read(src) as f:
        storage.put_stream(dst, f)
    assert storage.get_bytes(dst) == data


def test_put_file_multipart(storage_root, tmp_path):
    data = os.urandom(11 * 1024 * 1024)
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    st = Storage(multipart_threshold=5 * 1024 * 1024, multipart_chunksize=5 * 1024 * 1024)
    uri = join_uri(storage_root, "multi/big.bin")
    st.put_file(src, uri)
    info = st.stat(uri)
    assert info.size == len(data)
    if storage_root.startswith("s3://"):
        assert info.etag.endswith("-3")  # 3 parts of 5 MiB, 5 MiB, 1 MiB
        with st.download_to_temp(uri) as p:
            assert open(p, "rb").read() == data
    assert st.get_bytes(uri) == data
    with pytest.raises(StorageNotFound):
        st.put_file(tmp_path / "nope.bin", uri)


def test_local_writes_are_atomic_and_file_uris(tmp_path):
    uri = "file://" + str(tmp_path / "x" / "y.bin")
    storage.put_bytes(uri, b"1")
    assert (tmp_path / "x" / "y.bin").read_bytes() == b"1"
    assert [o.uri for o in storage.list_objects("file://" + str(tmp_path) + "/")] == [uri]
    assert os.listdir(tmp_path / "x") == ["y.bin"]  # no temp leftovers

    class Boom(io.RawIOBase):
        def readable(self):
            return True

        def readinto(self, b):
            raise RuntimeError("stream broke")

    with pytest.raises(RuntimeError):
        storage.put_stream(uri, Boom())
    assert (tmp_path / "x" / "y.bin").read_bytes() == b"1"  # old content kept
    assert os.listdir(tmp_path / "x") == ["y.bin"]


# --------------------------------------------------------------------------- S3 specifics
def test_missing_bucket(moto_s3):
    with pytest.raises(StorageNotFound):
        storage.get_bytes("s3://no-such-bucket-xyz/k")
    with pytest.raises(StorageNotFound):
        list(storage.list_objects("s3://no-such-bucket-xyz/"))
    with pytest.raises(StorageError) as ei:  # a write never reports "not found"
        storage.put_bytes("s3://no-such-bucket-xyz/k", b"1")
    assert not isinstance(ei.value, StorageNotFound) and "s3://no-such-bucket-xyz/k" in str(ei.value)


def test_endpoint_from_standard_env(moto_s3, s3_bucket, monkeypatch):
    """No custom variable: boto3 resolves AWS_ENDPOINT_URL itself; clients follow env changes."""
    uri = f"s3://{s3_bucket}/k"
    storage.put_bytes(uri, b"v")
    assert storage.default_storage().client().meta.endpoint_url == moto_s3.endpoint_url
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(StorageError) as ei:
        Storage(max_attempts=1, connect_timeout=1).get_bytes(uri)
    assert not isinstance(ei.value, StorageNotFound) and uri in str(ei.value)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_s3.endpoint_url)  # service-specific wins
    assert storage.get_bytes(uri) == b"v"


def test_client_cached_per_process(moto_s3):
    st = Storage(max_attempts=4)
    assert st.client() is st.client() is Storage(max_attempts=4).client()
    assert st.client() is not Storage(max_attempts=5).client()
    # botocore's Config(retries={'max_attempts': N}) means N retries = N + 1 attempts in all
    assert st.client().meta.config.retries == {"mode": "adaptive", "total_max_attempts": 5}


# --------------------------------------------------------------------------- retries (real HTTP)
@pytest.fixture
def dummy_creds(monkeypatch):
    """botocore signs requests: give it dummy credentials (no moto server needed)."""
    from injection_pipeline.local_services import moto_env

    for k, v in moto_env("http://unused").items():
        if k != "AWS_ENDPOINT_URL":
            monkeypatch.setenv(k, v)


def _fake_s3(survey_server, key, data):
    """The survey file server answers path-style GET/HEAD /<bucket>/<key> like S3 does."""
    p = os.path.join(survey_server.root_dir, "bkt", *key.split("/"))
    os.makedirs(os.path.dirname(p), exist_ok=True)
    with open(p, "wb") as f:
        f.write(data)
    return f"s3://bkt/{key}", f"/bkt/{key}"


def test_transient_5xx_retried(survey_server, dummy_creds):
    uri, path = _fake_s3(survey_server, "south/x.fits", b"payload")
    survey_server.add_fault(FaultRule(path, kind="status", status=503, times=2))
    st = Storage(endpoint_url=survey_server.base_url, max_attempts=4)
    assert st.get_bytes(uri) == b"payload"
    assert survey_server.count(path, "GET") == 3
    # too few attempts: a StorageError naming the URI, not StorageNotFound
    survey_server.add_fault(FaultRule(path, kind="status", status=500, times=5))
    survey_server.reset_counts()
    with pytest.raises(StorageError) as ei:
        Storage(endpoint_url=survey_server.base_url, max_attempts=1).get_bytes(uri)
    assert not isinstance(ei.value, StorageNotFound) and uri in str(ei.value)
    assert survey_server.count(path) == 2  # max_attempts=1: one retry
    survey_server.clear_faults()
    # a plain 404 from the server is StorageNotFound, exists() is False
    st404 = Storage(endpoint_url=survey_server.base_url, max_attempts=4)
    with pytest.raises(StorageNotFound):
        st404.get_bytes("s3://bkt/missing")
    assert not st404.exists("s3://bkt/missing") and st404.exists(uri)
    assert survey_server.count("/bkt/missing") == 2  # 404 is not retried


def test_connection_reset_and_truncated_body_retried(survey_server, dummy_creds):
    data = os.urandom(200_000)
    uri, path = _fake_s3(survey_server, "south/y.fits", data)
    st = Storage(endpoint_url=survey_server.base_url, max_attempts=3)
    survey_server.add_fault(FaultRule(path, kind="reset", times=1))
    assert st.get_bytes(uri) == data
    assert survey_server.count(path) == 2
    survey_server.reset_counts()
    survey_server.add_fault(FaultRule(path, kind="truncate", times=1, truncate_to=1000))
    assert st.get_bytes(uri) == data  # body cut mid-stream: whole GET retried
    assert survey_server.count(path) == 2
    survey_server.add_fault(FaultRule(path, kind="truncate", times=None))
    with pytest.raises(StorageError) as ei:
        st.get_bytes(uri)
    assert not isinstance(ei.value, StorageNotFound) and uri in str(ei.value)


def _child_reads(uri, q):
    inherited = dict(storage._CACHE.clients)  # must be empty: the fork hook dropped them
    q.put((not inherited, storage.get_bytes(uri)))


def test_forked_child_builds_its_own_client(moto_s3, s3_bucket):
    import multiprocessing

    uri = f"s3://{s3_bucket}/fork.bin"
    storage.put_bytes(uri, b"from-parent")
    assert storage._CACHE.clients  # the parent has a cached client
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child_reads, args=(uri, q))
    p.start()
    fresh, data = q.get(timeout=20)
    p.join(timeout=20)
    assert p.exitcode == 0 and fresh and data == b"from-parent"


def test_exhausted_transient_faults_are_storage_transient(survey_server, dummy_creds):
    """After the storage layer's own retries, throttling / 5xx / resets / cut bodies raise
    StorageTransient (stage 4c re-raises it so that Spark retries the task); a 404 and a
    403 do not."""
    from botocore.exceptions import ClientError
    uri, path = _fake_s3(survey_server, "south/z.fits", os.urandom(50_000))
    st = Storage(endpoint_url=survey_server.base_url, max_attempts=1, body_read_attempts=1)
    for rule in (FaultRule(path, kind="status", status=503, times=None),
                 FaultRule(path, kind="status", status=500, times=None),
                 FaultRule(path, kind="reset", times=None),
                 FaultRule(path, kind="truncate", times=None, truncate_to=1000)):
        survey_server.clear_faults()
        survey_server.add_fault(rule)
        with pytest.raises(storage.StorageTransient) as ei:
            st.get_bytes(uri)
        assert uri in str(ei.value), rule
        assert storage.is_transient(ei.value)
        with pytest.raises(storage.StorageTransient):      # the 4c brick download path
            with st.download_to_temp(uri):
                pass
    survey_server.clear_faults()
    survey_server.add_fault(FaultRule(path, kind="status", status=403, times=None))
    with pytest.raises(StorageError) as ei:
        st.get_bytes(uri)
    assert not isinstance(ei.value, storage.StorageTransient)
    survey_server.clear_faults()
    with pytest.raises(StorageNotFound) as ei:
        st.get_bytes("s3://bkt/absent")
    assert not storage.is_transient(ei.value)

    def client_error(code, status):
        return ClientError({"Error": {"Code": code, "Message": "m"},
                            "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")
    assert storage.is_transient(client_error("SlowDown", 503))
    assert storage.is_transient(client_error("", 429))
    assert storage.is_transient(client_error("InternalError", 500))
    assert not storage.is_transient(client_error("AccessDenied", 403))
    assert not storage.is_transient(client_error("NoSuchKey", 404))
    assert storage.is_transient(ConnectionResetError()) and storage.is_transient(TimeoutError())
    assert not storage.is_transient(ValueError("bad FITS header"))
