"""DESI Legacy Imaging Surveys DR10 (South): the data model this pipeline reads.

Sources: legacysurvey.org DR10 pages (``dr10/files``, ``dr10/description``) and legacypipe at
tag DR10.0.12 (``survey.py`` brick names/paths, ``coadds.py`` products and compression).
See ``docs/dr10.md`` and ``/work/shared/reference/dr10-data-model.md``.

What lives here
---------------
* brick names: :func:`validate_brickname`, :func:`brick_name_for` (naming rule; a name does
  NOT give the exact brick centre -- always use the survey-bricks table for centres/bounds);
* paths and URLs of the 10 cached products per brick: :data:`CACHED_PRODUCTS`,
  :func:`product_filename`, :func:`brick_filenames`, :func:`brick_dir`, :func:`product_url`,
  :func:`brick_urls`, :data:`SUCCESS_MARKER`;
* the survey-bricks table: :func:`read_survey_bricks`;
* the parent-catalogue columns (DR10 Tractor / photo-z names, types, units, plus user
  columns): :data:`CATALOGUE_COLUMNS`, :func:`validate_parent_catalogue`,
  :func:`read_parent_catalogue`, :func:`mw_transmission` (DR10 extinction coefficients);
* brick geometry with ``astropy.wcs`` (TAN, 0.262"/px): :func:`brick_wcs`,
  :func:`radec_to_brick_pixel`, :func:`brick_pixel_to_radec` (0-based pixels, x = column);
* loaders of tile-compressed planes (HDU 1 of each ``.fits.fz``): :func:`read_plane`,
  :func:`read_cutout` and :class:`BrickPlanes` (keeps files open for many cutouts).

Loader engine choice -- measured here (2 cores shared with other jobs, Python 3.11, fitsio
1.4.2, astropy 8.0.2) on a synthetic full-size brick written with the DR10 compression
settings on tmpfs; CPU-time medians of 6 full reads, wall-clock medians of 200 random
cutouts (ranges over image, invvar, psfsize, maskbits)::

    read                                   fitsio       astropy
    image-r 3600x3600 full (RICE_1)        0.32 s       0.16 s
    invvar-r full (RICE_1)                 0.30 s       0.15 s
    psfsize-r full (GZIP_1 lossless)       0.19 s       0.08 s
    maskbits full (HCOMPRESS_1 int32)      0.32 s       0.10 s
    64x64 cutout, file already open        0.3-0.56 ms  0.53-0.96 ms
    96x96 cutout, file already open        0.56-0.94 ms 0.68-1.0 ms
    open + validate + 64x64 cutout         1.0-1.6 ms   4.1-7.9 ms  (BytesIO: ~6-10 ms)

So ``engine="auto"`` reads whole planes with astropy (about half the CPU of fitsio) and
cutouts with fitsio (faster, especially open + cutout); file objects always use astropy
(fitsio needs a path).  Both decompress only the tiles a cutout touches (proved by a test
that destroys every other tile).  ``BrickPlanes(..., cache_tiles=True)`` (used by stage 4c)
additionally keeps every decompressed tile while the file is open, so a tile shared by
several cutouts (paired controls, neighbouring targets) is decompressed once: at ~170 tasks
per full brick this halves the decompression time (docs/performance.md).
"""
from __future__ import annotations

import io
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Sequence, Union

import numpy as np

from lensing.photometry import AB_ZP_NMGY, DR10_PIXSCALE_ARCSEC

# ----------------------------------------------------------------------------- constants
BANDS: tuple[str, ...] = ("g", "r", "z")
PIXSCALE_ARCSEC: float = DR10_PIXSCALE_ARCSEC
BRICK_SIZE: int = 3600
REGION: str = "south"
DEFAULT_BASE_URL: str = "https://portal.nersc.gov/cfs/cosmo/data/legacysurvey/dr10/"
MAGZERO: float = AB_ZP_NMGY
SUCCESS_MARKER: str = "_SUCCESS"
TILE_SHAPE: tuple[int, int] = (100, 100)

#: per-band products (one file per band) and per-brick products (one file per brick)
BAND_PRODUCTS: tuple[str, ...] = ("image", "invvar", "psfsize")
BRICK_PRODUCTS: tuple[str, ...] = ("maskbits",)

#: the 10 (product, band) pairs cached per brick, band None for maskbits
CACHED_PRODUCTS: tuple[tuple[str, str | None], ...] = tuple(
    [(p, b) for p in BAND_PRODUCTS for b in BANDS] + [("maskbits", None)]
)

#: numpy dtype of the decompressed data of each product
PRODUCT_DTYPES: dict[str, np.dtype] = {
    "image": np.dtype(np.float32),
    "invvar": np.dtype(np.float32),
    "psfsize": np.dtype(np.float32),
    "maskbits": np.dtype(np.int32),
}
#: FITS BITPIX (ZBITPIX for compressed HDUs) of each product
PRODUCT_BITPIX: dict[str, int] = {"image": -32, "invvar": -32, "psfsize": -32, "maskbits": 32}
#: BUNIT header values (maskbits has none)
PRODUCT_BUNIT: dict[str, str | None] = {
    "image": "nanomaggy",
    "invvar": "1/nanomaggy^2",
    "psfsize": "arcsec",
    "maskbits": None,
}

#: legacypipe ``get_compression_args`` (DR10): tiles 100x100 for all products.
#: ``qlevel`` follows cfitsio: negative = absolute quantisation step, positive = step as a
#: fraction of the tile's noise sigma (q 16 -> sigma/16), 0 = lossless.
COMPRESSION: dict[str, dict[str, Any]] = {
    "image": dict(zcmptype="RICE_1", fitsio_compress="RICE", qlevel=-1e-4,
                  qmethod="SUBTRACTIVE_DITHER_2"),
    "invvar": dict(zcmptype="RICE_1", fitsio_compress="RICE", qlevel=16.0,
                   qmethod="NO_DITHER"),
    "psfsize": dict(zcmptype="GZIP_1", fitsio_compress="GZIP", qlevel=0.0, qmethod=None),
    "maskbits": dict(zcmptype="HCOMPRESS_1", fitsio_compress="HCOMPRESS", qlevel=None,
                     qmethod=None, hcomp_scale=0.0),
}

_BRICKNAME_RE = re.compile(r"^(\d{4})([pm])(\d{3})$")
_FILENAME_RE = re.compile(
    r"^legacysurvey-(?P<brick>\d{4}[pm]\d{3})-(?P<product>[a-z0-9]+)(?:-(?P<band>[a-z]))?"
    r"\.fits\.fz$"
)

PathLike = Union[str, os.PathLike]


class DR10FileError(ValueError):
    """A DR10 file exists but is unusable (corrupt, truncated, wrong shape/dtype/HDU)."""


# ----------------------------------------------------------------------------- brick names
def validate_brickname(name: str) -> str:
    """Return ``name`` if it is a valid DR10 brick name, else raise ValueError.

    Valid: ``<RRRR><p|m><DDD>`` lower case, RRRR = int(RA*10) in 0..3599, DDD = int(|Dec|*10)
    in 0..900 (e.g. ``1126p222``).
    """
    if not isinstance(name, str):
        raise ValueError(f"DR10 brick name must be a str, got {type(name).__name__}: {name!r}")
    m = _BRICKNAME_RE.match(name)
    if m is None or int(m.group(1)) >= 3600 or int(m.group(3)) > 900:
        raise ValueError(
            f"invalid DR10 brick name {name!r}: expected <RRRR><p|m><DDD> with RRRR=int(RA*10) "
            f"in 0000..3599 and DDD=int(|Dec|*10) in 000..900, lower case, e.g. '1126p222'"
        )
    return name


def brick_name_for(ra: float, dec: float) -> str:
    """Brick name of a brick whose centre is (ra, dec), by the legacypipe naming rule.

    ``'%04i%s%03i' % (int(ra*10), 'p' if dec >= 0 else 'm', int(abs(dec)*10))``.
    The rule truncates, so a name only says the centre lies in a 0.1 x 0.1 deg cell: the
    exact centre and bounds must come from the survey-bricks table (:func:`read_survey_bricks`).
    It is NOT the brick containing an arbitrary (ra, dec): only call it with brick centres.
    """
    ra = float(ra) % 360.0
    dec = float(dec)
    if not (-90.0 <= dec <= 90.0) or not math.isfinite(ra):
        raise ValueError(f"invalid coordinates ra={ra!r}, dec={dec!r}")
    return "%04i%s%03i" % (int(ra * 10), "p" if dec >= 0 else "m", int(abs(dec) * 10))


