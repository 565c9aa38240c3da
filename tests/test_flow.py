"""The Prefect flow: content cache keys, and a real cache hit through a temporary Prefect server."""
from __future__ import annotations

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # offline machine: no telemetry attempts
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")  # tasks below run outside a flow

import importlib.util
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from PIL import Image
from prefect import flow as prefect_flow
from prefect.testing.utilities import prefect_test_harness

from pipeline import flow
from pipeline.config import METHODS, Config, PrepareConfig
from pipeline.paths import Dirs

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def prefect_server():
    """A temporary local Prefect server and SQLite database for the session (offline)."""
    with prefect_test_harness(server_startup_timeout=180):  # slow to start on a loaded machine
        yield


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


def dvc_code_deps() -> dict[str, list[str]]:
    """Stage name -> the code files dvc.yaml lists in its deps (foreach / matrix stages expanded)."""
    out = {}
    for name, stage in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].items():
        if "matrix" in stage:
            for task in stage["matrix"]["task"]:
                out[f"{name}_{task}"] = [d.replace("${item.task}", task) for d in stage["deps"]]
        else:
            out[name] = stage["do"]["deps"] if "foreach" in stage else stage["deps"]
    return {k: sorted(d for d in deps if d.startswith(("stages/", "pipeline/"))) for k, deps in out.items()}


def test_flow_stages_and_code_deps_match_dvc_yaml():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert tuple(stages["evaluate"]["matrix"]["task"]) == flow.EVAL_TASKS
    assert tuple(stages["evaluate"]["matrix"]["method"]) == tuple(stages["train"]["foreach"]) == METHODS
    assert dvc_code_deps() == {name: sorted(files) for name, files in flow.CODE.items()}
    assert set(flow.TASKS) == set(flow.CODE)


def test_prepare_key_follows_its_params_section_and_the_source_content(tmp_path):
    cfg = folder_dataset(tmp_path / "images")
    key = flow.prepare_key(None, {"cfg": cfg})
    assert flow.prepare_key(None, {"cfg": cfg}) == key  # deterministic
    assert flow.prepare_key(None, {"cfg": replace(cfg, train=replace(cfg.train, lr=0.5))}) == key  # another section
    assert flow.prepare_key(None, {"cfg": replace(cfg, prepare=replace(cfg.prepare, test_fraction=0.5))}) != key
    Image.new("RGB", (8, 8), "black").save(tmp_path / "images" / "red.png")  # same name, new pixels
    assert flow.prepare_key(None, {"cfg": cfg}) != key


def test_keys_hash_file_contents_not_paths(tmp_path):
    cfg = Config()
    a, b = tmp_path / "a", tmp_path / "b"
    for folder in (a, b):
        folder.mkdir()
        (folder / "train.parquet").write_bytes(b"manifest")
        (folder / "train_questions.parquet").write_bytes(b"questions")
    key = flow.extract_key(None, {"cfg": cfg, "prepared_dir": a})
    assert flow.extract_key(None, {"cfg": cfg, "prepared_dir": b}) == key  # same bytes elsewhere: same key
    (b / "train_questions.parquet").write_bytes(b"other questions")  # extract does not read questions
    assert flow.extract_key(None, {"cfg": cfg, "prepared_dir": b}) == key
    (b / "train.parquet").write_bytes(b"another manifest")
    assert flow.extract_key(None, {"cfg": cfg, "prepared_dir": b}) != key
    batch = replace(cfg, extract=replace(cfg.extract, batch_size=7))  # not a content setting, as in dvc.yaml
    assert flow.extract_key(None, {"cfg": batch, "prepared_dir": a}) == key
    fp32 = replace(cfg, extract=replace(cfg.extract, dtype="float32"))
    assert flow.extract_key(None, {"cfg": fp32, "prepared_dir": a}) != key


