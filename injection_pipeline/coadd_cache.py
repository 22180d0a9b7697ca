"""The DR10 coadd cache: per-brick fetch / verify / upload with retries, ``_SUCCESS`` provenance
and the brick blacklist.  Pure Python (no Spark): stages 4b and 4b2 call :func:`process_bricks`
inside ``mapPartitions``; everything here is unit-testable without a JVM.

Cache layout (``<cache>`` = ``s3://bucket/prefix`` or a local path, see docs/cache.md)::

    <cache>/<brick>/legacysurvey-<brick>-<product>[-<band>].fits.fz   the 10 CACHED_PRODUCTS
    <cache>/<brick>/_SUCCESS        JSON provenance, written LAST; a brick is cached iff it
                                    exists and lists all 10 files (:func:`validate_success`)
    <cache>/<brick>/_PARTIAL.json   provenance of the files uploaded by a run that did not
                                    complete the brick (so a rerun need not re-hash them);
                                    removed when the brick completes

Per file: stream HTTP -> temp file (``/dev/shm`` when usable) while hashing (sha256) and
counting bytes (a body shorter than Content-Length is a transient error), verify it with
:func:`injection_pipeline.dr10.inspect_plane` (FITS structure, HDU 1, truncation, dtype, shape)
and, with ``verify="full"``, :func:`injection_pipeline.dr10.read_plane` (every tile decodes),
then upload with :mod:`injection_pipeline.storage`.

Errors (:func:`classify_error`): HTTP 404/410 (or a missing file under a local base URL) ->
``not_found``: the brick is blacklisted with the reason, no retry.  5xx, 408, 425, 429,
timeouts, connection resets/refusals, short bodies, storage errors -> ``transient``; a file
that fails verification -> ``corrupt``; both retried up to ``max_retries`` times with
exponential backoff and jitter (:func:`backoff_delay`), then the brick is recorded ``failed``
(never blacklisted).  Other HTTP 4xx and unexpected exceptions -> ``permanent``: recorded
``failed`` at once.  One brick never stops the others: every outcome is a result row.
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import dataclasses
import datetime as _dt
import hashlib
import http.client
import json
import logging
import math
import os
import random
import shutil
import socket
import ssl
import tempfile
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from injection_pipeline import brick_heads, dr10, tile_ranges
from injection_pipeline import storage as st

LOG = logging.getLogger("phase4.coadd_cache")

SUCCESS_FORMAT = "dr10-coadd-cache/1"
PARTIAL_MARKER = "_PARTIAL.json"
BLACKLIST_FORMAT = "dr10-brick-blacklist/1"
MiB = 1024 * 1024
CHUNK = 1 * MiB

# brick statuses (result rows)
CACHED = "cached"            # 4b: brick completed by this run (>= 1 file fetched or adopted)
REPAIRED = "repaired"        # 4b2: missing files fetched / _SUCCESS rewritten
SKIPPED = "skipped"          # already complete: nothing downloaded
NOT_CACHED = "not_cached"    # 4b2: nothing in the cache for this brick (4b's job)
BLACKLISTED = "blacklisted"  # a file is 404 upstream (or the name is invalid): blacklist
FAILED = "failed"            # transient / corrupt after all retries, or permanent error
INCOMPLETE = "incomplete"    # 4b2 without --repair (check only): files missing / unrecorded
STATUSES = (CACHED, REPAIRED, SKIPPED, NOT_CACHED, BLACKLISTED, FAILED, INCOMPLETE)

# error kinds
NOT_FOUND, TRANSIENT, CORRUPT, PERMANENT = "not_found", "transient", "corrupt", "permanent"

RESULT_FIELDS = (("brick", "string"), ("status", "string"), ("reason", "string"),
                 ("bytes", "bigint"), ("seconds", "double"), ("files_fetched", "int"),
                 ("files_adopted", "int"), ("http_requests", "int"), ("retries", "int"))


# =========================================================================== config
@dataclasses.dataclass(frozen=True)
class CacheConfig:
    """Settings of one cache run.  Plain values only: pickled to every Spark task."""

    cache_root: str
    base_url: str = dr10.DEFAULT_BASE_URL
    region: str = dr10.REGION
    max_retries: int = 5               # retries per file after the first attempt
    backoff_base_s: float = 1.0        # delay before retry k: ~base * 2**(k-1), capped, jittered
    backoff_max_s: float = 60.0
    connect_timeout_s: float = 30.0    # urllib has one timeout (socket ops): max of both used
    read_timeout_s: float = 120.0
    threads: int = 4                   # concurrent bricks (= downloads) per Spark task
    verify: str = "full"               # "full" (decode every tile) | "header" (structure only)
    brick_size: int = dr10.BRICK_SIZE  # expected plane side; 0 = any 2-D shape
    tmp_dir: str | None = None         # None: /dev/shm when usable, else TMPDIR
    rehash_existing: bool = True       # adopt cached objects without provenance by hashing them
    write_heads: bool = True           # write <brick>/_HEADS before _SUCCESS (brick_heads)
    progress_every: int = 100          # worker-side log line every N bricks of a task
    dry_run: bool = False              # repair mode: report what is missing, change nothing
    code_version: str = "unknown"
    run_id: str = ""
    stage: str = "4b"
    user_agent: str = "dr10-lens-injection-cache/1 (+https://github.com/)"
    storage: st.Storage = dataclasses.field(default_factory=st.Storage)

    def __post_init__(self) -> None:
        if self.verify not in ("full", "header"):
            raise ValueError(f"verify must be 'full' or 'header', got {self.verify!r}")
        if self.max_retries < 0 or self.threads < 1:
            raise ValueError("max_retries must be >= 0 and threads >= 1")

    @property
    def expected_shape(self) -> tuple[int, int] | None:
        return (self.brick_size, self.brick_size) if self.brick_size else None


# =========================================================================== errors
class UpstreamNotFound(Exception):
    """The upstream file does not exist (HTTP 404/410, or a missing file under a local root)."""


class UpstreamHTTPError(Exception):
    def __init__(self, code: int, url: str):
        super().__init__(f"HTTP {code} for {url}")
        self.code = code
        self.url = url


class ShortBody(Exception):
    """The body ended before Content-Length bytes (connection cut mid-stream)."""


class CorruptFile(Exception):
    """The downloaded file is not a valid DR10 plane (verification failed)."""


class _CacheObjectGone(Exception):
    """A listed cache object vanished before it could be adopted (classified permanent)."""


_TRANSIENT_HTTP = {408, 425, 429}


def classify_error(exc: BaseException) -> str:
    """``not_found`` | ``transient`` | ``corrupt`` | ``permanent`` for an exception of a fetch."""
    if isinstance(exc, UpstreamNotFound):
        return NOT_FOUND
    if isinstance(exc, (UpstreamHTTPError, urllib.error.HTTPError)):
        code = int(exc.code)
        if code in (404, 410):
            return NOT_FOUND
        if code >= 500 or code in _TRANSIENT_HTTP:
            return TRANSIENT
        return PERMANENT
    if isinstance(exc, (CorruptFile, dr10.DR10FileError)):
        return CORRUPT
    if isinstance(exc, (ShortBody, http.client.HTTPException, urllib.error.URLError,
                        ConnectionError, TimeoutError, socket.timeout, ssl.SSLError,
                        st.StorageError)):
        return TRANSIENT
    if isinstance(exc, OSError):  # disk full on the temp dir, EPIPE, ...
        return TRANSIENT
    return PERMANENT


def backoff_delay(retry: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Delay before retry number ``retry`` (1-based): "equal jitter" exponential backoff.

    d = min(cap, base * 2**(retry-1)); returns d/2 + U(0, d/2), so delays grow geometrically,
    never exceed ``cap`` and never synchronise across executors.
    """
    if retry < 1:
        raise ValueError("retry is 1-based")
    d = min(float(cap), float(base) * (2.0 ** (retry - 1)))
    u = (rng or random).random()
    return d / 2.0 + u * d / 2.0


