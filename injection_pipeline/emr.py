"""AWS EMR deployment: build, (dry-run) print and send the EMR requests that run the stages.

Used by the driver sub-command ``emr-submit`` (:mod:`injection_pipeline.stages.stage_emr`);
settings in ``conf/cluster.toml``, reasoning in docs/emr.md.

What one submission does
    1. Builds the code artefacts, deterministically (same files -> same bytes -> same sha):
       ``phase4.zip`` (``lensing/``, ``injection_pipeline/``, ``conf/``) for ``--py-files``,
       ``phase4_conf.zip`` (the ``conf/*.toml`` files at its root) for
       ``--archives ...#conf`` (YARN unpacks it as ``./conf`` in the driver's container, which
       ``--config conf`` reads: a directory inside a zip on sys.path is not a directory), the
       driver ``spark_phase4_pipeline.py`` and the bootstrap script.
    2. Checks every step's stage flags with the driver's own argparse (a typo fails here, not
       after the cluster has started) and that executors fit the node's YARN memory.
    3. Builds the request: ``RunJobFlow`` (new cluster: release label, instance groups with
       spot task nodes, bootstrap action, configurations, steps, log URI) or
       ``AddJobFlowSteps`` (``--cluster-id``).  Each step is ``command-runner.jar`` running
       ``spark-submit --deploy-mode cluster ... --py-files <zip> <driver> <stage> <flags>``.
    4. ``dry_run``: returns the request and the planned uploads; uploads and sends nothing.
       Otherwise uploads the artefacts to ``<code>/<sha12>/`` (content-addressed: a new code
       version never overwrites the files a running step uses) through
       :mod:`injection_pipeline.storage`, sends the request and returns the cluster id.

Endpoints: boto3's standard resolution (``AWS_ENDPOINT_URL``, profiles, instance roles) or an
explicit ``endpoint_url`` (tests: a moto server on 127.0.0.1 serving both EMR and S3).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import importlib.util
import io
import json
import logging
import os
import re
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Mapping, Sequence

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from injection_pipeline import storage

__all__ = [
    "REPO_ROOT", "DEFAULT_CLUSTER_CONF", "CODE_ZIP", "CONF_ZIP", "DRIVER", "BOOTSTRAP",
    "BUILD_INFO", "CodeArtifacts", "git_info", "load_cluster_conf", "resolve_paths", "build_code_zip", "build_conf_zip",
    "build_artifacts", "artifact_uris", "validate_stage_args", "check_executor_fit",
    "spark_submit_args", "build_steps", "build_configurations", "build_instances",
    "build_run_job_flow_request", "build_add_steps_request", "emr_client", "upload_artifacts",
    "submit", "to_json",
]

LOG = logging.getLogger("phase4.emr")

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CLUSTER_CONF = REPO_ROOT / "conf" / "cluster.toml"
CODE_ZIP = "phase4.zip"
CONF_ZIP = "phase4_conf.zip"
DRIVER = "spark_phase4_pipeline.py"
BOOTSTRAP = "bootstrap_phase4_pipeline_install_deps.sh"
PACKAGES = ("lensing", "injection_pipeline")
CONF_ARCHIVE_ALIAS = "conf"            # --archives <conf zip>#conf -> ./conf in each container
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)      # fixed timestamps: reproducible zips
_PLACEHOLDER = re.compile(r"\{(\w+)\}")


# =========================================================================== conf
def load_cluster_conf(path: str | os.PathLike | None = None) -> dict:
    """Parse conf/cluster.toml (or ``path``: a TOML file or a conf directory holding one)."""
    p = Path(path) if path else DEFAULT_CLUSTER_CONF
    if p.is_dir():
        p = p / "cluster.toml"
    with open(p, "rb") as f:
        conf = tomllib.load(f)
    for section in ("cluster", "paths", "instances", "spark_env", "spark_defaults", "submit",
                    "steps", "bootstrap", "node"):
        if section not in conf:
            raise ValueError(f"{p}: missing [{section}] section")
    conf["_source"] = str(p)
    return conf


def _fill(template: str, values: Mapping[str, str], what: str) -> str:
    def sub(m: re.Match) -> str:
        if m.group(1) not in values:
            raise ValueError(f"{what}: unknown placeholder {{{m.group(1)}}} in {template!r} "
                             f"(known: {', '.join(sorted(values))})")
        return str(values[m.group(1)])
    return _PLACEHOLDER.sub(sub, template)


def resolve_paths(conf: Mapping, overrides: Mapping[str, str | None] | None = None) -> dict:
    """[paths] with ``{root}`` substituted and CLI overrides applied (None = keep conf)."""
    raw = dict(conf["paths"])
    raw.update({k: v for k, v in (overrides or {}).items() if v})
    root = raw.get("root", "")
    out = {k: _fill(str(v), {"root": root}, f"[paths].{k}") for k, v in raw.items()}
    for key in ("code", "logs", "out"):
        if not storage.is_s3_uri(out.get(key, "")):
            raise ValueError(f"paths.{key} must be an s3:// URI on EMR, got {out.get(key)!r}")
    return out


# =========================================================================== artefacts
@dataclasses.dataclass(frozen=True)
class CodeArtifacts:
    """Local files to upload (name -> path) and the content version (sha256 prefix)."""

    files: dict
    version: str
    members: tuple  # names inside phase4.zip


def _zip_write(zf: zipfile.ZipFile, arcname: str, data: bytes) -> None:
    info = zipfile.ZipInfo(arcname, date_time=_ZIP_DATE)
    info.external_attr = 0o644 << 16
    info.compress_type = zipfile.ZIP_DEFLATED
    zf.writestr(info, data)


def _code_files(repo_root: Path) -> list[tuple[str, Path]]:
    files = []
    for pkg in PACKAGES:
        base = repo_root / pkg
        if not (base / "__init__.py").is_file():
            raise FileNotFoundError(f"{base}: package missing (is {repo_root} the repository?)")
        for p in sorted(base.rglob("*.py")):
            if "__pycache__" not in p.parts:
                files.append((p.relative_to(repo_root).as_posix(), p))
    for p in sorted((repo_root / "conf").glob("*.toml")):
        files.append((f"conf/{p.name}", p))
    return files


BUILD_INFO = "injection_pipeline/BUILD_INFO.json"


def git_info(repo_root: str | os.PathLike = REPO_ROOT) -> dict:
    """{"git_commit", "git_dirty"} of the checkout (None when it is not a git checkout)."""
    import subprocess

    def git(*a: str) -> str | None:
        try:
            r = subprocess.run(["git", "-C", str(repo_root), *a], capture_output=True,
                               text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return r.stdout.strip() if r.returncode == 0 else None
    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--", *PACKAGES, "conf") if commit else None
    return {"git_commit": commit, "git_dirty": bool(status) if commit else None}


def build_code_zip(dest: str | os.PathLike, repo_root: str | os.PathLike = REPO_ROOT) -> list[str]:
    """Write the --py-files zip (packages + conf/ + ``BUILD_INFO``); returns its members.

    ``injection_pipeline/BUILD_INFO.json`` (git commit, dirty flag, file sha256s) gives code
    running from the zip its provenance: ``importlib.resources.files("injection_pipeline")
    .joinpath("BUILD_INFO.json").read_text()`` (git is not available there).
    """
    members = _code_files(Path(repo_root))
    info = {**git_info(repo_root), "files": {
        a: hashlib.sha256(p.read_bytes()).hexdigest() for a, p in members}}
    with zipfile.ZipFile(dest, "w") as zf:
        for arc, p in members:
            _zip_write(zf, arc, p.read_bytes())
        _zip_write(zf, BUILD_INFO, (json.dumps(info, indent=1, sort_keys=True) + "\n").encode())
    return [a for a, _ in members] + [BUILD_INFO]


def build_conf_zip(dest: str | os.PathLike, repo_root: str | os.PathLike = REPO_ROOT) -> list[str]:
    """Write the --archives zip: conf/*.toml at its root (unpacked as ./conf on YARN)."""
    confs = sorted((Path(repo_root) / "conf").glob("*.toml"))
    with zipfile.ZipFile(dest, "w") as zf:
        for p in confs:
            _zip_write(zf, p.name, p.read_bytes())
    return [p.name for p in confs]


def build_artifacts(workdir: str | os.PathLike, repo_root: str | os.PathLike = REPO_ROOT,
                    bootstrap_script: str = BOOTSTRAP) -> CodeArtifacts:
    """Build every artefact in ``workdir``; version = sha256 over all of them (12 hex)."""
    repo_root, workdir = Path(repo_root), Path(workdir)
    code_zip, conf_zip = workdir / CODE_ZIP, workdir / CONF_ZIP
    members = build_code_zip(code_zip, repo_root)
    build_conf_zip(conf_zip, repo_root)
    files = {CODE_ZIP: code_zip, CONF_ZIP: conf_zip, DRIVER: repo_root / DRIVER,
             Path(bootstrap_script).name: repo_root / bootstrap_script}
    h = hashlib.sha256()
    for name in sorted(files):
        if not files[name].is_file():
            raise FileNotFoundError(f"artefact {name}: {files[name]} not found")
        h.update(name.encode() + b"\0" + files[name].read_bytes() + b"\0")
    return CodeArtifacts({k: str(v) for k, v in files.items()}, h.hexdigest()[:12],
                         tuple(members))


def artifact_uris(code_root: str, artifacts: CodeArtifacts) -> dict:
    """S3 URI of every artefact: <code_root>/<version>/<name>."""
    base = storage.join_uri(code_root, artifacts.version)
    return {name: storage.join_uri(base, name) for name in artifacts.files}


# =========================================================================== checks
def _load_driver(repo_root: Path = REPO_ROOT):
    spec = importlib.util.spec_from_file_location("_phase4_driver", repo_root / DRIVER)
    mod = importlib.util.module_from_spec(spec)
    saved = list(sys.path)  # the driver puts its directory on sys.path: do not leak that
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path[:] = saved
    return mod


def validate_stage_args(stage: str, args: Sequence[str], repo_root: Path = REPO_ROOT) -> None:
    """Parse ``<stage> <args>`` with the driver's own parser; ValueError with argparse's text."""
    from injection_pipeline.stages import STAGE_MODULES

    if stage not in STAGE_MODULES:
        raise ValueError(f"stage {stage!r} is not a sub-command of {DRIVER} "
                         f"(registered: {', '.join(STAGE_MODULES)})")
    parser = _load_driver(repo_root).build_parser()
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            parser.parse_args([stage, *args])
    except SystemExit as exc:
        raise ValueError(f"stage {stage}: flags {list(args)} rejected by the driver: "
                         f"{err.getvalue().strip().splitlines()[-1] if err.getvalue() else exc}") from None


def _mib(value: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)b?\s*", str(value).lower())
    if not m:
        raise ValueError(f"cannot parse memory size {value!r}")
    n, unit = int(m.group(1)), m.group(2)
    return {"k": n // 1024, "": n // (1024 * 1024), "m": n, "g": n * 1024, "t": n * 1024 ** 2}[unit]


def check_executor_fit(conf: Mapping) -> dict:
    """Executors per worker node, from spark_defaults and [node]; ValueError if none fits."""
    sd, node = conf["spark_defaults"], conf["node"]
    cores = int(sd.get("spark.executor.cores", 1))
    heap = _mib(sd.get("spark.executor.memory", "1g"))
    overhead = _mib(sd["spark.executor.memoryOverhead"]) if "spark.executor.memoryOverhead" in sd \
        else max(384, heap // 10)
    container = heap + overhead
    per_node = min(int(node["vcpus"]) // cores, int(node["yarn_memory_mb"]) // container)
    if per_node < 1:
        raise ValueError(f"an executor ({cores} cores, {container} MiB) does not fit a node "
                         f"({node['vcpus']} vCPU, {node['yarn_memory_mb']} MiB YARN)")
    if per_node * cores < int(node["vcpus"]):
        LOG.warning("executors use %d of %d vCPUs per node (memory-bound)", per_node * cores,
                    node["vcpus"])
    return {"executors_per_node": per_node, "container_mib": container,
            "python_mib_per_core": (overhead - 600) // cores,
            "yarn_used_mib": per_node * container, "yarn_memory_mib": int(node["yarn_memory_mb"])}


# =========================================================================== request
def spark_submit_args(conf: Mapping, step: Mapping, uris: Mapping[str, str],
                      paths: Mapping[str, str]) -> list[str]:
    """The command-runner.jar argument list of one step."""
    values = {k: v for k, v in paths.items()}
    stage_args = [_fill(str(a), values, f"step {step['stage']}") for a in step.get("args", [])]
    cmd = ["spark-submit", *[str(a) for a in conf["submit"].get("spark_submit_args", [])]]
    cmd += ["--name", f"phase4-{step['name']}"]
    for k, v in sorted(step.get("spark_conf", {}).items()):
        cmd += ["--conf", f"{k}={v}"]
    cmd += ["--py-files", uris[CODE_ZIP],
            "--archives", f"{uris[CONF_ZIP]}#{CONF_ARCHIVE_ALIAS}",
            uris[DRIVER], step["stage"], "--config", CONF_ARCHIVE_ALIAS, "--out", paths["out"],
            *stage_args]
    return cmd


def _steps_conf(conf: Mapping, names: Sequence[str]) -> list[dict]:
    out = []
    for name in names:
        if name not in conf["steps"]:
            raise ValueError(f"no [steps.{name}] in {conf.get('_source', 'cluster.toml')} "
                             f"(steps: {', '.join(conf['steps'])})")
        s = dict(conf["steps"][name])
        s.setdefault("stage", name)
        s["name"] = name
        out.append(s)
    return out


def build_steps(conf: Mapping, names: Sequence[str], uris: Mapping[str, str],
                paths: Mapping[str, str], *, validate: bool = True,
                repo_root: str | os.PathLike = REPO_ROOT) -> list[dict]:
    """EMR StepConfig list (command-runner.jar + spark-submit) for the named steps."""
    action = conf["cluster"].get("action_on_failure", "CANCEL_AND_WAIT")
    steps = []
    for s in _steps_conf(conf, names):
        args = spark_submit_args(conf, s, uris, paths)
        if validate:
            i = args.index(uris[DRIVER])
            validate_stage_args(s["stage"], args[i + 2:], Path(repo_root))
        steps.append({"Name": f"phase4 {s['name']} ({s['stage']})", "ActionOnFailure": action,
                      "HadoopJarStep": {"Jar": "command-runner.jar", "Args": args}})
    return steps


def build_configurations(conf: Mapping) -> list[dict]:
    """EMR Configurations: spark-env (export), spark-defaults, spark, yarn-site."""
    s = lambda d: {str(k): str(v) for k, v in d.items()}  # noqa: E731  (EMR wants strings)
    # boto3 on the nodes takes its region from the environment (not from the instance): the
    # cluster's, so that stage 4c's SigV4 range-GET URLs are signed for the region of the S3
    # cache (kept in the cluster's region; [spark_env] AWS_DEFAULT_REGION overrides)
    env = dict(conf["spark_env"])
    env.setdefault("AWS_DEFAULT_REGION", conf["cluster"]["region"])
    out = [{"Classification": "spark-env", "Properties": {},
            "Configurations": [{"Classification": "export", "Properties": s(env)}]},
           {"Classification": "spark-defaults", "Properties": s(conf["spark_defaults"])}]
    if conf.get("spark"):
        out.append({"Classification": "spark", "Properties": s(conf["spark"])})
    if conf.get("yarn_site"):
        out.append({"Classification": "yarn-site", "Properties": s(conf["yarn_site"])})
    return out


def build_instances(conf: Mapping, *, task_nodes: int | None = None,
                    keep_alive: bool | None = None) -> dict:
    """EMR ``Instances`` (instance groups; TASK count overridable)."""
    cl = conf["cluster"]
    groups = []
    for key, g in conf["instances"].items():
        count = int(g["count"])
        if g["role"] == "TASK" and task_nodes is not None:
            count = int(task_nodes)
        if count <= 0:
            continue
        ig = {"Name": f"phase4-{key}", "InstanceRole": g["role"], "Market": g["market"],
              "InstanceType": g["instance_type"], "InstanceCount": count}
        if g.get("bid_price"):
            ig["BidPrice"] = str(g["bid_price"])
        if g.get("ebs_gb"):
            ig["EbsConfiguration"] = {"EbsOptimized": True, "EbsBlockDeviceConfigs": [
                {"VolumeSpecification": {"VolumeType": "gp3", "SizeInGB": int(g["ebs_gb"])},
                 "VolumesPerInstance": 1}]}
        groups.append(ig)
    inst: dict[str, Any] = {
        "InstanceGroups": groups,
        "KeepJobFlowAliveWhenNoSteps": bool(cl.get("keep_alive", False) if keep_alive is None
                                            else keep_alive),
        "TerminationProtected": False}
    if cl.get("subnet_id"):
        inst["Ec2SubnetId"] = cl["subnet_id"]
    if cl.get("ec2_key_name"):
        inst["Ec2KeyName"] = cl["ec2_key_name"]
    return inst


def build_run_job_flow_request(conf: Mapping, steps: list[dict], uris: Mapping[str, str],
                               paths: Mapping[str, str], *, name: str | None = None,
                               task_nodes: int | None = None,
                               keep_alive: bool | None = None) -> dict:
    """The complete RunJobFlow request (boto3 keyword arguments)."""
    cl = conf["cluster"]
    boot = conf["bootstrap"]
    instances = build_instances(conf, task_nodes=task_nodes, keep_alive=keep_alive)
    req: dict[str, Any] = {
        "Name": name or cl["name"],
        "LogUri": paths["logs"],
        "ReleaseLabel": cl["release_label"],
        "Applications": [{"Name": a} for a in cl.get("applications", ["Spark"])],
        "Instances": instances,
        "BootstrapActions": [{"Name": "phase4: install pinned Python 3.11 dependencies",
                              "ScriptBootstrapAction": {
                                  "Path": uris[Path(boot["script"]).name],
                                  "Args": [str(a) for a in boot.get("args", [])]}}],
        "Configurations": build_configurations(conf),
        "Steps": steps,
        "JobFlowRole": cl["job_flow_role"],
        "ServiceRole": cl["service_role"],
        "VisibleToAllUsers": True,
        "StepConcurrencyLevel": int(cl.get("step_concurrency_level", 1)),
        "Tags": [{"Key": str(k), "Value": str(v)} for k, v in cl.get("tags", {}).items()],
    }
    if cl.get("ebs_root_volume_size_gb"):
        req["EbsRootVolumeSize"] = int(cl["ebs_root_volume_size_gb"])
    if instances["KeepJobFlowAliveWhenNoSteps"] and cl.get("idle_timeout_s"):
        req["AutoTerminationPolicy"] = {"IdleTimeout": int(cl["idle_timeout_s"])}
    return req


def build_add_steps_request(cluster_id: str, steps: list[dict]) -> dict:
    return {"JobFlowId": cluster_id, "Steps": steps}


# =========================================================================== send
def emr_client(region: str, endpoint_url: str | None = None):
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        "emr", region_name=region, endpoint_url=endpoint_url,
        config=Config(retries={"max_attempts": 10, "mode": "adaptive"}))


def upload_artifacts(artifacts: CodeArtifacts, uris: Mapping[str, str],
                     store: storage.Storage, extra: Mapping[str, str] | None = None) -> list[str]:
    """Upload every artefact (and ``extra`` {local path: uri}); returns the URIs written."""
    done = []
    items = [(artifacts.files[n], uris[n]) for n in sorted(artifacts.files)]
    items += sorted((extra or {}).items())
    for local, uri in items:
        store.put_file(local, uri)
        LOG.info("uploaded %s -> %s", local, uri)
        done.append(uri)
    return done


def to_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=str)


def submit(conf: Mapping, *, steps: Sequence[str] | None = None, cluster_id: str | None = None,
           region: str | None = None, root: str | None = None, code_uri: str | None = None,
           log_uri: str | None = None, out: str | None = None, name: str | None = None, task_nodes: int | None = None,
           keep_alive: bool | None = None, dry_run: bool = False,
           endpoint_url: str | None = None, validate: bool = True,
           repo_root: str | os.PathLike = REPO_ROOT, client=None) -> dict:
    """Create a cluster (or add steps to ``cluster_id``) running ``steps``.

    Returns {"action", "region", "request", "uploads", "version", "executor_fit",
    "cluster_id" (None on dry runs), "step_ids"}.  ``request`` is exactly the keyword
    arguments given to boto3 (``run_job_flow`` / ``add_job_flow_steps``).
    """
    repo_root = Path(repo_root)
    paths = resolve_paths(conf, {"root": root, "code": code_uri, "logs": log_uri, "out": out})
    region = region or conf["cluster"]["region"]
    names = list(steps) if steps else list(conf["submit"]["default_steps"])
    fit = check_executor_fit(conf)
    LOG.info("executors: %d per node, %d MiB containers (%d of %d MiB YARN), ~%d MiB Python "
             "per core", fit["executors_per_node"], fit["container_mib"], fit["yarn_used_mib"],
             fit["yarn_memory_mib"], fit["python_mib_per_core"])
    with tempfile.TemporaryDirectory(prefix="phase4-emr-") as tmp:
        arts = build_artifacts(tmp, repo_root, conf["bootstrap"]["script"])
        uris = artifact_uris(paths["code"], arts)
        conf_uris = {str(repo_root / "conf" / Path(c).name):
                     storage.join_uri(paths["code"], arts.version, "conf", Path(c).name)
                     for c in sorted((repo_root / "conf").glob("*.toml"))}
        step_cfgs = build_steps(conf, names, uris, paths, validate=validate, repo_root=repo_root)
        if cluster_id:
            action, request = "AddJobFlowSteps", build_add_steps_request(cluster_id, step_cfgs)
        else:
            action = "RunJobFlow"
            request = build_run_job_flow_request(conf, step_cfgs, uris, paths, name=name,
                                                 task_nodes=task_nodes, keep_alive=keep_alive)
        result = {"action": action, "region": region, "version": arts.version,
                  "uploads": {**{uris[n]: arts.files[n] for n in sorted(arts.files)},
                              **{u: p for p, u in conf_uris.items()}},
                  "executor_fit": fit, "request": request, "cluster_id": cluster_id,
                  "step_ids": []}
        if dry_run:
            result["request"] = copy.deepcopy(request)
            return result
        store = storage.Storage(endpoint_url=endpoint_url) if endpoint_url else storage.default_storage()
        upload_artifacts(arts, uris, store, conf_uris)
    client = client or emr_client(region, endpoint_url)
    if cluster_id:
        resp = client.add_job_flow_steps(**request)
    else:
        resp = client.run_job_flow(**request)
        result["cluster_id"] = resp["JobFlowId"]
    result["step_ids"] = list(resp.get("StepIds", []))
    LOG.info("%s: cluster %s, %d step(s) %s", action, result["cluster_id"], len(step_cfgs),
             result["step_ids"] or [s["Name"] for s in step_cfgs])
    return result
