"""StampFileWriter (stage 4c stamps written by the Python workers) and stamps_io reading them
back, on a local directory and on a moto S3 server (no Spark)."""
from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from injection_pipeline import injection as inj
from injection_pipeline import stamp_writer, stamps_io, storage

N, BANDS = 16, "grz"


def _result(i: int, split: str, control: bool, rng) -> inj.TaskResult:
    row = {"task_id": f"exp/b/{i:04d}{'/ctl' if control else ''}", "split": split,
           "stamp_size_px": N, "bands": BANDS, "status": "ok", "is_control": int(control),
           "brickname": "1500p020", "theta_e_arcsec": 1.0 + i}
    img = rng.normal(size=(3, N, N)).astype(np.float32)
    arc = np.zeros_like(img) if control else rng.random((3, N, N)).astype(np.float32)
    stamps = {"image": img, "arc": arc, "invvar": rng.random((3, N, N)).astype(np.float32),
              "maskbits": rng.integers(0, 2 ** 12, size=(N, N)).astype(np.int32)}
    return inj.TaskResult(row, stamps)


def _batches(results, per=5):
    schema = inj.output_arrow_schema(True)
    return [inj.results_to_batch(results[i:i + per], schema, True)
            for i in range(0, len(results), per)]


@pytest.fixture
def results():
    rng = np.random.default_rng(3)
    splits = ["train"] * 7 + ["val"] * 4 + ["train"] * 2        # runs of splits, order kept
    return [_result(i, s, i % 2 == 1, rng) for i, s in enumerate(splits)]


def _writer(uri):
    return stamp_writer.StampFileWriter(uri, "1500p020", inj.output_arrow_schema(True),
                                        binary_columns=inj.STAMP_COLUMN_NAMES,
                                        code_version="test-cv")


def _mark_complete(uri, n_rows, fmt=stamp_writer.FORMAT):
    """The marker 4c writes after its accounting check (stage_4c.run_stage_4c)."""
    storage.put_bytes(storage.join_uri(uri, "_SUCCESS"),
                      json.dumps({"format": fmt, "rows": n_rows}).encode())


def _check_roundtrip(uri, results):
    _mark_complete(uri, len(results))
    st = stamps_io.load_stamps(uri, columns=stamps_io.STAMP_NAMES, status=None)
    ids = list(st.meta.column("task_id").to_pylist())
    assert ids == sorted(r.row["task_id"] for r in results)
    by_id = {r.row["task_id"]: r for r in results}
    for k, tid in enumerate(ids):
        r = by_id[tid]
        for name in stamps_io.STAMP_NAMES:          # bit-identical planes
            assert np.array_equal(getattr(st, name)[k], r.stamps[name]), (tid, name)
        assert st.meta.column("split")[k].as_py() == r.row["split"]
        assert st.meta.column("theta_e_arcsec")[k].as_py() == r.row["theta_e_arcsec"]