def brick_dir(brickname: str, region: str = REGION) -> str:
    """Relative coadd directory of a brick: ``<region>/coadd/<AAA>/<brick>`` (AAA = name[:3])."""
    validate_brickname(brickname)
    return f"{region}/coadd/{brickname[:3]}/{brickname}"


def brickname_from_dir(path: PathLike) -> str:
    """Brick name of a coadd directory ``.../coadd/<AAA>/<brick>[/]``; validates AAA."""
    p = Path(path)
    name = validate_brickname(p.name)
    if p.parent.name and p.parent.name != name[:3]:
        raise ValueError(f"{path}: brick {name!r} must sit under {name[:3]!r}, not "
                         f"{p.parent.name!r}")
    return name


def _check_product(product: str, band: str | None) -> None:
    if product in BAND_PRODUCTS:
        if band not in BANDS:
            raise ValueError(f"product {product!r} needs a band in {BANDS}, got {band!r}")
    elif product in BRICK_PRODUCTS:
        if band is not None:
            raise ValueError(f"product {product!r} has no band, got {band!r}")
    else:
        raise ValueError(f"unknown cached DR10 product {product!r}; known: "
                         f"{BAND_PRODUCTS + BRICK_PRODUCTS}")


def product_filename(brickname: str, product: str, band: str | None = None) -> str:
    """``legacysurvey-<brick>-<product>[-<band>].fits.fz``."""
    validate_brickname(brickname)
    _check_product(product, band)
    suffix = f"-{band}" if band is not None else ""
    return f"legacysurvey-{brickname}-{product}{suffix}.fits.fz"


def parse_product_filename(filename: PathLike) -> tuple[str, str, str | None]:
    """Inverse of :func:`product_filename`: ``(brickname, product, band)``."""
    base = Path(filename).name
    m = _FILENAME_RE.match(base)
    if m is None:
        raise ValueError(f"not a DR10 coadd product file name: {base!r} (expected "
                         f"legacysurvey-<brick>-<product>[-<band>].fits.fz)")
    brick, product, band = m.group("brick"), m.group("product"), m.group("band")
    validate_brickname(brick)
    _check_product(product, band)
    return brick, product, band


def brick_filenames(brickname: str) -> list[str]:
    """The 10 cached file names of a brick (image/invvar/psfsize x g,r,z, then maskbits)."""
    return [product_filename(brickname, p, b) for p, b in CACHED_PRODUCTS]


def product_relpath(brickname: str, product: str, band: str | None = None,
                    region: str = REGION) -> str:
    """Path relative to the DR10 root, e.g. ``south/coadd/112/1126p222/legacysurvey-...``."""
    return f"{brick_dir(brickname, region)}/{product_filename(brickname, product, band)}"


def product_url(brickname: str, product: str, band: str | None = None,
                base_url: str = DEFAULT_BASE_URL, region: str = REGION) -> str:
    """Public URL of one product file (``base_url`` is the DR10 root, slash optional)."""
    return base_url.rstrip("/") + "/" + product_relpath(brickname, product, band, region)


def brick_urls(brickname: str, base_url: str = DEFAULT_BASE_URL,
               region: str = REGION) -> dict[str, str]:
    """``{file name: public URL}`` for the 10 cached files of a brick, in CACHED_PRODUCTS order."""
    return {product_filename(brickname, p, b): product_url(brickname, p, b, base_url, region)
            for p, b in CACHED_PRODUCTS}


# ----------------------------------------------------------------------------- survey-bricks
SURVEY_BRICKS_COLUMNS: tuple[str, ...] = ("brickname", "ra", "dec", "ra1", "ra2", "dec1", "dec2")


