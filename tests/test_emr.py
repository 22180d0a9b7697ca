"""EMR deployment: bootstrap script, code zip, conf/cluster.toml and the submit helper.

The submit helper is tested against moto's EMR API in SERVER mode (the session's
ThreadedMotoServer on 127.0.0.1, which serves EMR and S3; boto3 clients get its endpoint_url),
never with in-process mock decorators.  The request boto3 actually sends is captured with a
botocore event hook and compared with the --dry-run JSON.
"""
from __future__ import annotations

import copy
import hashlib
import importlib.metadata as md
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from injection_pipeline import emr

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bootstrap_phase4_pipeline_install_deps.sh"
def _runtime_deps() -> tuple[str, ...]:
    """pyproject.toml's runtime dependencies for CPython 3.11 (EMR), canonical names."""
    import tomllib
    from packaging.requirements import Requirement
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    reqs = [Requirement(d) for d in deps]
    env = {"python_version": "3.11", "python_full_version": "3.11.0"}
    return tuple(r.name.lower() for r in reqs if r.marker is None or r.marker.evaluate(env))


TOP_LEVEL_DEPS = _runtime_deps()


# =========================================================================== bootstrap
def _script_pins() -> dict[str, str]:
    text = SCRIPT.read_text()
    block = re.search(r"^PINS=\((.*?)^\)", text, re.S | re.M).group(1)
    return dict(p.split("==") for p in re.findall(r'"([^"]+==[^"]+)"', block))


