"""The Prefect flow: built from the stage graph, keyed on DVC's inputs, a real cache hit on a temporary server."""
from __future__ import annotations

import os

os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")  # tasks below run outside a flow

import importlib.util
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from PIL import Image
from prefect import flow as prefect_flow
from prefect._internal.result_records import ResultRecord, ResultRecordMetadata
from prefect.serializers import PickleSerializer

from pipeline.config import METHODS, Config, PrepareConfig
from pipeline.paths import Dirs
from stages import graph, sources
from vlap import flow

REPO = Path(__file__).resolve().parents[1]


def node(name: str) -> graph.Node:
    return next(n for n in graph.graph() if n.spec.name == name)


def folder_dataset(root: Path) -> Config:
    """A prepare.source=folder dataset of four 8x8 PNGs (3 train, 1 test) and its config."""
    rows = [("red.png", "red", "a red square", "train"), ("blue.png", "blue", "a blue square", "train"),
            ("teal.png", "teal", "a teal square", "train"), ("gray.png", "gray", "a gray square", "test")]
    root.mkdir(parents=True)
    for name, colour, _, _ in rows:
        Image.new("RGB", (8, 8), colour).save(root / name)
    write_captions(root, rows)
    return Config(prepare=PrepareConfig(source="folder", folder=str(root)))


def write_captions(root: Path, rows: list[tuple]) -> None:
    (root / "captions.csv").write_text("image,caption,split\n" + "".join(f"{r[0]},{r[2]},{r[3]}\n" for r in rows))


def test_flow_runs_what_dvc_runs():
    """Every stage dvc.yaml defines (foreach expanded) is one flow task, and each has upstream tasks
    exactly where dvc.yaml's deps meet another stage's outs."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    dvc_names = {f"{name}@{m}" if "foreach" in s else name for name, s in stages.items()
                 for m in (s.get("foreach") or [None])}
    nodes = graph.graph()
    assert {n.spec.label(m) for n in nodes for m in n.instances()} == dvc_names
    dirs = Dirs.under(Path("data"))
    assert flow.upstream(nodes, node("train"), "vlap", dirs) == ["prepare", "extract", "prototypes"]
    assert flow.upstream(nodes, node("evaluate_vqa"), "limber", dirs) == ["prepare", "extract", "prototypes",
                                                                          "train@limber"]
    assert set(flow.upstream(nodes, node("summarize"), None, dirs)) == {"prepare"} | {  # prepare: the zero-shot note
        f"evaluate_{t}@{m}" for t in ("caption", "vqa", "retrieval", "arithmetic", "taxonomy") for m in METHODS}


def test_key_follows_declared_params_only(tmp_path):
    cfg, dirs, train = Config(), Dirs.under(tmp_path), node("train")
    keys = {m: train.declared_inputs_digest(m, cfg, dirs) for m in METHODS}
    assert len(set(keys.values())) == len(METHODS)
    lam = replace(cfg, methods=replace(cfg.methods, vlap=replace(cfg.methods.vlap, ap_weight=0.5)))
    assert train.declared_inputs_digest("vlap", lam, dirs) != keys["vlap"]
    assert train.declared_inputs_digest("limber", lam, dirs) == keys["limber"]  # methods.vlap is not limber's param
    other_eval = replace(cfg, evaluate=replace(cfg.evaluate, common=replace(cfg.evaluate.common, test_images=3)))
    assert train.declared_inputs_digest("vlap", other_eval, dirs) == keys["vlap"]
    arith, tokens = node("evaluate_arithmetic"), replace(cfg.evaluate.caption, max_new_tokens=3)
    assert arith.declared_inputs_digest("vlap", replace(cfg, evaluate=replace(cfg.evaluate, caption=tokens)), dirs) != \
        arith.declared_inputs_digest("vlap", cfg, dirs)  # arithmetic decodes with the caption length


def test_key_hashes_data_deps_by_content(tmp_path):
    cfg, ev = Config(), node("evaluate_caption")
    a, b = Dirs.under(tmp_path / "a"), Dirs.under(tmp_path / "b")
    for dirs in (a, b):
        for path in (dirs.models / "vlap" / "model.safetensors", dirs.features / "index.json", dirs.prepared / "t.parquet"):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"v1")
    key = ev.declared_inputs_digest("vlap", cfg, a)
    assert ev.declared_inputs_digest("vlap", cfg, b) == key  # same bytes elsewhere: same key
    (b.models / "vlap" / "model.safetensors").write_bytes(b"retrained")
    assert ev.declared_inputs_digest("vlap", cfg, b) != key
    (b.models / "vlap" / "model.safetensors").write_bytes(b"v1")
    (b.metrics / "vqa").mkdir(parents=True)
    (b.metrics / "vqa" / "vlap.json").write_text("{}")  # not a dep of captioning
    assert ev.declared_inputs_digest("vlap", cfg, b) == key


def test_code_edit_changes_the_key(tmp_path, monkeypatch):
    summarize = node("summarize")
    for name in summarize.code:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, tmp_path / name)
    monkeypatch.setattr(graph, "ROOT", tmp_path)
    dirs = Dirs.under(tmp_path / "data")
    key = summarize.declared_inputs_digest(None, Config(), dirs)
    with open(tmp_path / "pipeline" / "tasks" / "summary.py", "a") as f:  # a module summarize imports
        f.write("\n# an edit\n")
    assert summarize.declared_inputs_digest(None, Config(), dirs) != key


def test_prepare_key_follows_every_file_a_prepare_key_names(tmp_path):
    """A changed questions file, any file of the test source, or an image changes sources.json (the sources
    stage, which runs every time), and with it prepare's key."""
    prepare, dirs = node("prepare"), Dirs.under(tmp_path / "data")
    files = {k: tmp_path / f"{k}.json" for k in ("annotations", "questions", "test_annotations", "test_questions")}
    for f in files.values():
        f.write_text("{}")
    (tmp_path / "images").mkdir()
    cfg = Config(prepare=PrepareConfig(source="vqav2", folder=str(tmp_path / "images"), test_source="vqav2",
                                       test_folder=str(tmp_path / "images"), **{k: str(f) for k, f in files.items()}))
    (tmp_path / "images" / "a.png").write_bytes(b"v1")
    sources.run(cfg, dirs)
    key = prepare.declared_inputs_digest(None, cfg, dirs)
    sources.run(cfg, dirs)
    assert prepare.declared_inputs_digest(None, cfg, dirs) == key  # the same data: the same key
    for name, f in files.items():
        f.write_text('{"changed": "%s"}' % name)
        sources.run(cfg, dirs)
        assert prepare.declared_inputs_digest(None, cfg, dirs) != key, name
        key = prepare.declared_inputs_digest(None, cfg, dirs)
    (tmp_path / "images" / "a.png").write_bytes(b"v2")
    sources.run(cfg, dirs)
    assert prepare.declared_inputs_digest(None, cfg, dirs) != key