def _reason(exc: BaseException) -> str:
    text = str(exc).replace("\n", " ").strip()
    return f"{type(exc).__name__}: {text}"[:500]


# =========================================================================== provenance
def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def brick_prefix(cfg_or_root, brick: str) -> str:
    root = cfg_or_root.cache_root if isinstance(cfg_or_root, CacheConfig) else cfg_or_root
    return st.join_uri(root, brick) + "/"


def success_uri(cache_root: str, brick: str) -> str:
    return st.join_uri(cache_root, brick, dr10.SUCCESS_MARKER)


def make_success(brick: str, files: Mapping[str, Mapping[str, Any]], *, code_version: str,
                 stage: str, run_id: str, base_url: str) -> dict:
    """The ``_SUCCESS`` document (files in CACHED_PRODUCTS order)."""
    order = dr10.brick_filenames(brick)
    return {"format": SUCCESS_FORMAT, "brickname": brick, "complete": True,
            "n_files": len(order), "written_at": _now(), "code_version": code_version,
            "stage": stage, "run_id": run_id, "base_url": base_url,
            "files": {n: dict(files[n]) for n in order}}


def validate_success(doc: Any, brick: str,
                     objects: Mapping[str, int] | None = None) -> list[str]:
    """Problems with a parsed ``_SUCCESS`` (empty list = the brick is cached).

    Valid: our format, this brick, all 10 file names, each with an int size > 0, a 64-hex
    sha256 and a source URL.  With ``objects`` ({file name: size} listed in the cache) every
    file must also be present with the recorded size.
    """
    if not isinstance(doc, Mapping):
        return ["not a JSON object"]
    probs = []
    if doc.get("format") != SUCCESS_FORMAT:
        probs.append(f"format {doc.get('format')!r} != {SUCCESS_FORMAT!r}")
    if doc.get("brickname") != brick:
        probs.append(f"brickname {doc.get('brickname')!r} != {brick!r}")
    files = doc.get("files")
    if not isinstance(files, Mapping):
        return probs + ["no files"]
    for name in dr10.brick_filenames(brick):
        e = files.get(name)
        if not isinstance(e, Mapping):
            probs.append(f"missing {name}")
            continue
        size, sha = e.get("size"), e.get("sha256")
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            probs.append(f"{name}: bad size {size!r}")
        if not brick_heads.is_sha256_hex(sha):
            probs.append(f"{name}: bad sha256")
        if not isinstance(e.get("source_url"), str):
            probs.append(f"{name}: no source_url")
        if objects is not None:
            if name not in objects:
                probs.append(f"{name}: object missing from the cache")
            elif objects[name] != size:
                probs.append(f"{name}: cached size {objects[name]} != recorded {size}")
    extra = set(files) - set(dr10.brick_filenames(brick))
    if extra:
        probs.append(f"unexpected files {sorted(extra)}")
    return probs


