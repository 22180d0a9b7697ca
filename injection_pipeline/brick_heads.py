"""The heads object of a cached brick: every file's headers and tile table in one object.

Stage 4c's range reads (:mod:`injection_pipeline.tile_ranges`) need, per file, its two FITS
headers and the binary-table rows of its compression tiles (the *head*: bytes
``[0, rows_end)``, ~19-50 kB for a DR10 product) before they can fetch any tile.  Read per
file, that is ten ranged GETs per brick opening (at the shipped ~2 tasks per opened brick,
most of the GETs a brick costs).  Stage 4b therefore writes, after the brick's ten files are
cached and before ``_SUCCESS``, the object ``<cache>/<brick>/_HEADS``: the heads of the files
concatenated in ``dr10.brick_filenames`` order, uncompressed (~325 kB for a full-size brick).
``_SUCCESS`` describes it under ``heads`` (docs/cache.md)::

    "heads": {"name": "_HEADS", "format": "dr10-brick-heads/1", "size": <bytes>,
              "sha256": <hex of the object>,
              "files": {<file name>: {"offset": o, "length": n, "size": <object bytes>}}}

A file is listed only when its head could be read as a tile-compressed FITS file.  Readers
treat the object as an optimisation: a marker without ``heads`` (an older 4b), a malformed
entry, an absent object or one whose size or SHA-256 differs make 4c read each head with its
own GET, and the number of files read either way is counted in the 4c summary.  Pure
functions here (the GETs are the caller's); transient storage faults propagate.
"""
from __future__ import annotations

import hashlib
import re
from typing import Any, Mapping, Sequence

HEADS_NAME = "_HEADS"
HEADS_FORMAT = "dr10-brick-heads/1"


class HeadsUnusable(ValueError):
    """A ``heads`` entry or object that cannot be used (the reason is the message)."""


_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def is_sha256_hex(value) -> bool:
    """True for a str of 64 lower-case hex digits (a SHA-256 as 4b records it)."""
    return isinstance(value, str) and _SHA256_HEX.fullmatch(value) is not None


def pack(heads: Sequence[tuple[str, bytes, int]]) -> tuple[bytes, dict]:
    """(object bytes, the ``heads`` entry of ``_SUCCESS``) from ``(file name, head bytes,
    object size)`` in file order."""
    parts, files, offset = [], {}, 0
    for name, head, size in heads:
        files[name] = {"offset": offset, "length": len(head), "size": int(size)}
        parts.append(bytes(head))
        offset += len(head)
    blob = b"".join(parts)
    return blob, {"name": HEADS_NAME, "format": HEADS_FORMAT, "size": len(blob),
                  "sha256": hashlib.sha256(blob).hexdigest(), "files": files}


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def entry(doc: Any, file_names: Sequence[str]) -> dict:
    """The validated ``heads`` entry of a parsed ``_SUCCESS`` (``file_names``: the brick's
    files).  Raises :class:`HeadsUnusable` saying what is wrong (absent, malformed)."""
    e = doc.get("heads") if isinstance(doc, Mapping) else None
    if e is None:
        raise HeadsUnusable("_SUCCESS has no heads entry (written by an older 4b)")
    if not isinstance(e, Mapping):
        raise HeadsUnusable("heads entry is not an object")
    if e.get("format") != HEADS_FORMAT:
        raise HeadsUnusable(f"heads format {e.get('format')!r} != {HEADS_FORMAT!r}")
    if e.get("name") != HEADS_NAME:
        raise HeadsUnusable(f"heads name {e.get('name')!r} != {HEADS_NAME!r}")
    size, sha, files = e.get("size"), e.get("sha256"), e.get("files")
    if not _int(size):
        raise HeadsUnusable(f"heads size {size!r} is not a non-negative integer")
    if not is_sha256_hex(sha):
        raise HeadsUnusable("heads sha256 is not 64 hex digits")
    if not isinstance(files, Mapping):
        raise HeadsUnusable("heads files is not an object")
    known = set(file_names)
    for name, f in files.items():
        if name not in known:
            raise HeadsUnusable(f"heads lists {name!r}, not a file of the brick")
        if not (isinstance(f, Mapping) and _int(f.get("offset")) and _int(f.get("length"))
                and _int(f.get("size")) and f["length"] > 0
                and f["offset"] + f["length"] <= size):
            raise HeadsUnusable(f"heads entry of {name} is malformed: {f!r}")
    return dict(e)


def unpack(blob: bytes, heads_entry: Mapping) -> dict[str, tuple[bytes, int]]:
    """{file name: (head bytes, object size)} from the object's bytes, after checking them
    against the entry (size and SHA-256: a ``_HEADS`` of another 4b run is refused)."""
    if len(blob) != heads_entry["size"]:
        raise HeadsUnusable(f"{HEADS_NAME} is {len(blob)} bytes, _SUCCESS records "
                            f"{heads_entry['size']}")
    if hashlib.sha256(blob).hexdigest() != heads_entry["sha256"]:
        raise HeadsUnusable(f"{HEADS_NAME} SHA-256 differs from the one _SUCCESS records")
    mv = memoryview(blob)
    return {name: (bytes(mv[f["offset"]:f["offset"] + f["length"]]), int(f["size"]))
            for name, f in heads_entry["files"].items()}