def test_local_files_layout_metadata_and_roundtrip(tmp_path, results):
    uri = str(tmp_path / "stamps" / "exp")
    w = _writer(uri)
    for b in _batches(results):
        w.write(b)
    done = w.close()
    assert sorted(done) == [os.path.join(uri, "split=train", "part-1500p020.zstd.parquet"),
                            os.path.join(uri, "split=val", "part-1500p020.zstd.parquet")]
    assert done[os.path.join(uri, "split=train", "part-1500p020.zstd.parquet")] == 9
    # nothing else (no temporaries) in the output tree
    files = sorted(os.path.relpath(os.path.join(dp, f), uri) for dp, _, fs in os.walk(uri)
                   for f in fs)
    assert files == ["split=train/part-1500p020.zstd.parquet",
                     "split=val/part-1500p020.zstd.parquet"]
    f = pq.ParquetFile(os.path.join(uri, files[0]))
    assert "split" not in f.schema_arrow.names                   # hive directory instead
    assert f.schema_arrow.metadata[b"format"] == stamp_writer.FORMAT.encode()
    assert f.schema_arrow.metadata[b"code_version"] == b"test-cv"
    rg = f.metadata.row_group(0)
    enc = {rg.column(c).path_in_schema: rg.column(c).encodings for c in range(rg.num_columns)}
    comp = {rg.column(c).path_in_schema: rg.column(c).compression for c in range(rg.num_columns)}
    assert {comp[n] for n in inj.STAMP_COLUMN_NAMES} == {"ZSTD"}     # planes zstd
    assert comp["task_id"] == "SNAPPY"                           # scalars: snappy (default)
    for name in inj.STAMP_COLUMN_NAMES:                          # planes: no dictionary
        assert not any("DICT" in e for e in enc[name]), (name, enc[name])
        assert not rg.column(f.schema_arrow.get_field_index(name)).is_stats_set
    types = {fl.name: fl.type for fl in f.schema_arrow}
    for c in range(rg.num_columns):                              # dictionary: strings only
        col = rg.column(c)
        if col.path_in_schema in inj.STAMP_COLUMN_NAMES:
            continue
        assert col.is_stats_set, col.path_in_schema              # scalars: row-group stats
        assert any("DICT" in e for e in col.encodings) == \
            pa.types.is_string(types[col.path_in_schema]), (col.path_in_schema, col.encodings)
    assert [r["task_id"] for r in f.read().to_pylist()] == \
        [r.row["task_id"] for r in results if r.row["split"] == "train"]   # order kept
    _check_roundtrip(uri, results)


def test_abort_leaves_nothing_readable(tmp_path, results):
    uri = str(tmp_path / "stamps" / "exp")
    w = _writer(uri)
    w.write(_batches(results)[0])
    w.abort()
    assert [f for _, _, fs in os.walk(uri) for f in fs] == []


def test_rows_without_split_are_refused(tmp_path, results):
    results[2].row["split"] = None
    w = _writer(str(tmp_path / "s"))
    with pytest.raises(ValueError, match="without a split.*0002"):
        w.write(_batches(results, per=13)[0])
    w.abort()


def test_s3_objects_and_stamps_io_from_s3(moto_s3, results, tmp_path):
    bucket = "stampwriter"
    moto_s3.client().create_bucket(Bucket=bucket)
    uri = f"s3://{bucket}/phase4c/v/stamps/exp"
    storage.put_bytes(f"{uri}/split=train/part-stale.zstd.parquet", b"old run")
    assert stamp_writer.clear(uri) == 1                          # overwrite semantics
    w = stamp_writer.StampFileWriter(uri, "1500p020", inj.output_arrow_schema(True),
                                     binary_columns=inj.STAMP_COLUMN_NAMES,
                                     temp_dir=str(tmp_path))
    for b in _batches(results, per=4):
        w.write(b)
    w.close()
    keys = sorted(o.uri for o in storage.list_objects(uri + "/"))
    assert keys == [f"{uri}/split=train/part-1500p020.zstd.parquet",
                    f"{uri}/split=val/part-1500p020.zstd.parquet"]
    assert os.listdir(tmp_path) == []                            # temporaries removed
    _check_roundtrip(uri, results)                               # pyarrow S3 on moto


def test_clear_local(tmp_path):
    d = tmp_path / "stamps" / "exp" / "split=train"
    d.mkdir(parents=True)
    (d / "part-a.zstd.parquet").write_bytes(b"x")
    assert stamp_writer.clear(str(tmp_path / "stamps" / "exp")) == 1
    assert not (tmp_path / "stamps" / "exp").exists()
    assert stamp_writer.clear(str(tmp_path / "nothing")) == 0


def test_tables_with_zero_copy_planes_write_the_same_rows(tmp_path, results):
    """Stage 4c hands the writer ``results_to_table`` Tables (a chunk per plane); the files
    hold the same rows, in order, as written from contiguous RecordBatches."""
    schema = inj.output_arrow_schema(True)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    wa, wb = _writer(a), _writer(b)
    for i in range(0, len(results), 5):
        wa.write(inj.results_to_table(results[i:i + 5], schema, True))
    for batch in _batches(results):
        wb.write(batch)
    assert wa.close() == {k.replace(b, a, 1): v for k, v in wb.close().items()}
    for split in ("train", "val"):
        name = f"split={split}/part-1500p020.zstd.parquet"
        ta, tb = pq.read_table(os.path.join(a, name)), pq.read_table(os.path.join(b, name))
        assert ta.num_rows > 0 and ta.equals(tb)
    _check_roundtrip(a, results)


