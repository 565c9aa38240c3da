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
from pipeline.io import write_json_atomic
from pipeline.locks import lock_timeout

log = logging.getLogger("vlap.run")
RUN_LOCK = Path(".dvc") / "tmp" / "vlap-run.lock"  # DVC's own temp folder: never tracked, never committed
# What DVC prints when another DVC process holds a lock it needs (dvc.rwlock, dvc.lock)
DVC_BUSY = ("is busy, it is being blocked by", "Unable to acquire lock")
RETRY_S = 2.0


# Seconds a waiter gives the lock's holder to write who it is (it does so as soon as it holds the lock).
HOLDER_WAIT_S = 5.0


def holder_of(lock: Path, wait_s: float = HOLDER_WAIT_S) -> str:
    """Who holds the run lock, as its holder wrote it next to the lock. The holder writes it just after it
    takes the lock (and removes it just before letting go): a waiter that comes in between waits for it a
    moment. A record whose process is gone is a killed run's, and says nothing of the holder."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            info = json.loads(lock.with_suffix(".holder").read_text())
            if pid_alive(int(info["pid"])):
                return f"`{info['command']}` (pid {info['pid']}, started {info['started']})"
        except (OSError, ValueError, KeyError, TypeError):
            pass
        if time.monotonic() > deadline:
            return "another `vlap run`"
        time.sleep(0.05)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


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
    holder = lock_path.with_suffix(".holder")
    try:
        write_json_atomic(holder, {"pid": os.getpid(), "command": command, "started": time.strftime("%H:%M:%S")})
        yield
    finally:
        holder.unlink(missing_ok=True)
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