def parse_json(data: bytes | None) -> Any:
    if data is None:
        return None
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None


# =========================================================================== blacklist
def merge_blacklist(old: Mapping | None, add: Iterable[Mapping[str, Any]] = (),
                    remove: Iterable[str] = (), now: str | None = None) -> dict:
    """Merge blacklist entries (``brick``, ``reason``, ``time``, ...) into ``old``.

    A brick already present keeps its first ``time`` and reason; ``last_seen`` and
    ``times_seen`` are updated.  Bricks in ``remove`` (found upstream again) are dropped.
    Entries are sorted by brick; the document is deterministic apart from ``updated_at``.
    """
    now = now or _now()
    entries: dict[str, dict] = {}
    for e in (old or {}).get("bricks", []) or []:
        if isinstance(e, Mapping) and e.get("brick"):
            entries[str(e["brick"])] = dict(e)
    for e in add:
        b = str(e["brick"])
        if b in entries:
            cur = entries[b]
            cur["last_seen"] = e.get("time", now)
            cur["times_seen"] = int(cur.get("times_seen", 1)) + 1
            if e.get("reason") and e.get("reason") != cur.get("reason"):
                cur["last_reason"] = e.get("reason")
        else:
            entries[b] = {"brick": b, "reason": e.get("reason") or "",
                          "time": e.get("time", now), "last_seen": e.get("time", now),
                          "times_seen": 1, **{k: v for k, v in e.items()
                                              if k not in ("brick", "reason", "time")}}
    for b in remove:
        entries.pop(str(b), None)
    out = [entries[b] for b in sorted(entries)]
    return {"format": BLACKLIST_FORMAT, "updated_at": now, "count": len(out), "bricks": out}


def read_blacklist(uri: str, storage: st.Storage | None = None) -> dict:
    s = storage or st.default_storage()
    try:
        doc = json.loads(s.get_bytes(uri).decode("utf-8"))
    except st.StorageNotFound:
        return merge_blacklist(None)
    if not isinstance(doc, Mapping) or not isinstance(doc.get("bricks"), list):
        raise ValueError(f"{uri}: not a brick blacklist (expected {{'bricks': [...]}})")
    return dict(doc)


def blacklisted_bricks(doc: Mapping) -> set[str]:
    return {str(e["brick"]) for e in doc.get("bricks", []) if isinstance(e, Mapping)}


# =========================================================================== temp files
def temp_dir(preferred: str | None = None, min_free: int = 512 * MiB) -> str:
    if preferred:
        return preferred
    d = "/dev/shm"
    try:
        if (os.path.isdir(d) and os.access(d, os.W_OK | os.X_OK)
                and shutil.disk_usage(d).free >= min_free):
            return d
    except OSError:
        pass
    return tempfile.gettempdir()


@contextlib.contextmanager
def _temp_path(cfg: CacheConfig, name: str) -> Iterator[str]:
    from injection_pipeline.storage import temp_name_prefix
    d = temp_dir(cfg.tmp_dir)
    fd, path = tempfile.mkstemp(prefix=temp_name_prefix("c4b-", d), suffix="-" + name, dir=d)
    os.close(fd)
    try:
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


