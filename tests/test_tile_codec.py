"""tile_codec: tiles decoded from their bytes in memory are bit-identical to fitsio's reading
of the same file, for every layout DR10 uses and the others the codec accepts (the brick-level
checks, no file and no FITS handle for a range read, are in test_tile_ranges.py)."""
from __future__ import annotations

import glob
import os

import numpy as np
import pytest

from injection_pipeline import dr10
from injection_pipeline import tile_codec
from injection_pipeline import tile_ranges as tr


class _Bytes:
    """Storage.get_range over one local file's bytes."""

    def __init__(self, raw: bytes):
        self.raw = raw

    def get_range(self, uri, start, end):
        return self.raw[start:end], len(self.raw)


def _plane(kind: str, shape, rng) -> np.ndarray:
    ny, nx = shape
    if kind == "sky":                     # image-like: noise, sources, zeros and NaNs
        a = rng.normal(0.0, 0.01, shape).astype(np.float32)
        a[ny // 3:ny // 3 + 5, :] += 40.0
        a[:7, :9] = 0.0                   # exact zeros (SUBTRACTIVE_DITHER_2 keeps them)
        a[ny - 3:, nx - 4:] = np.nan
        return a
    if kind == "wide":                    # tiles that do not quantise (a range beyond int32
        a = rng.normal(100.0, 1.0, shape).astype(np.float32)   # steps): GZIP_COMPRESSED_DATA
        a[:100, :60] = (rng.normal(0.0, 1.0, (100, 60)) * 1e30).astype(np.float32)
        a[120:130, 100:110] = 7.25
        return a
    if kind == "psf":                     # piecewise constant floats (psfsize-like)
        return np.repeat(rng.uniform(1.0, 1.6, (ny, 1)), nx, axis=1).astype(np.float32)
    if kind == "bits":                    # maskbits-like int32
        return (rng.integers(0, 4, shape) * (1 << rng.integers(0, 13, shape))).astype(np.int32)
    if kind == "int16":
        return rng.integers(-3000, 3000, shape).astype(np.int16)
    raise ValueError(kind)


def _write(path, data, **kw):
    import fitsio
    with fitsio.FITS(str(path), "rw", clobber=True) as f:
        f.write(None)
        f.write(data, **kw)


def _decode_all(raw: bytes, label: str) -> tuple[np.ndarray, tr.SparsePlane]:
    sp = tr.SparsePlane(_Bytes(raw), label, None)
    sp.ensure_all()
    c = sp.codec()
    out = np.empty(c.shape, c.dtype)
    for t in range(sp.layout.n_tiles):
        r0, r1, c0, c1 = c.tile_window(t)
        out[r0:r1, c0:c1] = sp.decode_tile(t)
    return out, sp


CASES = [
    # (plane kind, fitsio write keywords): DR10's image / invvar / psfsize / maskbits first
    ("sky", dict(compress="RICE", qlevel=-0.5, qmethod="SUBTRACTIVE_DITHER_2", dither_seed=478)),
    ("wide", dict(compress="RICE", qlevel=-0.5, qmethod="NO_DITHER")),
    ("wide", dict(compress="RICE", qlevel=4.0, qmethod="SUBTRACTIVE_DITHER_1", dither_seed=2)),
    ("psf", dict(compress="GZIP", qlevel=0)),
    ("bits", dict(compress="HCOMPRESS", hcomp_scale=0)),
    ("sky", dict(compress="RICE", qlevel=4.0, qmethod="SUBTRACTIVE_DITHER_1", dither_seed=9)),
    ("sky", dict(compress="GZIP", qlevel=4.0, qmethod="SUBTRACTIVE_DITHER_1", dither_seed=3)),
    ("sky", dict(compress="GZIP_2", qlevel=4.0, qmethod="SUBTRACTIVE_DITHER_2", dither_seed=5)),
    ("psf", dict(compress="GZIP_2", qlevel=0)),
    ("bits", dict(compress="RICE")),
    ("bits", dict(compress="GZIP")),
    ("bits", dict(compress="GZIP_2")),
    ("int16", dict(compress="RICE")),
    ("int16", dict(compress="HCOMPRESS", hcomp_scale=0)),
]


@pytest.mark.parametrize("kind,kw", CASES, ids=[f"{k}-{v['compress']}-{v.get('qmethod', '')}"
                                                for k, v in CASES])
def test_every_tile_decodes_bit_identical_to_fitsio(tmp_path, kind, kw):
    """Edge tiles too: a 250 x 230 plane in 100 x 60 tiles (the last row and column clipped)."""
    import fitsio
    rng = np.random.default_rng(7)
    data = _plane(kind, (250, 230), rng)
    path = tmp_path / "plane.fits.fz"
    _write(path, data, tile_dims=[100, 60], **kw)
    ref = fitsio.read(str(path), ext=1)
    ref = ref.astype(ref.dtype.newbyteorder("="))
    got, sp = _decode_all(path.read_bytes(), str(path))
    assert got.dtype == ref.dtype and got.shape == ref.shape
    assert got.tobytes() == ref.tobytes()          # bit for bit, NaNs included
    if kind == "wide" and kw["qlevel"] < 0:        # the lossless fallback column was used
        assert "GZIP_COMPRESSED_DATA" in sp.layout.descriptor_names
        assert any("GZIP_COMPRESSED_DATA" in sp.tile_data(t) for t in range(sp.layout.n_tiles))
    if kind == "sky" and kw.get("qmethod") == "SUBTRACTIVE_DITHER_2":
        assert (got[:7, :9] == 0).all() and np.isnan(got[-3:, -4:]).all()


def test_synthetic_dr10_brick_planes_decode_bit_identical(tmp_path):
    """The ten products of a synthetic DR10 brick as the survey writes them (the DR10
    compression settings, docs/dr10.md)."""
    import fitsio

    from injection_pipeline import synthetic_survey as ss
    survey = ss.generate_survey(tmp_path / "s", n_bricks=1, size=300, seed=11)
    rec = survey.bricks[0]
    seen = set()
    for prod, band in dr10.CACHED_PRODUCTS:
        name = dr10.product_filename(rec.spec.brickname, prod, band)
        path = glob.glob(os.path.join(str(survey.root), "**", name), recursive=True)[0]
        raw = open(path, "rb").read()
        got, sp = _decode_all(raw, path)
        ref = fitsio.read(path, ext=1)
        assert got.tobytes() == ref.astype(ref.dtype.newbyteorder("=")).tobytes(), path
        seen.add(sp.codec().compression)
    assert seen == {"RICE_1", "GZIP_1", "HCOMPRESS_1"}


def test_unsupported_layout_and_corrupt_bytes(tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "plio.fits.fz"
    _write(path, np.abs(_plane("int16", (120, 120), rng)) % 7, compress="PLIO",
           tile_dims=[60, 60])
    sp = tr.SparsePlane(_Bytes(path.read_bytes()), str(path), None)
    with pytest.raises(tile_codec.UnsupportedTiles, match="PLIO_1"):
        sp.codec()
    path = tmp_path / "rice.fits.fz"
    _write(path, _plane("sky", (120, 120), rng), compress="RICE", qlevel=4.0,
           qmethod="SUBTRACTIVE_DITHER_2", tile_dims=[60, 60])
    raw = bytearray(path.read_bytes())
    lay = tr.parse_layout(bytes(raw), str(path))      # the head alone: no heap byte fetched
    sp = tr.SparsePlane(_Bytes(bytes(raw)), str(path), None, head=bytes(raw[:lay.rows_end]),
                        size=len(raw))
    with pytest.raises(dr10.DR10FileError, match="not fetched"):
        sp.decode_tile(3)                       # its bytes were never fetched
    sp.ensure_all()
    a, b = int(sp._starts[2, 0]), int(sp._ends[2, 0])
    raw[a:b] = bytes(b - a)                     # tile 2's bytes zeroed
    bad = tr.SparsePlane(_Bytes(bytes(raw)), str(path), None)
    bad.ensure_all()
    with pytest.raises(tile_codec.TileDecodeError, match="tile 2"):
        bad.decode_tile(2)
    bad.decode_tile(1)                          # the other tiles still decode