def read_survey_bricks(path_or_fileobj: PathLike | BinaryIO,
                       extra_columns: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """Read a survey-bricks FITS table (``.fits`` or ``.fits.gz``, path or binary file object).

    Returns ``{column: numpy array}`` with lower-case keys ``brickname`` (str), ``ra``, ``dec``
    (centre, deg), ``ra1``, ``ra2``, ``dec1``, ``dec2`` (bounds of the brick's unique area,
    deg, float64) plus any ``extra_columns`` (e.g. ``brickid``).  Input column names are
    matched case-insensitively; the first table HDU is used.  Raises ValueError naming the
    file and the missing column(s).  ``pyarrow.table(result)`` gives an Arrow table.
    """
    from astropy.io import fits

    is_path = isinstance(path_or_fileobj, (str, os.PathLike))
    label = os.fspath(path_or_fileobj) if is_path else \
        (getattr(path_or_fileobj, "name", None) or "<survey-bricks file object>")
    if is_path and not os.path.exists(path_or_fileobj):
        raise FileNotFoundError(f"survey-bricks file not found: {label}")
    if not is_path:  # astropy detects gzip from file names only: decompress file objects here
        head = path_or_fileobj.read(2)
        path_or_fileobj.seek(-len(head), io.SEEK_CUR)
        if head == b"\x1f\x8b":
            import gzip
            with gzip.GzipFile(fileobj=path_or_fileobj) as gz:
                path_or_fileobj = io.BytesIO(gz.read())
    try:
        with fits.open(path_or_fileobj, memmap=False) as hdul:
            table_hdu = next((h for h in hdul[1:] if isinstance(h, fits.BinTableHDU)), None)
            if table_hdu is None:
                raise ValueError(f"{label}: no binary table HDU (expected survey-bricks table)")
            data = table_hdu.data
            names = {n.lower(): n for n in data.columns.names}
            wanted = list(SURVEY_BRICKS_COLUMNS) + [c.lower() for c in extra_columns]
            missing = [c for c in wanted if c not in names]
            if missing:
                raise ValueError(
                    f"{label}: survey-bricks table lacks column(s) {missing} (case-insensitive);"
                    f" has {data.columns.names}")
            out: dict[str, np.ndarray] = {}
            for c in wanted:
                col = np.asarray(data[names[c]])
                if c == "brickname":
                    col = np.char.strip(np.char.lower(col.astype(str)))
                elif c in SURVEY_BRICKS_COLUMNS:
                    col = col.astype(np.float64)
                else:
                    col = col.astype(col.dtype.newbyteorder("="))
                out[c] = col
            return out
    except (OSError, TypeError) as exc:
        raise ValueError(f"{label}: cannot read survey-bricks FITS table: {exc}") from exc


# ----------------------------------------------------------------------------- parent catalogue
@dataclass(frozen=True)
class CatalogueColumn:
    """One documented column of a parent (lens-candidate) catalogue in Parquet.

    ``name`` is the DR10 name, lower case (the DR10 sweeps store the same names upper case);
    ``dtype`` the Arrow type DR10 uses (``string`` for char[n]); ``source``: ``tractor``
    (DR10 Tractor / sweep catalogue), ``photo-z`` (DR10.1 photo-z sweeps, row-matched to the
    sweeps by release, brickid, objid) or ``user`` (not a DR10 column).
    ``nullable``: null (NaN in pandas) where unknown.
    """

    name: str
    dtype: str
    unit: str
    meaning: str
    source: str
    required: bool = False
    nullable: bool = False


#: DECam extinction coefficients A_band / E(B-V) used for DR10 mw_transmission (Schlafly's
#: values for a 7000 K source at airmass 1.3; legacysurvey.org DR10 "catalogs" page)
EXTINCTION_COEFFS: dict[str, float] = {"g": 3.214, "r": 2.165, "z": 1.211}
#: DR10 photo-z fill value (objects failing the NOBS cut; z_spec where there is none)
PHOTOZ_FILL: float = -99.0
#: DR10 RELEASE of DECam DR10 (DR10.1 reprocessed bricks: 10002)
RELEASE_DR10: int = 10000

_PZ = "photo-z"
_PHOTOZ_PDF = "; -99 where not computed (NOBS_G,R,Z < 1)"
CATALOGUE_COLUMNS: tuple[CatalogueColumn, ...] = (
    CatalogueColumn("brickname", "string", "", "DR10 brick name, e.g. `1126p222`",
                    "tractor", required=True),
    CatalogueColumn("objid", "int32", "", "object number within the brick (0..N-1)",
                    "tractor", required=True),
    CatalogueColumn("ra", "float64", "deg", "right ascension (ICRS)", "tractor", required=True),
    CatalogueColumn("dec", "float64", "deg", "declination (ICRS)", "tractor", required=True),
    CatalogueColumn("flux_r", "float32", "nanomaggy", "r model flux, NOT extinction-corrected "
                    "(m = 22.5 - 2.5 log10 flux)", "tractor", required=True),
    CatalogueColumn("release", "int16", "", "10000 DR10 DECam (10002: DR10.1 reprocessed)",
                    "tractor"),
    CatalogueColumn("brickid", "int32", "", "survey-bricks BRICKID", "tractor"),
    CatalogueColumn("type", "string", "", "Tractor model: PSF, REX, DEV, EXP, SER (DUP); "
                    "forced PSF inside BRIGHT, GALAXY, CLUSTER masks", "tractor"),
    CatalogueColumn("sersic", "float32", "", "Sersic index: 4 DEV, 1 EXP/REX, fitted SER, "
                    "0 PSF", "tractor"),
    CatalogueColumn("shape_r", "float32", "arcsec", "half-light radius (0 for PSF)",
                    "tractor"),
    CatalogueColumn("shape_e1", "float32", "", "ellipticity e cos 2theta, e = (1-q)/(1+q), "
                    "theta = PA east of north (`lensing.shapes`)", "tractor"),
    CatalogueColumn("shape_e2", "float32", "", "ellipticity e sin 2theta", "tractor"),
    CatalogueColumn("flux_g", "float32", "nanomaggy", "g model flux, not extinction-corrected",
                    "tractor"),
    CatalogueColumn("flux_z", "float32", "nanomaggy", "z model flux, not extinction-corrected",
                    "tractor"),
    CatalogueColumn("ebv", "float32", "mag", "Galactic E(B-V) (SFD98) at the object",
                    "tractor"),
    CatalogueColumn("mw_transmission_g", "float32", "", "Galactic transmission "
                    "10^(-0.4 x 3.214 ebv); dereddened flux = flux_g / it", "tractor"),
    CatalogueColumn("mw_transmission_r", "float32", "", "10^(-0.4 x 2.165 ebv)", "tractor"),
    CatalogueColumn("mw_transmission_z", "float32", "", "10^(-0.4 x 1.211 ebv)", "tractor"),
    CatalogueColumn("maskbits", "int32", "bits", "maskbits map at the object's pixel "
                    "(round(bx), round(by)) (`lensing.maskbits.MASKBITS`)", "tractor"),
    CatalogueColumn("z_phot_mean", "float32", "", "mean of the photo-z PDF" + _PHOTOZ_PDF, _PZ),
    CatalogueColumn("z_phot_median", "float32", "", "median of the photo-z PDF", _PZ),
    CatalogueColumn("z_phot_std", "float32", "", "standard deviation of the photo-z PDF", _PZ),
    CatalogueColumn("z_phot_l68", "float32", "", "16th percentile of the photo-z PDF", _PZ),
    CatalogueColumn("z_phot_u68", "float32", "", "84th percentile", _PZ),
    CatalogueColumn("z_phot_l95", "float32", "", "2.5th percentile", _PZ),
    CatalogueColumn("z_phot_u95", "float32", "", "97.5th percentile", _PZ),
    CatalogueColumn("z_spec", "float32", "", "spectroscopic redshift of the photo-z truth "
                    "table; -99 when none", _PZ),
    CatalogueColumn("survey", "string", "", "source survey of z_spec (char[12]); '' when none",
                    _PZ),
    CatalogueColumn("training", "bool", "", "z_spec used in the photo-z training", _PZ),
    CatalogueColumn("z", "float64", "", "user's spectroscopic redshift of the lens", "user",
                    nullable=True),
    CatalogueColumn("sigma", "float64", "km/s", "user's stellar velocity dispersion of the "
                    "lens", "user", nullable=True),
)
CATALOGUE_COLUMN_BY_NAME: dict[str, CatalogueColumn] = {c.name: c for c in CATALOGUE_COLUMNS}
#: columns every parent catalogue must have (stage 4a reads only these)
REQUIRED_CATALOGUE_COLUMNS: tuple[str, ...] = tuple(c.name for c in CATALOGUE_COLUMNS
                                                    if c.required)
#: documented optional columns (lens model, photometry, redshifts); when one is missing the
#: consumer records the fallback it used in its provenance
OPTIONAL_CATALOGUE_COLUMNS: tuple[str, ...] = tuple(c.name for c in CATALOGUE_COLUMNS
                                                    if not c.required)
PHOTOZ_COLUMNS: tuple[str, ...] = tuple(c.name for c in CATALOGUE_COLUMNS if c.source == _PZ)


class CatalogueError(ValueError):
    """A parent catalogue does not follow the documented schema (message names the file)."""


def mw_transmission(ebv, band: str) -> np.ndarray:
    """Galactic transmission 10^(-0.4 R_band E(B-V)) as DR10's ``mw_transmission_<band>``.

    ``ebv``: E(B-V) in mag (array-like); computed in float64, returned as float32 like DR10.
    """
    if band not in EXTINCTION_COEFFS:
        raise ValueError(f"no DR10 extinction coefficient for band {band!r}; "
                         f"known: {sorted(EXTINCTION_COEFFS)}")
    ebv = np.asarray(ebv, dtype=np.float64)
    return np.power(10.0, -0.4 * EXTINCTION_COEFFS[band] * ebv).astype(np.float32)


def catalogue_arrow_schema(names: Iterable[str] | None = None):
    """``pyarrow.Schema`` of the documented columns (all of them, or ``names`` in that order)."""
    import pyarrow as pa

    names = [c.name for c in CATALOGUE_COLUMNS] if names is None else list(names)
    unknown = [n for n in names if n not in CATALOGUE_COLUMN_BY_NAME]
    if unknown:
        raise KeyError(f"not documented catalogue column(s) {unknown}")
    return pa.schema([pa.field(n, pa.type_for_alias(CATALOGUE_COLUMN_BY_NAME[n].dtype),
                               nullable=True) for n in names])


def _type_family(t) -> str:
    """'string', 'bool', 'int', 'float', 'null' or 'other' for an Arrow DataType."""
    import pyarrow as pa

    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "string"
    if pa.types.is_boolean(t):
        return "bool"
    if pa.types.is_integer(t):
        return "int"
    if pa.types.is_floating(t):
        return "float"
    if pa.types.is_null(t):
        return "null"
    return "other"


#: Arrow type families accepted for a documented dtype (floats accept integers: exact casts)
_ACCEPTED = {"string": {"string"}, "bool": {"bool"}, "int16": {"int"}, "int32": {"int"},
             "float32": {"float", "int"}, "float64": {"float", "int"}}


@dataclass(frozen=True)
class CatalogueCheck:
    """Result of :func:`validate_parent_catalogue` (only returned when there is no error)."""

    source: str
    columns: tuple[str, ...]                 # documented columns present
    missing_optional: tuple[str, ...]        # documented optional columns absent
    extra: tuple[str, ...]                   # undocumented columns (ignored by the pipeline)
    all_null: tuple[str, ...] = ()           # optional columns of Arrow type null

    @property
    def has_photoz(self) -> bool:
        return all(c in self.columns for c in PHOTOZ_COLUMNS)


def _catalogue_schema(catalogue):
    """(Arrow schema, label) of a path (file or dataset directory), table, schema or DataFrame."""
    import pyarrow as pa

    if isinstance(catalogue, pa.Schema):
        return catalogue, "<schema>"
    if isinstance(catalogue, pa.Table):
        return catalogue.schema, "<table>"
    if isinstance(catalogue, (str, os.PathLike)):
        import pyarrow.dataset as ds

        label = os.fspath(catalogue)
        if not os.path.exists(label):
            raise FileNotFoundError(f"parent catalogue not found: {label}")
        try:
            return ds.dataset(label, format="parquet").schema, label
        except (pa.ArrowInvalid, OSError) as exc:
            raise CatalogueError(f"{label}: not a readable Parquet catalogue: {exc}") from exc
    if hasattr(catalogue, "dtypes") and hasattr(catalogue, "columns"):      # pandas
        return pa.Schema.from_pandas(catalogue, preserve_index=False), "<DataFrame>"
    raise TypeError(f"cannot validate a catalogue given as {type(catalogue).__name__}")


def validate_parent_catalogue(catalogue, *, label: str | None = None) -> CatalogueCheck:
    """Check a parent catalogue's columns against :data:`CATALOGUE_COLUMNS` (schema only).

    ``catalogue``: Parquet path (file or directory of parts), ``pyarrow.Table`` /
    ``Schema`` or pandas DataFrame; ``label`` names it in messages (default: the path).
    Errors (one :class:`CatalogueError` listing all): a required column missing; a documented
    column of an incompatible type (integers for int columns; floats or integers for float
    columns; strings; booleans); a documented name present only in another case (DR10 sweeps
    are upper case: rename to lower case).  Missing optional columns are not errors: they
    are listed in ``missing_optional`` for the consumer's provenance.
    """
    schema, default_label = _catalogue_schema(catalogue)
    label = label or default_label
    have = {f.name: f.type for f in schema}
    lower = {n.lower(): n for n in have}
    errors: list[str] = []
    present, missing_opt, all_null = [], [], []
    for col in CATALOGUE_COLUMNS:
        kind = "required" if col.required else "optional"
        if col.name not in have:
            other = lower.get(col.name)
            if other is not None:
                errors.append(f"column {other!r} must be named {col.name!r} (lower case, as "
                              f"documented; DR10 sweeps use upper case)")
            elif col.required:
                errors.append(f"required column {col.name!r} is missing (expected {col.dtype}"
                              f"{', ' + col.unit if col.unit else ''}: {col.meaning})")
            else:
                missing_opt.append(col.name)
            continue
        fam = _type_family(have[col.name])
        if fam == "null" and not col.required:
            all_null.append(col.name)
        elif fam not in _ACCEPTED[col.dtype]:
            errors.append(f"{kind} column {col.name!r} has type {have[col.name]}, expected "
                          f"{col.dtype}{' (' + col.unit + ')' if col.unit else ''}")
        present.append(col.name)
    if errors:
        raise CatalogueError(f"{label}: parent catalogue does not follow the DR10 catalogue "
                             f"schema (docs/dr10.md): " + "; ".join(errors))
    extra = tuple(n for n in have if n not in CATALOGUE_COLUMN_BY_NAME)
    return CatalogueCheck(source=label, columns=tuple(present),
                          missing_optional=tuple(missing_opt), extra=extra,
                          all_null=tuple(all_null))


def read_parent_catalogue(path: PathLike, columns: Sequence[str] | None = None):
    """Validate then read a Parquet parent catalogue as a ``pyarrow.Table``.

    ``columns``: documented or extra columns to read (default all); asking for an absent
    column raises :class:`CatalogueError` naming the file.  Documented columns come back
    cast to their documented Arrow types (e.g. a float64 ``flux_r`` as float32).
    """
    import pyarrow as pa
    import pyarrow.dataset as ds

    check = validate_parent_catalogue(path)
    have = set(check.columns) | set(check.extra)
    names = list(columns) if columns is not None else \
        [c for c in (*check.columns, *check.extra)]
    absent = [c for c in names if c not in have]
    if absent:
        raise CatalogueError(f"{check.source}: parent catalogue has no column(s) {absent}")
    table = ds.dataset(os.fspath(path), format="parquet").to_table(columns=names)
    fields = []
    for f in table.schema:
        spec = CATALOGUE_COLUMN_BY_NAME.get(f.name)
        fields.append(pa.field(f.name, pa.type_for_alias(spec.dtype)) if spec else f)
    return table.cast(pa.schema(fields))


def catalogue_markdown() -> str:
    """The documented columns as the Markdown table of ``docs/dr10.md``."""
    rows = ["| column | type | unit | source | required | meaning |", "|---|---|---|---|---|---|"]
    for c in CATALOGUE_COLUMNS:
        req = "yes" if c.required else ("no (null = unknown)" if c.nullable else "no")
        rows.append(f"| `{c.name}` | {c.dtype} | {c.unit} | {c.source} | {req} | {c.meaning} |")
    return "\n".join(rows)


# ----------------------------------------------------------------------------- geometry
def brick_wcs(ra_c: float, dec_c: float, size: int = BRICK_SIZE,
              pixscale: float = PIXSCALE_ARCSEC):
    """astropy WCS of a ``size x size`` brick centred on (ra_c, dec_c).

    TAN, CRVAL = centre, CRPIX = (size+1)/2 (1800.5 for 3600: FITS 1-based), so the centre is
    0-based pixel ((size-1)/2, (size-1)/2); CD1_1 = -pixscale/3600 (east left),
    CD2_2 = +pixscale/3600, no rotation.  ``pixel_shape`` = (size, size).
    """
    from astropy.wcs import WCS

    size = int(size)
    if size <= 0:
        raise ValueError(f"brick size must be positive, got {size}")
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [float(ra_c) % 360.0, float(dec_c)]
    w.wcs.crpix = [(size + 1) / 2.0, (size + 1) / 2.0]
    s = pixscale / 3600.0
    w.wcs.cd = np.array([[-s, 0.0], [0.0, s]])
    w.wcs.radesys = "ICRS"
    w.wcs.equinox = 2000.0
    w.pixel_shape = (size, size)
    w.wcs.set()
    return w


def wcs_header_cards(wcs) -> list[tuple[str, Any, str]]:
    """DR10-style WCS header cards (CTYPE, CRVAL, CRPIX, CD, IMAGEW/H) for a brick WCS."""
    cd = wcs.wcs.cd
    nx, ny = wcs.pixel_shape
    return [
        ("CTYPE1", "RA---TAN", "TAN (gnomic) projection"),
        ("CTYPE2", "DEC--TAN", "TAN (gnomic) projection"),
        ("CRVAL1", float(wcs.wcs.crval[0]), "RA of reference point"),
        ("CRVAL2", float(wcs.wcs.crval[1]), "Dec of reference point"),
        ("CRPIX1", float(wcs.wcs.crpix[0]), "X reference pixel (1-based)"),
        ("CRPIX2", float(wcs.wcs.crpix[1]), "Y reference pixel (1-based)"),
        ("CD1_1", float(cd[0, 0]), "CD matrix"),
        ("CD1_2", float(cd[0, 1]), "CD matrix"),
        ("CD2_1", float(cd[1, 0]), "CD matrix"),
        ("CD2_2", float(cd[1, 1]), "CD matrix"),
        ("IMAGEW", float(nx), "Image width"),
        ("IMAGEH", float(ny), "Image height"),
        ("RADESYS", "ICRS", ""),
        ("EQUINOX", 2000.0, ""),
    ]


_WCS_KEYS = ("CTYPE1", "CTYPE2", "CRVAL1", "CRVAL2", "CRPIX1", "CRPIX2",
             "CD1_1", "CD1_2", "CD2_1", "CD2_2", "RADESYS", "EQUINOX")


def wcs_from_header(header) -> Any:
    """astropy WCS from a plane header (image or compressed-bintable header).

    Reads CTYPE, CRVAL, CRPIX, CD, RADESYS and EQUINOX (the keys DR10 coadds carry);
    ``pixel_shape`` from ZNAXISn/NAXISn.  A plain TAN header with the full CD matrix (every
    DR10 coadd) is set on the WCS directly from the parsed values (~40x faster than building
    an ``astropy.io.fits.Header``, and the floats are not re-formatted on the way); any other
    header goes through astropy's header parser.
    """
    from astropy.wcs import WCS

    if (header.get("CTYPE1") == "RA---TAN" and header.get("CTYPE2") == "DEC--TAN"
            and all(k in header for k in _WCS_KEYS[2:10])):
        w = WCS(naxis=2)
        w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
        w.wcs.crval = [float(header["CRVAL1"]), float(header["CRVAL2"])]
        w.wcs.crpix = [float(header["CRPIX1"]), float(header["CRPIX2"])]
        w.wcs.cd = np.array([[float(header["CD1_1"]), float(header["CD1_2"])],
                             [float(header["CD2_1"]), float(header["CD2_2"])]])
        if "RADESYS" in header:
            w.wcs.radesys = str(header["RADESYS"]).strip()
        if "EQUINOX" in header:
            w.wcs.equinox = float(header["EQUINOX"])
        w.wcs.set()
    else:
        from astropy.io import fits

        h = fits.Header()
        for k in _WCS_KEYS:
            if k in header:
                h[k] = header[k]
        w = WCS(h, naxis=2)
    nx = header.get("ZNAXIS1", header.get("NAXIS1"))
    ny = header.get("ZNAXIS2", header.get("NAXIS2"))
    if nx and ny:
        w.pixel_shape = (int(nx), int(ny))
    return w


def radec_to_brick_pixel(wcs, ra, dec) -> tuple[np.ndarray, np.ndarray]:
    """(ra, dec) deg -> 0-based (x = column, y = row) float64 pixel coordinates (vectorised).

    Pixel (0, 0) is the centre of the first stored pixel; ``image[int(round(y)), int(round(x))]``
    is the pixel containing the position.
    """
    x, y = wcs.all_world2pix(np.asarray(ra, dtype=np.float64),
                             np.asarray(dec, dtype=np.float64), 0)
    return np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)


