"""The Prefect flow on tiny local models: one stage run at a time per device unless more are allowed, a
transient failure retried with growing waits and its reason logged, and a flow on an existing Dask cluster
(a real `dask scheduler` and `dask worker` processes) whose worker is killed in the middle of training: the
stage runs again on the other worker and writes what an uninterrupted flow wrote, byte for byte."""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from pipeline.io import sha256_bytes
from pipeline.paths import Dirs
from stages import graph
from stages.common import RUN_JOURNAL, RunJournal
from vlap import flow

REPO = Path(__file__).resolve().parents[1]
DASK = str(Path(sys.executable).with_name("dask"))
TRAININGS = ["train@vlap", "train@limber"]  # independent of each other, both on the CPU here


@pytest.fixture(scope="module")
def tiny_params(tmp_path_factory, smollm2) -> Path:
    """The committed params.yaml at a test's cost (tests/own_data.py): a folder of drawn pictures, tiny models."""
    from own_data import shrink_cost, write_folder_dataset
    from tiny_models import save_tiny_clip_vision, save_tiny_opt

    root = tmp_path_factory.mktemp("tiny")
    write_folder_dataset(root / "photos")
    clip, opt = save_tiny_clip_vision(root / "models" / "clip"), save_tiny_opt(root / "models" / "opt", smollm2.tokenizer)
    params = shrink_cost(yaml.safe_load((REPO / "params.yaml").read_text()), clip, opt)
    params["prepare"] |= {"source": "folder", "folder": str(root / "photos")}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root / "params.yaml"


@pytest.fixture(autouse=True)
def own_device_locks(tmp_path, monkeypatch):
    """Device slots of this test only (the flow's default folder is the machine's)."""
    monkeypatch.setenv(flow.DEVICE_LOCKS_ENV, str(tmp_path / "device-locks"))
    monkeypatch.setenv(flow.RETRY_DELAY_ENV, "1")


def trainings(data: Path) -> list[dict]:
    """The journal's entries of the two training runs, first started first."""
    entries = RunJournal(data / ".locks" / RUN_JOURNAL).entries()
    return sorted((e for e in entries if e["stage"] in TRAININGS), key=lambda e: e["started"])


def outputs(data: Path, labels: list[str]) -> dict[str, str]:
    """sha256 of every file of these stage runs' outputs, by path (as tests/test_dvc_repro.py's every_output)."""
    dirs, found = Dirs.under(data), {}
    for node in graph.graph():
        for method in node.instances():
            if node.spec.label(method) in labels:
                for out in node.spec.out_paths(dirs, method):
                    for f in [out] if out.is_file() else sorted(p for p in out.rglob("*") if p.is_file()):
                        found[f.relative_to(data).as_posix()] = sha256_bytes(f.read_bytes())
    return found


@pytest.fixture(scope="module")
def one_at_a_time(tiny_params, prefect_server, tmp_path_factory) -> Path:
    """A flow run of the two trainings (and what they read), two threads, one slot on the CPU: uninterrupted."""
    data = tmp_path_factory.mktemp("one-slot") / "data"
    os.environ[flow.DEVICE_LOCKS_ENV] = str(data.parent / "device-locks")
    try:
        flow.run_flow(str(tiny_params), str(data), dask=False, workers=2, per_device=1, targets=TRAININGS)
    finally:
        os.environ.pop(flow.DEVICE_LOCKS_ENV, None)
    return data


@pytest.mark.slow
def test_one_slot_per_device_keeps_two_trainings_apart_and_two_slots_let_them_overlap(one_at_a_time, tiny_params,
                                                                                       tmp_path):
    first, second = trainings(one_at_a_time)
    assert second["started"] >= first["finished"]  # two threads free, one CPU slot: one after the other

    data = tmp_path / "data"  # the same data, the trainings not run yet: a second run of the same flow
    shutil.copytree(one_at_a_time, data, ignore=shutil.ignore_patterns("models", "train", RUN_JOURNAL, "written.json"))
    flow.run_flow(str(tiny_params), str(data), dask=False, workers=2, per_device=2, targets=TRAININGS)
    first, second = trainings(data)
    assert second["started"] < first["finished"]  # two slots: side by side
    assert outputs(data, TRAININGS) == outputs(one_at_a_time, TRAININGS)


def test_a_device_slot_is_held_across_threads_and_let_go_by_a_dead_holder(tmp_path):
    """Slots are flocks: a second holder waits in another thread; a holder killed mid-run frees its slot."""
    held, order = threading.Event(), []

    def first():
        with flow.device_slot("cuda:0", 1, "a"):
            held.set()
            time.sleep(1.0)
            order.append("a done")

    worker = threading.Thread(target=first)
    worker.start()
    held.wait(10)
    with flow.device_slot("cuda:0", 1, "b"):
        order.append("b in")
    worker.join()
    assert order == ["a done", "b in"]
    with flow.device_slot("cuda:0", 2, "c"), flow.device_slot("cuda:0", 2, "d"):  # two slots: both at once
        pass

    code = ("import os, sys, time; from vlap import flow\n"
            "with flow.device_slot('cuda:0', 1, 'x'):\n    print('held', flush=True); time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True,
                              env=os.environ | {flow.DEVICE_LOCKS_ENV: os.environ[flow.DEVICE_LOCKS_ENV]})
    try:
        assert holder.stdout.readline().strip() == "held"
        holder.kill()
        holder.wait()
        started = time.monotonic()
        with flow.device_slot("cuda:0", 1, "after"):
            assert time.monotonic() - started < 2
    finally:
        holder.kill()


