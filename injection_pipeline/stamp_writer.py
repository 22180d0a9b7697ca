"""Stage 4c output files, written by the Python workers themselves (pyarrow Parquet, zstd):
the stamps and the metrics.

Why not Spark's writer: a stamp row is ~160 kB (64 px) to ~370 kB (96 px) of float32
planes.  Handing those bytes to the JVM costs an Arrow IPC copy, a conversion to Spark rows
and a second Parquet encoder; measured with ``benchmarks/bench_stage_4c.py`` it was 1.4-3.5 ms
of JVM CPU per task, more than writing the same Parquet from Python (0.6-1.1 ms).  So each
Spark partition writes its rows here and hands Spark only one small record per brick
(docs/performance.md).  The metrics files are written the same way (``file_format``
:data:`METRICS_FORMAT`, no binary columns) so that a file group's outputs are files of their
own that ``--resume`` can keep or redo (docs/injection.md "Output files and resume").

Layout (the same hive layout Spark wrote before, readable by Spark, pyarrow and pandas)::

    <dataset_uri>/split=<split>/part-<tag>.zstd.parquet

``tag`` is the file group (a sky cell of bricks, ``file_groups.group_tag``): one file per
(experiment, group, split), so names are unique within a run, a retried or speculative task
attempt rewrites the same file with the same content (rows are deterministic), and a resumed
run overwrites exactly the files of the groups it redoes.  A file appears only complete: local files are written under
a dot-prefixed temporary name (``.<name>.inprogress-<pid>-<hex>``) in the destination
directory and renamed (atomic on POSIX); S3 objects are uploaded from a node-local
temporary (``4c-<pid>-stamps-*``, swept by ``storage.temp_name_prefix``) when the brick ends
(a PUT is atomic).  Readers ignore dot- and underscore-prefixed names; the temporaries of
dead attempts are removed by :func:`sweep_dead_temps` (the driver of the run that succeeds).
The driver clears ``<dataset_uri>/`` before the job (overwrite semantics; not with
``--resume``) and checks afterwards that the files hold exactly the manifest's tasks
(:func:`stage_4c.run_experiments`).
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import uuid
from typing import Optional

from injection_pipeline import storage as st

#: key-value metadata stored in every stamps file's Parquet footer (and the ``format`` of the
#: stamps dataset's ``_SUCCESS``, which ``stamps_io.check_complete`` requires)
FORMAT = "phase4c-stamps/1"
#: the same for the metrics files (also written by the workers)
METRICS_FORMAT = "phase4c-metrics/1"
#: the local temporaries of this module (``.<name>.inprogress-<pid>-<hex>``) and of
#: ``storage.put_bytes`` (``.<name>.tmp-<pid>-<hex>``, e.g. the file groups' markers)
_TEMP_RE = re.compile(r"^\.(.+)\.(inprogress|tmp)-(\d+)-[0-9a-f]+$")


#: Parquet codecs accepted for the scalar columns (``[job] scalar_compression``)
SCALAR_CODECS = ("snappy", "zstd", "none", "gzip", "lz4", "brotli")


def check_scalar_compression(codec: str, where: str = "scalar_compression") -> str:
    """``codec`` if it is one of :data:`SCALAR_CODECS`, else ValueError naming ``where``."""
    if codec not in SCALAR_CODECS:
        raise ValueError(f"{where} = {codec!r}: expected one of {', '.join(SCALAR_CODECS)}")
    return codec


class StampFileWriter:
    """Writes one Spark partition's stamps rows, one Parquet file per split.

    ``schema``: the full output schema (``injection.output_arrow_schema(True)``), including
    the ``split`` column, which becomes the ``split=<value>`` directory (hive partitioning)
    and is not stored in the files.  ``compression_level``: zstd level of the binary planes
    (and of the scalars when ``scalar_compression`` is "zstd"; default snappy).  Dictionary
    encoding is used for the string columns only (status, psf_source, code_version, ...:
    few distinct values); on the numeric columns it made the files larger and cost 0.05 ms
    per row, and the binary stamp columns are never repeated.  Column statistics are
    written for every column but the stamps (row-group pruning on the scalars).
    """

    def __init__(self, stamps_uri: str, tag: str, schema, *, compression_level: int = 3,
                 binary_columns=(), code_version: str = "unknown",
                 storage: Optional[st.Storage] = None, temp_dir: Optional[str] = None,
                 file_format: str = FORMAT, scalar_compression: str = "snappy"):
        import pyarrow as pa

        if "split" not in schema.names:
            raise ValueError("stamps schema needs a 'split' column")
        self.stamps_uri = stamps_uri
        self.tag = tag
        self.storage = storage or st.default_storage()
        self.local = st.parse_uri(stamps_uri).scheme == "file"
        self._temp_dir = temp_dir
        keep = [f for f in schema if f.name != "split"]
        self.file_schema = pa.schema(keep, metadata={b"format": file_format.encode(),
                                                     b"code_version": code_version.encode()})
        self._cols = [f.name for f in keep]
        self._stat_cols = [c for c in self._cols if c not in set(binary_columns)]
        self._dict_cols = [f.name for f in keep
                           if f.name in self._stat_cols and pa.types.is_string(f.type)]
        self.level = int(compression_level)
        # zstd (at ``compression_level``) for the binary stamp planes; the scalar columns get
        # ``scalar_compression``: ~156 tiny column chunks per file, where a zstd context per
        # chunk cost 2.7 of the 6.5 CPU-ms of a 2-row file (a brick at the shipped density)
        # for 7 % fewer scalar bytes (~30 bytes per row); docs/performance.md
        binary = set(binary_columns)
        check_scalar_compression(scalar_compression)
        self._compression = {c: ("zstd" if c in binary else scalar_compression)
                             for c in self._cols}
        self._levels = {c: self.level for c, k in self._compression.items() if k == "zstd"}
        self._open: dict = {}          # split -> (writer, temp path, final uri)
        self.rows: dict = {}           # split -> rows written
        self.written: dict = {}        # final uri -> (rows, bytes), filled by close()

    def _writer(self, split: str):
        import pyarrow.parquet as pq

        if split not in self._open:
            name = f"part-{self.tag}.zstd.parquet"
            uri = st.join_uri(self.stamps_uri, f"split={split}", name)
            if self.local:
                final = st.parse_uri(uri).key
                d = os.path.dirname(final)
                os.makedirs(d, exist_ok=True)
                sweep_dead_inprogress(d, name)
                tmp = os.path.join(d, f".{name}.inprogress-{os.getpid()}-{uuid.uuid4().hex[:12]}")
            else:
                from injection_pipeline.coadd_cache import temp_dir
                d = temp_dir(self._temp_dir)
                fd, tmp = tempfile.mkstemp(prefix=st.temp_name_prefix("4c-", d) + "stamps-",
                                           suffix=".parquet", dir=d)
                os.close(fd)
            w = pq.ParquetWriter(tmp, self.file_schema, compression=self._compression,
                                 compression_level=self._levels or None,
                                 use_dictionary=self._dict_cols, write_statistics=self._stat_cols)
            self._open[split] = (w, tmp, uri)
            self.rows[split] = 0
        return self._open[split][0]

    def write(self, batch) -> None:
        """Write a RecordBatch or Table of the full schema (rows of any splits; each run of
        equal ``split`` values goes to that split's file, order kept)."""
        if batch.num_rows == 0:
            return
        splits = batch.column("split").to_pylist()
        start = 0
        for i in range(1, len(splits) + 1):
            if i == len(splits) or splits[i] != splits[start]:
                s = splits[start]
                if s is None:
                    raise ValueError(f"stamps rows without a split (task_id "
                                     f"{batch.column('task_id')[start]})")
                part = batch.slice(start, i - start).select(self._cols)
                self._writer(str(s)).write(part)
                self.rows[str(s)] += i - start
                start = i

    def close(self) -> dict:
        """Finish every file; returns {final uri: rows}."""
        done = {}
        try:
            for split, (w, tmp, uri) in list(self._open.items()):
                w.close()
                size = os.path.getsize(tmp)
                if self.local:
                    os.replace(tmp, st.parse_uri(uri).key)
                else:
                    self.storage.put_file(tmp, uri)
                    os.unlink(tmp)
                done[uri] = self.rows[split]
                self.written[uri] = (self.rows[split], size)
                del self._open[split]
        finally:
            self.abort()
        return done

    def abort(self) -> None:
        """Drop unfinished files (their temporaries); nothing partial is left readable."""
        for w, tmp, _ in self._open.values():
            with contextlib.suppress(Exception):
                w.close()
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        self._open.clear()


def _remove_dead(directory: str, files, name: Optional[str] = None,
                 kinds: tuple = ("inprogress", "tmp")) -> int:
    """Unlink the temporaries among ``files`` of ``directory`` (:data:`_TEMP_RE`: of kind in
    ``kinds``, of file ``name`` when given) whose writing process is dead; a live pid or this
    process is never touched.  Returns the number removed."""
    removed = 0
    for f in files:
        m = _TEMP_RE.match(f)
        if not m or m.group(2) not in kinds or (name is not None and m.group(1) != name):
            continue
        pid = int(m.group(3))
        if pid == os.getpid() or st._pid_alive(pid):
            continue
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(directory, f))
            removed += 1
    return removed


