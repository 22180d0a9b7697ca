"""Read stage-4c stamps Parquet into NumPy arrays, without Spark (the documented loader).

Layout (docs/injection.md): ``<out>/phase4c/<variant>/stamps/<experiment_id>/split=<split>/
part-*.parquet`` (zstd).  Every row holds the metrics columns (manifest columns + 4c results)
and four binary stamp columns, raw little-endian C-order bytes:

==========  ===========  ==================  ===========================================
column      dtype        shape               content
==========  ===========  ==================  ===========================================
image       float32      (B, N, N)           injected image = original + arc [nMgy/pixel]
arc         float32      (B, N, N)           arc model alone (zeros for controls)
invvar      float32      (B, N, N)           invvar cutout [1/nMgy^2] (0 = masked / no data)
maskbits    int32        (N, N)              DR10 MASKBITS cutout
==========  ===========  ==================  ===========================================

B = ``len(bands)`` in the order of the ``bands`` column (e.g. 'grz'), N = ``stamp_size_px``;
array axis 1 is y (+row, north), axis 2 is x (+column, toward decreasing RA).  Rows whose
``status`` is not ``ok`` have null stamps; ``invvar``/``maskbits`` are null when 4c ran with
``--no-store-invvar-maskbits`` (maskbits also when the brick's file was missing).
The original (control) cutout is ``image - arc`` (to float32 rounding, <= 1 ulp of image).

>>> from injection_pipeline.stamps_io import load_stamps          # doctest: +SKIP
>>> st = load_stamps("results/phase4c/v1/stamps/debug_stamp64_bandsgrz_gridgrid_small",
...                  splits=["train"], columns=["image", "arc"])
>>> st.image.shape        # (N, 3, 64, 64) float32
>>> st.meta["theta_e_arcsec"]   # pyarrow column aligned with the arrays
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Optional, Sequence

import numpy as np

STAMP_NAMES: tuple[str, ...] = ("image", "arc", "invvar", "maskbits")
_DTYPES = {"image": np.dtype("<f4"), "arc": np.dtype("<f4"), "invvar": np.dtype("<f4"),
           "maskbits": np.dtype("<i4")}


@dataclass
class Stamps:
    """Arrays (N, B, H, W) (maskbits (N, H, W)); ``None`` for a plane not loaded or all-null.

    ``meta``: pyarrow Table of the scalar columns (same row order); ``bands``: e.g. 'grz'.
    """

    image: Optional[np.ndarray] = None
    arc: Optional[np.ndarray] = None
    invvar: Optional[np.ndarray] = None
    maskbits: Optional[np.ndarray] = None
    meta: object = None
    bands: str = ""
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return 0 if self.meta is None else self.meta.num_rows

    @property
    def original(self) -> Optional[np.ndarray]:
        """The cutout without the arc: image - arc (float32)."""
        if self.image is None or self.arc is None:
            return None
        return self.image - self.arc


def decode_stamps(columns: Mapping[str, Sequence], names: Sequence[str] = STAMP_NAMES) -> dict:
    """Decode the binary stamp columns of a batch (``{column: list of values}``).

    Needs ``stamp_size_px`` and ``bands`` columns.  All decoded rows must share N and B.
    A row with a null value gives NaN (float planes) / -1 (maskbits) for that row; a plane
    that is null on every row gives None.
    """
    sizes = list(columns["stamp_size_px"])
    bands = list(columns["bands"])
    n_rows = len(sizes)
    out: dict = {}
    if n_rows == 0:
        return {name: None for name in names}
    if len(set(sizes)) != 1 or len(set(bands)) != 1:
        raise ValueError(f"rows have different stamp sizes {sorted(set(sizes))} or bands "
                         f"{sorted(set(bands))}: load one experiment at a time")
    n, nb = int(sizes[0]), len(bands[0])
    for name in names:
        vals = list(columns[name])
        if all(v is None for v in vals):
            out[name] = None
            continue
        shape = (n, n) if name == "maskbits" else (nb, n, n)
        dt = _DTYPES[name]
        arr = np.empty((n_rows,) + shape, dtype=dt.newbyteorder("="))
        fill = -1 if name == "maskbits" else np.nan
        for i, v in enumerate(vals):
            if v is None:
                arr[i] = fill
            else:
                a = np.frombuffer(v, dtype=dt)
                if a.size != int(np.prod(shape)):
                    raise ValueError(f"{name} of row {i}: {a.size} values, expected {shape}")
                arr[i] = a.reshape(shape)
        out[name] = arr
    return out


def _dataset(path: str):
    import pyarrow.dataset as ds

    if path.startswith(("s3://", "s3a://", "s3n://")):
        from pyarrow import fs

        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        kw = {}
        if endpoint:  # pyarrow ignores AWS_ENDPOINT_URL: pass it explicitly (docs/storage.md)
            kw["endpoint_override"] = endpoint
            kw["scheme"] = "https" if endpoint.startswith("https") else "http"
        region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
        if region:
            kw["region"] = region
        s3 = fs.S3FileSystem(**kw)
        return ds.dataset(path.split("://", 1)[1], filesystem=s3, format="parquet",
                          partitioning="hive")
    return ds.dataset(path, format="parquet", partitioning="hive")


def _filter(splits, status, filter_expr):
    import pyarrow.dataset as ds

    expr = None
    if splits is not None:
        expr = ds.field("split").isin(list(splits))
    if status is not None:
        e = ds.field("status") == status
        expr = e if expr is None else expr & e
    if filter_expr is not None:
        expr = filter_expr if expr is None else expr & filter_expr
    return expr


class IncompleteDataset(ValueError):
    """A stamps dataset without a valid ``_SUCCESS`` (a 4c run that did not finish), or whose
    files do not hold the rows ``_SUCCESS`` lists."""


SUCCESS_NAME = "_SUCCESS"


def _read_success(path: str) -> bytes:
    """The bytes of ``<path>/_SUCCESS`` (local or s3://); FileNotFoundError if absent."""
    uri = path.rstrip("/") + "/" + SUCCESS_NAME
    if path.startswith(("s3://", "s3a://", "s3n://")):
        from injection_pipeline import storage
        try:
            return storage.get_bytes("s3://" + uri.split("://", 1)[1])
        except storage.StorageNotFound:
            raise FileNotFoundError(uri) from None
    with open(uri, "rb") as fh:
        return fh.read()


def check_complete(path: str, dset=None) -> dict:
    """The parsed ``_SUCCESS`` of a 4c stamps dataset, after checking that it is the JSON 4c
    writes last (``format`` = stamp_writer's, ``rows``) and that the Parquet files hold exactly
    ``rows`` rows (footer metadata: cheap).  Raises :class:`IncompleteDataset` naming the path
    and what is wrong.  Spark's own empty ``_SUCCESS`` (a write that 4c never checked) fails."""
    import json

    from injection_pipeline.stamp_writer import FORMAT

    hint = ("written by a 4c run that did not finish (or not by 4c); rerun 4c, or pass "
            "allow_incomplete=True to read the files anyway")
    try:
        raw = _read_success(path)
    except FileNotFoundError:
        raise IncompleteDataset(f"{path}: no {SUCCESS_NAME}: {hint}") from None
    try:
        doc = json.loads(raw.decode("utf-8"))
        rows = int(doc["rows"])
        fmt = doc["format"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise IncompleteDataset(f"{path}/{SUCCESS_NAME} is not 4c's JSON marker "
                                f"({type(exc).__name__}: {exc}; {len(raw)} bytes): {hint}") from None
    if fmt != FORMAT:
        raise IncompleteDataset(f"{path}/{SUCCESS_NAME}: format {fmt!r}, expected {FORMAT!r}")
    n = (dset if dset is not None else _dataset(path)).count_rows()
    if n != rows:
        raise IncompleteDataset(f"{path}: the Parquet files hold {n} rows but {SUCCESS_NAME} "
                                f"lists {rows}: files were added or removed after 4c finished")
    return doc


def iter_stamps(path: str, *, columns: Sequence[str] = ("image", "arc"),
                meta_columns: Optional[Sequence[str]] = None, splits=None,
                status: Optional[str] = "ok", filter=None,
                batch_rows: int = 1024, allow_incomplete: bool = False) -> Iterator[Stamps]:
    """Stream :class:`Stamps` chunks of <= ``batch_rows`` rows (bounded memory).

    ``columns``: stamp planes to decode; ``meta_columns``: scalar columns to keep (default:
    all non-stamp columns); ``splits``: e.g. ["train"]; ``status``: keep rows with this status
    (default "ok"; None = all rows); ``filter``: an extra ``pyarrow.dataset`` expression;
    ``allow_incomplete``: read a dataset without a valid ``_SUCCESS`` (:func:`check_complete`;
    default False: :class:`IncompleteDataset` is raised before any row is read).
    """
    dset = _dataset(path)
    if not allow_incomplete:
        check_complete(path, dset)
    names = dset.schema.names
    meta = [c for c in names if c not in STAMP_NAMES] if meta_columns is None else \
        list(meta_columns)
    need = list(dict.fromkeys(meta + ["stamp_size_px", "bands"] + list(columns)))
    scanner = dset.scanner(columns=need, filter=_filter(splits, status, filter),
                           batch_size=batch_rows)
    for batch in scanner.to_batches():
        if batch.num_rows == 0:
            continue
        cols = {c: batch.column(c).to_pylist() for c in ["stamp_size_px", "bands"] + list(columns)}
        arrays = decode_stamps(cols, names=list(columns))
        import pyarrow as pa
        yield Stamps(meta=pa.Table.from_batches([batch.select(meta)]), bands=cols["bands"][0],
                     **arrays)


def load_stamps(path: str, *, columns: Sequence[str] = ("image", "arc"),
                meta_columns: Optional[Sequence[str]] = None, splits=None,
                status: Optional[str] = "ok", filter=None, sort_by: str = "task_id",
                allow_incomplete: bool = False) -> Stamps:
    """All matching rows as one :class:`Stamps` (arrays (N, B, H, W)), sorted by ``sort_by``.

    Memory: N x B x H x W x 4 bytes per plane (64 px, 3 bands: 49 KB per stamp and plane);
    use :func:`iter_stamps` or ``filter``/``splits`` for large experiments.  ``path``: local
    directory or s3:// (pyarrow S3, endpoint from AWS_ENDPOINT_URL[_S3]).  A dataset without
    4c's valid ``_SUCCESS`` is refused (:class:`IncompleteDataset`) unless
    ``allow_incomplete=True``.
    """
    import pyarrow as pa

    parts = list(iter_stamps(path, columns=columns, meta_columns=meta_columns, splits=splits,
                             status=status, filter=filter, allow_incomplete=allow_incomplete))
    if not parts:
        return Stamps(meta=None)
    meta = pa.concat_tables([p.meta for p in parts])
    if len({p.bands for p in parts}) != 1:
        raise ValueError("rows with different bands: load one experiment at a time")
    out = Stamps(meta=meta, bands=parts[0].bands)
    for name in columns:
        arrs = [getattr(p, name) for p in parts]
        if all(a is None for a in arrs):
            continue
        like = next(a for a in arrs if a is not None)
        fill = -1 if name == "maskbits" else np.nan
        arrs = [a if a is not None else np.full((len(p),) + like.shape[1:], fill, like.dtype)
                for a, p in zip(arrs, parts)]        # all-null chunk: NaN / -1 rows
        setattr(out, name, np.concatenate(arrs))
    if sort_by and sort_by in meta.column_names:
        order = np.argsort(np.asarray(meta.column(sort_by).to_pylist(), dtype=object),
                           kind="stable")
        out.meta = meta.take(pa.array(order))
        for name in columns:
            a = getattr(out, name)
            if a is not None:
                setattr(out, name, a[order])
    return out


def column_names(path: str) -> list[str]:
    """Column names of a stamps dataset (Parquet schema + the hive ``split`` partition)."""
    return list(_dataset(path).schema.names)