def test_a_stage_uses_its_sections_device():
    from pipeline.config import Config

    cfg, nodes = Config(), {n.spec.name: n for n in graph.graph()}
    assert flow.stage_device(nodes["train"], "vlap", cfg) == flow.stage_device(nodes["summarize"], None, cfg)
    import dataclasses
    gpu = dataclasses.replace(cfg, evaluate=dataclasses.replace(cfg.evaluate, common=dataclasses.replace(
        cfg.evaluate.common, device="cuda:1")))
    for name in ("evaluate_caption", "evaluate_vqa", "evaluate_taxonomy"):
        assert flow.stage_device(nodes[name], "vlap", gpu) == "cuda:1"  # unavailable here: named as given
    assert flow.stage_device(nodes["train"], "vlap", gpu) != "cuda:1"


@pytest.mark.slow
def test_a_transient_failure_logs_its_reason_and_waits_longer_each_try(prefect_server, tmp_path, monkeypatch):
    """Every try of the sources stage fails the same transient way (a folder stands where its output file
    goes, so the write fails): a one-line reason for each try that is retried, then the failure; the waits
    grow 1 s, 3 s (x3 each)."""
    from test_flow import folder_dataset

    folder_dataset(tmp_path / "images")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"prepare": {"source": "folder", "folder": str(tmp_path / "images")}}))
    data = tmp_path / "data"
    (data / "sources.json" / "in-the-way").mkdir(parents=True)
    from pipeline.config import load_config

    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logging.getLogger("prefect.task_runs").addHandler(handler)
    node = next(n for n in graph.graph() if n.spec.name == "sources")
    try:
        started = time.monotonic()
        state = flow.stage_task(node, None, load_config(str(params)), Dirs.under(data), retries=2)(
            "sources", str(params), str(data), None, return_state=True)
        took = time.monotonic() - started
    finally:
        logging.getLogger("prefect.task_runs").removeHandler(handler)
    assert state.is_failed()
    said = [line for line in lines if line.startswith("sources: try ")]
    assert [s.split(" failed (")[0] for s in said] == ["sources: try 1 of 3", "sources: try 2 of 3"], lines
    assert said[0].endswith("; trying again in 1 s") and said[1].endswith("; trying again in 3 s")
    assert all("Error: " in s and "\n" not in s for s in said)
    assert took >= 4


def start_worker(address: str, name: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen([DASK, "worker", address, "--nthreads", "1", "--no-nanny", "--no-dashboard",
                             "--name", name], cwd=REPO, env=env, stderr=subprocess.DEVNULL)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("prefect_dask") is None, reason="needs prefect-dask (the dask extra)")
def test_a_worker_killed_mid_training_the_flow_ends_with_the_uninterrupted_bytes(one_at_a_time, tiny_params,
                                                                                 tmp_path):
    """The flow on an existing scheduler (`--dask --scheduler`). Worker w0 runs every stage, and stops itself
    (VLAP_PAUSE_AT) as train@vlap writes its model; w1 joins, w0 is killed there: Dask runs the task again on
    w1, which trains from the start, and the flow ends with the bytes of the run nobody interrupted."""
    from distributed import Client

    marker, address_file = tmp_path / "paused", tmp_path / "scheduler.json"
    env = os.environ | {"DASK_DISTRIBUTED__WORKER__DAEMON": "False"}
    scheduler = subprocess.Popen([DASK, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                                  "--scheduler-file", str(address_file)], cwd=REPO, env=env,
                                 stderr=subprocess.DEVNULL)
    workers: list[subprocess.Popen] = []
    try:
        deadline = time.monotonic() + 60
        while not address_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        address = json.loads(address_file.read_text())["address"]
        workers.append(start_worker(address, "w0", env | {"VLAP_PAUSE_AT": "written:model.safetensors:1",
                                                          "VLAP_PAUSE_MARKER": str(marker)}))
        with Client(address) as client:
            client.wait_for_workers(1, timeout=60)
        data, outcome = tmp_path / "data", {}

        def run():
            try:
                outcome["result"] = flow.run_flow(str(tiny_params), str(data), dask=True, scheduler=address,
                                                  targets=["train@vlap"])
            except BaseException as err:  # noqa: BLE001  (reported by the test)
                outcome["error"] = err

        runner = threading.Thread(target=run)
        runner.start()
        deadline = time.monotonic() + 240
        while not marker.exists() and runner.is_alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert marker.exists(), outcome
        paused_pid = int(marker.read_text().split()[0])
        assert paused_pid == workers[0].pid  # the stage runs in the worker's own process (no nanny)
        workers.append(start_worker(address, "w1", env))
        with Client(address) as client:
            client.wait_for_workers(2, timeout=60)
        os.kill(paused_pid, signal.SIGKILL)
        runner.join(300)
        assert not runner.is_alive() and "error" not in outcome, outcome
    finally:
        for proc in workers + [scheduler]:
            proc.kill()
            proc.wait()
    runs = [e for e in RunJournal(data / ".locks" / RUN_JOURNAL).entries() if e["stage"] == "train@vlap"]
    assert [e["pid"] for e in runs] == [workers[1].pid]  # finished once, on w1: the killed try never finished
    assert outcome["result"]["train@vlap"] is not None
    assert outputs(data, ["train@vlap"]) == outputs(one_at_a_time, ["train@vlap"])
    assert outputs(data, ["train@vlap"])  # the model and its metrics were compared