@pytest.mark.slow
def test_prepare_task_runs_once_then_is_a_cache_hit(prefect_server, tmp_path):
    cfg = folder_dataset(tmp_path / "images")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"prepare": {"source": "folder", "folder": str(tmp_path / "images")}}))
    dirs, prepare = Dirs.under(tmp_path / "data"), node("prepare")

    def run_prepare():
        assert flow.stage_task(node("sources"), None, cfg, dirs)("sources", str(params), str(dirs.root), None,
                                                                 return_state=True).name == "Completed"  # always
        return flow.stage_task(prepare, None, cfg, dirs)("prepare", str(params), str(dirs.root), None,
                                                         return_state=True)

    first = run_prepare()
    assert first.name == "Completed"
    report = first.result()
    assert report == {"train": {"images": 3, "captions": 3}, "test": {"images": 1, "captions": 1}}
    record = dirs.root / ".prefect-results" / prepare.declared_inputs_digest(None, cfg, dirs)
    stored = json.loads(record.read_bytes())  # plain JSON, the result itself too: no pickle anywhere
    assert stored["metadata"]["serializer"]["type"] == "json" and json.loads(stored["result"]) == report
    written = (dirs.prepared / "train.parquet").stat().st_mtime_ns

    second = run_prepare()  # a new task run, same content: served from the persisted result
    assert second.name == "Cached" and second.result() == report
    assert (dirs.prepared / "train.parquet").stat().st_mtime_ns == written  # the stage did not run

    (dirs.prepared / "test.parquet").unlink()  # an output went missing: re-run despite the key hit
    assert run_prepare().name == "Completed" and (dirs.prepared / "test.parquet").is_file()
    (dirs.prepared / "report.json").write_text("{}")  # an output changed since (another run, a hand edit)
    assert run_prepare().name == "Completed" and json.loads((dirs.prepared / "report.json").read_text())

    # A result file from elsewhere under the same key, holding a pickle that would write a file if loaded:
    # moved aside unread, and the stage runs.
    marker = tmp_path / "unpickled"
    record.write_bytes(ResultRecord(result=WritesOnUnpickle(str(marker)), metadata=ResultRecordMetadata(
        serializer=PickleSerializer(), storage_key=str(record))).serialize())
    assert run_prepare().name == "Completed" and not marker.exists()
    assert record.with_name(record.name + ".refused").is_file() and json.loads(record.read_bytes())

    write_captions(tmp_path / "images", [("red.png", "", "a crimson square", "train")])  # new source content
    changed = run_prepare()
    assert changed.name == "Completed" and changed.result() == {"train": {"images": 1, "captions": 1}}


