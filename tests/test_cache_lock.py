"""One 4b / 4b2 writer per cache (issue 16): <cache>/_4b.lock, a conditional create."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from injection_pipeline import storage
from injection_pipeline.stages import stage_4b


def _dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True).stdout)


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_cache_lock_one_writer_stale_and_break(kind, tmp_path, request):
    if kind == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        cache = f"s3://{bucket}/cache"
    else:
        cache = str(tmp_path / "cache")
    lock = storage.join_uri(cache, stage_4b.LOCK_NAME)
    assert storage.create_exclusive(storage.join_uri(cache, "x"), b"1")
    assert not storage.create_exclusive(storage.join_uri(cache, "x"), b"2")
    assert storage.get_bytes(storage.join_uri(cache, "x")) == b"1"
    with stage_4b.cache_lock(cache, "4b") as uri:
        assert uri == lock and json.loads(storage.get_bytes(lock))["pid"] == os.getpid()
        with pytest.raises(stage_4b.CacheLocked, match="held by .*--break-lock"):
            with stage_4b.cache_lock(cache, "4b2"):
                pass
        assert storage.exists(lock)                       # the holder keeps it
    assert not storage.exists(lock)                       # released at the end
    # a lock left by a dead process of this host is broken; another host's is not
    storage.put_bytes(lock, json.dumps({"host": __import__("socket").gethostname(),
                                        "pid": _dead_pid(), "token": "old"}).encode())
    with stage_4b.cache_lock(cache, "4b"):
        assert json.loads(storage.get_bytes(lock))["token"] != "old"
    storage.put_bytes(lock, json.dumps({"host": "other-host", "pid": 1,
                                        "token": "theirs"}).encode())
    with pytest.raises(stage_4b.CacheLocked, match="other-host"):
        with stage_4b.cache_lock(cache, "4b"):
            pass
    with stage_4b.cache_lock(cache, "4b", break_lock=True):
        pass
    assert not storage.exists(lock)


def test_a_locked_cache_makes_4b_exit_4(tmp_path):
    import spark_phase4_pipeline as drv
    cache = str(tmp_path / "cache")
    storage.put_bytes(storage.join_uri(cache, stage_4b.LOCK_NAME),
                      json.dumps({"host": "other-host", "pid": 1}).encode())
    code = drv.main(["4b", "--master", "local[1]", "--out", str(tmp_path / "out"),
                     "--cache", cache, "--bricks", str(tmp_path / "none.txt")])
    assert code == stage_4b.EXIT_LOCKED
