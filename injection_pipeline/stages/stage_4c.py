"""Stage 4c: inject lensed sources into cached DR10 cutouts (Spark glue around
:mod:`injection_pipeline.injection`).

Inputs: the manifest ``<out>/phase4a/<variant>/<manifests-subdir>/<experiment_id>/`` (default
subdir ``manifests_filtered``) of each experiment of ``--experiment-id a,b,c`` and the coadd
cache ``<cache>/<brickname>/`` written by 4b (local path or s3://).  Outputs under
``<out>/phase4c/<variant>/``, per experiment::

    stamps/<experiment_id>/split=<split>/part-<group>.zstd.parquet
                                             every output row: manifest columns + results +
                                             binary stamps (image, arc, invvar, maskbits)
    stamps/<experiment_id>/_SUCCESS          JSON, after the accounting check
    metrics/<experiment_id>/split=<split>/part-<group>.zstd.parquet
                                             the same rows without the stamp columns
    metrics/<experiment_id>/_SUCCESS         JSON, after the accounting check
    bricks/<experiment_id>/<group>.json      completion marker of a file group (its bricks
                                             and rows, config sha, code version, manifest
                                             digest, files: --resume)
    summaries/<experiment_id>.json           accounting and summaries read from the WRITTEN
                                             metrics and stamps

A file group (``<group>``) is a sky cell of ``[job] file_cell_deg`` (1 deg) read off the brick
names (:mod:`injection_pipeline.file_groups`; ``file_cell_deg = 0``: one group per brick, named
by the brick).

Data flow (docs/injection.md): the experiments' manifests are united (column ``_x`` = the
experiment, ``_g`` = the brick's file group), range-partitioned by ``_g`` and sorted by (_g,
brickname, _x, task_id) within partitions, so that ONE pass opens each brick once for all
experiments (one CachedBrick / range-read fetch, the tiles of every experiment's stamps
prefetched together), and within an experiment a paired control (``<injection>/ctl``) is
written right after its injection (zstd stores their shared cutout once).  Each experiment's
rows of a group are written by the Python worker to that experiment's stamps and metrics
files of the group (the planes are handed to Parquet without a copy,
``injection.results_to_table``), then its marker; Spark only gets one small record per
(experiment, brick).  The result is computed ONCE; every count comes from the written files
(:func:`summarise_experiments`: 2 Spark actions for all experiments), which must hold exactly
one row per manifest task.  With ``--resume`` a group whose marker matches (same config sha,
code version, grouping, bricks and manifest rows; files present with their sizes) is kept,
every other group is redone.  No task data is collected to the driver (only aggregates and,
with --resume, the distinct (split, group) pairs; the survey-bricks table is read on the
driver and broadcast whole, never joined to a list of the bricks).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Optional

from injection_pipeline import injection as inj
from injection_pipeline import manifests as mf
from injection_pipeline import file_groups, python_worker, stamp_writer, storage, tile_ranges
from injection_pipeline.provenance import code_version
from injection_pipeline.python_worker import drop_zip_importer_caches, tune_malloc
from injection_pipeline.spark_session import check_spark_filesystem, spark_path

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover
    import tomli as tomllib  # type: ignore[no-redef]

NAME = "4c"
HELP = "inject lensed sources into cached DR10 cutouts -> stamps + metrics parquet"
LOG = logging.getLogger("phase4.4c")
EXIT_TOO_MANY_ERRORS = 2
#: an experiment whose 4c raised (bad manifest, accounting mismatch, storage down...): the
#: other experiments of the same ``--experiment-id a,b,c`` run still succeed or fail on their
#: own (a failure of the shared pass itself fails all of them)
EXIT_FAILED = 3


# =========================================================================== configuration
def load_conf(conf: str | os.PathLike | None) -> dict:
    """conf/injection.toml as a dict (``conf``: the conf directory or the TOML itself)."""
    p = Path(conf) if conf else mf.DEFAULT_CONF_DIR
    path = p / "injection.toml" if p.is_dir() else (p.parent / "injection.toml"
                                                     if p.name != "injection.toml" else p)
    try:
        with open(path, "rb") as f:
            d = tomllib.load(f)
    except FileNotFoundError:
        raise mf.ConfigError(f"configuration file not found: {path}") from None
    d["_path"] = str(path)
    return d


def _pick(cli, conf_value):
    return conf_value if cli is None else cli


def config_from_args(args, conf: dict) -> inj.InjectionConfig:
    psf = conf.get("psf", {})
    ij = conf.get("injection", {})
    met = conf.get("metrics", {})
    ims = conf.get("images", {})
    shot = conf.get("shot_noise", {})
    ss = int(_pick(args.supersample, ij.get("supersample", 0)) or 0)
    src = conf.get("source", {})
    clump_conf = src.get("clumps", {})
    return inj.InjectionConfig(
        psf_model=_pick(args.psf_model, psf.get("model", "gaussian")),
        moffat_beta=float(_pick(args.moffat_beta, psf.get("moffat_beta", 3.5))),
        use_psfsize_maps=bool(int(_pick(args.use_psfsize_maps,
                                        int(psf.get("use_psfsize_maps", True))))),
        psf_default_fwhm=tuple(sorted((k, float(v)) for k, v in
                                      psf.get("default_fwhm_arcsec", {}).items()))
        or inj.InjectionConfig().psf_default_fwhm,
        psf_min_fwhm=float(psf.get("min_fwhm_arcsec", 0.0)),
        psf_max_fwhm=float(psf.get("max_fwhm_arcsec", 10.0)),
        on_missing_maskbits=_pick(args.on_missing_maskbits,
                                  ij.get("on_missing_maskbits", "inject")),
        store_invvar_maskbits=bool(_pick(args.store_invvar_maskbits,
                                         ij.get("store_invvar_maskbits", True))),
        supersample=ss if ss > 0 else None,
        source_model=_pick(getattr(args, "source_model", None), src.get("model", "sersic")),
        source_model_tiers=tuple(src.get("tiers", ("train",))),
        clump_model=inj.ClumpModel.from_conf(clump_conf) if clump_conf else inj.ClumpModel(),
        psf_oversample=int(_pick(args.psf_oversample,
                                 ij.get("psf_oversample", inj.PSF_OVERSAMPLE_DEFAULT))),
        arc_region_k=_pick(args.arc_region_k, met.get("arc_region_k", inj.ARC_REGION_K_DEFAULT)),
        arc_region_bands=_pick(args.arc_region_bands,
                               met.get("arc_region_bands", "".join(inj.BANDS))),
        mu_point_factor=float(ims.get("mu_point_factor", 1.1)),
        resolved_b_fac=float(ims.get("resolved_b_fac", 2.0)),
        resolved_r_fac=float(ims.get("resolved_r_fac", 2.0)),
        shot_noise=_pick(getattr(args, "arc_shot_noise", None), shot.get("mode", "auto")),
        shot_noise_tiers=tuple(shot.get("tiers", ["train"])),
        shot_zpt=_band_table(shot.get("zpt_ab_1e_per_s"), inj.DEFAULT_SHOT_ZPT),
        shot_exptime=_band_table(shot.get("exptime_s"), inj.DEFAULT_SHOT_EXPTIME),
        shot_nexp=_band_table(shot.get("nexp"), inj.DEFAULT_SHOT_NEXP),
        code_version=code_version())


def _band_table(value, default) -> tuple:
    """((band, float), ...) from a conf inline table, else the default."""
    if not value:
        return tuple(default)
    return tuple(sorted((str(k), float(v)) for k, v in dict(value).items()))


# =========================================================================== CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of stage 4c (defaults None = value from conf/injection.toml)."""
    g = p.add_argument_group("inputs / outputs")
    g.add_argument("--experiment-id", required=True,
                   help="experiment id(s), comma-separated (e.g. debug_stamp64_bandsgrz_gridgrid_small)")
    g.add_argument("--variant", default="default",
                   help="<out>/phase4a/<variant>/ (input) and <out>/phase4c/<variant>/ (output)")
    g.add_argument("--manifests-subdir", default=None,
                   help="manifest directory under <out>/phase4a/<variant>/ (conf: manifests_filtered)")
    g.add_argument("--manifests-root", default=None,
                   help="explicit parent directory of <experiment_id>/ manifests (overrides "
                        "<out>/phase4a/<variant>/<manifests-subdir>)")
    g.add_argument("--cache", default=None,
                   help="coadd cache root written by 4b: <cache>/<brickname>/ (local or s3://); "
                        "default: 4b's (conf/cache.toml [cache] cache, else <out>/coadd_cache)")
    g.add_argument("--survey-bricks", default=None,
                   help="survey-bricks(-dr10-south) FITS table for the bricks-table PSF fallback "
                        "(psfsize_g/r/z columns; local or s3://); conf [inputs] survey_bricks; "
                        "unset = the bricks_table fallback level is skipped")
    g.add_argument("--metrics-only", nargs="?", const="yes", default="auto",
                   choices=("auto", "yes", "no"),
                   help="yes: metrics without stamps; no: always stamps; auto: the manifest's "
                        "metrics_only column (grid tiers)")
    g.add_argument("--store-invvar-maskbits", action=argparse.BooleanOptionalAction,
                   default=None, help="store invvar and maskbits cutouts with each stamp")
    ph = p.add_argument_group("physics (unset = conf/injection.toml)")
    ph.add_argument("--use-psfsize-maps", type=int, choices=(0, 1), default=None,
                    help="1: FWHM from psfsize maps at the stamp centre (fallbacks recorded)")
    ph.add_argument("--psf-model", choices=inj.PSF_MODELS, default=None, help="PSF profile: gaussian "
                    "(FWHM = psfsize) | moffat (NEA-matched to the psfsize Gaussian)")
    ph.add_argument("--moffat-beta", type=float, default=None, help="Moffat index (conf 3.5)")
    ph.add_argument("--on-missing-maskbits", choices=("inject", "skip"), default=None,
                    help="inject (null mask metrics + reason) or skip (status missing_maskbits)")
    ph.add_argument("--supersample", type=int, default=None,
                    help="renderer: 0 = adaptive rule (default), s = uniform s x s")
    ph.add_argument("--source-model", choices=inj.SOURCE_MODELS, default=None,
                    help="sersic (smooth manifest Sersic) | clumpy (that Sersic + star-forming "
                         "clumps from task_seed64, conf [source.clumps]) | auto (clumpy for the "
                         "tiers conf [source] tiers, sersic otherwise); conf [source] model")
    ph.add_argument("--psf-oversample", type=int, choices=inj.PSF_OVERSAMPLE_ALLOWED,
                    default=None, help="renderer: fine cells per pixel per axis of the "
                    "convolution grid; the PSF (which contains the pixel response) is evaluated "
                    "at pixel centres, pixel response applied once (conf 4; 1 = legacy double "
                    "pixel response, comparisons only)")
    ph.add_argument("--arc-region-k", type=float, default=None,
                    help="arc_snr_region_<b>: region = good pixels with arc > k x pixel sigma "
                         "(conf [metrics] arc_region_k = 1.0)")
    ph.add_argument("--arc-shot-noise", choices=inj.SHOT_NOISE_MODES, default=None,
                    help="Poisson noise of the arc's photons added to image: auto = on for the "
                         "tiers of conf [shot_noise] tiers (train), on, off (conf mode = auto)")
    ph.add_argument("--arc-region-bands", default=None,
                    help="bands whose best region S/N is arc_snr_region (conf: grz)")
    j = p.add_argument_group("job")
    j.add_argument("--error-threshold", type=float, default=None,
                   help="exit 2 when more than this fraction of tasks is neither ok nor "
                        "off_brick (conf 0.01)")
    j.add_argument("--off-brick-threshold", type=float, default=None,
                   help="exit 2 when more than this fraction of tasks is off_brick (real DR10 "
                        "targets never are; conf 0.001)")
    j.add_argument("--fetch", choices=("auto", "range", "whole"), default=None,
                   help="S3 cache: fetch only the compression tiles the stamps touch (range), "
                        "each file whole, or range unless a plane's stamps need more than "
                        "fetch_auto_fraction of its tiles (auto; conf [job] fetch)")
    j.add_argument("--partitions", type=int, default=None,
                   help="Spark partitions (default: tasks / tasks_per_partition, <= bricks)")
    j.add_argument("--tasks-per-partition", type=int, default=None, help="conf 2000")
    j.add_argument("--resume", action="store_true",
                   help="keep the file groups whose outputs are complete and were made with "
                        "this config sha, code version, grouping and manifest rows (markers "
                        "bricks/<experiment>/<group>.json); redo only the others (missing, "
                        "partial or made otherwise); without it the outputs are rewritten")
    j.add_argument("--file-cell-deg", type=float, default=None,
                   help="the bricks of one sky cell of this size [deg, a multiple of 0.1] "
                        "share their output files and marker; 0 = one file per brick "
                        "(conf [job] file_cell_deg = 1.0)")




