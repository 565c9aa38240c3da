"""File helpers shared by the stages: atomic writes and content hashes."""
from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import signal
import tempfile
from pathlib import Path
from typing import Any, Iterator

from pipeline.errors import DISK_FULL, DiskFullError


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; rename it onto `path` only if the block succeeds.

    A crash or error leaves any previous `path` untouched, and no partial file. A full disk is one line
    naming `path` (DiskFullError).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        pause_if_asked("written", path, tmp)
        os.replace(tmp, path)
        pause_if_asked("renamed", path, tmp)
    except OSError as err:
        if err.errno not in DISK_FULL:
            raise
        raise DiskFullError(f"{path}: no space left on device while writing it (nothing partial "
                            "was kept); free space and run again (finished work is kept)") from None
    finally:
        tmp.unlink(missing_ok=True)


PAUSE_AT, PAUSE_MARKER = "VLAP_PAUSE_AT", "VLAP_PAUSE_MARKER"
_pauses_seen: dict[str, int] = {}


def pause_if_asked(when: str, path: Path, tmp: Path) -> None:
    """A place to kill a run for real (tests/test_kill_anywhere.py); does nothing unless VLAP_PAUSE_AT is set.

    VLAP_PAUSE_AT="<when>:<file name pattern>:<n>" stops this process (SIGSTOP) the n-th time it writes a
    file whose name matches, at `when`: "written" (the temp file holds every byte, the rename has not
    happened) or "renamed" (the file is in place). First it writes "<pid> <temp path>" to VLAP_PAUSE_MARKER,
    so the test knows it is there and can SIGKILL it at that point, with nothing moving meanwhile."""
    spec = os.environ.get(PAUSE_AT)
    if not spec:
        return
    at, pattern, nth = spec.split(":")
    if at != when or not fnmatch.fnmatchcase(path.name, pattern):
        return
    _pauses_seen[spec] = seen = _pauses_seen.get(spec, 0) + 1
    if seen == int(nth):
        marker = Path(os.environ[PAUSE_MARKER])
        marker.with_suffix(".part").write_text(f"{os.getpid()} {tmp}\n")
        os.replace(marker.with_suffix(".part"), marker)  # whole when the test sees it
        os.kill(os.getpid(), signal.SIGSTOP)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_json(data: Any) -> str:
    """Hash of a JSON-able value, independent of dict key order."""
    return sha256_bytes(json.dumps(data, sort_keys=True, separators=(",", ":")).encode())
