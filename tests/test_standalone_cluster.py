"""Real distributed execution: stages 4b and 4c under a Spark standalone master + worker
started from the pip package on 127.0.0.1, against the moto S3 cache, give the same results as
local mode.

* The master and worker are started with ``spark-class`` (environment.md) in a CLEAN
  environment (no AWS_* variables; SPARK_HOME = a folder of symlinks to the package so that
  nothing is written into site-packages; the worker's work dir in tmp).  Executors are separate
  JVMs + Python workers launched by the worker: they see only what ``spark.executorEnv.*``
  gives them (the moto endpoint and dummy credentials), never the driver's environment or
  globals.  A probe job checks exactly that (a driver-only variable is absent on executors).
* Reference: 4a, 4b and 4c in local mode in this process (the session ``spark`` fixture,
  through each stage's CLI ``run(args)``).  Cluster: the same 4b and 4c command lines in a
  driver subprocess whose session is built (``build_spark``, master spark://127.0.0.1:P) with
  the moto endpoint in spark.executorEnv before the stages run, writing another cache and
  variant.  Asserted equal: blacklist, filtered manifests, cached files (sha256 and size from
  each _SUCCESS), every metrics column but ``cache_marker_sha`` (the _SUCCESS markers of the
  two caches differ in run ids and times), and the stamp bytes.
* Skipped, with the reason, when the cluster cannot start (no java, ports, timeout).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.dataset as ds
import pytest
from conftest import EXECUTOR_MARKER_VALUE, EXECUTOR_MARKER_VAR

from injection_pipeline import coadd_cache as cc
from injection_pipeline import storage
from injection_pipeline import synthetic_survey as ss
from injection_pipeline.stages.stage_demo import port_is_open

REPO = Path(__file__).resolve().parents[1]
EXP = "train_stamp64_bandsgrz_gridgrid_small"
DRIVER_ONLY = "INJECTION_TEST_DRIVER_ONLY"
pytestmark = [pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spark_home_links(dst: Path) -> Path:
    """A folder of symlinks to the pyspark package (logs / work dirs stay out of site-packages)."""
    import pyspark

    pkg = Path(pyspark.__file__).resolve().parent
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("bin", "jars", "python", "sbin", "conf", "data", "examples", "licenses"):
        if (pkg / name).exists() and not (dst / name).exists():
            (dst / name).symlink_to(pkg / name)
    return dst


def _clean_env(spark_home: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "PYSPARK_", "SPARK_")) and k != DRIVER_ONLY}
    env.update(SPARK_HOME=str(spark_home), SPARK_LOCAL_IP="127.0.0.1",
               SPARK_MASTER_OPTS="-Dspark.master.rest.enabled=false",
               PYSPARK_PYTHON=sys.executable)
    return env


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)      # the process group WE started
        proc.wait(timeout=15)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass


@pytest.fixture(scope="module")
def standalone(tmp_path_factory):
    """(master URL, info) of a running standalone master + 1 worker (2 cores, 2 GB)."""
    if shutil.which("java") is None:
        pytest.skip("no java on PATH: cannot start a standalone Spark cluster")
    spark_class = Path(sys.executable).parent / "spark-class"
    if not spark_class.exists():
        pytest.skip(f"{spark_class} not found (pyspark pip package scripts)")
    tmp = tmp_path_factory.mktemp("standalone")
    home = _spark_home_links(tmp / "spark_home")
    env = _clean_env(home)
    port, ui, wui = _free_port(), _free_port(), _free_port()
    master_url = f"spark://127.0.0.1:{port}"
    procs = []
    logs = {n: open(tmp / f"{n}.log", "w") for n in ("master", "worker")}
    try:
        procs.append(subprocess.Popen(
            [str(spark_class), "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
             "--port", str(port), "--webui-port", str(ui)], env=env, cwd=tmp,
            stdout=logs["master"], stderr=subprocess.STDOUT, start_new_session=True))
        procs.append(subprocess.Popen(
            [str(spark_class), "org.apache.spark.deploy.worker.Worker", "--host", "127.0.0.1",
             "--cores", "2", "--memory", "2g", "--webui-port", str(wui),
             "--work-dir", str(tmp / "work"), master_url], env=env, cwd=tmp,
            stdout=logs["worker"], stderr=subprocess.STDOUT, start_new_session=True))
        deadline = time.monotonic() + 60
        alive = 0
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in procs):
                break
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{ui}/json/", timeout=2) as r:
                    state = json.load(r)
                alive = sum(1 for w in state.get("workers", []) if w.get("state") == "ALIVE")
                if alive:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        if not alive:
            for f in logs.values():
                f.flush()
            tail = (tmp / "worker.log").read_text()[-1500:] + (tmp / "master.log").read_text()[-1500:]
            pytest.skip(f"standalone cluster did not start within 60 s: {tail}")
        yield master_url, {"tmp": tmp, "ports": (port, ui, wui), "spark_home": home}
    finally:
        for p in reversed(procs):
            _stop(p)
        for f in logs.values():
            f.close()
    for p in (port, ui, wui):
        assert not port_is_open("127.0.0.1", p), f"port {p} still open after stop"


def _parse(argv):
    from injection_pipeline.stages.stage_demo import _driver

    return _driver().build_parser().parse_args(argv)


CLUSTER_DRIVER = textwrap.dedent('''
    import json, os, socket, sys
    sys.path.insert(0, {repo!r})
    from injection_pipeline.local_services import moto_env
    from injection_pipeline.spark_session import build_spark
    from injection_pipeline.stages.stage_demo import _driver

    master, endpoint, result, argv4b, argv4c = sys.argv[1:6]
    env = moto_env(endpoint)
    env[{marker_var!r}] = {marker_value!r}
    spark = build_spark(master, app_name="standalone-test", executor_env=env, for_tests=True,
                        conf={{"spark.cores.max": "2", "spark.executor.memory": "1g",
                              "spark.executor.cores": "2"}})
    sc = spark.sparkContext

    def probe(_):
        return [(os.getpid(), os.environ.get({driver_only!r}),
                 os.environ.get("AWS_ENDPOINT_URL"), os.environ.get("AWS_ACCESS_KEY_ID"),
                 os.environ.get({marker_var!r}))]

    rows = sc.parallelize(range(4), 4).mapPartitions(probe).collect()
    drv = _driver()
    code4b = drv.main(json.loads(argv4b))
    code4c = drv.main(json.loads(argv4c))
    execs = sc._jsc.sc().getExecutorMemoryStatus().size()
    with open(result, "w") as f:
        json.dump({{"driver_pid": os.getpid(), "probe": rows, "code4b": code4b,
                   "code4c": code4c, "master": sc.master, "block_managers": execs}}, f)
    spark.stop()
''')


def _metrics(path) -> pd.DataFrame:
    t = ds.dataset(str(path), format="parquet", partitioning="hive").to_table()
    df = t.to_pandas()
    df["split"] = df["split"].astype(str)
    return df.sort_values("task_id").reset_index(drop=True)


def _success_files(cache: str, brick: str) -> dict:
    doc = cc.parse_json(storage.get_bytes(f"{cache}/{brick}/_SUCCESS"))
    assert cc.validate_success(doc, brick) == []
    return {n: (e["size"], e["sha256"]) for n, e in doc["files"].items()}


def test_4b_4c_on_standalone_cluster_match_local_mode(standalone, spark, moto_s3, s3_bucket,
                                                      tmp_path):
    from injection_pipeline.local_services import start_survey_http_server
    from injection_pipeline.stages import stage_4a, stage_4b, stage_4c

    master_url, _info = standalone
    out = tmp_path / "out"
    desc = ss.generate_survey(tmp_path / "survey", n_bricks=3, size="small", seed=7,
                              faults=["absent"], layout="contiguous")
    absent = [b for b, f in desc.faults.items() if "absent" in f]
    common = ["--out", str(out), "--config", str(REPO / "conf")]

    with start_survey_http_server(desc.root) as http:
        base = http.base_url + "/"

        # ---- reference: local mode, in this process (session fixture, local[2]) ---------
        a = _parse(["4a", "--master", "local[2]", *common, "--catalogue", desc.catalogue,
                    "--survey-bricks", desc.survey_bricks, "--variant", "local",
                    "--experiments", EXP, "--n-total-train-per-split", "24",
                    # mechanics test: the independent model's exact row counts
                    "--lens-model-train", "independent"])
        assert stage_4a.run(a) == 0
        # the cluster run starts from the same manifests, under its own variant
        shutil.copytree(out / "phase4a" / "local", out / "phase4a" / "cluster")

        def argv(stage, variant, cache, master):
            flags = [stage, "--master", master, *common, "--variant", variant, "--cache", cache]
            if stage == "4b":
                flags += ["--base-url", base, "--brick-size", str(desc.size),
                          "--backoff-base", "0.1", "--max-retries", "1",
                          "--bricks-per-task", "1", "--threads-per-task", "2"]
            else:
                flags += ["--experiment-id", EXP, "--tasks-per-partition", "20",
                          "--off-brick-threshold", "1"]     # 400 px bricks: by design
            return flags

        local_cache = f"s3://{s3_bucket}/local"
        cluster_cache = f"s3://{s3_bucket}/cluster"
        assert stage_4b.run(_parse(argv("4b", "local", local_cache, "local[2]"))) == 0
        assert stage_4c.run(_parse(argv("4c", "local", local_cache, "local[2]"))) == 0

        # ---- the same command lines on the standalone cluster (driver subprocess) --------
        script = tmp_path / "cluster_driver.py"
        script.write_text(CLUSTER_DRIVER.format(repo=str(REPO), driver_only=DRIVER_ONLY,
                                                   marker_var=EXECUTOR_MARKER_VAR,
                                                   marker_value=EXECUTOR_MARKER_VALUE))
        result = tmp_path / "cluster_result.json"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYSPARK_", "SPARK_"))}
        env.update(moto_s3.env)          # the driver itself talks to S3 (blacklist, listing)
        env[DRIVER_ONLY] = "1"           # must NOT reach the executors
        proc = subprocess.run(
            [sys.executable, str(script), master_url, moto_s3.endpoint_url, str(result),
             json.dumps(argv("4b", "cluster", cluster_cache, master_url)),
             json.dumps(argv("4c", "cluster", cluster_cache, master_url))],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    res = json.loads(result.read_text())

    # ---- executors are other processes that only got spark.executorEnv ------------------
    assert res["master"] == master_url
    assert res["block_managers"] >= 2            # the driver + >= 1 executor
    assert res["code4b"] == 0 and res["code4c"] == 0
    for pid, driver_only, endpoint, key, marker in res["probe"]:
        assert pid != res["driver_pid"]
        assert driver_only is None, "executors inherited the driver's environment"
        assert endpoint == moto_s3.endpoint_url and key == "testing"
        assert marker == EXECUTOR_MARKER_VALUE

    # ---- identical results -------------------------------------------------------------
    p4a = out / "phase4a"
    bl = {v: [b["brick"] for b in json.loads((p4a / v / "brick_blacklist.json").read_text())
              ["bricks"]] for v in ("local", "cluster")}
    assert bl["local"] == bl["cluster"] == absent
    fm = {v: _metrics(p4a / v / "manifests_filtered" / EXP) for v in ("local", "cluster")}
    pd.testing.assert_frame_equal(fm["local"], fm["cluster"])
    present = sorted(b.spec.brickname for b in desc.bricks if b.spec.brickname not in absent)
    for brick in present:
        assert _success_files(local_cache, brick) == _success_files(cluster_cache, brick)
    assert not storage.exists(f"{cluster_cache}/{absent[0]}/_SUCCESS")

    p4c = out / "phase4c"
    m_local = _metrics(p4c / "local" / "metrics" / EXP)
    m_cluster = _metrics(p4c / "cluster" / "metrics" / EXP)
    assert len(m_local) == len(fm["local"]) and (m_local["status"] == "ok").sum() > 0
    pd.testing.assert_frame_equal(m_local.drop(columns=["cache_marker_sha"]),
                                  m_cluster.drop(columns=["cache_marker_sha"]))
    s_local = _metrics(p4c / "local" / "stamps" / EXP)
    s_cluster = _metrics(p4c / "cluster" / "stamps" / EXP)
    for col in ("image", "arc", "invvar", "maskbits"):
        assert s_local[col].tolist() == s_cluster[col].tolist(), col
    ok = s_local["status"] == "ok"
    assert s_local.loc[ok, "image"].map(len).eq(3 * 64 * 64 * 4).all()
    assert np.array_equal(m_local["status"].to_numpy(), m_cluster["status"].to_numpy())
