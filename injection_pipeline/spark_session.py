"""Build a SparkSession configured for where it runs (laptop local[*], tests, EMR spark-submit).

Only Spark 3.5 API is used.  Under ``spark-submit`` (EMR/YARN) the master, Python and network
settings chosen by spark-submit are respected; the local-only settings below apply when the
master is ``local*`` / ``local-cluster*`` / a standalone ``spark://127.0.0.1`` or ``localhost``.

Local settings (see /work/shared/reference/environment.md)
    PYSPARK_PYTHON = spark.pyspark.python = sys.executable   (workers see the same packages)
    SPARK_LOCAL_IP = spark.driver.host = spark.driver.bindAddress = 127.0.0.1
    a log4j2 config at WARN (ERROR when quiet) so the JVM does not print its start-up warnings
Always
    executor_env -> ``spark.executorEnv.<NAME>`` (standalone/YARN executors do not inherit the
    driver's environment; in local mode the Python workers get them too)
for_tests=True
    ``-XX:TieredStopAtLevel=1 -XX:+UseSerialGC`` on the driver JVM (~2.5 s faster start),
    spark.ui.enabled=false, few shuffle partitions.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
import urllib.parse

from injection_pipeline import storage

__all__ = ["build_spark", "is_local_master", "launched_by_spark_submit", "TEST_JVM_OPTIONS",
           "spark_path", "check_spark_filesystem"]

TEST_JVM_OPTIONS = "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC"

_LOG = logging.getLogger(__name__)

_LOG4J2_TEMPLATE = """\
# written by injection_pipeline.spark_session
rootLogger.level = {level}
rootLogger.appenderRef.stdout.ref = console
appender.console.type = Console
appender.console.name = console
appender.console.target = SYSTEM_ERR
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = %d{{yy/MM/dd HH:mm:ss}} %p %c{{1}}: %m%n%ex
logger.hadoopnative.name = org.apache.hadoop.util.NativeCodeLoader
logger.hadoopnative.level = error
logger.sparkutils.name = org.apache.spark.util.Utils
logger.sparkutils.level = error
logger.shutdown.name = org.apache.spark.util.ShutdownHookManager
logger.shutdown.level = error
logger.blockmanager.name = org.apache.spark.storage.BlockManager
logger.blockmanager.level = error
logger.parquet.name = org.apache.parquet
logger.parquet.level = error
logger.snappy.name = org.apache.spark.sql.execution.datasources.parquet
logger.snappy.level = error
"""


def launched_by_spark_submit() -> bool:
    """True when this Python driver was started by spark-submit (the JVM already exists)."""
    return "PYSPARK_GATEWAY_PORT" in os.environ


def is_local_master(master: str | None) -> bool:
    if not master:
        return False
    m = master.strip().lower()
    return (m.startswith("local") or m.startswith("spark://127.0.0.1") or m.startswith("spark://localhost"))


def effective_master(cli_master: str | None) -> str:
    """The master this driver will run on: spark-submit's (``spark.master`` of the JVM it
    started) when launched by it, else the ``--master`` flag."""
    if launched_by_spark_submit():
        from pyspark import SparkConf
        return SparkConf().get("spark.master", "") or ""
    return cli_master or ""


def absolute_out(out: str, master: str) -> str:
    """``--out`` as every process must see it: s3:// unchanged; a local path made absolute in
    local mode (``local...``); a RELATIVE local path on any other master is refused
    (ValueError): each executor would resolve it in its own working directory."""
    if storage.is_s3_uri(out):
        return out
    path = storage.parse_uri(out).key
    if os.path.isabs(path):
        return path
    if not master.strip().lower().startswith("local"):
        raise ValueError(f"--out {out!r} is a relative local path but the Spark master is "
                         f"{master!r}: executors would each write under their own working "
                         f"directory; give an absolute path on a shared filesystem or s3://")
    return os.path.abspath(path)


#: task attempts in local mode (Spark's own default spark.task.maxFailures on a cluster)
LOCAL_TASK_MAX_FAILURES = 4
_LOCAL_RE = re.compile(r"^local(\[(\*|\d+)\])?$")


def local_master_with_retries(master: str, max_failures: int = LOCAL_TASK_MAX_FAILURES) -> str:
    """``local`` / ``local[N]`` / ``local[*]`` -> ``local[N,F]``: Spark's local mode runs
    each task once whatever ``spark.task.maxFailures`` says, so a killed Python worker or a
    transient storage fault would fail the job; with F attempts the task is retried as on a
    cluster.  Any other master (``local[N,F]`` given explicitly, ``spark://``, ``yarn``) is
    returned unchanged."""
    m = _LOCAL_RE.match(master.strip()) if master else None
    if not m or max_failures <= 1:
        return master
    return f"local[{m.group(2) or '1'},{int(max_failures)}]"


def _log4j2_file(level: str) -> str:
    level = level.lower()
    path = os.path.join(tempfile.gettempdir(), f"injection-pipeline-log4j2-{level}.properties")
    text = _LOG4J2_TEMPLATE.format(level=level)
    try:
        with open(path) as f:
            if f.read() == text:
                return path
    except OSError:
        pass
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


#: AWS variables executors need to reach the same S3 endpoint as the driver
AWS_EXECUTOR_VARIABLES = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION",
                          "AWS_REGION")
#: credentials: forwarded only to a loopback endpoint (moto); never put real keys in Spark conf
AWS_LOCAL_CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


def aws_executor_env(environ=None) -> dict:
    """The driver's S3 endpoint/region for ``spark.executorEnv.*`` (standalone and YARN
    executors do not inherit the driver's environment).  Dummy credentials are forwarded only
    when the endpoint is on 127.0.0.1/localhost (a local moto server); on EMR executors use
    the instance role."""
    environ = os.environ if environ is None else environ
    env = {k: environ[k] for k in AWS_EXECUTOR_VARIABLES if environ.get(k)}
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or ""
    if urllib.parse.urlsplit(endpoint).hostname in ("127.0.0.1", "localhost"):
        env.update({k: environ[k] for k in AWS_LOCAL_CREDENTIALS if environ.get(k)})
    return env


def build_spark(
    master: str | None = "local[*]",
    app_name: str = "dr10-lens-injection",
    executor_env: dict | None = None,
    conf: dict | None = None,
    verbose: bool = False,
    *,
    for_tests: bool = False,
    log_level: str | None = None,
):
    """Create (or get) a SparkSession.

    master        ignored under spark-submit (its ``--master`` wins); None = leave unset.
    executor_env  environment for executors (e.g. local_services.moto_env(...)), passed as
                  ``spark.executorEnv.*`` on top of :func:`aws_executor_env` (the driver's S3
                  endpoint and region).  Values are strings.
    conf          extra Spark conf; wins over the defaults set here (JVM option strings are
                  appended to ours).
    verbose       keep Spark's INFO logs; otherwise WARN (log4j2 config + setLogLevel).
    for_tests     fast-start JVM flags, no UI, 4 shuffle partitions.
    log_level     explicit SparkContext log level (overrides verbose).
    """
    from pyspark.sql import SparkSession

    submitted = launched_by_spark_submit()
    local = (not submitted) and is_local_master(master)
    conf = dict(conf or {})
    level = (log_level or ("INFO" if verbose else "WARN")).upper()
    settings: dict[str, str] = {}
    java_opts: list[str] = []

    if local:
        os.environ["PYSPARK_PYTHON"] = sys.executable
        os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
        settings["spark.pyspark.python"] = sys.executable
        settings["spark.pyspark.driver.python"] = sys.executable
        settings["spark.driver.host"] = os.environ["SPARK_LOCAL_IP"]
        settings["spark.driver.bindAddress"] = os.environ["SPARK_LOCAL_IP"]
        if not verbose:
            java_opts.append(f"-Dlog4j2.configurationFile=file:{_log4j2_file(level)}")
    if for_tests:
        java_opts.append(TEST_JVM_OPTIONS)
        settings["spark.ui.enabled"] = "false"
        settings["spark.ui.showConsoleProgress"] = "false"
        settings["spark.sql.shuffle.partitions"] = "4"
    elif not verbose:
        settings["spark.ui.showConsoleProgress"] = "false"
    executor_env = {**aws_executor_env(), **(executor_env or {})}
    for k, v in executor_env.items():
        settings[f"spark.executorEnv.{k}"] = str(v)

    for key, opts in (("spark.driver.extraJavaOptions", java_opts),
                      ("spark.executor.extraJavaOptions", java_opts if local else [])):
        parts = [" ".join(opts)] if opts else []
        if key in conf:
            parts.append(str(conf.pop(key)))
        if parts:
            settings[key] = " ".join(p for p in parts if p)
    settings.update({k: str(v) for k, v in conf.items()})

    builder = SparkSession.builder.appName(app_name)
    if master and not submitted:
        retried = local_master_with_retries(
            master, int(settings.get("spark.task.maxFailures", LOCAL_TASK_MAX_FAILURES)))
        if retried != master:
            _LOG.debug("master %s -> %s (task retries in local mode)", master, retried)
        builder = builder.master(retried)
    elif master and submitted:
        _LOG.debug("launched by spark-submit: ignoring master=%r", master)
    for k, v in settings.items():
        builder = builder.config(k, v)

    from pyspark import SparkContext

    active = SparkContext._active_spark_context
    if active is not None and executor_env:
        current = active.getConf()
        differ = sorted(k for k, v in executor_env.items()
                        if current.get(f"spark.executorEnv.{k}") != str(v))
        if differ:
            _LOG.warning("a SparkContext already exists with other executor environment values "
                         "for %s: executors keep the old ones", ", ".join(differ))
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(level)
    return spark


# =========================================================================== Spark table paths
def spark_path(uri: str) -> str:
    """Path handed to Spark's table I/O: local paths made absolute, s3:// kept (EMRFS)."""
    parsed = storage.parse_uri(uri)
    if parsed.scheme == "file":
        return os.path.abspath(parsed.key)
    return uri


def check_spark_filesystem(spark, uri: str) -> None:
    """Fail early, clearly, when Spark has no Hadoop filesystem for ``uri``'s scheme."""
    if not storage.is_s3_uri(uri):
        return
    jvm = spark.sparkContext._jvm
    try:
        jvm.org.apache.hadoop.fs.FileSystem.get(jvm.java.net.URI(uri),
                                                spark.sparkContext._jsc.hadoopConfiguration())
    except Exception as exc:  # py4j error: no FileSystem for scheme
        raise RuntimeError(
            f"Spark cannot read/write {uri!r} here ({str(exc).splitlines()[0][:200]}). "
            f"Locally there is no hadoop-aws jar: use a local --out / --catalogue path; on EMR "
            f"s3:// works through EMRFS (docs/storage.md, 'Spark table I/O').") from None


@contextlib.contextmanager
def worker_environment(spark, env: dict):
    """``env`` in the Python workers' environment for the jobs run inside (the SparkContext
    environment goes with every Python function; new values start new workers); the previous
    values are restored on exit."""
    e = spark.sparkContext.environment
    saved = {k: e.get(k) for k in env}
    e.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                e.pop(k, None)
            else:
                e[k] = v
