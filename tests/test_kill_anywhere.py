"""`dvc repro` killed for real (SIGKILL to its whole process group) at points the test picks, not only as a
stage starts: once training's first checkpoint is written (inside the second one's write), inside the
bridge's write, inside an evaluation's output write, inside a feature file's write, and inside DVC's own
work after a stage (committing its outputs to .dvc/cache; writing dvc.lock). VLAP_PAUSE_AT
(pipeline.io.pause_if_asked) stops the stage process at the chosen point of an atomic write, so the kill
lands there and nowhere else; DVC's own steps are caught by polling the output DVC relinks and dvc.lock.
After each kill, `dvc repro` ends with every output, byte for byte, and every output hash in dvc.lock as
one uninterrupted run left them; training says which step it resumed from. One small repo: the tiny models
and cost of tests/own_data.py, up to one evaluation (retrieval, the quickest).

Each killed stage first gets an edit DVC sees (a comment in its module), as after any code change: the stage
has never run on these inputs, so neither dvc.lock nor DVC's run cache can stand in for it and the next
`dvc repro` runs it (after a killed `dvc repro -f` of unchanged inputs DVC only checks the outputs out of
its cache again). The comment changes no output, so every output is still the uninterrupted run's."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from dvc_repo import REPO, make_project, sh
from own_data import shrink_cost, write_folder_dataset
from pipeline.io import PAUSE_AT, PAUSE_MARKER, sha256_file
from pipeline.paths import Dirs
from pipeline.train import checkpoint_file, read_checkpoint
from test_dvc_repro import every_output, outs_hashes
from tiny_models import save_tiny_clip_vision, save_tiny_opt

pytestmark = pytest.mark.slow  # real dvc repro, killed and run again

TRAIN, EVALUATE = "train@vlap", "evaluate_retrieval@vlap"  # retrieval: no LLM, a few seconds
STEPS = 3
CHECKPOINT = checkpoint_file(Path("data/models"), "vlap")  # relative to the repo


@pytest.fixture(scope="module")
def reference(tmp_path_factory, smollm2):
    """The repo after one uninterrupted `dvc repro` up to EVALUATE, dvc.lock committed (as after any run);
    (repo, env, every output's sha256, dvc.lock's output hashes)."""
    root = tmp_path_factory.mktemp("kill-anywhere")
    write_folder_dataset(root / "photos")
    clip = save_tiny_clip_vision(root / "models" / "clip")
    opt = save_tiny_opt(root / "models" / "opt", smollm2.tokenizer)
    params = shrink_cost(yaml.safe_load((REPO / "params.yaml").read_text()), clip, opt)
    params["prepare"] |= {"source": "folder", "folder": str(root / "photos")}
    # a checkpoint after every step: one to resume from before the last step, and later ones to kill inside;
    # no validation and no loader process, for time only (neither is what these kills are about)
    params["train"] |= {"steps": STEPS, "checkpoint_every": 1, "loader_workers": 0}
    params["train"]["validation"]["every"] = 0
    work = root / "repo"
    env = make_project(work, params)
    sh([sys.executable, "-m", "dvc", "repro", TRAIN, EVALUATE], work, env, timeout=900)
    sh(["git", "add", "-A"], work, env)
    sh(["git", "commit", "-qm", "an uninterrupted run"], work, env)
    return work, env, every_output(Dirs.under(work / "data")), outs_hashes(work)


def edit_code_of(work: Path, stage: str, why: str) -> None:
    """A comment appended to the stage's module: a code dep changed, nothing it does."""
    module = work / "stages" / f"{stage.split('@')[0]}.py"
    module.write_text(module.read_text() + f"# {why}\n")


