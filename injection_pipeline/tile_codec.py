"""Decode one compression tile of a tile-compressed FITS plane from its bytes in memory.

Stage 4c's range reads (:mod:`injection_pipeline.tile_ranges`) fetch only the heap bytes of
the tiles a brick's stamps touch.  Handing those bytes to fitsio needs a sparse local file per
plane and a FITS open per plane (~0.2-0.3 CPU-ms each, ten planes per brick) plus ~0.15 ms per
tile; at the shipped density (about two tasks per brick) that was a fifth of the CPU per task
(docs/performance.md, "Stop 28").  :class:`TileCodec` decodes a tile straight from its bytes
with the FITS library's own codecs: astropy's ``RICE_1`` / ``HCOMPRESS_1`` decoders and its
de-quantisation (both the cfitsio C code astropy ships), and zlib for ``GZIP_1`` / ``GZIP_2``.
These codec classes are astropy's internal API (``astropy.io.fits.hdu.compressed``), pinned
in the lock; ``tests/test_tile_codec.py`` checks every supported layout bit for bit against
fitsio, so an astropy upgrade that changed them fails there, not in the data.

The tiled image compression convention (Pence et al. 2010; FITS 4.0 sect. 10): each table row
is a tile; ``COMPRESSED_DATA`` holds it compressed with ``ZCMPTYPE``; a floating-point plane
is quantised (``ZSCALE`` / ``ZZERO`` columns, ``ZQUANTIZ`` dither method, seed ``ZDITHER0``:
tile ``i`` (0-based) uses random-sequence row ``i + ZDITHER0``), unless ``ZQUANTIZ = 'NONE'``
(lossless); a float tile that did not quantise is stored losslessly in
``GZIP_COMPRESSED_DATA`` (or raw in ``UNCOMPRESSED_DATA``) with ``COMPRESSED_DATA`` empty;
integers equal to ``ZBLANK`` (column or keyword) are undefined pixels (NaN for floats).
Layouts not listed in :data:`SUPPORTED` raise :class:`UnsupportedTiles` at construction; the
caller then reads that plane through fitsio (the same pixels, more CPU).
"""
from __future__ import annotations

import math
import zlib
from typing import Any, Mapping

import numpy as np
from astropy.io.fits.hdu.compressed import _codecs as astropy_codecs
from astropy.io.fits.hdu.compressed._quantization import Quantize

from injection_pipeline.tile_ranges import row_field

#: ZCMPTYPE values decoded here (PLIO_1 is not: fitsio reads such planes)
SUPPORTED = ("RICE_1", "RICE_ONE", "GZIP_1", "GZIP_2", "HCOMPRESS_1", "NOCOMPRESS")
#: ZQUANTIZ -> the dither method number of the convention (cfitsio / astropy)
DITHER_METHODS = {"NO_DITHER": -1, "SUBTRACTIVE_DITHER_1": 1, "SUBTRACTIVE_DITHER_2": 2}
_INT_DTYPES = {8: np.dtype(np.uint8), 16: np.dtype(np.int16), 32: np.dtype(np.int32),
               64: np.dtype(np.int64)}
_FLOAT_DTYPES = {-32: np.dtype(np.float32), -64: np.dtype(np.float64)}


class UnsupportedTiles(ValueError):
    """The plane's compression layout is not one :class:`TileCodec` decodes."""


class TileDecodeError(ValueError):
    """A tile's bytes do not decode to the tile's pixels."""


def _settings(header: Mapping) -> dict:
    """{name: value} of the ``ZNAMEi`` / ``ZVALi`` compression parameters (i = 1, 2, ...
    until the first missing ZNAMEi; the first of a repeated name wins)."""
    out: dict = {}
    for i in range(1, 1000):
        key = header.get(f"ZNAME{i}")
        if key is None:
            break
        out.setdefault(str(key).strip().upper(), header.get(f"ZVAL{i}"))
    return out


def _row_column(rows: np.ndarray, offset: int, code: str) -> np.ndarray:
    """One scalar column (TFORM type ``code``) of the table rows as a native array."""
    return row_field(rows, offset, {"D": ">f8", "E": ">f4", "J": ">i4", "K": ">i8",
                                    "I": ">i2"}[code])