def test_stamps_without_a_valid_success_marker_are_refused(tmp_path, results):
    """A 4c run killed before its accounting check leaves complete-looking part files and no
    (or Spark's empty) _SUCCESS: the loader refuses them unless asked, naming the path."""
    uri = str(tmp_path / "stamps" / "exp")
    w = _writer(uri)
    for b in _batches(results):
        w.write(b)
    w.close()
    with pytest.raises(stamps_io.IncompleteDataset, match=r"exp: no _SUCCESS.*allow_incomplete"):
        stamps_io.load_stamps(uri)
    with pytest.raises(stamps_io.IncompleteDataset):
        next(stamps_io.iter_stamps(uri))
    (tmp_path / "stamps" / "exp" / "_SUCCESS").write_bytes(b"")          # Spark's own marker
    with pytest.raises(stamps_io.IncompleteDataset, match="not 4c's JSON marker"):
        stamps_io.load_stamps(uri)
    _mark_complete(uri, len(results), fmt="something-else/9")
    with pytest.raises(stamps_io.IncompleteDataset, match="format 'something-else/9'"):
        stamps_io.load_stamps(uri)
    _mark_complete(uri, len(results) + 1)                                 # a part file lost
    with pytest.raises(stamps_io.IncompleteDataset,
                       match=f"hold {len(results)} rows but _SUCCESS lists {len(results) + 1}"):
        stamps_io.load_stamps(uri)
    st = stamps_io.load_stamps(uri, status=None, allow_incomplete=True)  # asked: read anyway
    assert len(st) == len(results)
    _mark_complete(uri, len(results))
    assert len(stamps_io.load_stamps(uri, status=None)) == len(results)
    assert stamps_io.check_complete(uri)["rows"] == len(results)


@pytest.mark.parametrize("codec", ["snappy", "zstd", "none"])
def test_planes_are_zstd_and_scalars_use_the_scalar_codec(tmp_path, results, codec):
    """Binary stamp planes: zstd at compression_level; every other column: scalar_compression
    (default snappy: a zstd context per tiny scalar chunk dominated a per-brick file's
    cost).  The rows read back are the same whatever the codec."""
    uri = str(tmp_path / "stamps")
    w = stamp_writer.StampFileWriter(uri, "t0", inj.output_arrow_schema(True),
                                     compression_level=5, code_version="test",
                                     binary_columns=inj.STAMP_COLUMN_NAMES,
                                     scalar_compression=codec)
    for b in _batches(results):
        w.write(b)
    done = w.close()
    for f in done:
        md = pq.ParquetFile(storage.parse_uri(f).key).metadata
        rg = md.row_group(0)
        codecs = {rg.column(i).path_in_schema: rg.column(i).compression
                  for i in range(rg.num_columns)}
        assert {codecs[c] for c in inj.STAMP_COLUMN_NAMES} == {"ZSTD"}
        scal = {v for k, v in codecs.items() if k not in inj.STAMP_COLUMN_NAMES}
        assert scal == {{"snappy": "SNAPPY", "zstd": "ZSTD", "none": "UNCOMPRESSED"}[codec]}
    _mark_complete(uri, len(results))
    _check_roundtrip(uri, results)


def test_an_unknown_scalar_codec_is_refused_by_name():
    with pytest.raises(ValueError, match=r"\[job\] scalar_compression = 'zip'.*snappy"):
        stamp_writer.check_scalar_compression("zip", "[job] scalar_compression")
    with pytest.raises(ValueError, match="scalar_compression"):
        stamp_writer.StampFileWriter("/tmp/x", "t", inj.output_arrow_schema(True),
                                     scalar_compression="zip")