@pytest.mark.slow
def test_a_transient_failure_is_tried_again_and_bad_input_is_not(prefect_server, tmp_path, monkeypatch):
    """An output another run keeps locked past the wait (VLAP_LOCK_TIMEOUT) fails the try; the lock let go
    during the retry delay, the next try runs the stage. A params file naming a missing folder fails once."""
    import threading

    from pipeline.locks import locked

    cfg = folder_dataset(tmp_path / "images")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"prepare": {"source": "folder", "folder": str(tmp_path / "images")}}))
    dirs, prepare = Dirs.under(tmp_path / "data"), node("prepare")
    monkeypatch.setenv("VLAP_LOCK_TIMEOUT", "1")
    assert flow.stage_task(node("sources"), None, cfg, dirs)("sources", str(params), str(dirs.root), None,
                                                             return_state=True).name == "Completed"
    held, release = threading.Event(), threading.Event()

    def other_run() -> None:  # another run writing prepare's outputs
        with locked(dirs.root, prepare.spec.out_paths(dirs, None), holder="another run"):
            held.set()
            release.wait(60)

    holder = threading.Thread(target=other_run)
    holder.start()
    held.wait(30)
    threading.Timer(3.0, release.set).start()  # lets go during the first retry delay
    started = time.monotonic()
    state = flow.stage_task(prepare, None, cfg, dirs, retries=2, retry_delay_s=4)(
        "prepare", str(params), str(dirs.root), None, return_state=True)
    holder.join()
    assert state.name == "Completed" and (dirs.prepared / "train.parquet").is_file()
    assert time.monotonic() - started >= 5  # the 1 s wait that failed, then the 4 s retry delay

    nowhere = replace(cfg, prepare=replace(cfg.prepare, folder=str(tmp_path / "nowhere")))
    params.write_text(yaml.safe_dump({"prepare": {"source": "folder", "folder": str(tmp_path / "nowhere")}}))
    started = time.monotonic()
    bad = flow.stage_task(prepare, None, nowhere, Dirs.under(tmp_path / "other"), retries=2, retry_delay_s=30)(
        "prepare", str(params), str(tmp_path / "other"), None, return_state=True)
    assert bad.is_failed() and "nowhere" in str(bad.result(raise_on_failure=False))
    assert time.monotonic() - started < 30  # failed once: no retry delay was waited


class WritesOnUnpickle:
    """A pickle payload as an attacker would write it: unpickling it creates `path`."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


@prefect_flow
def summarize_flow(data: str) -> str:
    """The summarize task submitted as vlap_pipeline submits it; returns its final state's name."""
    future = flow.stage_task(node("summarize"), None, Config(), Dirs.under(Path(data))).submit(
        "summarize", str(REPO / "params.yaml"), data, None)
    future.wait()
    return future.state.name


@pytest.mark.slow
def test_submitted_task_is_reused_across_flow_runs(prefect_server, tmp_path):
    # Prefect's default cache policy includes the flow run id; the content key does not.
    assert summarize_flow(str(tmp_path)) == "Completed"
    assert summarize_flow(str(tmp_path)) == "Cached"
    (tmp_path / "metrics" / "caption").mkdir()
    (tmp_path / "metrics" / "caption" / "vlap.json").write_text('{"CIDEr": 0.5}')  # an input changed
    assert summarize_flow(str(tmp_path)) == "Completed"
    assert "0.5" in (tmp_path / "metrics" / "summary.md").read_text()


@pytest.mark.skipif(importlib.util.find_spec("prefect_dask") is not None, reason="would run the whole flow")
def test_dask_without_prefect_dask_is_one_line(tmp_path, capsys):
    assert flow.main(["--dask", "--params", str(REPO / "params.yaml"), "--data", str(tmp_path)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: --dask needs the prefect-dask package (pip install prefect-dask)"]


def test_a_server_that_does_not_start_in_time_is_one_line_with_the_fix(tmp_path):
    """With no PREFECT_API_URL the flow starts Prefect's temporary server; one that never answers within the
    allowed start-up (0 s here, a loaded machine in life) ends in one line saying how to run a real one."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "0", "PREFECT_HOME": str(tmp_path / "home")}
    run = subprocess.run([sys.executable, "-m", "vlap.flow", "--params", str(REPO / "params.yaml"),
                          "--data", str(tmp_path / "data")], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert run.returncode == 2 and len(errors) == 1 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert "did not answer within 0 s" in errors[0] and "prefect server start" in errors[0]
    assert "PREFECT_API_URL" in errors[0] and "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in errors[0]
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").rglob("*.parquet"))  # nothing ran