# =========================================================================== per file
@dataclasses.dataclass
class _Stats:
    http_requests: int = 0
    retries: int = 0
    bytes: int = 0
    fetched: int = 0
    adopted: int = 0


def _is_local_base(base_url: str) -> bool:
    return "://" not in base_url or base_url.lower().startswith("file:")


def download(url: str, path: str, cfg: CacheConfig) -> dict:
    """Stream ``url`` into ``path``; returns size, sha256, last_modified, etag.

    Raises UpstreamNotFound (404/410 or missing local file), UpstreamHTTPError (other status),
    ShortBody (fewer bytes than Content-Length) or the network error.
    """
    h = hashlib.sha256()
    n = 0
    if _is_local_base(url):
        src = st.parse_uri(url).key
        try:
            f_in = open(src, "rb")
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise UpstreamNotFound(f"missing upstream file {src}") from exc
        with f_in, open(path, "wb") as out:
            while chunk := f_in.read(CHUNK):
                out.write(chunk)
                h.update(chunk)
                n += len(chunk)
        mtime = os.stat(src).st_mtime
        import email.utils
        return {"size": n, "sha256": h.hexdigest(), "etag": None,
                "last_modified": email.utils.formatdate(mtime, usegmt=True)}
    req = urllib.request.Request(url, headers={"User-Agent": cfg.user_agent,
                                               "Accept-Encoding": "identity"})
    timeout = max(cfg.connect_timeout_s, cfg.read_timeout_s)
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as exc:
        with contextlib.suppress(Exception):
            exc.close()
        if exc.code in (404, 410):
            raise UpstreamNotFound(f"HTTP {exc.code} for {url}") from None
        raise UpstreamHTTPError(exc.code, url) from None
    with resp, open(path, "wb") as out:
        clen = resp.headers.get("Content-Length")
        while chunk := resp.read(CHUNK):
            out.write(chunk)
            h.update(chunk)
            n += len(chunk)
        if clen is not None and n != int(clen):
            raise ShortBody(f"{url}: got {n} of {clen} bytes")
        return {"size": n, "sha256": h.hexdigest(), "etag": resp.headers.get("ETag"),
                "last_modified": resp.headers.get("Last-Modified")}


def psf_median_summary(plane) -> dict:
    """The ``psf_median`` provenance of a decoded psfsize plane (docs/cache.md):
    ``{"fwhm_arcsec": median of the valid pixels or None, "n_valid": their count,
    "valid_range_arcsec": [min, max]}`` with the psf_fallback defaults (valid = finite and in
    (min, max]); the median is ``psf_fallback.brick_median_fwhm``'s value, bit for bit."""
    from injection_pipeline import psf_fallback as pf

    med, n = pf.valid_fwhm_median(plane, pf.MIN_FWHM_ARCSEC, pf.MAX_FWHM_ARCSEC)
    return {"fwhm_arcsec": med, "n_valid": n,
            "valid_range_arcsec": [float(pf.MIN_FWHM_ARCSEC), float(pf.MAX_FWHM_ARCSEC)]}


def psfsize_summary(path: str, expected_shape: tuple[int, int] | None = None) -> dict:
    """:func:`psf_median_summary` of a local psfsize file (whole plane decoded with astropy,
    the engine stage 4c uses for whole-plane reads).  Raises ``dr10.DR10FileError`` /
    ``OSError`` for an unreadable file."""
    plane = dr10.read_plane(path, product="psfsize", expected_shape=expected_shape,
                            engine="astropy")
    return psf_median_summary(plane.data)