def _run_script(env_extra: dict, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PHASE4_")}
    env.update(env_extra)
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_bootstrap_bash_syntax():
    r = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    head = SCRIPT.read_text().splitlines()[:40]
    assert any(line.strip() == "set -euo pipefail" for line in head)
    code = [ln for ln in SCRIPT.read_text().splitlines() if not ln.lstrip().startswith("#")]
    assert not any("|| true" in ln for ln in code), "never hide an install failure (pitfall)"


def test_bootstrap_shellcheck_clean():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not on PATH (Debian package `shellcheck`: apt-get install shellcheck)")
    r = subprocess.run(["shellcheck", "--shell=bash", "--severity=style", str(SCRIPT)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_bootstrap_pins_cover_runtime_deps_and_exclude_pyspark():
    """Every runtime dependency of pyproject.toml is pinned (the versions themselves are
    compared with uv.lock in tests/test_lock.py, never with what an index serves today)."""
    pins = _script_pins()
    for dist in TOP_LEVEL_DEPS:
        assert dist in pins, f"{dist} not pinned"
    assert not any(d.lower().startswith("pyspark") for d in pins)
    checked = {c.split(":")[1] for c in re.findall(r'"([a-z0-9_]+:[a-z0-9-]+)"', SCRIPT.read_text())}
    assert set(TOP_LEVEL_DEPS) <= checked, "every top-level dependency is verified after install"
    assert checked <= set(pins), "every verified distribution is pinned"


def test_bootstrap_dry_run_prints_pinned_pip_command(tmp_path):
    log = tmp_path / "boot.log"
    r = _run_script({"PHASE4_BOOTSTRAP_DRY_RUN": "1", "PHASE4_BOOTSTRAP_LOG": str(log),
                     "PHASE4_BOOTSTRAP_SUDO": ""})
    assert r.returncode == 0, r.stdout + r.stderr
    pip_lines = [ln for ln in r.stdout.splitlines() if "-m pip install" in ln]
    assert len(pip_lines) == 1 and "DRY-RUN:" in pip_lines[0]
    words = pip_lines[0].split("DRY-RUN: ", 1)[1].split()
    assert words[:4] == ["python3.11", "-m", "pip", "install"]
    assert "--only-binary=:all:" in words
    for dist, version in _script_pins().items():
        assert f"{dist}=={version}" in words
    assert "pyspark" not in r.stdout.lower()
    assert "nothing installed" in r.stdout
    assert log.read_text() == r.stdout  # everything logged to stdout AND the log file


_SHIM = r"""#!/usr/bin/env bash
# fake python3.11 for the bootstrap tests: records its arguments, fakes pip and the check
printf '%s\n' "$*" >> "$SHIM_RECORD"
if [ "${1:-}" = "--version" ]; then echo "Python 3.11.99"; exit 0; fi
if [ "${1:-}" = "-m" ] && [ "${2:-}" = "pip" ]; then
    if [ "${3:-}" = "--version" ]; then echo "pip 99"; exit 0; fi
    echo "fake pip: $*"
    if [ "${FAKE_PIP_EXIT:-0}" != "0" ]; then echo "ERROR: fake pip failure" >&2; exit "$FAKE_PIP_EXIT"; fi
    touch "$SHIM_STATE/installed"; exit 0
fi
if [ "${1:-}" = "-c" ]; then
    if [ -n "${SHIM_REAL_PYTHON:-}" ]; then exec "$SHIM_REAL_PYTHON" "$@"; fi
    if [ -z "${FAKE_BROKEN_IMPORT:-}" ] && [ -e "$SHIM_STATE/installed" ]; then echo "  ok (fake)"; exit 0; fi
    echo "PROBLEMS: boto3: import failed: ModuleNotFoundError"; exit 1
fi
echo "unexpected call: $*" >&2; exit 99
"""


@pytest.fixture
def shim(tmp_path):
    bindir, state = tmp_path / "bin", tmp_path / "state"
    bindir.mkdir()
    state.mkdir()
    exe = bindir / "python3.11"
    exe.write_text(_SHIM)
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    record = tmp_path / "calls.txt"
    env = {"PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}", "SHIM_RECORD": str(record),
           "SHIM_STATE": str(state), "PHASE4_BOOTSTRAP_SUDO": "",
           "PHASE4_BOOTSTRAP_LOG": str(tmp_path / "log" / "boot.log")}

    def calls() -> list[str]:
        return record.read_text().splitlines() if record.exists() else []
    return env, calls


def test_bootstrap_installs_pins_then_is_idempotent(shim):
    env, calls = shim
    r = _run_script(env)
    assert r.returncode == 0, r.stdout + r.stderr
    installs = [c for c in calls() if c.startswith("-m pip install")]
    assert len(installs) == 1
    words = installs[0].split()
    for dist, version in _script_pins().items():
        assert f"{dist}=={version}" in words
    assert not any(w.lower().startswith("pyspark") for w in words)
    assert "--only-binary=:all:" in words
    assert "verifying imports" in r.stdout and "OK: all pinned" in r.stdout
    # second run on the same node: nothing installed, still verified
    r2 = _run_script(env)
    assert r2.returncode == 0, r2.stdout + r2.stderr
    assert len([c for c in calls() if c.startswith("-m pip install")]) == 1
    assert "nothing to install" in r2.stdout
    # --force reinstalls
    r3 = _run_script(env, "--force", "--index-url", "https://pypi.example/simple")
    assert r3.returncode == 0
    last = [c for c in calls() if c.startswith("-m pip install")][-1]
    assert "--index-url https://pypi.example/simple" in last


def test_bootstrap_failing_pip_exits_nonzero(shim):
    env, calls = shim
    r = _run_script({**env, "FAKE_PIP_EXIT": "3"})
    assert r.returncode != 0
    assert "pip install failed" in r.stdout
    assert "OK: all pinned" not in r.stdout


def test_bootstrap_missing_module_after_install_fails_loudly(shim):
    """The known pitfall: pip 'succeeded' but boto3 is not importable -> the node must fail."""
    env, calls = shim
    r = _run_script({**env, "FAKE_BROKEN_IMPORT": "1"})
    assert r.returncode != 0
    assert "dependency verification failed" in r.stdout and "boto3" in r.stdout


def test_bootstrap_refuses_non_x86_64(shim):
    env, calls = shim
    r = _run_script({**env, "PHASE4_BOOTSTRAP_ARCH": "aarch64"})
    assert r.returncode != 0 and "fitsio" in r.stdout
    assert not any(c.startswith("-m pip install") for c in calls())


def test_bootstrap_real_verification_against_tested_env(shim):
    """The script's verification code run by the real interpreter of this env: every pinned
    module imports at its pinned version, and a pip-installed pyspark is reported as an error
    (on EMR it would shadow the cluster's Spark)."""
    env, calls = shim
    # FORCE: skip the pre-install check (one real verification run instead of two)
    r = _run_script({**env, "SHIM_REAL_PYTHON": sys.executable, "PHASE4_BOOTSTRAP_FORCE": "1"},
                    timeout=120)
    for dist, version in _script_pins().items():
        if dist in TOP_LEVEL_DEPS:
            assert re.search(rf"ok\s+{re.escape(dist)}=={re.escape(version)}", r.stdout), r.stdout
    try:
        md.version("pyspark")
        has_pyspark = True
    except md.PackageNotFoundError:
        has_pyspark = False
    if has_pyspark:
        assert r.returncode != 0 and "pyspark" in r.stdout and "shadow" in r.stdout
    else:
        assert r.returncode == 0, r.stdout


# =========================================================================== code zip
def test_code_zip_contents_deterministic_and_importable_from_clean_dir(tmp_path, frozen_repo):
    z1, z2 = tmp_path / "a.zip", tmp_path / "b.zip"
    members = emr.build_code_zip(z1, frozen_repo)  # a frozen copy: concurrent edits cannot race
    emr.build_code_zip(z2, frozen_repo)
    assert z1.read_bytes() == z2.read_bytes(), "zip must be reproducible"
    names = zipfile.ZipFile(z1).namelist()
    assert names == members
    for must in ("lensing/__init__.py", "lensing/render.py", "injection_pipeline/__init__.py",
                 "injection_pipeline/storage.py", "injection_pipeline/emr.py",
                 "injection_pipeline/stages/__init__.py", "injection_pipeline/stages/stage_4a.py",
                 "conf/experiments.toml", "conf/grids.toml", "conf/priors.toml",
                 "conf/cluster.toml"):
        assert must in names, must
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)
    assert {n.split("/")[0] for n in names} == {"lensing", "injection_pipeline", "conf"}
    info = json.loads(zipfile.ZipFile(z1).read(emr.BUILD_INFO))
    assert info["files"]["lensing/render.py"] == hashlib.sha256(
        (frozen_repo / "lensing" / "render.py").read_bytes()).hexdigest()

    conf_zip = tmp_path / "conf.zip"
    conf_names = emr.build_conf_zip(conf_zip, frozen_repo)
    assert "experiments.toml" in conf_names and all("/" not in n for n in conf_names)

    clean = tmp_path / "clean"
    clean.mkdir()
    unzipped = tmp_path / "unzipped"
    zipfile.ZipFile(z1).extractall(unzipped)
    code = ("import importlib.resources, json, lensing, injection_pipeline, "
            "injection_pipeline.storage, injection_pipeline.manifests, "
            "injection_pipeline.stages.stage_4a; "
            "json.loads(importlib.resources.files('injection_pipeline')"
            ".joinpath('BUILD_INFO.json').read_text()); "
            "print(lensing.__file__); print(injection_pipeline.__file__)")
    for where in (z1, unzipped):  # as --py-files (zipimport) and unpacked
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        env["PYTHONPATH"] = str(where)
        r = subprocess.run([sys.executable, "-c", code], cwd=clean, env=env,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        files = r.stdout.split()
        assert all(f.startswith(str(where)) for f in files), (where, files)


# =========================================================================== conf + request
def test_cluster_conf_decisions():
    conf = emr.load_cluster_conf()
    assert re.fullmatch(r"emr-7\.\d+\.\d+", conf["cluster"]["release_label"])
    assert conf["spark_env"]["PYSPARK_PYTHON"] == "python3.11"
    sd = conf["spark_defaults"]
    assert sd["spark.speculation"] == "false"
    assert sd["spark.dynamicAllocation.enabled"] == "true"
    assert int(sd["spark.task.maxFailures"]) > 4
    markets = {g["role"]: g["market"] for g in conf["instances"].values()}
    assert markets == {"MASTER": "ON_DEMAND", "CORE": "ON_DEMAND", "TASK": "SPOT"}
    fit = emr.check_executor_fit(conf)
    assert fit["executors_per_node"] == 2 and fit["yarn_used_mib"] <= fit["yarn_memory_mib"]
    # Python budget per core covers the whole-brick footprint (10 x 3600^2 x 4 B = 518 MB)
    assert fit["python_mib_per_core"] * 2 ** 20 > 10 * 3600 ** 2 * 4 * 1.5
    bad = copy.deepcopy(conf)
    bad["spark_defaults"]["spark.executor.memoryOverhead"] = "30g"
    with pytest.raises(ValueError, match="does not fit"):
        emr.check_executor_fit(bad)


def _conf_for(root: str) -> dict:
    conf = emr.load_cluster_conf()
    conf["paths"]["root"] = root
    return conf


def test_step_args_validated_against_the_driver():
    conf = _conf_for("s3://b")
    paths = emr.resolve_paths(conf)
    uris = {n: f"s3://b/code/v/{n}" for n in (emr.CODE_ZIP, emr.CONF_ZIP, emr.DRIVER, emr.BOOTSTRAP)}
    steps = emr.build_steps(conf, ["4a"], uris, paths)
    args = steps[0]["HadoopJarStep"]["Args"]
    assert steps[0]["HadoopJarStep"]["Jar"] == "command-runner.jar"
    assert args[:5] == ["spark-submit", "--deploy-mode", "cluster", "--master", "yarn"]
    i = args.index("--py-files")
    assert args[i + 1] == uris[emr.CODE_ZIP]
    assert args[args.index("--archives") + 1] == uris[emr.CONF_ZIP] + "#conf"
    d = args.index(uris[emr.DRIVER])
    assert args[d + 1:d + 6] == ["4a", "--config", "conf", "--out", "s3://b/phase4"]
    assert "s3://b/inputs/parent_catalogue.parquet" in args

    conf["steps"]["4a"]["args"] = ["--no-such-flag", "1"]
    with pytest.raises(ValueError, match="no-such-flag"):
        emr.build_steps(conf, ["4a"], uris, paths)
    conf["steps"]["bogus"] = {"stage": "9z", "args": []}
    with pytest.raises(ValueError, match="not a sub-command"):
        emr.build_steps(conf, ["bogus"], uris, paths)
    with pytest.raises(ValueError, match="no \\[steps.nope\\]"):
        emr.build_steps(conf, ["nope"], uris, paths)
    conf["paths"]["out"] = "/local/path"
    with pytest.raises(ValueError, match="s3://"):
        emr.resolve_paths(conf)


# =========================================================================== moto EMR (server)
@pytest.fixture
def frozen_repo(tmp_path):
    """A copy of the files a submission ships, so concurrent edits cannot change its hash."""
    dst = tmp_path / "repo"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for d in ("lensing", "injection_pipeline", "conf"):
        shutil.copytree(REPO / d, dst / d, ignore=ignore)
    for f in (emr.DRIVER, emr.BOOTSTRAP):
        shutil.copy2(REPO / f, dst / f)
    return dst


def _capturing_client(endpoint: str, region: str, sink: dict):
    client = emr.emr_client(region, endpoint)

    def capture(params, model, **kwargs):
        sink[model.name] = copy.deepcopy(params)
    client.meta.events.register("provide-client-params.emr.*", capture)
    return client


def _cli_dry_run(repo: Path, *args: str) -> dict:
    r = subprocess.run([sys.executable, str(repo / emr.DRIVER), "emr-submit", "--dry-run", *args],
                       capture_output=True, text=True, timeout=60, cwd=repo)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)  # stdout is exactly one JSON document


def test_submit_against_moto_emr_server(moto_s3, s3_bucket, frozen_repo):
    endpoint, region = moto_s3.endpoint_url, "us-west-2"
    root = f"s3://{s3_bucket}"
    conf = _conf_for(root)
    common = dict(region=region, endpoint_url=endpoint, repo_root=frozen_repo,
                  code_uri=f"{root}/code", log_uri=f"{root}/emr-logs/")
    sent: dict = {}
    client = _capturing_client(endpoint, region, sent)

    res = emr.submit(conf, steps=["4a", "4b"], client=client, **common)
    cid = res["cluster_id"]
    assert re.fullmatch(r"j-[A-Z0-9]+", cid)
    req = sent["RunJobFlow"]
    assert req == res["request"]

    # --dry-run through the CLI: valid JSON, request identical to what was sent
    dry = _cli_dry_run(frozen_repo, "--stages", "4a,4b", "--region", region, "--s3-root", root,
                       "--code-uri", f"{root}/code", "--log-uri", f"{root}/emr-logs/")
    assert dry["action"] == "RunJobFlow" and dry["cluster_id"] is None
    assert dry["request"] == json.loads(json.dumps(req))
    assert dry["version"] == res["version"]
    assert sorted(dry["uploads"]) == sorted(res["uploads"])

    # what moto recorded
    cl = client.describe_cluster(ClusterId=cid)["Cluster"]
    assert cl["ReleaseLabel"] == conf["cluster"]["release_label"]
    assert cl["LogUri"] == f"{root}/emr-logs/"
    assert {a["Name"] for a in cl["Applications"]} == {"Spark"}
    cfg = {c["Classification"]: c for c in cl["Configurations"]}
    export = {c["Classification"]: c for c in cfg["spark-env"]["Configurations"]}["export"]
    assert export["Properties"]["PYSPARK_PYTHON"] == "python3.11"
    # boto3 on the nodes signs range-GET URLs (SigV4) for the cluster's region
    assert export["Properties"]["AWS_DEFAULT_REGION"] == conf["cluster"]["region"]
    sd = cfg["spark-defaults"]["Properties"]
    assert sd["spark.speculation"] == "false" and sd["spark.executor.memoryOverhead"] == "7g"
    assert sd["spark.dynamicAllocation.enabled"] == "true" and sd["spark.task.maxFailures"] == "8"

    boot = client.list_bootstrap_actions(ClusterId=cid)["BootstrapActions"]
    assert len(boot) == 1
    boot_uri = boot[0]["ScriptPath"]
    assert boot_uri == f"{root}/code/{res['version']}/{emr.BOOTSTRAP}"

    groups = {g["InstanceGroupType"]: g for g in client.list_instance_groups(ClusterId=cid)["InstanceGroups"]}
    assert groups["TASK"]["Market"] == "SPOT" and groups["CORE"]["Market"] == "ON_DEMAND"
    assert groups["TASK"]["InstanceType"] == conf["instances"]["task"]["instance_type"]

    steps = client.list_steps(ClusterId=cid)["Steps"]
    by_name = {s["Name"]: s["Config"]["Args"] for s in steps}
    assert set(by_name) == {"phase4 4a (4a)", "phase4 4b (4b)"}
    for s in req["Steps"]:
        assert by_name[s["Name"]] == s["HadoopJarStep"]["Args"]
    a4 = by_name["phase4 4a (4a)"]
    zip_uri = a4[a4.index("--py-files") + 1]
    assert a4[:3] == ["spark-submit", "--deploy-mode", "cluster"]
    assert a4[a4.index(zip_uri) + 1:].count("4a") == 1

    # the uploaded artefacts are the ones the request names
    s3 = moto_s3.client()
    for uri in (zip_uri, boot_uri, a4[a4.index("--archives") + 1].split("#")[0],
                f"{root}/code/{res['version']}/{emr.DRIVER}",
                f"{root}/code/{res['version']}/conf/cluster.toml"):
        bucket, key = uri[len("s3://"):].split("/", 1)
        s3.head_object(Bucket=bucket, Key=key)
    bucket, key = boot_uri[len("s3://"):].split("/", 1)
    assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == (frozen_repo / emr.BOOTSTRAP).read_bytes()

    # add steps to the existing cluster
    res2 = emr.submit(conf, steps=["4b2"], cluster_id=cid, client=client, **common)
    assert res2["cluster_id"] == cid and len(res2["step_ids"]) == 1
    assert sent["AddJobFlowSteps"] == {"JobFlowId": cid, "Steps": res2["request"]["Steps"]}
    dry2 = emr.submit(conf, steps=["4b2"], cluster_id=cid, dry_run=True, **common)
    assert json.loads(emr.to_json(dry2))["request"] == json.loads(json.dumps(sent["AddJobFlowSteps"]))
    names = [s["Name"] for s in client.list_steps(ClusterId=cid)["Steps"]]
    assert sorted(names) == ["phase4 4a (4a)", "phase4 4b (4b)", "phase4 4b2 (4b2)"]


def test_dry_run_uploads_nothing(moto_s3, s3_bucket, frozen_repo):
    root = f"s3://{s3_bucket}"
    res = emr.submit(_conf_for(root), steps=["4a"], dry_run=True, region="us-east-1",
                     endpoint_url=moto_s3.endpoint_url, repo_root=frozen_repo)
    assert res["cluster_id"] is None and res["uploads"]
    assert all(u.startswith(f"{root}/code/{res['version']}/") for u in res["uploads"])
    assert moto_s3.client().list_objects_v2(Bucket=s3_bucket).get("KeyCount", 0) == 0


def test_cli_prints_cluster_id(moto_s3, s3_bucket, frozen_repo):
    root = f"s3://{s3_bucket}"
    r = subprocess.run(
        [sys.executable, str(frozen_repo / emr.DRIVER), "emr-submit", "--stages", "4a",
         "--endpoint-url", moto_s3.endpoint_url, "--region", "us-east-1",
         "--code-uri", f"{root}/code", "--log-uri", f"{root}/logs/", "--out", f"{root}/out",
         "--task-nodes", "3"],
        capture_output=True, text=True, timeout=60, env={**os.environ, **moto_s3.env})
    assert r.returncode == 0, r.stderr
    cid = r.stdout.strip()
    assert re.fullmatch(r"j-[A-Z0-9]+", cid), r.stdout
    client = emr.emr_client("us-east-1", moto_s3.endpoint_url)
    groups = {g["InstanceGroupType"]: g for g in client.list_instance_groups(ClusterId=cid)["InstanceGroups"]}
    assert groups["TASK"]["RequestedInstanceCount"] == 3
    bad = subprocess.run([sys.executable, str(frozen_repo / emr.DRIVER), "emr-submit", "--dry-run",
                          "--stages", "4a", "--out", "/tmp/not-s3"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "s3://" in bad.stderr


def test_spark_env_region_default_and_override():
    """spark-env exports AWS_DEFAULT_REGION = [cluster] region unless [spark_env] sets it."""
    base = {"spark_env": {"PYSPARK_PYTHON": "python3.11"}, "spark_defaults": {},
            "cluster": {"region": "us-west-2"}}
    export = emr.build_configurations(base)[0]["Configurations"][0]["Properties"]
    assert export == {"PYSPARK_PYTHON": "python3.11", "AWS_DEFAULT_REGION": "us-west-2"}
    base["spark_env"]["AWS_DEFAULT_REGION"] = "eu-west-1"
    export = emr.build_configurations(base)[0]["Configurations"][0]["Properties"]
    assert export["AWS_DEFAULT_REGION"] == "eu-west-1"
