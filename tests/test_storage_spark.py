"""storage used inside Spark executors (local[2], several partitions) against moto and local dirs."""

from __future__ import annotations

import os

import pytest

from injection_pipeline import storage
from injection_pipeline.storage import join_uri

from conftest import EXECUTOR_MARKER_VALUE, EXECUTOR_MARKER_VAR

pytestmark = pytest.mark.spark

N_PART = 4


def test_executor_env_comes_from_executorEnv(spark, moto_s3):
    assert EXECUTOR_MARKER_VAR not in os.environ  # only spark.executorEnv.* can deliver it
    conf = spark.sparkContext.getConf()
    assert conf.get(f"spark.executorEnv.{EXECUTOR_MARKER_VAR}") == EXECUTOR_MARKER_VALUE
    assert conf.get("spark.driver.host") == "127.0.0.1" and conf.get("spark.ui.enabled") == "false"
    assert "-XX:+UseSerialGC" in conf.get("spark.driver.extraJavaOptions")
    keys = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_DEFAULT_REGION", EXECUTOR_MARKER_VAR)

    def env(_):
        yield (os.getpid(), tuple(os.environ.get(k) for k in keys))

    rows = spark.sparkContext.parallelize(range(N_PART), N_PART).mapPartitions(env).collect()
    assert len(rows) == N_PART
    for pid, values in rows:
        assert pid != os.getpid()  # really ran in a Python worker
        assert values == (moto_s3.endpoint_url, "testing", "us-east-1", EXECUTOR_MARKER_VALUE)


def test_executors_write_and_read(spark, storage_root):
    root = storage_root  # captured by value: a plain string

    def write(it):
        for i in it:
            storage.put_bytes(join_uri(root, f"parts/p{i:03d}.bin"), f"value-{i}".encode() * (i + 1))
            yield i

    written = spark.sparkContext.parallelize(range(12), N_PART).mapPartitions(write).collect()
    assert sorted(written) == list(range(12))
    listed = sorted((o.uri, o.size) for o in storage.list_objects(join_uri(root, "parts/")))
    assert len(listed) == 12 and listed[5] == (join_uri(root, "parts/p005.bin"), len(b"value-5") * 6)

    def read(it):
        for uri, _ in it:
            yield uri, storage.get_bytes(uri)

    got = dict(spark.sparkContext.parallelize(listed, N_PART).mapPartitions(read).collect())
    assert got[join_uri(root, "parts/p011.bin")] == b"value-11" * 12


def test_not_found_is_distinguishable_in_executors(spark, storage_root):
    root = storage_root
    storage.put_bytes(join_uri(root, "present.bin"), b"ok")
    dead = storage.Storage(endpoint_url="http://127.0.0.1:9", max_attempts=0, connect_timeout=1)

    def probe(it):
        for name in it:
            uri = join_uri(root, name)
            st = dead if name.startswith("broken") else storage.default_storage()
            if name.startswith("broken"):
                uri = "s3://some-bucket/" + name  # unreachable endpoint -> a different error
            try:
                yield name, "ok", st.get_bytes(uri).decode()
            except storage.StorageNotFound as exc:
                yield name, "not_found", exc.uri
            except storage.StorageError as exc:
                yield name, "error", type(exc).__name__

    names = ["present.bin", "absent-1.bin", "sub/absent-2.bin", "broken.bin"]
    rows = {r[0]: r[1:] for r in spark.sparkContext.parallelize(names, N_PART).mapPartitions(probe).collect()}
    assert rows["present.bin"] == ("ok", "ok")
    assert rows["absent-1.bin"] == ("not_found", join_uri(root, "absent-1.bin"))
    assert rows["sub/absent-2.bin"][0] == "not_found"
    assert rows["broken.bin"] == ("error", "StorageTransient")   # connection refused: transient


def test_uncaught_not_found_reaches_driver_with_uri(spark, moto_s3, s3_bucket):
    uri = f"s3://{s3_bucket}/nope.fits"

    def boom(_):
        storage.get_bytes(uri)
        yield 1

    with pytest.raises(Exception) as ei:
        spark.sparkContext.parallelize([0], 1).mapPartitions(boom).collect()
    text = str(ei.value)
    assert "StorageNotFound" in text and uri in text


def test_aws_executor_env_forwards_endpoint_and_only_local_credentials():
    from injection_pipeline.spark_session import aws_executor_env

    local = aws_executor_env({"AWS_ENDPOINT_URL": "http://127.0.0.1:5000", "AWS_REGION": "us-east-1",
                              "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                              "HOME": "/root"})
    assert local == {"AWS_ENDPOINT_URL": "http://127.0.0.1:5000", "AWS_REGION": "us-east-1",
                     "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    remote = aws_executor_env({"AWS_ENDPOINT_URL_S3": "https://s3.us-west-2.amazonaws.com",
                               "AWS_ACCESS_KEY_ID": "AKIAREAL", "AWS_SECRET_ACCESS_KEY": "secret"})
    assert remote == {"AWS_ENDPOINT_URL_S3": "https://s3.us-west-2.amazonaws.com"}, \
        "real credentials must never be copied into Spark conf"
    # the endpoint's host must BE the loopback, not merely start with its name
    for host in ("https://localhost.example.com", "http://127.0.0.1.nip.io:9000",
                 "http://user@example.com/127.0.0.1"):
        env = aws_executor_env({"AWS_ENDPOINT_URL": host, "AWS_ACCESS_KEY_ID": "AKIAREAL",
                                "AWS_SECRET_ACCESS_KEY": "secret"})
        assert env == {"AWS_ENDPOINT_URL": host}, host
    assert "AWS_ACCESS_KEY_ID" in aws_executor_env(
        {"AWS_ENDPOINT_URL_S3": "http://localhost:5000", "AWS_ACCESS_KEY_ID": "testing"})
    assert aws_executor_env({}) == {}


def test_transient_errors_retried_inside_executors(spark, survey_server):
    """Executors' S3 reads retry 503s and connection resets (botocore adaptive retries) and
    then succeed; the local survey server answers path-style S3 GETs and counts requests."""
    from injection_pipeline.local_services import FaultRule

    keys = [f"retry/k{i}.bin" for i in range(N_PART)]
    for k in keys:
        p = os.path.join(survey_server.root_dir, "bkt", *k.split("/"))
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(k.encode() * 100)
    survey_server.add_fault(FaultRule(f"/bkt/{keys[0]}", kind="status", status=503, times=2))
    survey_server.add_fault(FaultRule(f"/bkt/{keys[1]}", kind="reset", times=1))
    endpoint = survey_server.base_url

    def read(it):
        st = storage.Storage(endpoint_url=endpoint, max_attempts=4)
        for k in it:
            yield k, st.get_bytes(f"s3://bkt/{k}")

    got = dict(spark.sparkContext.parallelize(keys, N_PART).mapPartitions(read).collect())
    assert got == {k: k.encode() * 100 for k in keys}
    assert survey_server.count(f"/bkt/{keys[0]}", "GET") == 3, "two 503s, then success"
    assert survey_server.count(f"/bkt/{keys[1]}", "GET") == 2, "one reset, then success"
    assert survey_server.count(f"/bkt/{keys[2]}", "GET") == 1, "no fault: no retry"