def stored_psf_median(entry: Any) -> tuple[float | None, int, tuple[float, float]] | None:
    """``(fwhm_arcsec, n_valid, (min, max))`` of a ``_SUCCESS`` file entry's ``psf_median``,
    or None when it is absent or malformed (readers then compute the median themselves).

    Well formed: ``fwhm_arcsec`` None or a finite number > 0 inside its own valid range,
    ``n_valid`` an int >= 0 (0 iff ``fwhm_arcsec`` is None), ``valid_range_arcsec`` a list of
    two finite numbers.  Never raises.
    """
    def num(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    pm = entry.get("psf_median") if isinstance(entry, Mapping) else None
    if not isinstance(pm, Mapping):
        return None
    fwhm, n, rng = pm.get("fwhm_arcsec"), pm.get("n_valid"), pm.get("valid_range_arcsec")
    if not (isinstance(rng, list) and len(rng) == 2 and all(num(v) for v in rng)):
        return None
    lo, hi = float(rng[0]), float(rng[1])
    if not (isinstance(n, int) and not isinstance(n, bool) and n >= 0):
        return None
    if fwhm is None:
        return (None, n, (lo, hi)) if n == 0 else None
    if not (num(fwhm) and fwhm > 0 and lo < fwhm <= hi and n > 0):
        return None
    return float(fwhm), n, (lo, hi)


def verify_file(path: str, name: str, cfg: CacheConfig) -> dict:
    """Verify a downloaded plane with dr10.inspect_plane (+ read_plane for verify='full').

    Returns ``{"shape": [ny, nx]}``, plus ``"psf_median"`` (:func:`psf_median_summary`) for a
    psfsize map: from the plane the full verification decoded, or, with verify='header', from
    one extra whole-plane read; if that read fails (header mode checks structure only, the
    file is not rejected for it) the entry has no ``psf_median`` and 4c computes it.
    """
    _, product, _ = dr10.parse_product_filename(name)
    extra = {}
    try:
        info = dr10.inspect_plane(path, product=product, expected_shape=cfg.expected_shape)
        if cfg.verify == "full":
            plane = dr10.read_plane(path, product=product, expected_shape=cfg.expected_shape,
                                    engine="astropy")
            if product == "psfsize":
                extra["psf_median"] = psf_median_summary(plane.data)
            del plane
    except (dr10.DR10FileError, ValueError, OSError, KeyError, TypeError) as exc:
        raise CorruptFile(f"{name}: {_reason(exc).replace(path, name)}") from exc
    if product == "psfsize" and "psf_median" not in extra:
        try:
            extra["psf_median"] = psfsize_summary(path, cfg.expected_shape)
        except (dr10.DR10FileError, ValueError, OSError, KeyError, TypeError) as exc:
            LOG.warning("%s: psfsize plane not decodable (%s): no psf_median recorded", name,
                        _reason(exc).replace(path, name))
    return {"shape": list(info.shape), **extra}


def _sha256_file(path: str) -> tuple[int, str]:
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            n += len(chunk)
    return n, h.hexdigest()


def _with_retries(fn: Callable[[], Any], cfg: CacheConfig, stats: _Stats, what: str,
                  sleep: Callable[[float], None] = time.sleep) -> Any:
    """Run ``fn`` with bounded retries for transient/corrupt errors.

    Raises the last exception (annotated with ``.kind`` and ``.attempts``) when not retried.
    """
    attempts = cfg.max_retries + 1
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:  # classified below; nothing is swallowed
            kind = classify_error(exc)
            exc.kind, exc.attempts = kind, attempt  # type: ignore[attr-defined]
            if kind in (NOT_FOUND, PERMANENT) or attempt == attempts:
                raise
            stats.retries += 1
            d = backoff_delay(attempt, cfg.backoff_base_s, cfg.backoff_max_s)
            LOG.info("%s: %s (%s), retry %d/%d in %.2f s", what, kind, _reason(exc), attempt,
                     cfg.max_retries, d)
            sleep(d)
    raise AssertionError("unreachable")


def fetch_file(brick: str, name: str, cfg: CacheConfig, stats: _Stats) -> dict:
    """Download, verify and upload one file; returns its provenance entry."""
    _, product, band = dr10.parse_product_filename(name)
    url = dr10.product_url(brick, product, band, cfg.base_url, cfg.region)
    dest = st.join_uri(cfg.cache_root, brick, name)
    with _temp_path(cfg, name) as tmp:
        def attempt() -> dict:
            stats.http_requests += 1
            meta = download(url, tmp, cfg)
            meta.update(verify_file(tmp, name, cfg))
            return meta

        meta = _with_retries(attempt, cfg, stats, f"{brick} {name}")
        _with_retries(lambda: cfg.storage.put_file(tmp, dest), cfg, stats, f"upload {dest}")
    stats.bytes += meta["size"]
    stats.fetched += 1
    return {"size": meta["size"], "sha256": meta["sha256"], "source_url": url,
            "last_modified": meta["last_modified"], "etag": meta["etag"],
            "fetched_at": _now(), "origin": "download", "verified": cfg.verify,
            "shape": meta["shape"], **_psf_median_of(meta), "run_id": cfg.run_id}


def _psf_median_of(meta: Mapping[str, Any]) -> dict:
    return {"psf_median": meta["psf_median"]} if "psf_median" in meta else {}


def adopt_file(brick: str, name: str, cfg: CacheConfig, stats: _Stats) -> dict:
    """Provenance for an object already in the cache without provenance: re-verify + hash it."""
    _, product, band = dr10.parse_product_filename(name)
    uri = st.join_uri(cfg.cache_root, brick, name)

    def attempt() -> dict:
        try:
            with cfg.storage.download_to_temp(uri, copy_local=False) as path:
                size, sha = _sha256_file(path)
                meta = verify_file(path, name, cfg)
        except st.StorageNotFound as exc:
            raise _CacheObjectGone(str(exc)) from exc
        return {"size": size, "sha256": sha, **meta}

    meta = _with_retries(attempt, cfg, stats, f"adopt {uri}")
    stats.adopted += 1
    return {"size": meta["size"], "sha256": meta["sha256"],
            "source_url": dr10.product_url(brick, product, band, cfg.base_url, cfg.region),
            "last_modified": None, "etag": None, "fetched_at": None, "adopted_at": _now(),
            "origin": "cache", "verified": cfg.verify, "shape": meta["shape"],
            **_psf_median_of(meta), "run_id": cfg.run_id}


# =========================================================================== per brick
def _fetch_order(brick: str) -> list[str]:
    """psfsize first (the product most often missing from old caches), then the others."""
    names = dr10.brick_filenames(brick)
    return [n for n in names if "-psfsize-" in n] + [n for n in names if "-psfsize-" not in n]


def _short(name: str) -> str:
    """``legacysurvey-1126p222-psfsize-g.fits.fz`` -> ``psfsize-g``."""
    _, product, band = dr10.parse_product_filename(name)
    return product + (f"-{band}" if band else "")


def _get_json(uri: str, s: st.Storage) -> tuple[bool, Any]:
    try:
        return True, parse_json(s.get_bytes(uri))
    except st.StorageNotFound:
        return False, None


def _list_brick(cfg: CacheConfig, brick: str) -> dict[str, int]:
    pre = brick_prefix(cfg, brick)
    return {o.uri[len(pre):]: o.size for o in cfg.storage.list(pre, recursive=False)}


def process_brick(brick: str, cfg: CacheConfig, mode: str = "cache") -> dict:
    """Cache (mode "cache", stage 4b) or repair (mode "repair", stage 4b2) one brick.

    cache:  a valid _SUCCESS -> ``skipped`` (one small GET, nothing listed or downloaded).
            Otherwise the brick is completed: files already in the cache are reused with their
            recorded provenance (_SUCCESS/_PARTIAL entry of the same size) or re-verified and
            hashed (``rehash_existing``), the others fetched; then _SUCCESS is written.
    repair: the brick's objects are listed and compared with its _SUCCESS; nothing cached ->
            ``not_cached``; all present and recorded -> ``skipped``; otherwise only the missing
            files are fetched (psfsize first) and _SUCCESS is rewritten -> ``repaired``.
    A stale _SUCCESS is deleted before any object changes, so it never sits beside missing or
    corrupt files.  Returns a result row (RESULT_FIELDS).
    """
    t0 = time.perf_counter()
    stats = _Stats()
    row = {"brick": brick, "status": FAILED, "reason": None}
    try:
        row.update(_process(brick, cfg, mode, stats))
    except Exception as exc:  # a bug or an unclassified error: a failed row, never a crash
        LOG.exception("%s: unexpected error", brick)
        row.update(status=FAILED, reason=f"internal: {_reason(exc)}")
    row.update(bytes=stats.bytes, seconds=round(time.perf_counter() - t0, 4),
               files_fetched=stats.fetched, files_adopted=stats.adopted,
               http_requests=stats.http_requests, retries=stats.retries)
    return row


def _process(brick: str, cfg: CacheConfig, mode: str, stats: _Stats) -> dict:
    s = cfg.storage
    try:
        dr10.validate_brickname(brick)
    except ValueError as exc:
        return {"status": BLACKLISTED, "reason": f"invalid brick name: {exc}"}
    succ_uri = success_uri(cfg.cache_root, brick)
    part_uri = st.join_uri(cfg.cache_root, brick, PARTIAL_MARKER)
    if mode == "cache":
        has_succ, doc = _get_json(succ_uri, s)
        if has_succ and not validate_success(doc, brick):
            return {"status": SKIPPED}
        objects = _list_brick(cfg, brick)
    elif mode == "repair":
        objects = _list_brick(cfg, brick)
        if not objects:
            return {"status": NOT_CACHED, "reason": "nothing cached (run 4b)"}
        has_succ = dr10.SUCCESS_MARKER in objects
        doc = _get_json(succ_uri, s)[1] if has_succ else None
        if has_succ and not validate_success(doc, brick, objects):
            why = heads_problem(doc, brick, objects) if cfg.write_heads else None
            if why is None:
                return {"status": SKIPPED}
            if cfg.dry_run:         # complete; only the optional heads object is missing
                return {"status": SKIPPED, "reason": f"{why} (4b2 --repair adds it)"}
            _put_marker(s, succ_uri, dict(doc, heads=write_heads(brick, cfg, doc["files"],
                                                                  stats)))
            return {"status": REPAIRED, "reason": f"added {brick_heads.HEADS_NAME} ({why})"}
    else:
        raise ValueError(f"mode must be 'cache' or 'repair', got {mode!r}")

    # provenance we can reuse: the old _SUCCESS (any version of ours) and a _PARTIAL record
    known: dict[str, dict] = {}
    for d in ((parse_json(s.get_bytes(part_uri)) if PARTIAL_MARKER in objects else None), doc):
        if isinstance(d, Mapping) and isinstance(d.get("files"), Mapping):
            for n, e in d["files"].items():
                if isinstance(e, Mapping) and isinstance(e.get("sha256"), str):
                    known.setdefault(n, dict(e))
    files: dict[str, dict] = {}
    todo: list[tuple[str, str]] = []  # (how, name): how = "adopt" | "fetch"
    for name in _fetch_order(brick):
        size = objects.get(name)
        e = known.get(name)
        if size is not None and e is not None and e.get("size") == size:
            files[name] = e                      # recorded provenance, same object size
        elif size is not None and e is None and cfg.rehash_existing:
            todo.append(("adopt", name))         # cached, no provenance: re-verify + hash
        else:
            todo.append(("fetch", name))         # missing, or size differs from the record
    if cfg.dry_run:
        missing = [n for how, n in todo if how == "fetch"]
        adopt = [n for how, n in todo if how == "adopt"]
        return {"status": INCOMPLETE,
                "reason": (f"missing {len(missing)}: {','.join(_short(n) for n in missing)}"
                           if missing else "")
                + (f"; unrecorded {len(adopt)}: {','.join(_short(n) for n in adopt)}"
                   if adopt else "")
                + ("; stale _SUCCESS" if has_succ else "")}
    if has_succ:  # from here on the brick is being modified: no _SUCCESS beside it
        s.delete(succ_uri)

    failures: list[str] = []
    for how, name in todo:
        try:
            if how == "adopt":
                try:
                    files[name] = adopt_file(brick, name, cfg, stats)
                    continue
                except (CorruptFile, _CacheObjectGone) as exc:
                    LOG.warning("%s: cached %s unusable (%s): fetching it again", brick, name,
                                _reason(exc))
            files[name] = fetch_file(brick, name, cfg, stats)
        except Exception as exc:
            kind = getattr(exc, "kind", None) or classify_error(exc)
            if kind == NOT_FOUND:  # the brick cannot be complete: stop, blacklist
                _write_partial(cfg, brick, files, part_uri)
                return {"status": BLACKLISTED,
                        "reason": f"404 upstream: {_short(name)}: {_reason(exc)}"}
            # keep going: the other files are cached now, a rerun fetches only the failed ones
            failures.append(f"{_short(name)}: {kind} after {getattr(exc, 'attempts', 1)} "
                            f"attempt(s): {_reason(exc)}")
    if failures:
        _write_partial(cfg, brick, files, part_uri)
        return {"status": FAILED, "reason": f"{len(failures)} file(s) failed: "
                                            + " | ".join(failures)}

    doc = make_success(brick, files, code_version=cfg.code_version, stage=cfg.stage,
                       run_id=cfg.run_id, base_url=cfg.base_url)
    heads_note = None
    if cfg.write_heads:
        try:
            doc["heads"] = write_heads(brick, cfg, files, stats)
        except Exception as exc:  # noqa: BLE001 - an optimisation only: 4c reads each head
            heads_note = f"no {brick_heads.HEADS_NAME}: {_reason(exc)}"
            LOG.warning("%s: %s (4c reads each file's head instead)", brick, heads_note)
    probs = validate_success(doc, brick)
    if probs:  # cannot happen unless an entry is malformed: refuse to write it
        return {"status": FAILED, "reason": f"internal: invalid _SUCCESS: {probs[:3]}"}
    _put_marker(s, succ_uri, doc)
    if PARTIAL_MARKER in objects or stats.fetched or stats.adopted:
        with contextlib.suppress(st.StorageError):
            s.delete(part_uri)
    if mode == "repair":
        return {"status": REPAIRED,
                "reason": "; ".join(r for r in (
                    f"fetched {stats.fetched}, adopted {stats.adopted}" if todo
                    else "rewrote _SUCCESS", heads_note) if r)}
    return {"status": CACHED, "reason": heads_note}


def _put_marker(s: st.Storage, uri: str, doc: Mapping) -> None:
    """Write a brick marker (``_SUCCESS`` or ``_PARTIAL.json``) as indented JSON."""
    s.put_bytes(uri, (json.dumps(doc, indent=1, sort_keys=False) + "\n").encode())


def heads_problem(doc: Mapping, brick: str, objects: Mapping[str, int]) -> str | None:
    """Why a valid ``_SUCCESS`` has no usable heads object (None when it has one):
    ``objects`` = {name: size} listed in the brick's cache prefix."""
    try:
        e = brick_heads.entry(doc, dr10.brick_filenames(brick))
    except brick_heads.HeadsUnusable as exc:
        return str(exc)
    if objects.get(brick_heads.HEADS_NAME) != e["size"]:
        return (f"{brick_heads.HEADS_NAME} absent" if brick_heads.HEADS_NAME not in objects
                else f"{brick_heads.HEADS_NAME} is not the object _SUCCESS describes")
    return None


def write_heads(brick: str, cfg: CacheConfig, files: Mapping[str, Mapping[str, Any]],
                stats: _Stats | None = None) -> dict:
    """Read the head (headers + tile table) of each cached file of ``brick`` back from the
    cache (ranged GETs, retried like every transfer), write them as ``<brick>/_HEADS``
    (:mod:`injection_pipeline.brick_heads`) and return the ``heads`` entry of ``_SUCCESS``.
    A file whose object has another size than its ``files`` entry, or that is not
    tile-compressed, is left out (4c then reads its head itself)."""
    s = cfg.storage
    stats = stats or _Stats()
    heads = []
    for name in dr10.brick_filenames(brick):
        uri = st.join_uri(cfg.cache_root, brick, name)

        def read(uri=uri):         # a cache GET, not an upstream request (http_requests)
            try:
                return tile_ranges.fetch_head(lambda a, b: s.get_range(uri, a, b), uri)
            except Exception as exc:  # noqa: BLE001 - only transient faults are retried
                if st.is_transient(exc):
                    raise
                return exc
        got = _with_retries(read, cfg, stats, f"head of {uri}")
        if isinstance(got, Exception):
            LOG.warning("%s: %s left out of %s: %s", brick, name, brick_heads.HEADS_NAME,
                        _reason(got))
            continue
        head, layout, size = got
        if size != files[name].get("size"):
            LOG.warning("%s: %s is %d bytes, recorded %s: left out of %s", brick, name, size,
                        files[name].get("size"), brick_heads.HEADS_NAME)
            continue
        heads.append((name, head[:layout.rows_end], size))
    blob, entry = brick_heads.pack(heads)
    uri = st.join_uri(cfg.cache_root, brick, brick_heads.HEADS_NAME)
    _with_retries(lambda: s.put_bytes(uri, blob), cfg, stats, f"upload {uri}")
    return entry


def _write_partial(cfg: CacheConfig, brick: str, files: Mapping[str, dict], uri: str) -> None:
    if not files:
        return
    doc = {"format": SUCCESS_FORMAT + "+partial", "brickname": brick, "complete": False,
           "written_at": _now(), "code_version": cfg.code_version, "run_id": cfg.run_id,
           "files": dict(files)}
    try:
        _put_marker(cfg.storage, uri, doc)
    except st.StorageError as exc:  # provenance only: the rerun re-hashes instead
        LOG.warning("%s: could not write %s: %s", brick, uri, exc)


# =========================================================================== per partition
def process_bricks(bricks: Sequence[str], cfg: CacheConfig, mode: str = "cache",
                   on_result: Callable[[dict], None] | None = None) -> Iterator[dict]:
    """Process ``bricks`` with ``cfg.threads`` concurrent bricks; yields result rows as they
    complete.  Logs a line every ``cfg.progress_every`` bricks (counts, MB/s, bricks/s)."""
    t0 = time.perf_counter()
    counts = dict.fromkeys(STATUSES, 0)
    nbytes = 0
    lock = threading.Lock()
    with cf.ThreadPoolExecutor(max_workers=cfg.threads, thread_name_prefix="c4b") as ex:
        futs = [ex.submit(process_brick, b, cfg, mode) for b in bricks]
        for i, fut in enumerate(cf.as_completed(futs), 1):
            row = fut.result()  # process_brick never raises
            with lock:
                counts[row["status"]] += 1
                nbytes += row["bytes"]
            if on_result is not None:
                on_result(row)
            if cfg.progress_every and (i % cfg.progress_every == 0 or i == len(futs)):
                dt = max(time.perf_counter() - t0, 1e-9)
                LOG.info("task progress %d/%d bricks: done %d skipped %d failed %d "
                         "blacklisted %d | %.1f MB/s, %.2f bricks/s", i, len(futs),
                         counts[CACHED] + counts[REPAIRED], counts[SKIPPED] + counts[NOT_CACHED],
                         counts[FAILED], counts[BLACKLISTED], nbytes / MiB / dt, i / dt)
            yield row