def brick_pixel_to_radec(wcs, x, y) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`radec_to_brick_pixel`: 0-based (x, y) -> (ra in [0, 360), dec) deg."""
    ra, dec = wcs.all_pix2world(np.asarray(x, dtype=np.float64),
                                np.asarray(y, dtype=np.float64), 0)
    return np.asarray(ra, dtype=np.float64) % 360.0, np.asarray(dec, dtype=np.float64)


def tiles_touched(rows: slice, cols: slice, shape: tuple[int, int],
                  tile_shape: tuple[int, int] = TILE_SHAPE) -> list[int]:
    """0-based indices (row-major, as stored) of the compression tiles a region touches."""
    ny, nx = shape
    ty, tx = tile_shape
    ntx = -(-nx // tx)
    r0, r1 = rows.start, rows.stop
    c0, c1 = cols.start, cols.stop
    if r1 <= r0 or c1 <= c0:
        return []
    return [iy * ntx + ix for iy in range(r0 // ty, (r1 - 1) // ty + 1)
            for ix in range(c0 // tx, (c1 - 1) // tx + 1)]


# ----------------------------------------------------------------------------- loaders
@dataclass
class PlaneInfo:
    """Facts about HDU 1 of a product file, parsed from its raw headers (no decompression)."""

    path: str
    product: str | None
    band: str | None
    shape: tuple[int, int]          # (ny, nx) of the full plane
    dtype: np.dtype                 # dtype of the decompressed data
    compressed: bool
    zcmptype: str | None
    bunit: str | None
    magzero: float | None
    header: Any                     # HDU 1's value cards, keyword -> value (raw; Z* keys for compressed)
    data_end: int                   # byte offset where HDU 1's data must end

    def wcs(self):
        return wcs_from_header(self.header)


@dataclass
class Plane:
    """Pixels read from one plane: ``data[rows, cols]`` of the full plane plus its facts."""

    data: np.ndarray
    info: PlaneInfo
    rows: slice
    cols: slice

    @property
    def bunit(self) -> str | None:
        return self.info.bunit

    @property
    def magzero(self) -> float | None:
        return self.info.magzero


@dataclass
class Cutout:
    """A ``size x size`` stamp; pixels outside the brick are ``fill`` and ``valid`` False.

    ``x0, y0`` is the brick pixel of stamp pixel [0, 0]; a target at brick pixel (x, y) sits at
    stamp pixel (x - x0, y - y0) (sub-pixel exact; see :func:`cutout_origin`).
    """

    data: np.ndarray
    valid: np.ndarray
    x0: int
    y0: int
    info: PlaneInfo
    extra: dict = field(default_factory=dict)


_BLOCK = 2880


def card_value(text: str):
    """Value of the value field of a FITS ``KEY = value / comment`` card: str (quotes
    undoubled, trailing blanks dropped, as astropy), bool (T/F), int or float."""
    v = text.strip()
    if v.startswith("'"):
        out, i = [], 1
        while i < len(v):
            if v[i] == "'":
                if v[i + 1:i + 2] == "'":
                    out.append("'")
                    i += 2
                    continue
                break
            out.append(v[i])
            i += 1
        return "".join(out).rstrip()
    v = v.split("/", 1)[0].strip()
    if v in ("T", "F"):
        return v == "T"
    try:
        return int(v)
    except ValueError:
        try:
            return float(v.replace("D", "E"))
        except ValueError:
            return v


class HeaderCards(Mapping):
    """keyword -> value of a FITS header's value cards, each value parsed
    (:func:`card_value`) on first access: stage 4c opens ~20 headers per brick and reads ~15
    keywords of their tens to hundreds of cards.  ``text`` maps keyword -> the card's value
    field (columns 11-80)."""

    def __init__(self, text: dict):
        self._text = text
        self._values: dict = {}

    def __getitem__(self, key):
        try:
            return self._values[key]
        except KeyError:
            v = self._values[key] = card_value(self._text[key])
            return v

    def get(self, key, default=None):
        if key in self._values:
            return self._values[key]
        text = self._text.get(key)
        if text is None:
            return default
        v = self._values[key] = card_value(text)
        return v

    def __contains__(self, key) -> bool:
        return key in self._text

    def __iter__(self):
        return iter(self._text)

    def __len__(self) -> int:
        return len(self._text)

    def __repr__(self) -> str:
        return f"HeaderCards({dict(self)!r})"


_END_CARD = b"END" + b" " * 77


def end_card_offset(buf: bytes, start: int = 0, stop: int | None = None) -> int | None:
    """Offset just past the END card of the header that starts at ``start`` of ``buf`` (the
    first all-blank ``END`` card on the 80-byte card grid from ``start``, searched before
    ``stop``), or None when there is none."""
    stop = len(buf) if stop is None else stop
    i = buf.find(_END_CARD, start, stop)
    while i >= 0:
        if (i - start) % 80 == 0:
            return i + 80
        i = buf.find(_END_CARD, i + 1, stop)
    return None


def parse_header_cards(raw: str) -> HeaderCards:
    """keyword -> value of the value cards of a FITS header text (80-char cards up to END;
    the first card of a repeated keyword wins, as astropy's ``header[key]``; values parsed on
    access).  A minimal parser, ~50x faster than ``astropy.io.fits.Header.fromstring`` for
    the structural and WCS keywords read here; the one card scanner of the package."""
    out: dict = {}
    for i in range(0, len(raw) - 79, 80):
        card = raw[i:i + 80]
        key = card[:8].rstrip()
        if key == "END" and not card[3:].strip():
            break
        if card[8:10] == "= " and key and key not in out:
            out[key] = card[10:]
    return HeaderCards(out)


def _read_header_blocks(f: BinaryIO, label: str, offset: int):
    """Read one FITS header starting at ``offset``; return (keyword -> value dict, end
    offset) (:func:`parse_header_cards`)."""
    f.seek(offset)
    chunks = []
    while True:
        block = f.read(_BLOCK)
        if len(block) < _BLOCK:
            raise DR10FileError(f"{label}: truncated or not FITS: header at byte {offset} has "
                                f"no END card before end of file")
        chunks.append(block)
        # END card: 80-char card starting with 'END' followed by blanks
        if end_card_offset(block) is not None:
            raw = b"".join(chunks).decode("ascii", errors="replace")
            try:
                hdr = parse_header_cards(raw)
            except Exception as exc:  # noqa: BLE001 - re-raised with context
                raise DR10FileError(f"{label}: unparsable FITS header at byte {offset}: "
                                    f"{exc}") from exc
            return hdr, offset + len(chunks) * _BLOCK
        if len(chunks) > 1000:
            raise DR10FileError(f"{label}: no END card in the first 1000 header blocks")


def hdu_data_size(h) -> int:
    """Bytes of an HDU's data (before padding to 2880) from its header mapping: |BITPIX|/8 x
    GCOUNT x (NAXIS1 x ... x NAXISn + PCOUNT); 0 when NAXIS = 0 (FITS standard 4.0, 4.4.1)."""
    naxis = int(h.get("NAXIS", 0))
    if naxis == 0:
        return 0
    n = 1
    for i in range(1, naxis + 1):
        n *= int(h[f"NAXIS{i}"])
    return abs(int(h["BITPIX"])) // 8 * int(h.get("GCOUNT", 1)) * (n + int(h.get("PCOUNT", 0)))


def inspect_plane(path_or_fileobj: PathLike | BinaryIO, product: str | None = None,
                  expected_shape: tuple[int, int] | None = None) -> PlaneInfo:
    """Validate HDU 1 of a product file from its raw headers; no pixels are decompressed.

    Checks: file exists and is FITS (``SIMPLE``); HDU 1 exists and is an image or a
    tile-compressed image; the file is long enough to hold HDU 1's data (truncation);
    BITPIX/ZBITPIX matches ``product`` (float32 for image/invvar/psfsize, int32 for
    maskbits); 2-D shape equals ``expected_shape`` if given.  ``product`` defaults to the one
    in the file name.  Raises FileNotFoundError or :class:`DR10FileError` naming the file.
    """
    if isinstance(path_or_fileobj, (str, os.PathLike)):
        label = os.fspath(path_or_fileobj)
        if not os.path.exists(label):
            raise FileNotFoundError(f"DR10 file not found: {label}")
        with open(label, "rb") as f:
            return _inspect(f, label, os.path.getsize(label), product, expected_shape)
    f = path_or_fileobj
    label = getattr(f, "name", None) or "<file object>"
    pos = f.tell()
    try:
        size = f.seek(0, io.SEEK_END)
        return _inspect(f, label, size, product, expected_shape)
    finally:
        f.seek(pos)


def _inspect(f, label, filesize, product, expected_shape) -> PlaneInfo:
    if filesize == 0:
        raise DR10FileError(f"{label}: empty file (0 bytes), expected a tile-compressed FITS")
    f.seek(0)
    if f.read(9) != b"SIMPLE  =":
        raise DR10FileError(f"{label}: not a FITS file (does not start with 'SIMPLE  =')")
    h0, end0 = _read_header_blocks(f, label, 0)
    start1 = end0 + -(-hdu_data_size(h0) // _BLOCK) * _BLOCK
    if start1 >= filesize:
        raise DR10FileError(f"{label}: truncated or missing HDU 1 (file has {filesize} bytes, "
                            f"HDU 1 would start at byte {start1}); expected the plane in HDU 1")
    h1, data_start = _read_header_blocks(f, label, start1)
    return plane_info_from_headers(label, filesize, h1, data_start, product, expected_shape)


def plane_info_from_headers(label: str, filesize: int, h1, data_start: int,
                            product: str | None = None,
                            expected_shape: tuple[int, int] | None = None) -> PlaneInfo:
    """The checks of :func:`inspect_plane` on HDU 1's already parsed header ``h1``
    (:func:`parse_header_cards`) whose data start at byte ``data_start`` of a file of
    ``filesize`` bytes: for a caller that has just parsed the head anyway (stage 4c's range
    reads, :mod:`injection_pipeline.tile_ranges`), so that it is not read and parsed twice."""
    band = None
    if product is None:
        try:
            _, product, band = parse_product_filename(label)
        except ValueError:
            product = None
    data_end = data_start + hdu_data_size(h1)
    if filesize < data_end:
        raise DR10FileError(f"{label}: truncated: HDU 1 data need bytes up to {data_end}, file "
                            f"has {filesize} bytes")
    compressed = bool(h1.get("ZIMAGE", False))
    if compressed:
        bitpix, naxis = int(h1["ZBITPIX"]), int(h1["ZNAXIS"])
        shape = tuple(int(h1[f"ZNAXIS{i}"]) for i in range(naxis, 0, -1))
    elif h1.get("XTENSION", "").strip() == "IMAGE":
        bitpix, naxis = int(h1["BITPIX"]), int(h1["NAXIS"])
        shape = tuple(int(h1[f"NAXIS{i}"]) for i in range(naxis, 0, -1))
    else:
        raise DR10FileError(f"{label}: HDU 1 is {h1.get('XTENSION')!r}, expected an image or a "
                            f"tile-compressed image")
    if len(shape) != 2:
        raise DR10FileError(f"{label}: HDU 1 has shape {shape}, expected a 2-D plane")
    dtype = {-32: np.dtype(np.float32), -64: np.dtype(np.float64), 8: np.dtype(np.uint8),
             16: np.dtype(np.int16), 32: np.dtype(np.int32), 64: np.dtype(np.int64)}[bitpix]
    if h1.get("BZERO", 0) not in (0, 0.0) or h1.get("BSCALE", 1) not in (1, 1.0):
        raise DR10FileError(f"{label}: scaled integers (BZERO/BSCALE) not expected")
    if product is not None:
        if product not in PRODUCT_DTYPES:
            raise ValueError(f"unknown product {product!r}")
        if dtype != PRODUCT_DTYPES[product]:
            raise DR10FileError(f"{label}: {product} data are {dtype} (BITPIX {bitpix}), "
                                f"expected {PRODUCT_DTYPES[product]}")
    if expected_shape is not None and tuple(shape) != tuple(expected_shape):
        raise DR10FileError(f"{label}: plane shape {shape}, expected {tuple(expected_shape)}")
    if band is None and product in BAND_PRODUCTS:
        band = (h1.get("BAND") or "").strip() or None
    magzero = h1.get("MAGZERO")
    return PlaneInfo(path=label, product=product, band=band, shape=shape, dtype=dtype,
                     compressed=compressed, zcmptype=h1.get("ZCMPTYPE"),
                     bunit=h1.get("BUNIT"), magzero=None if magzero is None else float(magzero),
                     header=h1, data_end=data_end)


def _norm_slice(s, n: int, what: str, label: str) -> slice:
    if s is None:
        return slice(0, n)
    if isinstance(s, tuple):
        s = slice(*s)
    if not isinstance(s, slice) or s.step not in (None, 1):
        raise ValueError(f"{label}: {what} must be a slice with step 1 or (start, stop), "
                         f"got {s!r}")
    start = 0 if s.start is None else int(s.start)
    stop = n if s.stop is None else int(s.stop)
    if not (0 <= start < stop <= n):
        raise ValueError(f"{label}: {what} {start}:{stop} outside the plane's 0:{n}")
    return slice(start, stop)


def _native(a: np.ndarray, dtype: np.dtype) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype != dtype:  # big-endian or other: convert to native expected dtype
        a = a.astype(dtype)
    return np.ascontiguousarray(a)


class _Reader:
    """One product file, validated once; fitsio/astropy handles opened lazily and kept.

    ``engine="auto"`` follows the measurements in the module docstring: whole-plane reads with
    astropy (about 2x less CPU than fitsio here), cutouts with fitsio when a path is given
    (0.3-0.9 ms vs 0.6-1.0 ms; open + cutout 1.0-1.5 ms vs 4-8 ms), astropy for file objects.
    """

    def __init__(self, path_or_fileobj, product=None, expected_shape=None, engine="auto",
                 cache_tiles: bool = False, head=None, decode_tile=None):
        """``head``: (HDU 1's parsed header, its data start, the file size) when the caller
        has parsed the file's head already (:func:`plane_info_from_headers`), else the file
        is inspected (:func:`inspect_plane`).  ``decode_tile``: ``t -> pixels of tile t``
        (row-major tile index) for a plane held in memory, not in a file (stage 4c's range
        reads, :mod:`injection_pipeline.tile_codec`): ``path_or_fileobj`` is then only the
        plane's label (its URI), ``head`` is required, and every read, whole planes too,
        goes through the tile cache."""
        self._decode_tile = decode_tile
        if decode_tile is not None:
            if head is None:
                raise ValueError("a tile decoder needs the parsed head")
            engine, cache_tiles = "auto", True
        if engine not in ("auto", "fitsio", "astropy"):
            raise ValueError(f"engine must be 'auto', 'fitsio' or 'astropy', got {engine!r}")
        self.source = path_or_fileobj
        self.is_path = isinstance(path_or_fileobj, (str, os.PathLike))
        if engine == "fitsio" and not self.is_path:
            raise ValueError("fitsio needs a file path; use engine='astropy' for file objects")
        if head is not None:
            if not self.is_path:
                raise ValueError("a parsed head is for a file path")
            self.info = plane_info_from_headers(os.fspath(path_or_fileobj), int(head[2]),
                                                head[0], int(head[1]), product, expected_shape)
        else:
            self.info = inspect_plane(path_or_fileobj, product, expected_shape)
        self.engine = engine
        self._handles: dict[str, Any] = {}
        # tile cache (cache_tiles=True, tile-compressed planes only): tile index -> the
        # decompressed tile; each tile is decompressed at most once while the reader is open.
        self.tile_shape = _tile_shape(self.info) if cache_tiles else None
        self._tiles: dict[int, np.ndarray] = {}
        self._failed: dict[int, str] = {}          # tile -> first decompression error
        self.tiles_decoded = 0

    def _engine_for(self, full: bool) -> str:
        if self.engine != "auto":
            return self.engine
        return "astropy" if (full or not self.is_path) else "fitsio"

    def _hdu(self, engine: str):
        if engine not in self._handles:
            try:
                if engine == "fitsio":
                    import fitsio
                    self._handles[engine] = fitsio.FITS(os.fspath(self.source))
                else:
                    from astropy.io import fits
                    if not self.is_path:
                        self.source.seek(0)
                    self._handles[engine] = fits.open(self.source, memmap=False,
                                                      lazy_load_hdus=True)
            except Exception as exc:  # noqa: BLE001 - re-raised with the file name
                raise DR10FileError(f"{self.info.path}: cannot open with {engine}: "
                                    f"{exc}") from exc
        return self._handles[engine][1]

    def read(self, rows=None, cols=None) -> Plane:
        ny, nx = self.info.shape
        label = self.info.path
        rows = _norm_slice(rows, ny, "rows", label)
        cols = _norm_slice(cols, nx, "cols", label)
        full = rows == slice(0, ny) and cols == slice(0, nx)
        if self.tile_shape is not None and (not full or self._decode_tile is not None):
            return Plane(data=self._read_via_tiles(rows, cols), info=self.info, rows=rows,
                         cols=cols)
        engine = self._engine_for(full)
        hdu = self._hdu(engine)
        try:
            if engine == "fitsio":
                data = hdu.read() if full else hdu[rows, cols]
            else:
                data = hdu.data if full else hdu.section[rows, cols]
        except Exception as exc:  # noqa: BLE001 - re-raised with the file name
            raise DR10FileError(f"{label}: cannot decompress rows {rows.start}:{rows.stop} cols "
                                f"{cols.start}:{cols.stop} of HDU 1 ({engine}): {exc}") from exc
        data = _native(data, self.info.dtype)
        if data.shape != (rows.stop - rows.start, cols.stop - cols.start):
            raise DR10FileError(f"{label}: read shape {data.shape}, expected "
                                f"{(rows.stop - rows.start, cols.stop - cols.start)}")
        return Plane(data=data, info=self.info, rows=rows, cols=cols)

    def _read_via_tiles(self, rows: slice, cols: slice) -> np.ndarray:
        """``[rows, cols]`` assembled from cached whole compression tiles.

        Each tile is decompressed once (a tile-aligned read, so the pixels are exactly those
        of any other read: decompression is per tile) and kept until :meth:`close`.
        """
        ny, nx = self.info.shape
        ty, tx = self.tile_shape
        out = np.empty((rows.stop - rows.start, cols.stop - cols.start), self.info.dtype)
        for iy in _tile_span(rows.start, rows.stop, ty):
            r0 = iy * ty
            a0, a1 = max(r0, rows.start), min(r0 + ty, ny, rows.stop)
            for ix in _tile_span(cols.start, cols.stop, tx):
                c0 = ix * tx
                b0, b1 = max(c0, cols.start), min(c0 + tx, nx, cols.stop)
                tile = self._tile(iy, ix, rows, cols)
                out[a0 - rows.start:a1 - rows.start, b0 - cols.start:b1 - cols.start] = \
                    tile[a0 - r0:a1 - r0, b0 - c0:b1 - c0]
        return out

    def _tile(self, iy: int, ix: int, rows: slice | None = None, cols: slice | None = None):
        """Tile (iy, ix), decompressed once and cached (``rows``/``cols``: the read that
        needs it, for the error message)."""
        ny, nx = self.info.shape
        ty, tx = self.tile_shape
        key = iy * (-(-nx // tx)) + ix
        tile = self._tiles.get(key)
        if tile is not None:
            return tile
        r0, r1 = iy * ty, min((iy + 1) * ty, ny)
        c0, c1 = ix * tx, min((ix + 1) * tx, nx)
        engine = "tile codec" if self._decode_tile is not None else self._engine_for(False)
        # a tile that failed once is not retried: every read touching it reports the FIRST
        # failure (cfitsio appends earlier messages to later ones: the reason would depend on
        # the order of the reads)
        failure = self._failed.get(key)
        if failure is None and self._decode_tile is not None:
            try:
                tile = self._decode_tile(key)
            except Exception as exc:  # noqa: BLE001 - re-raised with the file name
                failure = self._failed[key] = str(exc)
        elif failure is None:
            hdu = self._hdu(engine)
            try:
                if engine == "fitsio":
                    tile = hdu[r0:r1, c0:c1]
                else:
                    tile = hdu.section[r0:r1, c0:c1]
            except Exception as exc:  # noqa: BLE001 - re-raised with the file name
                failure = self._failed[key] = _fitsio_message(exc)
        if failure is not None:
            what = (f"rows {rows.start}:{rows.stop} cols {cols.start}:{cols.stop}"
                    if rows is not None else "a prefetched tile")
            raise DR10FileError(
                f"{self.info.path}: cannot decompress {what} of HDU 1 ({engine}; tile rows "
                f"{r0}:{r1} cols {c0}:{c1}): {failure}")
        tile = _native(tile, self.info.dtype)
        if tile.shape != (r1 - r0, c1 - c0):
            raise DR10FileError(f"{self.info.path}: tile rows {r0}:{r1} cols "
                                f"{c0}:{c1} read with shape {tile.shape}")
        self._tiles[key] = tile
        self.tiles_decoded += 1
        return tile

    def prefetch(self, regions) -> int:
        """Decompress, in file order, every not yet cached tile that ``regions`` ([(rows,
        cols) slices]) touch; a tile that fails is skipped (the read that needs it raises).
        Only with the tile cache (else a no-op).  Returns the number of tiles decoded."""
        if self.tile_shape is None:
            return 0
        ny, nx = self.info.shape
        ty, tx = self.tile_shape
        need = set()
        for rows, cols in regions:
            r0, r1 = max(rows.start, 0), min(rows.stop, ny)
            c0, c1 = max(cols.start, 0), min(cols.stop, nx)
            if r1 > r0 and c1 > c0:
                need.update((iy, ix) for iy in _tile_span(r0, r1, ty)
                            for ix in _tile_span(c0, c1, tx))
        before = self.tiles_decoded
        for iy, ix in sorted(need):
            try:
                self._tile(iy, ix)
            except DR10FileError:
                continue
        return self.tiles_decoded - before

    def cutout(self, x: float, y: float, size: int, fill=0) -> Cutout:
        ny, nx = self.info.shape
        x0, y0 = cutout_origin(x, y, size)
        ra0, ra1 = max(y0, 0), min(y0 + size, ny)
        ca0, ca1 = max(x0, 0), min(x0 + size, nx)
        data = np.full((size, size), fill, dtype=self.info.dtype)
        valid = np.zeros((size, size), dtype=bool)
        if ra1 > ra0 and ca1 > ca0:
            part = self.read(slice(ra0, ra1), slice(ca0, ca1)).data
            data[ra0 - y0:ra1 - y0, ca0 - x0:ca1 - x0] = part
            valid[ra0 - y0:ra1 - y0, ca0 - x0:ca1 - x0] = True
        return Cutout(data=data, valid=valid, x0=x0, y0=y0, info=self.info)

    def close(self):
        for h in self._handles.values():
            try:
                h.close()
            except Exception:  # noqa: BLE001 - closing must not mask the real error
                pass
        self._handles.clear()
        self._tiles.clear()
        self._failed.clear()


def _fitsio_message(exc: BaseException) -> str:
    """The text of a decompression error without cfitsio's leftover history: cfitsio keeps
    a message stack that earlier, successful reads fill with "could not find column" notes
    (optional ZZERO/ZSCALE/ZBLANK columns); they are dropped, so the reason does not depend
    on which reads came before."""
    lines = [ln for ln in str(exc).splitlines()
             if ln.strip() and not ln.strip().startswith("ffgcnn could not find column")]
    return "\n".join(dict.fromkeys(lines))


def _tile_span(start: int, stop: int, tile: int) -> range:
    """Indices of the tiles of size ``tile`` that pixels ``start:stop`` (stop > start) touch."""
    return range(start // tile, (stop - 1) // tile + 1)


def _tile_shape(info: PlaneInfo) -> tuple[int, int] | None:
    """(rows, cols) of a tile-compressed plane's tiles from ZTILE1/2; None if not tiled."""
    if not info.compressed:
        return None
    h = info.header
    try:
        return int(h.get("ZTILE2", 1)), int(h.get("ZTILE1", info.shape[1]))
    except (TypeError, ValueError):
        return None


def cutout_origin(x: float, y: float, size: int) -> tuple[int, int]:
    """Brick pixel (x0, y0) of stamp pixel [0, 0] for a ``size`` stamp around (x, y).

    The pixel containing (x, y) (nearest integer) lands at stamp index ``size // 2``; the exact
    target position in the stamp is ``(x - x0, y - y0)``, in [size//2 - 0.5, size//2 + 0.5).
    """
    size = int(size)
    if size <= 0:
        raise ValueError(f"cutout size must be positive, got {size}")
    if not (math.isfinite(x) and math.isfinite(y)):
        raise ValueError(f"cutout centre must be finite, got ({x}, {y})")
    return int(math.floor(x + 0.5)) - size // 2, int(math.floor(y + 0.5)) - size // 2


def read_plane(path_or_fileobj: PathLike | BinaryIO, rows=None, cols=None, *,
               product: str | None = None, expected_shape: tuple[int, int] | None = None,
               engine: str = "auto") -> Plane:
    """Read HDU 1 of a DR10 ``.fits.fz`` plane: the whole plane or ``[rows, cols]``.

    ``rows``/``cols`` are slices (step 1) or (start, stop) in 0-based pixels (rows = y); only
    the compression tiles they touch are decompressed.  Data come back native-endian with the
    product's dtype (float32, maskbits int32).  ``Plane.info`` has BUNIT, MAGZERO, band, the
    raw header and the full shape.  Errors: FileNotFoundError (missing file),
    :class:`DR10FileError` (not FITS, truncated, no HDU 1, wrong dtype/shape, undecodable
    tiles), ValueError (bad slices).  ``engine``: 'auto' (fitsio for paths, astropy for file
    objects), 'fitsio' or 'astropy'.
    """
    r = _Reader(path_or_fileobj, product, expected_shape, engine)
    try:
        return r.read(rows, cols)
    finally:
        r.close()


def read_cutout(path_or_fileobj: PathLike | BinaryIO, x: float, y: float, size: int, *,
                fill=0, product: str | None = None,
                expected_shape: tuple[int, int] | None = None, engine: str = "auto") -> Cutout:
    """Read a ``size x size`` stamp around brick pixel (x, y) (0-based, x = column).

    Pixels outside the plane are set to ``fill`` (default 0, i.e. "no data": invvar 0,
    psfsize 0) and flagged ``valid == False``.  See :func:`cutout_origin` for centring.
    """
    r = _Reader(path_or_fileobj, product, expected_shape, engine)
    try:
        return r.cutout(x, y, size, fill)
    finally:
        r.close()


class BrickPlanes:
    """The cached planes of one brick directory, opened lazily and kept open for cutouts.

    >>> with BrickPlanes("/cache/south/coadd/112/1126p222", size=3600) as bp:   # doctest: +SKIP
    ...     stamps = bp.cutouts(1799.5, 1800.2, 64)      # {(product, band): Cutout}
    """

    def __init__(self, directory: PathLike | None, brickname: str | None = None, *,
                 size: int | None = BRICK_SIZE, engine: str = "auto", cache_tiles: bool = False,
                 heads: Mapping | None = None, decoders: Mapping | None = None):
        """``heads``: {file name: (HDU 1's parsed header, its data start, the file size)}
        of files whose heads the caller has parsed (:class:`_Reader`'s ``head``).
        ``decoders``: {(product, band): (label, tile decoder)} of planes held in memory
        (:class:`_Reader`'s ``decode_tile``; their heads must be in ``heads`` under the
        product's file name); ``directory`` may be None when every plane read is one."""
        if directory is None and not brickname:
            raise ValueError("BrickPlanes without a directory needs the brickname")
        self.decoders = dict(decoders or {})
        self.directory = Path(directory) if directory is not None else None
        self.heads = dict(heads or {})
        self.brickname = validate_brickname(brickname) if brickname else \
            brickname_from_dir(self.directory)
        self.expected_shape = None if size is None else (int(size), int(size))
        self.engine = engine
        self.cache_tiles = bool(cache_tiles)
        self._readers: dict[tuple[str, str | None], _Reader] = {}

    def path(self, product: str, band: str | None = None) -> Path:
        return self.directory / product_filename(self.brickname, product, band)

    def missing(self) -> list[str]:
        """File names of the 10 cached products that are absent from the directory."""
        return [n for n in brick_filenames(self.brickname) if not (self.directory / n).exists()]

    def _reader(self, product: str, band: str | None) -> _Reader:
        key = (product, band)
        if key not in self._readers:
            _check_product(product, band)
            if key in self.decoders:
                label, decode = self.decoders[key]
                self._readers[key] = _Reader(
                    label, product, self.expected_shape, head=self.heads[
                        product_filename(self.brickname, product, band)], decode_tile=decode)
                return self._readers[key]
            if self.directory is None:
                raise FileNotFoundError(f"{product_filename(self.brickname, product, band)}: "
                                        f"not among the brick's in-memory planes")
            path = self.path(product, band)
            self._readers[key] = _Reader(path, product, self.expected_shape, self.engine,
                                         self.cache_tiles, head=self.heads.get(path.name))
        return self._readers[key]

    def info(self, product: str, band: str | None = None) -> PlaneInfo:
        return self._reader(product, band).info

    def read(self, product: str, band: str | None = None, rows=None, cols=None) -> Plane:
        return self._reader(product, band).read(rows, cols)

    def prefetch(self, product: str, band: str | None, regions) -> int:
        """Warm the tile cache of one plane for ``regions`` (:meth:`_Reader.prefetch`);
        a file that cannot be opened is left for the reads to report."""
        try:
            return self._reader(product, band).prefetch(regions)
        except (DR10FileError, OSError, ValueError):
            return 0

    def cutout(self, product: str, band: str | None, x: float, y: float, size: int,
               fill=0) -> Cutout:
        return self._reader(product, band).cutout(x, y, size, fill)

    def cutouts(self, x: float, y: float, size: int,
                products: Iterable[tuple[str, str | None]] = CACHED_PRODUCTS,
                fill=0) -> dict[tuple[str, str | None], Cutout]:
        return {(p, b): self.cutout(p, b, x, y, size, fill) for p, b in products}

    def close(self) -> None:
        for r in self._readers.values():
            r.close()
        self._readers.clear()

    def __enter__(self) -> "BrickPlanes":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
