"""`dvc repro` that waits for another run on the same repo rather than failing.

DVC refuses a second `dvc repro` while the first holds a stage's outputs ("... is busy, it is being
blocked by (PID n)"). `vlap run` (this module) and the Prefect flow on the repo's own data and params
take the repo's run lock first, so they go one after the other, the later saying which run it waits
for; should a plain `dvc repro` hold DVC's lock meanwhile, `vlap run` waits for it too, saying so, and
asks DVC again. What the earlier run made is recorded in dvc.lock (the flow commits each stage it runs
there), so the later run runs only what is still stale: no stage runs twice.

    python -m vlap run [-- dvc repro arguments]
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

from filelock import FileLock, Timeout

from pipeline.errors import LockTimeoutError
from pipeline.locks import lock_timeout

log = logging.getLogger("vlap.run")
RUN_LOCK = Path(".dvc") / "tmp" / "vlap-run.lock"  # DVC's own temp folder: never tracked, never committed
# What DVC prints when another DVC process holds a lock it needs (dvc.rwlock, dvc.lock)
DVC_BUSY = ("is busy, it is being blocked by", "Unable to acquire lock")
RETRY_S = 2.0


def holder_of(lock: Path) -> str:
    """Who holds the run lock, as its holder wrote it next to the lock."""
    try:
        info = json.loads(lock.with_suffix(".holder").read_text())
        return f"`{info['command']}` (pid {info['pid']}, started {info['started']})"
    except (OSError, ValueError, KeyError):
        return "another `vlap run`"


def run_dvc_repro(root: Path, args: list[str]) -> tuple[int, str]:
    """`dvc repro args` with its output passed through as it comes; (exit code, the tail of its stderr)."""
    proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro", *args], cwd=root, stderr=subprocess.PIPE)
    tail = bytearray()

    def relay() -> None:
        while chunk := os.read(proc.stderr.fileno(), 4096):
            sys.stderr.buffer.write(chunk)
            sys.stderr.buffer.flush()
            tail.extend(chunk)
            del tail[:-65536]

    reader = threading.Thread(target=relay, daemon=True)
    reader.start()
    code = proc.wait()
    reader.join()
    return code, tail.decode(errors="replace")


@contextlib.contextmanager
def repo_run_lock(root: Path, command: str) -> Iterator[None]:
    """Hold the repo's run lock (one `vlap run` or flow on the repo's own data at a time), saying which run
    it waits for. VLAP_LOCK_TIMEOUT (seconds) bounds the wait, as it bounds the stages' output locks."""
    lock_path = root / RUN_LOCK
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock, timeout = FileLock(str(lock_path)), lock_timeout()
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.warning("waiting for %s, which is running on %s", holder_of(lock_path), root.resolve())
        try:
            lock.acquire(timeout=timeout)
        except Timeout:
            raise LockTimeoutError(f"{root.resolve()}: another run still holds {lock_path} after "
                                   f"{timeout:g} s") from None
    try:
        lock_path.with_suffix(".holder").write_text(json.dumps(
            {"pid": os.getpid(), "command": command, "started": time.strftime("%H:%M:%S")}))
        yield
    finally:
        lock.release()


def repro(args: list[str], root: Path = Path(".")) -> int:
    """`dvc repro args` in `root`, after any other `vlap run` or flow there, waiting out other DVC processes'
    locks (a plain `dvc repro`): DVC's refusal is asked again every few seconds."""
    with repo_run_lock(root, " ".join(["vlap run", *args])):
        timeout = lock_timeout()
        deadline = time.monotonic() + timeout if timeout >= 0 else float("inf")
        said = False
        while True:
            code, err = run_dvc_repro(root, args)
            busy = next((line for line in err.splitlines() if any(mark in line for mark in DVC_BUSY)), None)
            if code == 0 or busy is None:
                return code
            if time.monotonic() > deadline:
                raise LockTimeoutError(f"{root.resolve()}: dvc repro: {busy.strip()}")
            if not said:
                blocker = next((line.strip() for line in err.splitlines() if line.strip().startswith("(PID")), "")
                log.warning("waiting for another DVC process on %s to release its lock (%s), then asking DVC again",
                            root.resolve(), blocker or busy.strip())
                said = True
            time.sleep(RETRY_S)