def test_train_key_per_method_and_inputs(tmp_path):
    cfg, dirs = Config(), Dirs.under(tmp_path)
    for path in (dirs.prepared / "train.parquet", dirs.features / "index.json", dirs.prototypes / "index.json"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("v1")

    def key(c: Config, method: str) -> str:
        return flow.train_key(None, {"cfg": c, "method": method, "prepared_dir": dirs.prepared,
                                     "features_dir": dirs.features, "prototypes_dir": dirs.prototypes})

    keys = {m: key(cfg, m) for m in METHODS}
    assert len(set(keys.values())) == len(METHODS)
    lam = replace(cfg, methods=replace(cfg.methods, vlap=replace(cfg.methods.vlap, ap_weight=0.5)))
    assert key(lam, "vlap") != keys["vlap"] and key(lam, "limber") == keys["limber"]
    other_eval = replace(cfg, evaluate=replace(cfg.evaluate, common=replace(cfg.evaluate.common, test_images=3)))
    assert key(other_eval, "vlap") == keys["vlap"]
    (dirs.features / "index.json").write_text("v2")  # another encoder's features
    assert key(cfg, "vlap") != keys["vlap"]


def test_evaluate_and_summarize_keys_follow_bridge_and_metrics_bytes(tmp_path):
    cfg, dirs = Config(), Dirs.under(tmp_path)
    bridge = dirs.models / "vlap" / "bridge.pt"
    bridge.parent.mkdir(parents=True)
    bridge.write_bytes(b"weights 1")

    def key(c: Config, task: str, method: str = "vlap") -> str:
        return flow.TASKS[f"evaluate_{task}"].cache_key_fn(None, {"cfg": c, "method": method, "dirs": dirs})

    caption, retrieval = key(cfg, "caption"), key(cfg, "retrieval")
    assert key(cfg, "caption", "limber") != caption
    eps = replace(cfg, evaluate=replace(cfg.evaluate, retrieval=replace(cfg.evaluate.retrieval, epsilon=0.1)))
    assert key(eps, "retrieval") != retrieval and key(eps, "caption") == caption  # only retrieval runs Sinkhorn
    lam = replace(cfg, methods=replace(cfg.methods, vlap=replace(cfg.methods.vlap, ap_weight=0.5, epsilon=0.1)))
    assert key(lam, "retrieval") == retrieval  # training settings reach evaluation only through bridge.pt
    bridge.write_bytes(b"weights 2")  # retrained bridge, same path
    assert key(cfg, "caption") != caption

    summary = flow.summarize_key(None, {"cfg": cfg, "dirs": dirs})
    (dirs.metrics / "vqa").mkdir(parents=True)
    (dirs.metrics / "vqa" / "limber.json").write_text('{"0shot_open_accuracy": 10.0}')
    assert flow.summarize_key(None, {"cfg": cfg, "dirs": dirs}) != summary


def test_code_version_changes_the_key(tmp_path, monkeypatch):
    for name in flow.CODE["summarize"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, tmp_path / name)
    monkeypatch.setattr(flow, "ROOT", tmp_path)
    params = {"cfg": Config(), "dirs": Dirs.under(tmp_path / "data")}
    key = flow.summarize_key(None, params)
    with open(tmp_path / "stages" / "summarize.py", "a") as f:
        f.write("\n# an edit\n")
    assert flow.summarize_key(None, params) != key


def test_prepare_task_runs_once_then_is_a_cache_hit(prefect_server, tmp_path):
    cfg = folder_dataset(tmp_path / "images")
    dirs, results = Dirs.under(tmp_path / "data"), tmp_path / "data" / ".prefect-results"

    def run_prepare():
        return flow.configured("prepare", dirs, results)(cfg, dirs.prepared, return_state=True)

    first = run_prepare()
    assert first.name == "Completed"
    report = first.result()
    assert report == {"train": {"images": 3, "captions": 3}, "test": {"images": 1, "captions": 1}}
    assert (results / flow.prepare_key(None, {"cfg": cfg})).is_file()  # persisted under the content key
    written = (dirs.prepared / "train.parquet").stat().st_mtime_ns

    second = run_prepare()  # a new task run, same content: served from the persisted result
    assert second.name == "Cached" and second.result() == report
    assert (dirs.prepared / "train.parquet").stat().st_mtime_ns == written  # the stage did not run

    (dirs.prepared / "test.parquet").unlink()  # an output went missing: re-run despite the key hit
    assert run_prepare().name == "Completed" and (dirs.prepared / "test.parquet").is_file()

    write_captions(tmp_path / "images", [("red.png", "", "a crimson square", "train")])  # new source content
    changed = run_prepare()
    assert changed.name == "Completed" and changed.result() == {"train": {"images": 1, "captions": 1}}


@prefect_flow
def summarize_flow(data: str) -> str:
    """The summarize task submitted as vlap_pipeline submits it; returns its final state's name."""
    dirs = Dirs.under(Path(data))
    future = flow.configured("summarize", dirs, Path(data) / ".prefect-results").submit(Config(), dirs)
    future.wait()
    return future.state.name


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
