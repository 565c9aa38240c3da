"""`vlap study --workers`: each (seed, method) a task on a local Dask cluster; a parallel study killed mid-run
and resumed by workers ends with the serial run's files."""
from __future__ import annotations

import filecmp
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml

from graph_runner import cut_easyvqa
from pipeline.config import parse_config
from pipeline.paths import Dirs
from stages import extract, prepare, prototypes
from stages.common import run_stage
from tiny_models import save_tiny_clip_vision, save_tiny_opt
from vlap.cells import CellCluster
from vlap.study import run_study

pytestmark = pytest.mark.slow  # 2 seeds x 2 methods trained and evaluated, serially and on workers

THREADS = 1  # torch threads of every cell, serial or on a worker: the same count gives the same bytes
STUDY = {"seeds": [0, 1], "methods": ["vlap", "limber"], "steps": 3, "test_images": 6, "vqa_questions": 4,
         "n_boot": 100}


@contextmanager
def torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, smollm2):
    root = tmp_path_factory.mktemp("parallel-study")
    clip, opt = save_tiny_clip_vision(root / "clip"), save_tiny_opt(root / "opt", smollm2.tokenizer)
    params = {
        "extract": {"encoder": f"hf:{clip}", "batch_size": 16},
        "prototypes": {"llm": f"hf:{opt}"},
        "train": {"batch_size": 4, "warmup_steps": 1, "checkpoint_every": 10, "loader_workers": 0},
        "evaluate": {"common": {"batch_size": 4}, "caption": {"max_new_tokens": 2, "examples": 1},
                     "vqa": {"shots": 1, "max_new_tokens": 2}, "arithmetic": {"queries": 2, "examples": 1},
                     "taxonomy": {"min_images": 1, "bootstrap": 20, "permutations": 20}},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    cfg = parse_config(params)
    base = Dirs.under(root / "data")
    run_stage(prepare, cfg, base)
    cut_easyvqa(base, (16, 6))
    run_stage(extract, cfg, base)
    run_stage(prototypes, cfg, base)
    with torch_threads(THREADS):
        report = run_study(cfg, base, root / "serial", **STUDY)
    return cfg, base, root, report


def run_files(study: Path) -> dict[str, Path]:
    """Every file the cells wrote (bridges, metrics, per-item scores, pages, records), by relative path; not the
    linked inputs, the lock folder, nor the throughput reports (timings)."""
    runs = study / "runs"
    return {str(p.relative_to(runs)): p for p in sorted(runs.rglob("*"))
            if p.is_file() and not any(part in ("prepared", "features", "prototypes", ".locks", "reports")
                                       for part in p.relative_to(runs).parts)}


def assert_same_as_serial(root: Path, study: Path) -> None:
    serial, other = run_files(root / "serial"), run_files(study)
    assert serial.keys() == other.keys()
    assert any(name.endswith("models/vlap/model.safetensors") for name in serial)
    assert any(name.endswith("plots/caption/limber/captions.json") for name in serial)  # per-item scores
    differ = [name for name in serial if not filecmp.cmp(serial[name], other[name], shallow=False)]
    assert differ == []
    assert (root / "serial" / "report.md").read_bytes() == (study / "report.md").read_bytes()
    serial_json, other_json = (json.loads((s / "study.json").read_text()) for s in (root / "serial", study))
    if serial_json["code_revision"] == other_json["code_revision"]:  # the checkout may move between the runs
        assert (root / "serial" / "study.json").read_bytes() == (study / "study.json").read_bytes()
    assert serial_json | {"code_revision": None} == other_json | {"code_revision": None}


def test_a_study_on_two_workers_killed_mid_run_is_resumed_by_workers_to_the_serial_result(inputs):
    """`vlap study --workers 2` runs cells on two Dask workers and is killed (with its workers) once a bridge is
    written; a study on two workers resumes it, runs no recorded training again, and ends with the serial
    study's files byte for byte: the same study whatever ran where, and whenever it stopped."""
    cfg, base, root, report = inputs
    out = root / "killed"
    command = [sys.executable, "-m", "vlap", "study", "--params", str(root / "params.yaml"), "--data", str(base.root),
               "--out", str(out), "--seeds", "0", "1", "--methods", "vlap", "limber", "--steps", "3",
               "--test-images", "6", "--vqa-questions", "4", "--boot", "100", "--workers", "2", "--threads", "1"]
    proc = subprocess.Popen(command, cwd=Path(__file__).resolve().parents[1], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    bridges = out / "runs"
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if any(bridges.glob("seed-*/models/*/model.safetensors")):
                break
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the study and its Dask workers, mid-run
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the study ended before it was killed"
    assert not (out / "study.json").exists()
    assert any(bridges.glob("seed-*/models/*/model.safetensors"))  # at least one cell had trained its bridge
    recorded = {root / "models" / label.split("@")[1] / "model.safetensors" for root in bridges.glob("seed-*")
                if (root / "stages.lock.json").exists()
                for label in json.loads((root / "stages.lock.json").read_text()) if label.startswith("train@")}
    kept = {p: p.stat().st_mtime_ns for p in recorded}
    with CellCluster(workers=2, threads=THREADS) as cluster:
        pids = set(cluster.client.run(os.getpid).values())
        resumed = run_study(cfg, base, out, cluster=cluster, **STUDY)
        # a worker loads the LLM once: its cached copy is there for its next cell
        loaded = cluster.client.run(lambda: __import__("vlap.cells").cells.worker_lm.cache_info().currsize)
    assert len(pids) == 2 and os.getpid() not in pids and set(loaded.values()) <= {0, 1}
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # a recorded training is not run again
    assert resumed == report
    assert_same_as_serial(root, out)