def run(args) -> int:
    """Entry point used by spark_phase4_pipeline.py: every experiment of ``--experiment-id``
    in ONE pass over the bricks (:func:`run_experiments`); each experiment keeps its own
    outputs and its own exit code (0, 2 or 3), and the largest is returned."""
    from injection_pipeline.spark_session import build_spark

    conf = load_conf(args.config)
    cfg = config_from_args(args, conf)
    spark = build_spark(args.master, app_name="phase4-4c", verbose=args.verbose)
    eids = list(dict.fromkeys(e.strip() for e in args.experiment_id.split(",") if e.strip()))
    results = run_experiments(spark, cfg, eids, **settings_from_args(args, conf))
    outcomes = {e: (EXIT_FAILED if isinstance(r, BaseException) else int(r["exit_code"]))
                for e, r in results.items()}
    if len(outcomes) > 1:
        LOG.info("stage 4c per experiment: %s", ", ".join(
            f"{e} {'ok' if c == 0 else f'exit {c}'}" for e, c in outcomes.items()))
    return max(outcomes.values(), default=0)


def settings_from_args(args, conf: dict) -> dict:
    """Keyword arguments of :func:`run_experiments` from the flags and conf/injection.toml."""
    job = conf.get("job", {})
    inputs = conf.get("inputs", {})
    return dict(
        out=args.out, variant=args.variant, cache=_cache_root(args),
        manifests_subdir=_pick(args.manifests_subdir,
                               inputs.get("manifests_subdir", "manifests_filtered")),
        manifests_root=args.manifests_root,
        survey_bricks=_pick(args.survey_bricks, inputs.get("survey_bricks") or None),
        metrics_only=args.metrics_only,
        error_threshold=float(_pick(args.error_threshold, job.get("error_threshold", 0.01))),
        off_brick_threshold=float(_pick(args.off_brick_threshold,
                                        job.get("off_brick_threshold", 0.001))),
        partitions=args.partitions,
        tasks_per_partition=int(_pick(args.tasks_per_partition,
                                      job.get("tasks_per_partition", 2000))),
        out_batch_rows=int(job.get("out_batch_rows", 128)),
        fetch=str(_pick(args.fetch, job.get("fetch", "auto"))),
        fetch_auto_fraction=float(job.get("fetch_auto_fraction", 0.5)),
        range_merge_gap=int(job.get("range_merge_gap_bytes", 65536)),
        stamps_zstd_level=int(job.get("stamps_zstd_level", 3)),
        scalar_compression=stamp_writer.check_scalar_compression(
            str(job.get("scalar_compression", "snappy")), "[job] scalar_compression"),
        gc_freeze=_conf_bool(job.get("gc_freeze", True), "[job] gc_freeze"),
        **worker_settings(job),
        resume=bool(getattr(args, "resume", False)),
        file_cell_deg=file_groups.cell_tenths(
            _pick(getattr(args, "file_cell_deg", None), job.get("file_cell_deg", 1.0))) / 10)


def _conf_bool(value, where: str) -> bool:
    """A TOML boolean, else ValueError naming ``where``."""
    if not isinstance(value, bool):
        raise ValueError(f"{where} = {value!r}: expected true or false")
    return value


def worker_settings(job: dict) -> dict:
    """The Python workers' process settings of a ``[job]`` table (conf/injection.toml):
    ``download_threads``, ``lookahead_bricks``, ``lookahead_tasks``, ``malloc_mb``
    (keywords of :func:`run_experiments`), checked with the key named."""
    return dict(
        download_threads=int(job.get("download_threads", 16)),
        lookahead_bricks=_conf_int(job.get("lookahead_bricks", 4), "[job] lookahead_bricks", 0),
        lookahead_tasks=_conf_int(job.get("lookahead_tasks", 32), "[job] lookahead_tasks", 1),
        malloc_mb=python_worker.malloc_mb_from_conf(job))


