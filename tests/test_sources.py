"""The source data is a DVC dependency: editing a VQAv2 questions file, the test source's annotations or
an image re-runs prepare under a real `dvc repro` and under the Prefect flow, and nothing else does."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from dvc_repo import REPO, make_project, sh
from pipeline.config import load_config
from pipeline.paths import Dirs
from stages import graph
from test_formats import draw, write_nocaps, write_vqav2
from vlap import flow

pytestmark = pytest.mark.slow  # real dvc repro and Prefect flows


def edits(root: Path) -> list[tuple[str, callable]]:
    """(what, how): the three kinds of source edit the test makes, each a real change of content."""
    q_path, a_path = root / "v2_OpenEnded_mscoco_train2014_questions.json", root / "nocaps_val_4500_captions.json"

    def rephrase_question():
        doc = json.loads(q_path.read_text())
        doc["questions"][0]["question"] = "Which colour is the square?"
        q_path.write_text(json.dumps(doc))

    def recaption_test_image():
        doc = json.loads(a_path.read_text())
        doc["annotations"][0]["caption"] = "a completely different caption"
        a_path.write_text(json.dumps(doc))

    def redraw_image():
        image = next((root / "coco").rglob("*.jpg"))
        draw(image, 5)

    return [("VQAv2 questions", rephrase_question), ("test-source annotations", recaption_test_image),
            ("an image", redraw_image)]


def make_dataset(root: Path) -> dict:
    """VQAv2 (train2014) for training, NoCaps as the test source; the prepare params naming them."""
    folder, q_path, a_path = write_vqav2(root, subtype="train2014")
    nocaps_folder, nocaps_json = write_nocaps(root)
    return {"source": "vqav2", "folder": str(folder), "questions": str(q_path), "annotations": str(a_path),
            "test_source": "nocaps", "test_folder": str(nocaps_folder), "test_annotations": str(nocaps_json),
            "heldout": [], "validation_fraction": 0.0}


def test_editing_source_files_reruns_prepare_under_dvc_repro(tmp_path):
    prepare = make_dataset(tmp_path)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["prepare"] |= prepare
    work = tmp_path / "repo"
    env = make_project(work, params)
    repro = [sys.executable, "-m", "dvc", "repro", "prepare"]
    assert "Running stage 'prepare'" in sh(repro, work, env)
    assert "Running stage 'prepare'" not in sh(repro, work, env)  # the same data: sources runs, prepare is kept
    for what, edit in edits(tmp_path):
        edit()
        assert "Running stage 'prepare'" in sh(repro, work, env), what
    questions = json.loads((work / "data" / "prepared" / "report.json").read_text())
    assert questions["train"]["questions"] == 3
    lock = yaml.safe_load((work / "dvc.lock").read_text())
    assert lock["stages"]["prepare"]["deps"][0]["path"] == "data/sources.json"


def test_editing_source_files_reruns_prepare_in_the_flow(prefect_server, tmp_path):
    prepare = make_dataset(tmp_path)
    params = tmp_path / "params.yaml"
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["prepare"] |= prepare
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    cfg, dirs = load_config(params), Dirs.under(tmp_path / "data")
    nodes = {n.spec.name: n for n in graph.graph()}

    def run(name: str) -> str:
        task = flow.stage_task(nodes[name], None, cfg, dirs)
        return task(name, str(params), str(dirs.root), None, return_state=True).name

    assert (run("sources"), run("prepare")) == ("Completed", "Completed")
    assert (run("sources"), run("prepare")) == ("Completed", "Cached")  # sources always runs; same data
    for what, edit in edits(tmp_path):
        edit()
        assert (run("sources"), run("prepare")) == ("Completed", "Completed"), what
        assert (run("sources"), run("prepare")) == ("Completed", "Cached"), what
