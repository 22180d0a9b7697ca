"""Process-level set-up of a PySpark Python worker, done at the start of each Spark task of
a stage's ``mapInArrow`` function (stage 4c).  Nothing here changes a result: only the CPU a
long-lived worker spends outside the pipeline's own work.

* :func:`drop_zip_importer_caches`: the PySpark worker calls ``importlib.invalidate_caches()``
  before every task; on Python 3.11 each cached ``zipimporter`` then re-reads its archive.
* :func:`tune_malloc`: glibc's malloc thresholds (``mallopt``).  With the defaults, every
  stamp-sized NumPy array above the dynamic mmap threshold is a fresh ``mmap`` and every free
  at the top of the heap above 128 kB is returned to the kernel, so each task faults in and
  zeroes its working memory again (~490 page faults and ~2.7 ms of system CPU per task at the
  shipped density, docs/performance.md "Stop 30").
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

LOG = logging.getLogger(__name__)

#: (glibc mallopt parameter, its code in malloc.h, configuration name, default [MB],
#: largest value [MB]: 32 is glibc's mmap-threshold maximum on 64-bit)
_PARAMS = (("M_MMAP_THRESHOLD", -3, "mmap_threshold_mb", 32.0, 32),
           ("M_TRIM_THRESHOLD", -1, "trim_threshold_mb", 256.0, 1024),
           ("M_TOP_PAD", -2, "top_pad_mb", 64.0, 1024))
#: the shipped thresholds (mmap, trim, top pad) [MB] ([job] malloc_*_mb)
DEFAULT_MALLOC_MB = tuple(d for _, _, _, d, _ in _PARAMS)

_APPLIED: dict = {}


def check_malloc_mb(mmap_threshold_mb, trim_threshold_mb, top_pad_mb, where: str = "malloc_"
                    ) -> tuple:
    """The three thresholds as floats [MB], else ValueError naming the setting
    (``where`` + its name, e.g. ``[job] malloc_mmap_threshold_mb``) and the range."""
    out = []
    for (_, _, name, _, top), mb in zip(_PARAMS, (mmap_threshold_mb, trim_threshold_mb,
                                                  top_pad_mb)):
        if isinstance(mb, bool) or not (isinstance(mb, (int, float)) and 0 <= mb <= top):
            raise ValueError(f"{where}{name} = {mb!r}: expected a number of MB in [0, {top}] "
                             f"(0 = glibc's default)")
        out.append(float(mb))
    return tuple(out)


def malloc_mb_from_conf(job) -> tuple:
    """The thresholds of a ``[job]`` table (``malloc_<name>``; absent keys: the defaults),
    checked (:func:`check_malloc_mb`, the key named)."""
    return check_malloc_mb(*(job.get(f"malloc_{name}", d) for _, _, name, d, _ in _PARAMS),
                           where="[job] malloc_")


def drop_zip_importer_caches() -> int:
    """Remove the zip-archive finders from ``sys.path_importer_cache``; returns how many.

    The PySpark worker calls ``importlib.invalidate_caches()`` before every task, and on
    Python 3.11 each cached ``zipimporter`` then re-reads its archive's whole directory:
    PySpark's own ``pyspark.zip`` (one finder per imported sub-package), the py4j zip and the
    ``spark-core`` jar it puts on the workers' path.  Measured: 0.17-0.20 CPU-s per Spark task
    in a warm worker (13 finders), 0.016 after.  A finder removed from the cache is made again
    by the import system the next time an import needs that path entry (``sys.path_hooks``),
    so nothing changes but that a warm worker, which imports nothing new, no longer re-reads
    the archives."""
    import zipimport

    dropped = [k for k, f in list(sys.path_importer_cache.items())
               if isinstance(f, zipimport.zipimporter)]
    for k in dropped:
        sys.path_importer_cache.pop(k, None)
    return len(dropped)


def _glibc():
    """The C library when it is glibc (has ``mallopt`` and ``gnu_get_libc_version``), else
    None (macOS, musl)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
        libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
        libc.mallopt.restype = ctypes.c_int
        return libc
    except (OSError, AttributeError):
        return None


def tune_malloc(mmap_threshold_mb: float, trim_threshold_mb: float, top_pad_mb: float) -> dict:
    """Set glibc's malloc thresholds for this process, once (later calls with the same values
    return at once); returns ``{parameter: bytes}`` as applied, ``{}`` when not glibc or when
    every value is 0 (= leave glibc's defaults).

    ``mmap_threshold_mb``: allocations at least this large get their own ``mmap`` (a
    3600 x 3600 float32 plane, 51.8 MB, still does when the threshold is 32 MB); setting it
    also turns off glibc's dynamic thresholds.  ``trim_threshold_mb``: free memory at the top
    of the heap kept before it is returned to the kernel.  ``top_pad_mb``: extra memory asked
    of the kernel each time the heap grows.  Memory: a worker keeps up to about
    ``trim_threshold_mb`` of freed heap mapped (peak RSS per worker unchanged within 3 %,
    docs/performance.md)."""
    want = check_malloc_mb(mmap_threshold_mb, trim_threshold_mb, top_pad_mb)
    todo = {name: int(mb * 2 ** 20) for (name, *_), mb in zip(_PARAMS, want) if mb > 0}
    if not todo:
        return {}
    if _APPLIED.get("want") == todo:
        return dict(_APPLIED["done"])
    libc = _glibc()
    if libc is None:
        LOG.info("malloc thresholds not set: the C library is not glibc")
        _APPLIED.update(want=todo, done={})
        return {}
    codes = {name: code for name, code, *_ in _PARAMS}
    done = {}
    for name, value in todo.items():
        if libc.mallopt(codes[name], value) == 1:           # 1 = success
            done[name] = value
        else:
            LOG.warning("mallopt(%s, %d) refused by glibc", name, value)
    _APPLIED.update(want=todo, done=done)
    return dict(done)
