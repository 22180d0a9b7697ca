"""Session-wide test fixtures (all lazy: nothing starts unless a test asks for it).

moto_s3        one moto S3 server for the session (MotoS3Server: .endpoint_url, .env, .client());
               while it runs, the driver's os.environ carries its endpoint + dummy credentials
               (restored at the end of the session).
spark          one local[2] SparkSession for the session, built after moto_s3 starts so that
               executors get the same endpoint/credentials through spark.executorEnv.*, plus
               EXECUTOR_MARKER_VAR (set ONLY through executorEnv, never in the driver).
s3_bucket      a fresh, empty bucket name per test (emptied and removed afterwards).
storage_root   parametrised ["local", "s3"]: a writable root URI (tmp dir path / s3://bucket)
               so one test body runs against both backends.
survey_server  a survey HTTP server over a fresh tmp dir, stopped after the test.
Tests that use `spark` are auto-marked `spark` (so `-m "not spark"` skips them).
"""

from __future__ import annotations

import uuid

import pytest

EXECUTOR_MARKER_VAR = "INJECTION_TEST_EXECUTOR_ENV"
EXECUTOR_MARKER_VALUE = "set-via-spark.executorEnv"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "spark" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.spark)


@pytest.fixture(scope="session")
def moto_s3():
    from injection_pipeline import storage
    from injection_pipeline.local_services import AWS_ENV_TO_CLEAR, patched_environ, start_moto_s3

    with start_moto_s3() as server, patched_environ(server.env, unset=AWS_ENV_TO_CLEAR):
        storage.clear_client_cache()
        yield server
    storage.clear_client_cache()


@pytest.fixture(scope="session")
def spark(moto_s3):
    from injection_pipeline.spark_session import build_spark

    env = dict(moto_s3.env)
    env[EXECUTOR_MARKER_VAR] = EXECUTOR_MARKER_VALUE
    session = build_spark(master="local[2]", app_name="injection-pipeline-tests",
                          executor_env=env, for_tests=True)
    yield session
    session.stop()


@pytest.fixture
def s3_bucket(moto_s3):
    from injection_pipeline import storage

    name = f"test-{uuid.uuid4().hex[:12]}"
    client = moto_s3.client()
    client.create_bucket(Bucket=name)
    yield name
    storage.delete_prefix(f"s3://{name}/")
    client.delete_bucket(Bucket=name)


@pytest.fixture(params=["local", "s3"])
def storage_root(request, tmp_path):
    """Root URI without trailing slash: a local directory or s3://<fresh bucket>."""
    if request.param == "local":
        root = tmp_path / "store"
        root.mkdir()
        return str(root)
    return "s3://" + request.getfixturevalue("s3_bucket")


@pytest.fixture
def survey_server(tmp_path):
    from injection_pipeline.local_services import start_survey_http_server

    root = tmp_path / "survey"
    root.mkdir()
    with start_survey_http_server(root) as server:
        yield server