def sweep_dead_inprogress(directory: str, name: Optional[str] = None) -> int:
    """Remove ``.<name>.inprogress-<pid>-*`` temporaries (any name when ``name`` is None)
    whose writing process is dead: a killed attempt's partial file, found by the retried
    attempt, which writes the same file name (same host: local mode, or a shared mount
    whose writers run here).  A live or unknown pid is never touched.  Returns the number
    removed."""
    try:
        names = os.listdir(directory)
    except OSError:
        return 0
    return _remove_dead(directory, names, name, kinds=("inprogress",))


def clear(stamps_uri: str, storage: Optional[st.Storage] = None) -> int:
    """Remove an earlier run's stamps under ``stamps_uri/`` (objects or files)."""
    s = storage or st.default_storage()
    if st.parse_uri(stamps_uri).scheme == "file":
        path = st.parse_uri(stamps_uri).key
        if os.path.isdir(path):
            n = sum(len(f) for _, _, f in os.walk(path))
            shutil.rmtree(path)
            return n
        return 0
    return s.delete_prefix(st.join_uri(stamps_uri, ""))


def sweep_dead_temps(dataset_uri: str) -> int:
    """Remove, under a LOCAL ``dataset_uri`` (recursively), the dot-prefixed temporaries of
    writers whose process is dead (a killed or failed attempt: ``.<name>.inprogress-<pid>-*``
    of this module, ``.<name>.tmp-<pid>-*`` of ``storage.put_bytes``).  A live pid (or this
    process) is never touched.  S3 outputs have no temporaries (one PUT per file; the
    node-local upload temporaries are swept by ``storage.temp_name_prefix``): 0.  Returns the
    number removed."""
    p = st.parse_uri(dataset_uri)
    if p.scheme != "file" or not os.path.isdir(p.key):
        return 0
    return sum(_remove_dead(dirpath, files) for dirpath, _, files in os.walk(p.key))
