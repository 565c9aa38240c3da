"""One writer per output: a file lock per output folder, shared by `dvc repro` and the Prefect flow.

Both run the same stage functions; two runs on one data folder must never write the same
output together. Lock files live in <data>/.locks (outside every DVC output, so they never
enter a hash). A held lock is waited for with a message; `VLAP_LOCK_TIMEOUT` (seconds, default:
wait as long as it takes) bounds the wait, after which the run stops with one line.
"""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Iterable, Iterator

from filelock import FileLock, Timeout

from pipeline.errors import ConfigError, LockTimeoutError

log = logging.getLogger(__name__)
LOCK_DIR = ".locks"


def lock_timeout() -> float:
    raw = os.environ.get("VLAP_LOCK_TIMEOUT", "")
    if not raw:
        return -1  # filelock: wait forever
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"VLAP_LOCK_TIMEOUT: expected seconds, got {raw!r}") from None


def lock_file(data_root: Path, folder: Path) -> Path:
    """<data>/.locks/<folder relative to data, '/' -> '__'>.lock"""
    try:
        name = Path(folder).resolve().relative_to(Path(data_root).resolve()).as_posix()
    except ValueError:
        name = Path(folder).resolve().as_posix().lstrip("/")
    return Path(data_root) / LOCK_DIR / (name.replace("/", "__") + ".lock")


@contextlib.contextmanager
def locked(data_root: Path, folders: Iterable[Path], holder: str) -> Iterator[bool]:
    """Hold the locks of `folders` (sorted, so two runs never wait on each other in a cycle); yields
    whether another run held one of them first (it may have written them meanwhile)."""
    timeout = lock_timeout()
    waited = False
    with contextlib.ExitStack() as stack:
        for folder in sorted({Path(f) for f in folders}):
            path = lock_file(data_root, folder)
            path.parent.mkdir(parents=True, exist_ok=True)
            lock = FileLock(str(path))
            try:
                lock.acquire(timeout=0)
            except Timeout:
                waited = True
                log.warning("%s: waiting for %s, which another run is writing (lock %s)", holder, folder, path)
                try:
                    lock.acquire(timeout=timeout)
                except Timeout:
                    raise LockTimeoutError(f"{folder}: another run is writing it (lock {path} still held after "
                                           f"{timeout:g} s)") from None
            stack.callback(lock.release)
        yield waited
