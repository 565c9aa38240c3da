"""Two runs on one data folder never write the same output together: real processes, real locks."""
from __future__ import annotations

import os
import subprocess
import sys
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


def prepare_command(data: Path) -> list[str]:
    return [sys.executable, "-m", "stages.prepare", "--data", str(data)]


def prepare(data: Path, timeout: str) -> subprocess.CompletedProcess:
    return subprocess.run(prepare_command(data), cwd=REPO,
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
    """The second run says whom it waits for, and writes once the other lets go. The other holds the lock until
    the message is seen (a fixed hold would race the second run's start-up on a loaded machine)."""
    data = Dirs.under(tmp_path / "data")
    other = holder(data.root, 300)
    proc = subprocess.Popen(prepare_command(data.root), cwd=REPO,
                            stderr=subprocess.PIPE, text=True, env=os.environ | {"VLAP_LOCK_TIMEOUT": ""})
    try:
        first = ""
        while "waiting for" not in first and (line := proc.stderr.readline()):
            first += line
        assert "waiting for" in first and "which another run is writing" in first, first
        assert not (data.prepared / "train.parquet").exists()  # nothing written while the other holds it
    finally:
        other.kill()
    rest = proc.communicate(timeout=300)[1]
    assert proc.returncode == 0, first + rest
    assert (data.prepared / "train.parquet").exists()


def test_two_runs_of_a_stage_started_together_write_its_outputs_once(tmp_path):
    """Both finish; the one that waited finds the outputs written from its own inputs and does not write
    them again (the files keep the first run's mtimes); an edit to an output makes a waiting run run."""
    data = Dirs.under(tmp_path / "data")
    cmd = prepare_command(data.root)
    runs = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for _ in range(2)]
    logs = [run.communicate(timeout=300)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], logs
    waited = [log for log in logs if "waiting for" in log]
    assert len(waited) == 1 and "prepare: the run waited for wrote these outputs from the same inputs; not run again" \
        in waited[0]
    written = {p: p.stat().st_mtime_ns for p in data.prepared.iterdir()}
    other = holder(data.root, 2)  # a run holds the lock while an output is changed under it
    (data.prepared / "report.json").write_text("{}")
    proc = prepare(data.root, "")
    other.wait(timeout=30)
    assert proc.returncode == 0 and "not run again" not in proc.stderr
    assert (data.prepared / "report.json").read_text() != "{}"
    assert all(p.stat().st_mtime_ns != t for p, t in written.items() if p.name == "report.json")


def test_a_killed_runs_temp_files_are_removed_by_the_next_run_of_its_stage(tmp_path):
    """Temp files of unfinished atomic writes (what a SIGKILL mid-write leaves) go when the stage next runs
    under its outputs' locks; other files, and other outputs' temps, stay."""
    from stages.common import remove_leftover_temps

    folder, single = tmp_path / "features", tmp_path / "metrics" / "vlap.json"
    (folder / "sub").mkdir(parents=True)
    single.parent.mkdir()
    left = [folder / ".a.h5.x1.tmp", folder / "sub" / ".b.json.x2.tmp", single.parent / ".vlap.json.x3.tmp"]
    kept = [folder / "a.h5", single.parent / ".limber.json.x4.tmp", single.parent / "limber.json"]
    for path in left + kept:
        path.write_bytes(b"x")
    remove_leftover_temps([folder, single])
    assert not any(p.exists() for p in left) and all(p.exists() for p in kept)


def test_a_run_waiting_on_the_repo_names_the_run_that_holds_it_not_a_killed_one(tmp_path):
    """The repo's run lock (`vlap run`, the flow): a waiter that comes just as the holder took the lock waits
    for the holder's record; a killed run's record (its process gone) names nobody; a run lets go of its record."""
    import threading

    from vlap.repro import RUN_LOCK, holder_of, repo_run_lock

    record = (tmp_path / RUN_LOCK).with_suffix(".holder")
    record.parent.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    record.write_text(f'{{"pid": {dead.pid}, "command": "vlap run", "started": "01:02:03"}}')
    assert holder_of(tmp_path / RUN_LOCK, wait_s=0.2) == "another `vlap run`"
    # the holder writes its record a moment after the waiter looked
    later = threading.Timer(0.3, lambda: record.write_text(
        f'{{"pid": {os.getpid()}, "command": "vlap run", "started": "04:05:06"}}'))
    later.start()
    assert holder_of(tmp_path / RUN_LOCK) == f"`vlap run` (pid {os.getpid()}, started 04:05:06)"
    later.join()
    record.unlink()
    with repo_run_lock(tmp_path, "python -m vlap.flow"):
        assert f"`python -m vlap.flow` (pid {os.getpid()}" in holder_of(tmp_path / RUN_LOCK, wait_s=0)
    assert not record.exists()