class Run:
    """`dvc repro -s <stage>` (after an edit of the stage's code), or `dvc repro -f -s <stage>`, in its own
    process group, its output in a file."""

    def __init__(self, work: Path, env: dict, stage: str, pause: str | None = None, force: bool = False):
        if not force:
            edit_code_of(work, stage, f"run again: {pause}")
        self.log = work.parent / "killed.log"
        self.marker = work.parent / "paused"
        self.marker.unlink(missing_ok=True)
        env = env | ({PAUSE_AT: pause, PAUSE_MARKER: str(self.marker)} if pause else {})
        args = [sys.executable, "-m", "dvc", "repro", *(["-f"] if force else []), "-s", stage]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(args, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def paused(self) -> tuple[int, Path]:
        """Once the stage process has stopped itself where VLAP_PAUSE_AT says: (its pid, the temp file)."""
        deadline = time.monotonic() + 300
        while not self.marker.exists():
            assert self.proc.poll() is None and time.monotonic() < deadline, self.output()[-3000:]
            time.sleep(0.05)
        pid, tmp = self.marker.read_text().split()
        while process_state(int(pid)) != "T":  # SIGSTOP is asynchronous: wait until it has taken effect
            assert process_state(int(pid)) is not None and time.monotonic() < deadline, self.output()[-3000:]
            time.sleep(0.01)
        return int(pid), Path(tmp)

    def kill(self) -> str:
        """SIGKILL to dvc and every process it started (the stage and its children); what it printed."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        assert self.proc.returncode == -signal.SIGKILL, self.output()[-3000:]
        deadline = time.monotonic() + 30
        while group_alive(self.proc.pid):  # the orphans die as soon as the kernel delivers the signal
            assert time.monotonic() < deadline, "a killed process is still running"
            time.sleep(0.05)
        return self.output()


def process_state(pid: int) -> str | None:
    """The state letter in /proc/<pid>/stat (R, S, T stopped, Z exited), None once it is reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None


def group_alive(pgid: int) -> bool:
    """Whether any process of group `pgid` is running (not a zombie)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def repro_again(work: Path, env: dict) -> str:
    """A plain `dvc repro` of the targets the reference ran; what it and the stages printed."""
    run = subprocess.run([sys.executable, "-m", "dvc", "repro", TRAIN, EVALUATE], cwd=work, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:]
    return run.stdout


def check_as_uninterrupted(work: Path, reference) -> None:
    _, _, outputs, hashes = reference
    now = every_output(Dirs.under(work / "data"))
    assert now.keys() == outputs.keys()
    assert [f for f in now if now[f] != outputs[f]] == []
    assert outs_hashes(work) == hashes


def resumed_from(out: str) -> list[int]:
    return [int(line.rsplit(" ", 1)[1]) for line in out.splitlines() if "train vlap: resuming from step" in line]


def test_killed_inside_the_second_checkpoint_write_training_resumes_from_the_first(reference):
    """Killed once the first checkpoint is written, with the second one's bytes all in its temp file, before
    the rename: the first checkpoint is what the next run resumes from; the temp file is left, read by nothing."""
    work, env, _, _ = reference
    run = Run(work, env, TRAIN, pause=f"written:{CHECKPOINT.name}:2")
    _, tmp = run.paused()
    run.kill()
    assert read_checkpoint(tmp, torch.device("cpu"))["step"] == 2  # whole, but never renamed
    assert read_checkpoint(work / CHECKPOINT, torch.device("cpu"))["step"] == 1
    assert not (work / "data/models/vlap/model.safetensors").exists()  # DVC removed the outputs it re-runs
    out = repro_again(work, env)
    assert resumed_from(out) == [1], out[-3000:]
    assert not (work / CHECKPOINT).exists()  # a finished run removes its checkpoint
    check_as_uninterrupted(work, reference)


def test_killed_inside_the_bridge_write_training_resumes_after_its_last_step(reference):
    """Killed with the bridge's weights in their temp file: the last step's checkpoint is still there (a
    run removes it only after the bridge is written), so the next run trains no step and writes the bridge."""
    work, env, _, _ = reference
    run = Run(work, env, TRAIN, pause="written:model.safetensors:1")
    _, tmp = run.paused()
    run.kill()
    assert sha256_file(tmp) == reference[2]["models/vlap/model.safetensors"]
    assert not (work / "data/models/vlap/model.safetensors").exists()
    assert read_checkpoint(work / CHECKPOINT, torch.device("cpu"))["step"] == STEPS
    out = repro_again(work, env)
    assert resumed_from(out) == [STEPS], out[-3000:]
    check_as_uninterrupted(work, reference)


def test_killed_inside_an_evaluation_output_write_the_evaluation_runs_again(reference):
    """Killed with the metrics' bytes all in their temp file: DVC had cleared the stage's outputs before
    running it, so the next run runs the evaluation again (training stays up to date)."""
    work, env, _, _ = reference
    run = Run(work, env, EVALUATE, pause="written:vlap.json:1")  # metrics/retrieval/vlap.json, its last output
    _, tmp = run.paused()
    run.kill()
    assert sha256_file(tmp) == reference[2]["metrics/retrieval/vlap.json"]
    assert not (work / "data/metrics/retrieval/vlap.json").exists()
    out = repro_again(work, env)
    assert f"Running stage '{EVALUATE}'" in out and f"Running stage '{TRAIN}'" not in out, out[-3000:]
    check_as_uninterrupted(work, reference)


def test_killed_inside_a_feature_file_write_extraction_resumes_and_the_left_temp_file_is_in_no_hash(reference):
    """data/features persists across runs (DVC does not clear it), so the temp file a kill leaves there stays
    until the stage runs again, which removes it (stages.common.remove_leftover_temps); .dvcignore keeps such
    files out of the folder's hash meanwhile. The split's finished shards are kept; the next run assembles
    them without encoding an image again."""
    work, env, _, _ = reference
    features = work / "data" / "features"
    index = json.loads((features / "index.json").read_text())
    (features / index["val"]["file"]).unlink()  # a split to encode, as after a new split or encoder
    run = Run(work, env, "extract", pause="written:*.h5:1")
    _, tmp = run.paused()
    run.kill()
    assert tmp.exists() and not (features / index["val"]["file"]).exists()
    out = repro_again(work, env)
    assert "extract val: resuming, 1 of 1 blocks already done" in out, out[-3000:]
    assert "Running stage 'prototypes'" not in out and f"Running stage '{TRAIN}'" not in out, out[-3000:]
    assert not tmp.exists()  # removed by the run that went on
    assert every_output(Dirs.under(work / "data")) == reference[2]
    assert outs_hashes(work) == reference[3]


def file_id(path: Path) -> tuple[int, int] | None:
    """(inode, ctime) of `path`, None while it is missing: a rename or a new link changes it."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_ctime_ns


def test_killed_while_dvc_commits_a_stage_s_outputs_to_its_cache(reference):
    """After the stage, DVC hashes its outputs, saves its run cache and commits each output to .dvc/cache,
    taking the file out of the workspace and linking it back (dvc.output.Output.commit, relink), then writes
    dvc.lock. The kill lands at that relink of the bridge's weights, the first output: dvc.lock is untouched
    and the file may be missing; the next run checks the outputs out of DVC's cache or trains again."""
    work, env, _, _ = reference
    lock, weights = work / "dvc.lock", work / "data/models/vlap/model.safetensors"
    before = lock.read_bytes(), lock.stat().st_mtime_ns
    run = Run(work, env, TRAIN, pause="renamed:written.json:1")  # the stage's last write (stages.common)
    pid, _ = run.paused()
    written = file_id(weights)  # as the stage left it
    os.kill(pid, signal.SIGCONT)
    while file_id(weights) == written and run.proc.poll() is None:  # polled: DVC relinks ~0.2 s after the stage
        pass
    run.kill()
    assert process_state(pid) in (None, "Z")  # the stage had ended: this was DVC's own work
    assert (lock.read_bytes(), lock.stat().st_mtime_ns) == before  # DVC had not reached dvc.lock
    out = repro_again(work, env)
    assert f"Stage '{TRAIN}' is cached" in out or f"Running stage '{TRAIN}'" in out, out[-3000:]
    check_as_uninterrupted(work, reference)


def test_killed_while_dvc_writes_dvc_lock_the_committed_one_restores_it(reference):
    """DVC rewrites dvc.lock in place (open, truncate, write; not atomic): killed once it has opened it, the
    file is cut short and DVC refuses to run until it is restored. `git checkout dvc.lock` (or deleting it:
    DVC then re-runs or restores from its run cache) and `dvc repro` end as an uninterrupted run."""
    work, env, _, _ = reference
    sh(["git", "add", "-A"], work, env)  # dvc.lock committed, as after any run
    sh(["git", "commit", "-qm", "before the kill", "--allow-empty"], work, env)
    lock = work / "dvc.lock"
    before = lock.read_bytes(), lock.stat().st_mtime_ns
    run = Run(work, env, EVALUATE, pause="renamed:written.json:1", force=True)  # the stage's last write
    pid, _ = run.paused()
    os.kill(pid, signal.SIGCONT)
    while lock.stat().st_mtime_ns == before[1] and run.proc.poll() is None:  # polled: ~0.3 s after the stage
        pass
    run.kill()
    cut = lock.read_bytes()
    # inside the write: a forced run of the same inputs writes the same text, so what is there is a part of it
    assert len(cut) < len(before[0]) and before[0].startswith(cut), cut[-200:]
    refused = subprocess.run([sys.executable, "-m", "dvc", "repro", TRAIN, EVALUATE], cwd=work, env=env,
                             capture_output=True, text=True, timeout=600)
    assert refused.returncode != 0 and "dvc.lock" in refused.stdout + refused.stderr, refused.stdout[-2000:]
    sh(["git", "checkout", "dvc.lock"], work, env)
    out = repro_again(work, env)
    assert f"Running stage '{TRAIN}'" not in out, out[-3000:]
    check_as_uninterrupted(work, reference)