class TileCodec:
    """Decoder of the tiles of one plane, from its HDU 1 header and table rows.

    ``header``: HDU 1's value cards (a mapping, e.g. :func:`dr10.parse_header_cards`);
    ``columns``: the table's columns as ``(name, byte offset in a row, type code)``;
    ``rows``: the table rows, uint8 ``(n_tiles, row_bytes)``.  :meth:`decode` takes a tile
    index and its bytes per variable-length column, and returns the tile's pixels, native
    endian, of the plane's dtype (float32 / float64 / integers of ``ZBITPIX``).
    """

    def __init__(self, header: Mapping, columns, rows: np.ndarray):
        cmp = str(header.get("ZCMPTYPE", "")).strip().upper()
        if cmp not in SUPPORTED:
            raise UnsupportedTiles(f"ZCMPTYPE {cmp!r} (decoded here: {', '.join(SUPPORTED)})")
        self.compression = cmp
        self.zbitpix = int(header["ZBITPIX"])
        if int(header.get("ZNAXIS", 0)) != 2:
            raise UnsupportedTiles(f"ZNAXIS {header.get('ZNAXIS')!r}: only 2-D planes")
        self.shape = (int(header["ZNAXIS2"]), int(header["ZNAXIS1"]))
        self.tile_shape = (int(header.get("ZTILE2", 1)), int(header.get("ZTILE1", self.shape[1])))
        self.n_tiles_x = -(-self.shape[1] // self.tile_shape[1])
        if self.zbitpix in _FLOAT_DTYPES:
            self.dtype = _FLOAT_DTYPES[self.zbitpix]
        elif self.zbitpix in _INT_DTYPES:
            self.dtype = _INT_DTYPES[self.zbitpix]
        else:
            raise UnsupportedTiles(f"ZBITPIX {self.zbitpix}")
        names = {name: (off, code) for name, off, code in columns}
        self.quantized = self.zbitpix < 0 and "ZSCALE" in names
        quantiz = str(header.get("ZQUANTIZ", "NO_DITHER")).strip().upper()
        if self.quantized:
            if quantiz not in DITHER_METHODS:
                raise UnsupportedTiles(f"ZQUANTIZ {quantiz!r} with a ZSCALE column")
            if "ZZERO" not in names:
                raise UnsupportedTiles("a ZSCALE column without ZZERO")
            self.dither = DITHER_METHODS[quantiz]
            self.zscale = _row_column(rows, *names["ZSCALE"])
            self.zzero = _row_column(rows, *names["ZZERO"])
        self.dither_seed = int(header.get("ZDITHER0", 0))
        self.zblank_col = _row_column(rows, *names["ZBLANK"]) if "ZBLANK" in names else None
        self.zblank = header.get("ZBLANK")
        if self.zblank is None and not self.quantized:
            self.zblank = header.get("BLANK")
        zpar = _settings(header)
        self.blocksize = int(zpar.get("BLOCKSIZE", 32))
        self.bytepix = int(zpar.get("BYTEPIX", 4))
        self.hscale = int(zpar.get("SCALE", 0))
        self.hsmooth = int(zpar.get("SMOOTH", 0))
        self._codecs: dict = {}

    # ---------------------------------------------------------------- geometry
    def tile_window(self, t: int) -> tuple[int, int, int, int]:
        """(r0, r1, c0, c1): the plane pixels of tile ``t`` (edge tiles are clipped)."""
        iy, ix = divmod(int(t), self.n_tiles_x)
        ty, tx = self.tile_shape
        return (iy * ty, min((iy + 1) * ty, self.shape[0]),
                ix * tx, min((ix + 1) * tx, self.shape[1]))

    # ---------------------------------------------------------------- decoding
    def _codec(self, cmp: str, ny: int, nx: int):
        key = (cmp, ny, nx)
        c = self._codecs.get(key)
        if c is None:
            if cmp in ("RICE_1", "RICE_ONE"):
                c = astropy_codecs.Rice1(blocksize=self.blocksize, bytepix=self.bytepix,
                                         tilesize=ny * nx)
            else:                                             # HCOMPRESS_1
                # astropy's nx / ny are the C-order (slow, fast) tile axes
                c = astropy_codecs.HCompress1(scale=self.hscale, smooth=bool(self.hsmooth),
                                              bytepix=8, nx=ny, ny=nx)
            self._codecs[key] = c
        return c

    @staticmethod
    def _lossless(raw: bytes, n: int, zbitpix: int, what: str) -> np.ndarray:
        """Bytes of a losslessly stored tile (big-endian) as an array of ``n`` values: the
        element size from the byte count, as cfitsio does (GZIP_1, UNCOMPRESSED_DATA)."""
        size = len(raw) // max(n, 1)
        if size * n != len(raw) or size not in (1, 2, 4, 8):
            raise TileDecodeError(f"{what}: {len(raw)} bytes for {n} pixels")
        floats = zbitpix < 0 and size >= 4
        dt = {1: "u1", 2: ">i2", 4: ">f4" if floats else ">i4", 8: ">f8" if floats else ">i8"}
        return np.frombuffer(raw, dt[size])

    def decode(self, t: int, data: Mapping[str, Any]) -> np.ndarray:
        """Pixels of tile ``t`` (2-D, native endian, the plane's dtype) from ``data``:
        {column name: the tile's bytes in that variable-length column} (columns with no
        bytes for this tile may be absent).  TileDecodeError when they do not decode."""
        r0, r1, c0, c1 = self.tile_window(t)
        ny, nx = r1 - r0, c1 - c0
        n = ny * nx
        comp = data.get("COMPRESSED_DATA")
        quantized = self.quantized
        try:
            if comp is not None and len(comp):
                ints = self._decompress(bytes(comp), ny, nx, n)
            elif data.get("GZIP_COMPRESSED_DATA") is not None:
                ints = self._lossless(zlib.decompress(bytes(data["GZIP_COMPRESSED_DATA"]),
                                                      47), n, self.zbitpix, f"tile {t}")
                quantized = False
            elif data.get("UNCOMPRESSED_DATA") is not None:
                ints = self._lossless(bytes(data["UNCOMPRESSED_DATA"]), n, self.zbitpix,
                                      f"tile {t}")
                quantized = False
            else:
                raise TileDecodeError(f"tile {t} has no data in any column")
        except TileDecodeError:
            raise
        except Exception as exc:  # noqa: BLE001 - zlib.error, the codecs' CfitsioException
            if isinstance(exc, MemoryError):
                raise
            raise TileDecodeError(f"tile {t}: {self.compression} decode failed: "
                                  f"{exc}") from None
        if ints.size < n:
            raise TileDecodeError(f"tile {t}: {ints.size} pixels decoded, {n} expected")
        ints = ints[:n]
        zblank = self.zblank if self.zblank_col is None else self.zblank_col[t]
        blank = None
        if zblank is not None and ints.dtype.kind in "iu":
            blank = ints == zblank
            if not blank.any():
                blank = None
        out = self._dequantize(ints, t) if quantized else ints
        out = np.array(out, dtype=self.dtype, copy=True).reshape(ny, nx)   # own, writable
        if blank is not None:
            out[blank.reshape(ny, nx)] = np.nan if self.zbitpix < 0 else zblank
        return out

    def _decompress(self, raw: bytes, ny: int, nx: int, n: int) -> np.ndarray:
        cmp = self.compression
        if cmp in ("RICE_1", "RICE_ONE", "HCOMPRESS_1"):
            return np.asarray(self._codec(cmp, ny, nx).decode(np.frombuffer(raw, np.uint8)))
        stored = 32 if self.quantized else self.zbitpix     # quantised floats: int32 values
        if cmp == "NOCOMPRESS":
            return self._lossless(raw, n, stored, "tile")
        # GZIP_1 / GZIP_2: big-endian values, GZIP_2 with their bytes shuffled by significance
        buf = zlib.decompress(raw, 47)
        size = len(buf) // max(n, 1)
        if cmp == "GZIP_2" and size > 1 and size * n == len(buf):
            buf = np.frombuffer(buf, np.uint8).reshape(size, n).T.tobytes()
        return self._lossless(buf, n, stored, "tile")

    def _dequantize(self, ints: np.ndarray, t: int) -> np.ndarray:
        scale, zero = float(self.zscale[t]), float(self.zzero[t])
        if not (math.isfinite(scale) and math.isfinite(zero)):
            raise TileDecodeError(f"tile {t}: ZSCALE {scale}, ZZERO {zero}")
        q = Quantize(row=t + self.dither_seed if self.dither != -1 else 0,
                     dither_method=self.dither, quantize_level=None, bitpix=self.zbitpix)
        return np.asarray(q.decode_quantized(ints.astype(np.int32, copy=False), scale, zero))
