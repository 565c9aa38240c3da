"""Content hashes of files the pipeline reads but does not write (model weights, source datasets),
computed once per file and remembered.

A small table (path, size, mtime) -> sha256 under the user's cache folder: a file is read in full only
when it is new or has changed (a rewritten file changes its mtime). Hashing OPT-1.3B's 5 GB on every
stage start, or a dataset on every `dvc repro`, would otherwise cost minutes each time.
"""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from pipeline.io import sha256_file, sha256_json, write_json_atomic

TABLE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vlap-pipeline" / "digests.json"


def file_digests(paths: list[Path], table: Path | None = None) -> list[str]:
    """sha256 of each file, from the table where its size and mtime are those it was hashed at."""
    table = Path(table or TABLE)
    known, found, added = _read(table), [], {}
    for path in paths:
        path = Path(path).resolve()
        stat = path.stat()
        stamp = [stat.st_size, stat.st_mtime_ns]
        entry = added.get(str(path)) or known.get(str(path))
        if not entry or entry.get("stamp") != stamp:
            entry = added[str(path)] = {"stamp": stamp, "sha256": sha256_file(path)}
            HASHED["files"] += 1
            HASHED["bytes"] += stat.st_size
        found.append(entry["sha256"])
    if added:
        try:
            merged = _read(table) | added  # another process may have added entries meanwhile
            _write(table, {p: e for p, e in merged.items() if os.path.exists(p)})  # forget deleted files
        except OSError:  # a read-only home: the digests are still right, only not remembered
            pass
    return found


# What this process read in full to hash (files, bytes): the cost the table saves when it stays 0.
HASHED = {"files": 0, "bytes": 0}


def file_digest(path: Path, table: Path | None = None) -> str:
    return file_digests([path], table)[0]


def tree_digest(path: Path, table: Path | None = None) -> str:
    """A file's hash, a folder's hash over (relative name, hash) of its files, or "missing"."""
    path = Path(path)
    if path.is_file():
        return file_digest(path, table)
    if not path.is_dir():
        return "missing"  # the stage that reads it reports what is missing
    files = sorted(p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    return sha256_json(dict(zip((p.relative_to(path).as_posix() for p in files), file_digests(files, table))))


def tree_stamp(path: Path) -> str:
    """A hash of each file's (relative name, size, mtime) under `path` (or of the file itself): reads no file.
    It tells whether a folder is still the one seen before, in the same place, not what it holds."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []
    return sha256_json({p.relative_to(path).as_posix() if p != path else "": [p.stat().st_size, p.stat().st_mtime_ns]
                        for p in files} if files else "missing")


# The table as last read or written by this process, by path, with the (size, mtime) it had then: a
# table of thousands of files is parsed again only when another process has changed it, not once per
# file asked about (a flow asks about every code file of every stage).
_loaded: dict[Path, tuple[tuple[int, int], dict]] = {}
_loaded_lock = threading.Lock()


def _stamp(table: Path) -> tuple[int, int]:
    stat = table.stat()
    return stat.st_size, stat.st_mtime_ns


def _read(table: Path) -> dict:
    """The table (not to be changed in place: it is shared), or {} when it is missing or unreadable."""
    try:
        stamp = _stamp(table)
        with _loaded_lock:
            if table in _loaded and _loaded[table][0] == stamp:
                return _loaded[table][1]
        known = json.loads(table.read_text())
    except (OSError, ValueError):
        return {}
    known = known if isinstance(known, dict) else {}
    with _loaded_lock:
        _loaded[table] = (stamp, known)
    return known


def _write(table: Path, known: dict) -> None:
    write_json_atomic(table, known)
    with _loaded_lock:
        _loaded[table] = (_stamp(table), known)