def _conf_int(value, where: str, least: int) -> int:
    """A TOML integer >= ``least``, else ValueError naming ``where``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{where} = {value!r}: expected an integer >= {least}")
    return value


def _cache_root(args) -> str:
    """--cache, else the cache stage 4b writes by default (one definition: stage_4b's)."""
    if args.cache:
        return args.cache
    from injection_pipeline.stages.stage_4b import load_cache_conf
    configured = load_cache_conf(args.config).get("cache")
    return configured or storage.join_uri(args.out, "coadd_cache")


# =========================================================================== executors
#: format of the per-(experiment, file group) completion markers
#: ``bricks/<experiment>/<group>.json`` (file groups: :mod:`injection_pipeline.file_groups`)
MARKER_FORMAT = "phase4c-group/1"
#: the marker fields a resumed run compares with what it would write (any difference: redo)
MARKER_KEYS = ("format", "experiment_id", "file_group", "grouping", "bricks",
               "injection_config_sha", "code_version", "stamps_stored", "manifest_digest",
               "rows")


@dataclasses.dataclass(frozen=True)
class ExperimentPlan:
    """One experiment of a 4c pass as the workers see it (pickled to the executors)."""

    experiment_id: str
    cfg: inj.InjectionConfig            # store_stamps set for this experiment
    stamps_uri: Optional[str]           # None: metrics only (no stamps written)
    metrics_uri: Optional[str]          # None: metrics rows yielded to the caller (benchmark)
    bricks_uri: Optional[str] = None    # per-group completion markers (None: none written)
    resume: bool = False                # keep a group whose marker matches (--resume)

    def marker_uri(self, group) -> str:
        """The marker of file group ``group`` (its tag, :func:`file_groups.group_tag`)."""
        return storage.join_uri(self.bricks_uri, f"{group}.json")


@dataclasses.dataclass(frozen=True)
class WorkerOptions:
    out_batch_rows: int = 128
    download_threads: int = 4
    stamps_zstd_level: int = 3
    fetch: str = "whole"
    fetch_auto_fraction: float = 0.5
    range_merge_gap: int = 65536
    scalar_compression: str = "snappy"
    #: gc.freeze() at the start of each Spark task ([job] gc_freeze)
    gc_freeze: bool = True
    #: file groups: sky cells of this many tenths of a degree, 0 = one per brick
    #: ([job] file_cell_deg x 10; :mod:`injection_pipeline.file_groups`)
    file_cell_tenths: int = 10
    #: glibc malloc (mmap threshold, trim threshold, top pad) [MB] of the Python worker
    #: ([job] malloc_*_mb; :func:`injection_pipeline.python_worker.tune_malloc`; 0 = default)
    malloc_mb: tuple = python_worker.DEFAULT_MALLOC_MB
    #: brick openings begun ahead of the one being processed, and the most tasks they may
    #: hold ([job] lookahead_bricks / lookahead_tasks; :class:`_Lookahead`)
    lookahead_bricks: int = 4
    lookahead_tasks: int = 32


def _record_schema():
    """The one record per (experiment, brick) the workers hand to Spark."""
    import pyarrow as pa

    return pa.schema([("_x", pa.int32()), ("brickname", pa.string()), ("action", pa.string()),
                      ("rows", pa.int64()), ("opens", pa.int32()),
                      # files of the openings whose head came from the brick's _HEADS
                      # object / from a GET of their own (range reads; brick_heads)
                      ("heads_index", pa.int32()), ("head_gets", pa.int32()),
                      # the file group (its files and marker) the brick's rows went to
                      ("file_group", pa.string())])


def manifest_digest(tasks) -> str:
    """blake2b of manifest rows (every manifest column, in row order): a resumed run redoes a
    group whose manifest rows changed (e.g. 4a rerun)."""
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    for t in tasks:
        h.update(json.dumps([t.get(k) for k in mf.MANIFEST_COLUMN_NAMES], default=repr,
                            separators=(",", ":")).encode())
        h.update(b"\n")
    return h.hexdigest()


def _marker_expect(plan: ExperimentPlan, group: str, bricks, tenths: int) -> dict:
    """What the marker of ``group`` must say: ``bricks`` = [(brickname, tasks), ...] of this
    experiment in the group, in brick order (tasks in task_id order)."""
    return {"format": MARKER_FORMAT, "experiment_id": plan.experiment_id,
            "file_group": group, "grouping": file_groups.describe(tenths),
            "bricks": {b: len(t) for b, t in bricks},
            "injection_config_sha": plan.cfg.config_sha(),
            "code_version": plan.cfg.code_version, "stamps_stored": plan.stamps_uri is not None,
            "manifest_digest": manifest_digest(t for _, ts in bricks for t in ts),
            "rows": sum(len(t) for _, t in bricks)}


def _rel(base: str, uri: str) -> str:
    return uri[len(base.rstrip("/")) + 1:]


def group_is_complete(plan: ExperimentPlan, group: str, expect: dict) -> tuple[bool, Optional[dict]]:
    """(kept, old marker): the group's outputs may be kept when its marker equals ``expect``
    on :data:`MARKER_KEYS` and every file it lists exists with the recorded size (a deleted or
    replaced part file makes the group redone).  Transient storage faults propagate."""
    try:
        doc = json.loads(storage.get_bytes(plan.marker_uri(group)).decode("utf-8"))
    except storage.StorageNotFound:
        return False, None
    except (ValueError, UnicodeDecodeError):
        return False, {}
    if not isinstance(doc, dict):
        return False, {}
    if any(doc.get(k) != expect[k] for k in MARKER_KEYS):
        return False, doc
    files = doc.get("files") or {}
    for kind, base in (("stamps", plan.stamps_uri), ("metrics", plan.metrics_uri)):
        listed = files.get(kind) or {}
        if base is None:
            continue
        if sum(int(v.get("rows", 0)) for v in listed.values()) != expect["rows"]:
            return False, doc
        for rel, info in listed.items():
            try:
                if storage.stat(storage.join_uri(base, rel)).size != int(info["bytes"]):
                    return False, doc
            except storage.StorageNotFound:
                return False, doc
    return True, doc


class _Borrowed:
    """A brick opened once and shared by the experiments of a pass: ``process_brick`` closes
    what its opener returns, so each experiment gets this view, whose ``close`` does nothing
    (the pass closes the brick after its last experiment)."""

    def __init__(self, brick):
        self._brick = brick

    def __getattr__(self, name):
        return getattr(self._brick, name)

    def close(self):
        pass


def _brick_groups(batches, tenths: int):
    """(file group, brickname, [(_x, tasks), ...]) from rows sorted by (_g, brickname, _x,
    task_id); ``_g`` is the driver's :func:`file_groups.spark_group_column`, or, where the
    rows have none (the benchmark's one-core adapter), :func:`file_groups.group_tag`."""
    brick, groups, cur_x, tasks, cur_g = None, [], None, [], None
    for rb in batches:
        for t in rb.to_pylist():
            x = int(t.pop("_x", 0) or 0)
            g = t.pop("_g", None)
            b = t.get("brickname")
            if g is None:
                g = file_groups.group_tag(b, tenths)
            if tasks and (b != brick or g != cur_g):
                groups.append((cur_x, tasks))
                yield cur_g, brick, groups
                groups, tasks = [], []
            elif tasks and x != cur_x:
                groups.append((cur_x, tasks))
                tasks = []
            brick, cur_x, cur_g = b, x, g
            tasks.append(t)
    if tasks:
        groups.append((cur_x, tasks))
        yield cur_g, brick, groups


@dataclasses.dataclass
class _PassEvent:
    """One step of a 4c pass (:func:`_pass_fn`): "group" (a file group starts), "open" (a
    brick opening: ``items`` = [(_x, tasks), ...] of one band set), "end" (the group's
    last brick is done)."""
    kind: str
    group: str
    brick: Optional[str] = None
    items: list = dataclasses.field(default_factory=list)
    n_tasks: int = 0
    todo: dict = dataclasses.field(default_factory=dict)
    recs: list = dataclasses.field(default_factory=list)
    future: object = None
    start: object = None

    def result(self):
        """The opening's result: from the look-ahead pool, or made now (no look-ahead)."""
        if self.future is not None:
            return self.future.result()
        return self.start(self)


class _Lookahead:
    """Yields the events of a pass in order, each "open" event's ``start(event)`` begun on a
    thread pool as soon as the event is read, reading up to ``bricks`` openings ahead of the
    one the caller is processing (and, beyond the first, up to ``tasks`` tasks ahead).

    On S3 a brick opening at the shipped density is ~15 GETs of ~20-50 ms, ~200 ms of wall
    time for ~25 CPU-ms of work: opened in turn, a worker would wait on S3 most of the time.
    Opened ahead, the latency overlaps the work on the bricks before.  ``bricks = 0``: each
    brick is opened in its turn, in the caller's thread.  The task bound keeps dense bricks
    (a whole plane fetched for 170 stamps, ~8 MB per plane) from piling up in memory: the
    cost of those is the CPU, not the latency.  Results do not depend on the look-ahead (the
    same openings, consumed in the same order).  :meth:`close` (always call it) cancels the
    openings not begun and closes the bricks of those done or under way."""

    def __init__(self, events, start, bricks: int, tasks: int):
        import collections

        self._it = iter(events)
        self._start = start
        self.bricks, self.tasks = max(0, int(bricks)), max(1, int(tasks))
        self._q: "collections.deque" = collections.deque()
        self._n = self._t = 0                  # openings / tasks queued ahead
        self._done = False
        self.peak = 0                          # most openings queued ahead at once

    def _fill(self) -> None:
        while not self._done and self._n < self.bricks and (self._n == 0 or
                                                            self._t < self.tasks):
            ev = next(self._it, None)
            if ev is None:
                self._done = True
                break
            if ev.kind == "open":
                ev.future = tile_ranges.process_pool("brick-ahead", self.bricks).submit(
                    self._start, ev)
                self._n += 1
                self._t += ev.n_tasks
                self.peak = max(self.peak, self._n)
            self._q.append(ev)

    def __iter__(self):
        if self.bricks == 0:
            for ev in self._it:
                ev.start = self._start
                yield ev
            return
        self._fill()
        while self._q:
            ev = self._q.popleft()
            if ev.kind == "open":
                self._n -= 1
                self._t -= ev.n_tasks
            self._fill()
            yield ev

    def close(self) -> None:
        while self._q:
            ev = self._q.popleft()
            if ev.kind == "open" and ev.future is not None and not ev.future.cancel():
                try:
                    shared = ev.future.result()[0]
                except BaseException:  # noqa: BLE001 - the pass is failing already
                    continue
                if shared is not None:
                    shared.close()


def _file_groups(batches, tenths: int):
    """(group tag, [(brickname, [(_x, tasks), ...]), ...]) per file group, in input order.  A
    group met again after another one means rows not sorted by group: ValueError (its files
    and marker would be overwritten by the second run of rows)."""
    done: set = set()
    cur, bricks = None, []
    for g, brick, groups in _brick_groups(batches, tenths):
        if bricks and g != cur:
            yield cur, bricks
            done.add(cur)
            bricks = []
        if g in done:
            raise ValueError(f"stage 4c worker: rows of file group {g} (brick {brick}) after "
                             f"other groups: the input must be sorted by group")
        cur = g
        bricks.append((brick, groups))
    if bricks:
        yield cur, bricks


def _bands_of(tasks) -> tuple:
    return tuple(sorted({c for t in tasks for c in str(t.get("bands") or "")
                         if c in inj.BANDS}, key=inj.BANDS.index) or inj.BANDS)


class _GroupOutput:
    """One experiment's outputs of one file group: its stamps and metrics files (one per
    split, :class:`stamp_writer.StampFileWriter`), filled brick after brick, then its marker.
    An older marker of the group is deleted first (never a marker over half-new files);
    files it listed that this run does not write (e.g. a split no longer present) are
    deleted before the new marker is written."""

    def __init__(self, plan: ExperimentPlan, group: str, expect: dict, old, opts, schemas):
        self.plan, self.group, self.expect, self.old = plan, group, expect, old
        self.opts = opts
        self.full_schema, self.metrics_schema = schemas
        if plan.bricks_uri and old is not None:
            storage.delete(plan.marker_uri(group))
        self.with_stamps = plan.stamps_uri is not None
        self.schema = self.full_schema if self.with_stamps else self.metrics_schema
        self.sw = stamp_writer.StampFileWriter(
            plan.stamps_uri, group, self.full_schema, compression_level=opts.stamps_zstd_level,
            binary_columns=inj.STAMP_COLUMN_NAMES, code_version=plan.cfg.code_version,
            scalar_compression=opts.scalar_compression) if self.with_stamps else None
        self.mw = stamp_writer.StampFileWriter(
            plan.metrics_uri, group, self.metrics_schema,
            compression_level=opts.stamps_zstd_level, code_version=plan.cfg.code_version,
            file_format=stamp_writer.METRICS_FORMAT,
            scalar_compression=opts.scalar_compression) if plan.metrics_uri else None
        self.buf: list = []

    def _flush(self):
        t = inj.results_to_table(self.buf, self.schema, self.with_stamps)  # planes not copied
        self.buf.clear()
        if self.sw is not None:
            self.sw.write(t)
            t = t.select(self.metrics_schema.names)
        if self.mw is not None:
            self.mw.write(t)
            return []
        return t.combine_chunks().to_batches()   # scalar columns: one chunk, no copy

    def add(self, results):
        """Buffer one brick's results; yields metrics batches only when the plan has no
        metrics files (the benchmark adapter)."""
        for r in results:
            self.buf.append(r)
            if len(self.buf) >= self.opts.out_batch_rows:
                yield from self._flush()

    def finish(self):
        """Write the last rows, close the files, drop stale ones, write the marker."""
        out = self._flush() if self.buf else []
        files = {}
        for kind, w, base in (("stamps", self.sw, self.plan.stamps_uri),
                              ("metrics", self.mw, self.plan.metrics_uri)):
            if w is not None:
                w.close()
                files[kind] = {_rel(base, u): {"rows": n, "bytes": b}
                               for u, (n, b) in sorted(w.written.items())}
        for kind, base in (("stamps", self.plan.stamps_uri), ("metrics", self.plan.metrics_uri)):
            for rel in ((self.old or {}).get("files") or {}).get(kind) or {}:
                if base is not None and rel not in files.get(kind, {}):
                    storage.delete(storage.join_uri(base, rel))   # e.g. the split changed
        if self.plan.bricks_uri:
            storage.put_bytes(self.plan.marker_uri(self.group), (json.dumps(
                dict(self.expect, files=files), indent=1, sort_keys=True) + "\n").encode())
        return out

    def abort(self):
        for w in (self.sw, self.mw):
            if w is not None:
                w.abort()


def _pass_fn(plans, cache: str, table_bc, opts: WorkerOptions, yield_metrics: bool = False):
    """mapInArrow function of a 4c pass over the bricks of every experiment in ``plans``.

    Input rows: the union of the experiments' manifests with ``_x`` (index into ``plans``) and
    ``_g`` (the brick's file group, :mod:`injection_pipeline.file_groups`), sorted by (_g,
    brickname, _x, task_id).  Per file group and experiment: a group whose outputs are
    complete (``--resume``, :func:`group_is_complete`) is kept; the others get one set of
    files (stamps + metrics per split, :class:`_GroupOutput`) filled brick after brick.  Each
    brick is opened ONCE for all the experiments that need it (one ``CachedBrick`` /
    range-read fetch per brick and band set; the tiles every experiment's stamps touch are
    prefetched together), each experiment's tasks run through ``injection.process_brick`` on
    it, and after the group's last brick each experiment's files are closed and its marker
    written.  Yields one record per (experiment, brick) (:func:`_record_schema`); with
    ``yield_metrics`` (the one-experiment benchmark adapter :func:`_partition_fn`) the
    metrics batches instead."""

    def fn(batches):
        import gc

        import pyarrow as pa

        from injection_pipeline import injection as inj_mod

        table = table_bc.value if table_bc is not None else None
        if opts.gc_freeze:
            # The PySpark daemon runs gc.collect() in the worker after every Spark task, and
            # every full collection scans all ~10^5 tracked objects of the imports (numpy,
            # astropy, pyarrow, fitsio, boto3): 50-250 CPU-ms each.  Freezing what is alive
            # now (the daemon has just collected) moves it out of the collector's sight; the
            # objects of this task are collected as before.  Only a frozen object that later
            # becomes cyclic garbage is never freed (caches here are acyclic or bounded).
            gc.freeze()
        # the worker re-reads every cached zip finder's archive before each task: drop them;
        # malloc thresholds that keep a task's working memory mapped (python_worker)
        drop_zip_importer_caches()
        tune_malloc(*opts.malloc_mb)
        schemas = (inj_mod.output_arrow_schema(True), inj_mod.output_arrow_schema(False))
        rec_schema = _record_schema()
        tenths = opts.file_cell_tenths

        def opener_for(brick, bands, cfg, counter):
            def opener():
                counter[0] += 1
                try:
                    inj_mod.dr10.validate_brickname(brick)
                except ValueError as exc:
                    raise inj_mod.BrickUnavailable("invalid_task", str(exc)) from None
                cb = inj_mod.CachedBrick.open(
                    cache, brick, list(bands), use_psfsize_maps=cfg.use_psfsize_maps,
                    table_psf=table.get(brick) if table is not None else None, download_threads=opts.download_threads,
                    fetch=opts.fetch, fetch_auto_fraction=opts.fetch_auto_fraction,
                    range_merge_gap=opts.range_merge_gap)
                counter[1] += cb.heads_from_index
                counter[2] += cb.head_gets
                return cb
            return opener

        def open_ahead(brick, items):
            """One brick opened for every experiment of ``items`` and its stamps' compressed
            tiles fetched (all experiments' at once; decompressed later, in its turn).
            Returns (brick or None, the opening's exception or None, counter, exception of
            the tile fetch or None); never raises (run on the look-ahead pool)."""
            counter = [0, 0, 0]                  # openings, heads from _HEADS, head GETs
            opener = opener_for(brick, _bands_of(items[0][1]), plans[items[0][0]].cfg, counter)
            try:
                shared = opener()
            except Exception as exc:  # noqa: BLE001 - each experiment maps it (process_brick)
                return None, exc, counter, None
            try:
                regions: dict = {}
                for x, tasks in items:
                    pix = inj_mod.task_pixels(shared.wcs, tasks)
                    for k, r in inj_mod.stamp_regions(tasks, pix, shared,
                                                      plans[x].cfg).items():
                        regions.setdefault(k, []).extend(r)
                shared.fetch_tiles(regions)
            except Exception as exc:  # noqa: BLE001 - transient: re-raised in its turn;
                return shared, None, counter, exc   # others: process_brick meets them again
            return shared, None, counter, None

        def record(x, brick, group, action, rows, counter=(0, 0, 0)):
            return {"_x": x, "brickname": brick, "action": action, "rows": rows,
                    "opens": counter[0], "heads_index": counter[1], "head_gets": counter[2],
                    "file_group": group}

        def events():
            """The pass in order: per file group a "group" event (the experiments whose
            outputs it needs, the records of those kept by --resume), one "open" event per
            brick opening (per brick and band set, normally one), an "end" event."""
            for group, bricks in _file_groups(batches, tenths):
                per_x: dict = {}             # experiment -> [(brick, tasks), ...] of the group
                for brick, groups in bricks:
                    for x, tasks in groups:
                        per_x.setdefault(x, []).append((brick, tasks))
                todo, kept_recs = {}, []
                for x, items in per_x.items():
                    plan = plans[x]
                    expect = (_marker_expect(plan, group, items, tenths) if plan.bricks_uri
                              else {})
                    old = None
                    if plan.resume and plan.bricks_uri:
                        kept, old = group_is_complete(plan, group, expect)
                        if kept:
                            kept_recs += [record(x, b, group, "kept", len(t)) for b, t in items]
                            continue
                    todo[x] = (expect, old)
                yield _PassEvent("group", group, todo=todo, recs=kept_recs)
                for brick, groups in bricks:
                    by_bands: dict = {}
                    for x, tasks in groups:
                        if x in todo:
                            by_bands.setdefault(_bands_of(tasks), []).append((x, tasks))
                    for items in by_bands.values():
                        yield _PassEvent("open", group, brick=brick, items=items,
                                         n_tasks=sum(len(t) for _, t in items))
                yield _PassEvent("end", group)

        ahead = _Lookahead(events(), lambda ev: open_ahead(ev.brick, ev.items),
                           opts.lookahead_bricks, opts.lookahead_tasks)
        outputs: dict = {}
        recs: list = []
        try:
            for ev in ahead:
                if ev.kind == "group":
                    recs = list(ev.recs)
                    for x, (expect, old) in ev.todo.items():
                        outputs[x] = _GroupOutput(plans[x], ev.group, expect, old, opts,
                                                  schemas)
                elif ev.kind == "open":
                    shared, failure, counter, fetch_exc = ev.result()
                    try:
                        if fetch_exc is not None and storage.is_transient(fetch_exc):
                            raise fetch_exc          # Spark retries the task

                        one = len(ev.items) == 1  # the brick itself: process_brick closes
                                                  # it (CachedBrick.close is idempotent)

                        def borrowed(shared=shared, failure=failure, one=one):
                            if failure is not None:
                                raise failure
                            return shared if one else _Borrowed(shared)
                        first = True
                        for x, tasks in ev.items:
                            results = inj_mod.process_brick(tasks, borrowed, plans[x].cfg)
                            for b in outputs[x].add(results):
                                if yield_metrics:
                                    yield b
                            recs.append(record(x, ev.brick, ev.group, "done", len(tasks),
                                               counter if first else (0, 0, 0)))
                            first = False
                    finally:
                        if shared is not None:
                            shared.close()
                else:                                # the group's last brick is done
                    for x in sorted(outputs):
                        tail = outputs[x].finish()
                        del outputs[x]
                        for b in tail:
                            if yield_metrics:
                                yield b
                    if recs and not yield_metrics:
                        yield pa.RecordBatch.from_pylist(recs, schema=rec_schema)
                    recs = []
        except BaseException:
            for out in outputs.values():
                out.abort()
            raise
        finally:
            ahead.close()
    return fn


def _partition_fn(cfg: inj.InjectionConfig, cache: str, table_bc, with_stamps: bool,
                  out_batch_rows: int, download_threads: int, stamps_uri: Optional[str] = None,
                  stamps_zstd_level: int = 3, fetch: str = "whole",
                  fetch_auto_fraction: float = 0.5, range_merge_gap: int = 65536,
                  scalar_compression: str = "snappy", file_cell_tenths: int = 10,
                  lookahead_bricks: int = 4, lookahead_tasks: int = 32):
    """One experiment through the stage's worker (:func:`_pass_fn`), its metrics batches
    yielded instead of written (what ``benchmarks/bench_stage_4c.py`` times on one core):
    stamps written per file group to ``stamps_uri`` as the stage does, no markers.  Rows
    without ``_g`` get :func:`file_groups.group_tag` (they must be sorted by it)."""
    plan = ExperimentPlan("bench", dataclasses.replace(cfg, store_stamps=with_stamps),
                          stamps_uri if with_stamps else None, None)
    return _pass_fn([plan], cache, table_bc, WorkerOptions(
        out_batch_rows, download_threads, stamps_zstd_level, fetch, fetch_auto_fraction,
        range_merge_gap, scalar_compression, file_cell_tenths=file_cell_tenths,
        lookahead_bricks=lookahead_bricks, lookahead_tasks=lookahead_tasks),
        yield_metrics=True)


# =========================================================================== driver
def _bricks_table_psf(survey_bricks: Optional[str]):
    """(:class:`psf_fallback.BricksPSFTable` of every brick of the survey-bricks table, or
    None, and a status note) from its psfsize_<band> columns.  The whole table is read on the
    driver (DR10 South: ~350k rows, ~10 MB as broadcast): no list of the manifests' bricks is
    collected for it.  A table without psfsize columns (e.g. the all-sky survey-bricks.fits.gz
    instead of south/survey-bricks-dr10-south.fits.gz) skips the level with a warning."""
    if not survey_bricks:
        return None, "no survey-bricks table given: bricks_table level skipped"
    from injection_pipeline import dr10
    from injection_pipeline.psf_fallback import BricksPSFTable

    with storage.download_to_temp(survey_bricks) as path:
        try:
            t = dr10.read_survey_bricks(path, extra_columns=[f"psfsize_{b}" for b in dr10.BANDS])
        except ValueError as exc:
            LOG.warning("%s: no psfsize_<band> columns (%s): bricks_table PSF level skipped; "
                        "DR10's per-brick psfsize is in south/survey-bricks-dr10-south.fits.gz",
                        survey_bricks, str(exc).splitlines()[0][:200])
            return None, f"{survey_bricks}: no psfsize_<band> columns"
    import numpy as np
    table = BricksPSFTable(t["brickname"],
                           np.stack([t[f"psfsize_{b}"] for b in dr10.BANDS], axis=1),
                           tuple(dr10.BANDS))
    return table, f"{survey_bricks}: psfsize_<band> of {len(table)} bricks"


def metrics_columns() -> list:
    return list(mf.MANIFEST_COLUMN_NAMES) + list(inj.RESULT_COLUMN_NAMES)


def check_manifest_schema(spark_schema, where: str) -> None:
    """Names and types of a manifest against ``manifests.manifest_schema()``, before any
    work: ValueError naming every missing column and every column of another type (the
    Spark type found and the one expected), instead of an Arrow cast error on an executor
    that names neither.  Extra columns are allowed (they are not read)."""
    from pyspark.sql.pandas.types import from_arrow_type

    found = {f.name: f.dataType for f in spark_schema.fields}
    missing, wrong = [], []
    for field in mf.manifest_schema():
        if field.name not in found:
            missing.append(field.name)
            continue
        want = from_arrow_type(field.type)
        if found[field.name] != want:
            wrong.append(f"{field.name}: {found[field.name].simpleString()} (expected "
                         f"{want.simpleString()})")
    if missing or wrong:
        parts = ([f"missing column(s) {missing}"] if missing else []) + \
                ([f"column(s) of the wrong type: {'; '.join(wrong)}"] if wrong else [])
        raise ValueError(f"{where}: not a phase-4a manifest: {'; '.join(parts)} "
                         f"(docs/manifests.md)")


@dataclasses.dataclass
class _Prepared:
    """An experiment whose manifest passed the up-front checks."""

    experiment_id: str
    manifest_uri: str
    man: object                 # Spark DataFrame of the manifest columns
    n_tasks: int
    n_bricks: int
    n_groups: int               # file groups (file_groups) its bricks fall in
    plan: ExperimentPlan


def _prepare(spark, cfg, eid: str, in_root: str, root: str, metrics_only: str,
             resume: bool, tenths: int = 10) -> _Prepared:
    """Read and check one experiment's manifest (a pass over the manifest, not the results)."""
    from pyspark.sql import functions as F

    manifest_uri = storage.join_uri(in_root, eid)
    man = spark.read.parquet(spark_path(manifest_uri))
    check_manifest_schema(man.schema, manifest_uri)
    man = man.select(*mf.MANIFEST_COLUMN_NAMES)
    head = man.agg(F.count(F.lit(1)).alias("n"), F.countDistinct("task_id").alias("ids"),
                   F.countDistinct("brickname").alias("bricks"),
                   F.countDistinct(file_groups.spark_group_column(F.col("brickname"), tenths))
                   .alias("groups"),
                   F.collect_set("metrics_only").alias("mo")).first()
    n_tasks, n_bricks = int(head["n"]), int(head["bricks"])
    if n_tasks == 0:
        raise RuntimeError(f"{manifest_uri}: empty manifest")
    if head["ids"] != n_tasks:
        raise RuntimeError(f"{manifest_uri}: task_id not unique ({n_tasks} rows, "
                           f"{head['ids']} ids)")
    if metrics_only == "auto":
        with_stamps = not any(bool(x) for x in head["mo"])
    else:
        with_stamps = metrics_only == "no"
    plan = ExperimentPlan(
        eid, dataclasses.replace(cfg, store_stamps=with_stamps),
        storage.join_uri(root, "stamps", eid) if with_stamps else None,
        storage.join_uri(root, "metrics", eid), storage.join_uri(root, "bricks", eid),
        resume=resume)
    return _Prepared(eid, manifest_uri, man, n_tasks, n_bricks, int(head["groups"]), plan)


def _reset_outputs(p: _Prepared, root: str) -> None:
    """Before the pass: no _SUCCESS survives a run that changes files; a clean run clears the
    experiment's stamps, metrics and markers (overwrite semantics), a resumed one keeps them
    (but never stamps of a run that is now metrics-only)."""
    stamps = storage.join_uri(root, "stamps", p.experiment_id)
    for d in (stamps, p.plan.metrics_uri):
        storage.delete(storage.join_uri(d, "_SUCCESS"))
    if not p.plan.resume or p.plan.stamps_uri is None:
        stamp_writer.clear(stamps)
    if not p.plan.resume:
        stamp_writer.clear(p.plan.metrics_uri)
        stamp_writer.clear(p.plan.bricks_uri)


_PART_RE = re.compile(r"split=([^/]+)/part-([^/]+)\.zstd\.parquet")


def _remove_orphans(p: _Prepared, expected: set) -> int:
    """--resume: delete the part files and markers of an experiment that belong to no
    (split, brick) of its manifest (a brick dropped from it, files of an older layout), so
    the dataset holds exactly the manifest's bricks.  Returns the number of objects deleted."""
    n = 0
    tags = {t for _, t in expected}
    for base in (p.plan.stamps_uri, p.plan.metrics_uri):
        if base is None:
            continue
        for info in list(storage.list_objects(storage.join_uri(base, ""))):
            rel = _rel(base, info.uri)
            if rel.rsplit("/", 1)[-1].startswith((".", "_")):
                continue                     # _SUCCESS, temporaries (swept separately)
            m = _PART_RE.fullmatch(rel)
            if m and (m.group(1), m.group(2)) in expected:
                continue
            storage.delete(info.uri)
            n += 1
    for info in list(storage.list_objects(storage.join_uri(p.plan.bricks_uri, ""))):
        name = _rel(p.plan.bricks_uri, info.uri)
        if name.startswith((".", "_")) or (name.endswith(".json") and name[:-5] in tags):
            continue
        storage.delete(info.uri)
        n += 1
    return n


def run_experiments(spark, cfg: inj.InjectionConfig, experiment_ids, *, out: str, cache: str,
                    variant: str = "default", manifests_subdir: str = "manifests_filtered",
                    manifests_root: Optional[str] = None, survey_bricks: Optional[str] = None,
                    metrics_only: str = "auto", error_threshold: float = 0.01,
                    off_brick_threshold: float = 0.001, partitions: Optional[int] = None,
                    tasks_per_partition: int = 2000, out_batch_rows: int = 128,
                    download_threads: int = 4, fetch: str = "auto",
                    fetch_auto_fraction: float = 0.5, range_merge_gap: int = 65536,
                    output_variant: Optional[str] = None, stamps_zstd_level: int = 3,
                    scalar_compression: str = "snappy", gc_freeze: bool = True,
                    resume: bool = False, file_cell_deg: float = 1.0,
                    malloc_mb: tuple = python_worker.DEFAULT_MALLOC_MB,
                    lookahead_bricks: int = 4,
                    lookahead_tasks: int = 32) -> dict:
    """Stage 4c for several experiments in ONE pass over their bricks.

    Returns ``{experiment_id: summary dict, or the exception that failed it}``.  An
    experiment whose manifest is absent or malformed, or whose written output fails the
    accounting check, fails alone; a failure of the shared pass itself (e.g. storage down
    after Spark's retries) fails every experiment of the pass.  Each summary's
    ``exit_code`` is 0, or 2 (error / off_brick fraction above its threshold).
    ``output_variant`` (default ``variant``) names <out>/phase4c/<output_variant>/.
    ``resume``: keep the file groups whose outputs are complete and made with this config
    sha, code version, grouping and manifest rows; redo the others (docs/injection.md
    "Output files and resume").  ``file_cell_deg``: the bricks of one sky cell of this size
    [deg] share their output files and marker (:mod:`injection_pipeline.file_groups`; 0 = one
    file per brick).  ``malloc_mb``: the Python workers' glibc malloc thresholds
    (:func:`injection_pipeline.python_worker.tune_malloc`).  ``lookahead_bricks`` /
    ``lookahead_tasks``: brick openings each worker begins ahead of its turn
    (:class:`_Lookahead`; no effect on the outputs).
    """
    from pyspark.sql import functions as F
    from pyspark.sql.pandas.types import from_arrow_schema

    t0 = time.perf_counter()
    tenths = file_groups.cell_tenths(file_cell_deg)
    in_root = manifests_root or storage.join_uri(out, "phase4a", variant, manifests_subdir)
    root = storage.join_uri(out, "phase4c", output_variant or variant)
    check_spark_filesystem(spark, root)
    results: dict = {}
    preps: list[_Prepared] = []
    for eid in experiment_ids:
        try:
            preps.append(_prepare(spark, cfg, eid, in_root, root, metrics_only, resume,
                                  tenths))
        except Exception as exc:  # noqa: BLE001 - this experiment fails alone (exit 3)
            LOG.error("%s: stage 4c FAILED (exit %d): %s: %s", eid, EXIT_FAILED,
                      type(exc).__name__, exc, exc_info=exc)
            results[eid] = exc
    if not preps:
        return results
    n_tasks = sum(p.n_tasks for p in preps)
    n_groups = max(p.n_groups for p in preps)        # <= the distinct groups of the pass
    # one file group never spans two partitions; at least one partition per core when the
    # groups allow
    n_parts = partitions or max(1, min(n_groups, max(
        spark.sparkContext.defaultParallelism, math.ceil(n_tasks / max(1, tasks_per_partition)))))
    LOG.info("==== stage 4c: %d experiment(s) in one pass over their bricks -> %s (cache %s)"
             "%s ====", len(preps), root, cache, " RESUME" if resume else "")
    for p in preps:
        LOG.info("%s: %s: %d tasks on %d bricks in %d file groups (%s); stamps %s",
                 p.experiment_id, p.manifest_uri, p.n_tasks, p.n_bricks, p.n_groups,
                 file_groups.describe(tenths), "stored" if p.plan.stamps_uri else
                 "NOT stored (metrics only)")
    LOG.info("%d tasks -> %d partitions; PSF %s%s; config %s", n_tasks, n_parts,
             cfg.psf_model, f" beta={cfg.moffat_beta} (NEA-matched to the psfsize Gaussian)"
             if cfg.psf_model == "moffat" else " (FWHM = psfsize)", cfg.config_sha())
    union = None
    for i, p in enumerate(preps):
        d = p.man.withColumn("_x", F.lit(i).cast("int"))
        union = d if union is None else union.unionByName(d)
    union = union.withColumn("_g", file_groups.spark_group_column(F.col("brickname"), tenths))
    expected: dict = {}
    if resume:     # a pass over the manifests (not the results): the files that must exist
        rows = union.select("_x", "split", "_g").distinct().collect()
        for r in rows:
            expected.setdefault(r["_x"], set()).add((str(r["split"]), r["_g"]))
    table_bc = None
    table, table_note = _bricks_table_psf(survey_bricks)
    if table is not None:
        table_bc = spark.sparkContext.broadcast(table)
    LOG.info("PSF fallback table: %s", table_note)
    for p in preps:
        _reset_outputs(p, root)
    opts = WorkerOptions(out_batch_rows, download_threads, stamps_zstd_level, fetch,
                         fetch_auto_fraction, range_merge_gap, scalar_compression, gc_freeze,
                         tenths, tuple(malloc_mb), int(lookahead_bricks),
                         int(lookahead_tasks))
    # range partitioning on the file group: every group (so every brick) in one partition (as
    # with hash partitioning) but partitions balanced by task count from a sample (hashing k
    # keys into n partitions collides: 2 in 2 partitions share one with probability 1/2, and
    # at ~12 per partition counts vary by ~30 %); within a group brick after brick, within a
    # brick the experiments one after the other, each in task_id order (a paired control
    # right after its injection).  Output rows are identical on any partitioning.
    records = (union.repartitionByRange(n_parts, "_g")
               .sortWithinPartitions("_g", "brickname", "_x", "task_id")
               .mapInArrow(_pass_fn([p.plan for p in preps], cache, table_bc, opts),
                           from_arrow_schema(_record_schema())))
    done = F.col("action") == "done"
    t1 = time.perf_counter()
    try:                     # the one and only computation: workers write, Spark counts
        per_exp = {r["_x"]: r for r in records.groupBy("_x").agg(
            F.count(F.when(done, 1)).alias("bricks_done"),
            F.count(F.when(~done, 1)).alias("bricks_kept"),
            F.countDistinct(F.when(done, F.col("file_group"))).alias("groups_done"),
            F.countDistinct(F.when(~done, F.col("file_group"))).alias("groups_kept"),
            F.coalesce(F.sum(F.when(done, F.col("rows"))), F.lit(0)).alias("tasks_done"),
            F.coalesce(F.sum(F.when(~done, F.col("rows"))), F.lit(0)).alias("tasks_kept"),
            F.sum("opens").alias("opens"),
            F.sum("heads_index").alias("heads_index"),
            F.sum("head_gets").alias("head_gets"),
            F.slice(F.sort_array(F.collect_list(F.when(done, F.col("brickname")))), 1, 20)
            .alias("sample")).collect()}
    except Exception as exc:  # noqa: BLE001 - the shared pass failed: every experiment fails
        LOG.error("stage 4c pass FAILED for %s (exit %d): %s: %s",
                  ", ".join(p.experiment_id for p in preps), EXIT_FAILED, type(exc).__name__,
                  str(exc)[:2000])
        for p in preps:
            results[p.experiment_id] = exc
        return results
    finally:
        if table_bc is not None:
            table_bc.unpersist()
    t_inject = time.perf_counter() - t1
    opens_total = int(sum((r["opens"] or 0) for r in per_exp.values()))
    heads_index = int(sum((r["heads_index"] or 0) for r in per_exp.values()))
    head_gets = int(sum((r["head_gets"] or 0) for r in per_exp.values()))
    if head_gets:
        LOG.warning("pass: %d file head(s) read by their own GET, %d from the bricks' _HEADS "
                    "objects (a cache of an older 4b, or a _HEADS not matching its _SUCCESS: "
                    "rerun 4b2 --repair to add them; docs/cache.md)", head_gets, heads_index)
    LOG.info("pass: %d brick opening(s) for %d experiment(s) in %.1f s", opens_total,
             len(preps), t_inject)
    house: dict = {}
    for i, p in enumerate(preps):
        orphans = _remove_orphans(p, expected.get(i, set())) if resume else 0
        swept = sum(stamp_writer.sweep_dead_temps(d) for d in (
            p.plan.stamps_uri, p.plan.metrics_uri, p.plan.bricks_uri) if d)
        house[i] = (orphans, swept)
    from injection_pipeline.coadd_cache import temp_dir
    storage.sweep_dead_temps(temp_dir())       # node-local temporaries of dead processes here

    summaries = summarise_experiments(spark, preps, error_threshold, off_brick_threshold)
    for i, p in enumerate(preps):
        eid = p.experiment_id
        s = summaries[eid]
        if isinstance(s, BaseException):
            LOG.error("%s: stage 4c FAILED (exit %d): %s: %s", eid, EXIT_FAILED,
                      type(s).__name__, s)
            results[eid] = s
            continue
        r = per_exp.get(i)
        cfg_e = p.plan.cfg
        s["resume"] = {
            "enabled": resume, "bricks_redone": int(r["bricks_done"]) if r else 0,
            "bricks_kept": int(r["bricks_kept"]) if r else 0,
            "groups_redone": int(r["groups_done"]) if r else 0,
            "groups_kept": int(r["groups_kept"]) if r else 0,
            "tasks_redone": int(r["tasks_done"]) if r else 0,
            "tasks_kept": int(r["tasks_kept"]) if r else 0,
            "redone_bricks_sample": list(r["sample"]) if r else [],
            "orphan_files_removed": house[i][0], "dead_temporaries_removed": house[i][1]}
        s["pass"] = {"experiments": [q.experiment_id for q in preps], "partitions": n_parts,
                     "file_grouping": file_groups.describe(tenths), "file_groups": p.n_groups,
                     "brick_openings": opens_total, "file_heads_from_index": heads_index,
                     "file_head_gets": head_gets, "summary_spark_actions": SUMMARY_ACTIONS}
        success = {"experiment_id": eid, "rows": p.n_tasks, "code_version": cfg_e.code_version,
                   "injection_config_sha": cfg_e.config_sha()}
        if p.plan.stamps_uri:
            storage.put_bytes(storage.join_uri(p.plan.stamps_uri, "_SUCCESS"), (json.dumps(
                dict(success, format=stamp_writer.FORMAT), indent=1) + "\n").encode())
        storage.put_bytes(storage.join_uri(p.plan.metrics_uri, "_SUCCESS"), (json.dumps(
            dict(success, format=stamp_writer.METRICS_FORMAT), indent=1) + "\n").encode())
        s.update({
            "experiment_id": eid,
            "written_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "manifest_path": p.manifest_uri, "cache": cache,
            "stamps_path": p.plan.stamps_uri, "metrics_path": p.plan.metrics_uri,
            "bricks_path": p.plan.bricks_uri, "stamps_stored": p.plan.stamps_uri is not None,
            "partitions": n_parts, "bricks": p.n_bricks,
            "code_version": cfg_e.code_version, "injection_config": cfg_e.hashed_dict(),
            "injection_config_sha": cfg_e.config_sha(), "psf_table": table_note,
            "seconds_inject_and_write": round(t_inject, 3),
            "seconds_total": round(time.perf_counter() - t0, 3),
        })
        storage.put_bytes(storage.join_uri(root, "summaries", f"{eid}.json"),
                          (json.dumps(s, indent=1, default=str) + "\n").encode())
        print(format_summary(s), flush=True)
        if s["error_fraction"] > error_threshold:
            LOG.error("%s: %.2f%% of tasks failed (> threshold %.2f%%); top reasons:\n%s",
                      eid, 100 * s["error_fraction"], 100 * error_threshold,
                      "\n".join(f"  {x['count']:8d}  {x['status']}: {x['status_reason']}"
                                for x in s["top_failure_reasons"]))
        if s["off_brick_fraction"] > off_brick_threshold:
            LOG.error("%s: %.2f%% of tasks are off_brick (> threshold %.2f%%): real DR10 "
                      "targets lie well inside their brick; check the manifest's brickname/ra/"
                      "dec and the stamp size (--off-brick-threshold)", eid,
                      100 * s["off_brick_fraction"], 100 * off_brick_threshold)
        results[eid] = s
    return results


def run_stage_4c(spark, cfg: inj.InjectionConfig, *, experiment_id: str, **kwargs) -> dict:
    """Stage 4c for one experiment (:func:`run_experiments` with one id); returns its summary
    (also written as JSON) and raises what failed it (e.g. RuntimeError when the task
    accounting of the written output is not exact)."""
    res = run_experiments(spark, cfg, [experiment_id], **kwargs)[experiment_id]
    if isinstance(res, BaseException):
        raise res
    return res


def status_fractions(by_status: dict, n_tasks: int) -> tuple[float, float]:
    """(fraction of tasks neither ok nor off_brick, fraction off_brick); (0, 0) for none."""
    if not n_tasks:
        return 0.0, 0.0
    failed = sum(v for k, v in by_status.items() if k not in inj.TOLERATED_STATUSES)
    return failed / n_tasks, by_status.get("off_brick", 0) / n_tasks


def exit_code_for(by_status: dict, n_tasks: int, error_threshold: float,
                  off_brick_threshold: float) -> int:
    """2 when the fraction of tasks neither ok nor off_brick exceeds ``error_threshold`` or
    the off_brick fraction exceeds ``off_brick_threshold``; else 0."""
    frac, off_frac = status_fractions(by_status, n_tasks)
    return EXIT_TOO_MANY_ERRORS if (frac > error_threshold or
                                    off_frac > off_brick_threshold) else 0


#: Spark actions of :func:`summarise_experiments` over the written results, whatever the
#: number of experiments (issue 16: <= 3)
SUMMARY_ACTIONS = 2
QUANTILE_COLUMNS = ("arc_snr", "arc_snr_region", "mu_total", "mu_point", "image1_mu", "n_images",
                    "image_sep_max_arcsec", "psf_fwhm_used_g", "psf_fwhm_used_r",
                    "psf_fwhm_used_z")
QUANTILE_PROBS = (0.05, 0.25, 0.5, 0.75, 0.95)
#: relative error of the quantiles (percentile_approx accuracy = 1 / this)
QUANTILE_RELATIVE_ERROR = 1e-3
SUMMARY_JOB_GROUP = "phase4c-summary"


def _read_output(spark, uri: Optional[str], with_stamps: bool):
    """A written 4c dataset with its known schema (no schema-inference job); None if absent."""
    from pyspark.sql.pandas.types import from_arrow_schema

    if uri is None:
        return None
    schema = from_arrow_schema(inj.output_arrow_schema(with_stamps))
    try:
        return spark.read.schema(schema).parquet(spark_path(uri))
    except Exception as exc:  # noqa: BLE001 - no file at all: an empty dataset (a mismatch)
        LOG.warning("%s: not readable (%s: %s): counted as empty", uri, type(exc).__name__,
                    str(exc)[:200])
        return None


def summarise_experiments(spark, preps, error_threshold: float,
                          off_brick_threshold: float = 0.001) -> dict:
    """Accounting and summaries of every experiment of a pass from the WRITTEN metrics and
    stamps (never re-computed), in :data:`SUMMARY_ACTIONS` = 2 Spark actions in all:

    1. accounting + quantiles: the manifest task ids full-outer-joined with the task ids of
       the metrics and of the stamps files (rows and distinct ids written, ids missing /
       extra), beside ``percentile_approx`` of :data:`QUANTILE_COLUMNS` and the counts over
       ok injections, one row per experiment;
    2. counts: every row exploded into its keys (split x role x status; status x reason for
       failures, top 10 kept by a window; psf_source_<b> of ok rows), one aggregation.

    Returns ``{experiment_id: summary, or the RuntimeError of an inexact accounting}``.
    """
    from functools import reduce

    from pyspark.sql import Window
    from pyspark.sql import functions as F

    def union(dfs):
        dfs = [d for d in dfs if d is not None]
        return reduce(lambda a, b: a.unionByName(b), dfs) if dfs else None

    sc = spark.sparkContext
    sc.setLocalProperty("spark.jobGroup.id", SUMMARY_JOB_GROUP)
    sc.setLocalProperty("spark.job.description", "stage 4c summary")
    try:
        ids_in = union([p.man.select(F.lit(i).cast("int").alias("_x"), "task_id")
                        for i, p in enumerate(preps)]).withColumn("_in", F.lit(1))
        mets = []
        for i, p in enumerate(preps):
            d = _read_output(spark, p.plan.metrics_uri, False)
            if d is not None:
                mets.append(d.withColumn("_x", F.lit(i).cast("int")))
        stamps = []
        for i, p in enumerate(preps):
            d = _read_output(spark, p.plan.stamps_uri, True)
            if d is not None:
                stamps.append(d.select(F.lit(i).cast("int").alias("_x"), "task_id"))
        m = union(mets)
        if m is None:       # nothing readable: every experiment's accounting fails below
            m = spark.createDataFrame([], _metrics_spark_schema().add("_x", "int"))
        key = ["_x", "task_id"]
        acc = ids_in.join(m.groupBy(*key).agg(F.count(F.lit(1)).alias("_nm")), key, "full_outer")
        st = union(stamps)
        if st is not None:
            acc = acc.join(st.groupBy(*key).agg(F.count(F.lit(1)).alias("_ns")), key,
                           "full_outer")
        else:
            acc = acc.withColumn("_ns", F.lit(None).cast("long"))
        acc = acc.groupBy("_x").agg(
            F.coalesce(F.sum("_nm"), F.lit(0)).alias("rows_written"),
            F.count("_nm").alias("distinct_written"),
            F.count(F.when(F.col("_in").isNotNull() & F.col("_nm").isNull(), 1)).alias("missing"),
            F.count(F.when(F.col("_in").isNull() & F.col("_nm").isNotNull(), 1)).alias("extra"),
            F.coalesce(F.sum("_ns"), F.lit(0)).alias("stamps_rows"),
            F.count("_ns").alias("stamps_ids"))
        ok_inj = m.filter((F.col("status") == "ok") & (F.col("is_control") == 0))
        acc_q = int(round(1 / QUANTILE_RELATIVE_ERROR))
        probs = F.array(*[F.lit(q) for q in QUANTILE_PROBS])
        quant = ok_inj.groupBy("_x").agg(
            F.count(F.lit(1)).alias("ok_n"), F.count("mu_total").alias("ok_mu"),
            *[F.percentile_approx(F.when(~F.isnan(F.col(c)), F.col(c)), probs, acc_q)
              .alias(f"q_{c}") for c in QUANTILE_COLUMNS])
        pass1 = {r["_x"]: r for r in acc.join(quant, "_x", "left").collect()}   # action 1

        tolerated = F.col("status").isin(*inj.TOLERATED_STATUSES)
        ok = F.col("status") == "ok"

        def key_of(kind, a=None, b=None, c=None, when=None):
            s = F.struct(F.lit(kind).alias("k"), F.lit(a).cast("string").alias("a")
                         if a is None else a.cast("string").alias("a"),
                         F.lit(b).cast("string").alias("b") if b is None
                         else b.cast("string").alias("b"),
                         F.lit(c).cast("string").alias("c") if c is None
                         else c.cast("string").alias("c"))
            return s if when is None else F.when(when, s)
        keys = F.array(key_of("split", F.col("split"), F.col("is_control"), F.col("status")),
                       key_of("fail", F.col("status"), F.col("status_reason"), when=~tolerated),
                       *[key_of(f"psf_{b}", F.col(f"psf_source_{b}"), when=ok)
                         for b in inj.BANDS])
        counts = (m.select("_x", F.explode(keys).alias("e")).filter(F.col("e").isNotNull())
                  .groupBy("_x", "e.k", "e.a", "e.b", "e.c").count())
        rank = F.row_number().over(Window.partitionBy("_x", "k").orderBy(
            F.desc("count"), F.col("a").asc_nulls_first(), F.col("b").asc_nulls_first()))
        pass2 = (counts.withColumn("_rank", rank)
                 .filter((F.col("k") != "fail") | (F.col("_rank") <= 10)).collect())  # action 2
    finally:
        sc.setLocalProperty("spark.jobGroup.id", None)
        sc.setLocalProperty("spark.job.description", None)

    out: dict = {}
    for i, p in enumerate(preps):
        r = pass1.get(i)
        n_tasks = p.n_tasks
        get = (lambda k: int(r[k] or 0)) if r is not None else (lambda k: 0)
        accounting = {"tasks_in_manifest": n_tasks, "rows_written": get("rows_written"),
                      "distinct_task_ids_written": get("distinct_written"),
                      "manifest_tasks_missing_from_output": get("missing"),
                      "output_tasks_not_in_manifest": get("extra")}
        accounting["exact"] = (accounting["rows_written"] == n_tasks
                               and accounting["distinct_task_ids_written"] == n_tasks
                               and accounting["manifest_tasks_missing_from_output"] == 0
                               and accounting["output_tasks_not_in_manifest"] == 0)
        if p.plan.stamps_uri is not None:
            accounting["stamps_rows_written"] = get("stamps_rows")
            accounting["stamps_distinct_task_ids"] = get("stamps_ids")
            accounting["stamps_exact"] = (accounting["stamps_rows_written"] == n_tasks
                                          == accounting["stamps_distinct_task_ids"])
        by_status: dict = {}
        by_split: dict = {}
        top, psf = [], {b: {} for b in inj.BANDS}
        for c in pass2:
            if c["_x"] != i:
                continue
            if c["k"] == "split":
                by_status[c["c"]] = by_status.get(c["c"], 0) + c["count"]
                d = by_split.setdefault(c["a"], {})
                key = f"{'control' if c['b'] in ('1', 'true') else 'injection'}:{c['c']}"
                d[key] = d.get(key, 0) + c["count"]
            elif c["k"] == "fail":
                top.append((c["_rank"], {"status": c["a"], "status_reason": c["b"],
                                         "count": int(c["count"])}))
            else:
                psf[c["k"][4:]][c["a"]] = int(c["count"])
        frac, off_frac = status_fractions(by_status, n_tasks)
        quant = {}
        for col in QUANTILE_COLUMNS:
            q = r[f"q_{col}"] if r is not None and r["ok_n"] is not None else None
            quant[col] = dict(zip([f"p{int(x * 100)}" for x in QUANTILE_PROBS], q)) if q else {}
        summary = {
            "accounting": accounting, "by_status": dict(sorted(by_status.items())),
            "by_split": {k: dict(sorted(v.items())) for k, v in sorted(by_split.items())},
            "error_fraction": frac, "error_threshold": error_threshold,
            "off_brick_fraction": off_frac, "off_brick_threshold": off_brick_threshold,
            "top_failure_reasons": [d for _, d in sorted(top, key=lambda t: t[0])],
            "psf_source_counts_ok_rows": psf, "quantiles_ok_injections": quant,
            "ok_injections": int(r["ok_n"] or 0) if r is not None else 0,
            "ok_injections_with_mu_total": int(r["ok_mu"] or 0) if r is not None else 0,
        }
        if not accounting["exact"] or not accounting.get("stamps_exact", True):
            out[p.experiment_id] = RuntimeError(
                f"task accounting of the written output of {p.experiment_id} "
                f"({p.plan.metrics_uri}, {p.plan.stamps_uri}) is not exact: {accounting}")
            continue
        summary["exit_code"] = exit_code_for(by_status, n_tasks, error_threshold,
                                             off_brick_threshold)
        out[p.experiment_id] = summary
    return out


def _metrics_spark_schema():
    from pyspark.sql.pandas.types import from_arrow_schema

    return from_arrow_schema(inj.output_arrow_schema(False))


def format_summary(s: dict) -> str:
    """Human-readable table of a 4c summary."""
    a = s["accounting"]
    lines = [f"stage 4c {s.get('experiment_id', '')}: task accounting "
             f"{'EXACT' if a['exact'] else 'MISMATCH'}: manifest {a['tasks_in_manifest']}, "
             f"written {a['rows_written']} ({a['distinct_task_ids_written']} distinct), "
             f"missing {a['manifest_tasks_missing_from_output']}, "
             f"extra {a['output_tasks_not_in_manifest']}"]
    lines.append("  status counts: " + ", ".join(f"{k} {v}" for k, v in s["by_status"].items()))
    for split, d in s["by_split"].items():
        lines.append(f"  {split}: " + ", ".join(f"{k} {v}" for k, v in d.items()))
    lines.append(f"  failed fraction {100 * s['error_fraction']:.2f}% (threshold "
                 f"{100 * s['error_threshold']:.2f}%), off_brick "
                 f"{100 * s.get('off_brick_fraction', 0.0):.2f}% (threshold "
                 f"{100 * s.get('off_brick_threshold', 0.0):.2f}%) -> exit {s['exit_code']}")
    rs, ps = s.get("resume"), s.get("pass")
    if rs is not None and ps is not None:
        lines.append(f"  bricks: {rs['bricks_redone']} done ({rs['tasks_redone']} tasks), "
                     f"{rs['bricks_kept']} kept ({rs['tasks_kept']} tasks)"
                     f"{' [resume]' if rs['enabled'] else ''}; file groups "
                     f"({ps.get('file_grouping', 'brick')}): {rs.get('groups_redone', 0)} done, "
                     f"{rs.get('groups_kept', 0)} kept; pass of "
                     f"{len(ps['experiments'])} experiment(s): {ps['brick_openings']} brick "
                     f"opening(s)")
    for r in s["top_failure_reasons"][:5]:
        lines.append(f"    {r['count']:7d} {r['status']}: {str(r['status_reason'])[:150]}")
    for b, d in s["psf_source_counts_ok_rows"].items():
        lines.append(f"  psf_source_{b}: " + ", ".join(f"{k} {v}" for k, v in sorted(
            d.items(), key=lambda kv: str(kv[0]))))
    for c, q in s["quantiles_ok_injections"].items():
        if q:
            lines.append(f"  {c}: " + " ".join(f"{k}={v:.3g}" for k, v in q.items()))
    return "\n".join(lines)
