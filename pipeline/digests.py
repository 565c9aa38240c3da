"""Content hashes of files the pipeline reads but does not write (model weights, source datasets),
computed once per file and remembered.

A small table (path, size, mtime) -> sha256 under the user's cache folder: a file is read in full only
when it is new or has changed (a rewritten file changes its mtime). Hashing OPT-1.3B's 5 GB on every
stage start, or a dataset on every `dvc repro`, would otherwise cost minutes each time.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from pipeline.io import sha256_file, sha256_json, write_json_atomic

TABLE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vlap-pipeline" / "digests.json"


def file_digests(paths: list[Path], table: Path | None = None) -> list[str]:
    """sha256 of each file, from the table where its size and mtime are those it was hashed at."""
    table = Path(table or TABLE)
    known, found, missed = _read(table), [], False
    for path in paths:
        path = Path(path).resolve()
        stat = path.stat()
        stamp = [stat.st_size, stat.st_mtime_ns]
        entry = known.get(str(path))
        if not entry or entry.get("stamp") != stamp:
            entry, missed = {"stamp": stamp, "sha256": sha256_file(path)}, True
            known[str(path)] = entry
        found.append(entry["sha256"])
    if missed:
        try:
            merged = _read(table) | known  # another process may have added entries meanwhile
            write_json_atomic(table, {p: e for p, e in merged.items() if os.path.exists(p)})  # forget deleted files
        except OSError:  # a read-only home: the digests are still right, only not remembered
            pass
    return found


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


def _read(table: Path) -> dict:
    try:
        known = json.loads(table.read_text())
        return known if isinstance(known, dict) else {}
    except (OSError, ValueError):
        return {}
