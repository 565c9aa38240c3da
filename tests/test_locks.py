"""Two runs on one data folder never write the same output together: real processes, real locks."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from pipeline.paths import Dirs

REPO = Path(__file__).resolve().parents[1]
HOLD = """
import sys, time
from pathlib import Path
from pipeline.locks import locked
with locked(Path(sys.argv[1]), [Path(sys.argv[1]) / "prepared"], holder="another run"):
    print("holding", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def holder(data: Path, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(data), str(seconds)], cwd=REPO, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "holding"
    return proc


def prepare(data: Path, timeout: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stages.prepare", "--data", str(data)], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env=os.environ | {"VLAP_LOCK_TIMEOUT": timeout})


def test_a_held_output_fails_in_one_line_and_loses_nothing(tmp_path):
    data = Dirs.under(tmp_path / "data")
    data.prepared.mkdir(parents=True)
    (data.prepared / "train.parquet").write_bytes(b"written by the other run")
    other = holder(data.root, 30)
    try:
        proc = prepare(data.root, "1")
    finally:
        other.kill()
    assert proc.returncode == 2
    lock = data.root / ".locks" / "prepared.lock"
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {data.prepared}: another run is writing it (lock {lock} still held after 1 s)")
    assert (data.prepared / "train.parquet").read_bytes() == b"written by the other run"


def test_a_second_run_waits_with_a_message_then_writes(tmp_path):
    data = Dirs.under(tmp_path / "data")
    other = holder(data.root, 3)
    start = time.monotonic()
    proc = prepare(data.root, "")  # wait as long as it takes
    other.wait(timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "waiting for" in proc.stderr and "which another run is writing" in proc.stderr
    assert time.monotonic() - start >= 2.5
    assert (data.prepared / "train.parquet").is_file()
