"""The README's published-format recipes, followed literally through the real `dvc repro`: each repo starts
from the committed params.yaml and changes only the prepare keys the README names (the paper's recipe is
read out of the README's own yaml block), plus the cost keys every repro test shrinks (tiny local models).

COCO in Karpathy's split file, and CC3M (TSV + img2dataset files) training with NoCaps testing (CIDEr per
NoCaps domain), each run through VLAP's evaluations to the summary; then, as the README says, switching the test
source with `dvc exp run -S` to VQAv2 encodes only the new test images and trains the same bridges again,
and to COCO's Karpathy file (as the README's yaml names it) prepares that file's test split."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import yaml

from dvc_repo import REPO, make_project, sh
from pipeline.manifest import read_manifest
from own_data import NOCAPS_DOMAINS, shrink_cost, write_cc3m, write_karpathy, write_nocaps, write_vqav2
from tiny_models import save_tiny_clip_vision, save_tiny_opt

pytestmark = pytest.mark.slow  # real dvc repro and dvc exp run in subprocesses

# What is source-specific (reading the files, the splits, NoCaps' domains, the test captions) reaches the
# features and the test split, and VLAP's evaluations read all of it. The other methods' stages read the same
# inputs; the whole graph on own data runs in tests/test_dvc_repro.py (a folder).
VLAP_EVALUATIONS = tuple(f"evaluate_{task}@vlap" for task in ("caption", "vqa", "retrieval", "arithmetic"))


def readme_paper_params() -> dict:
    """The yaml block of the README's "Reproducing the paper" step 3 (train on CC3M, one test source)."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Reproducing the paper"):]
    block = re.search(r"```yaml\n(.*?)```", section, re.S)
    assert block, "README: no yaml block under 'Reproducing the paper'"
    return yaml.safe_load(block.group(1))


def merge(params: dict, changes: dict) -> dict:
    for key, value in changes.items():
        params[key] = merge(params.get(key, {}), value) if isinstance(value, dict) else value
    return params


def repro(root: Path, tokenizer, prepare: dict, evaluate: dict | None = None, targets: tuple[str, ...] = ()
          ) -> tuple[Path, dict, str]:
    clip, opt = save_tiny_clip_vision(root / "models" / "clip"), save_tiny_opt(root / "models" / "opt", tokenizer)
    params = shrink_cost(yaml.safe_load((REPO / "params.yaml").read_text()), clip, opt)
    merge(params, {"prepare": prepare, "evaluate": evaluate or {}})
    work = root / "repo"
    env = make_project(work, params)
    return work, env, sh([sys.executable, "-m", "dvc", "repro", *targets], work, env, timeout=900)


def metrics_of(work: Path, task: str, method: str = "vlap") -> dict:
    return json.loads((work / "data" / "metrics" / task / f"{method}.json").read_text())


def ran_vlap_evaluations(work: Path, out: str, env: dict) -> dict:
    """VLAP's evaluations and what they need are in dvc.lock, and the summary is made over their metrics;
    returns the prepare report."""
    assert set(VLAP_EVALUATIONS) <= set(yaml.safe_load((work / "dvc.lock").read_text())["stages"]), out[-3000:]
    sh([sys.executable, "-m", "stages.summarize"], work, env)  # over the metrics there are: VLAP's
    report = json.loads((work / "data" / "prepared" / "report.json").read_text())
    assert report["zero_shot"]["applicable"] is False  # the committed zero-shot split is easy-VQA's: skipped
    return report


def test_karpathy_coco_as_the_readme_says(tmp_path, smollm2):
    """`prepare.source: karpathy`, `folder`, `annotations`: VLAP's evaluations and the summary; restval trains,
    test is the file's own; two references an image; word arithmetic on the captions, VQA n/a (no questions)."""
    images, split_file, n_images = write_karpathy(tmp_path)
    work, env, out = repro(tmp_path, smollm2.tokenizer,
                           {"source": "karpathy", "folder": str(images), "annotations": str(split_file)},
                           targets=VLAP_EVALUATIONS)
    report = ran_vlap_evaluations(work, out, env)
    assert sum(report["splits"][s]["images"] for s in ("train", "val", "test")) == n_images - 9  # the file's val
    assert report["splits"]["test"]["images"] == 9
    caption = metrics_of(work, "caption")
    assert caption["applicable"] and caption["images"] == 9 and 0.0 <= caption["BLEU-1"] <= 1.0
    assert metrics_of(work, "vqa")["applicable"] is False
    assert metrics_of(work, "arithmetic")["word_swap_queries"] > 0
    assert metrics_of(work, "retrieval")["distinct_texts"] == 18  # two references for each of 9 images
    summary = (work / "data" / "metrics" / "summary.md").read_text()  # easy-VQA's study is not this data's
    assert "study.json is not shown: it was made with source 'easyvqa' (this run: 'karpathy')" in summary
    assert "real differences" not in summary


@pytest.fixture(scope="module")
def paper_repo(tmp_path_factory, smollm2):
    """The README's paper recipe on CC3M + NoCaps files the test wrote: its yaml block with the paths
    swapped for the test's and `test_source: nocaps`, as its comment offers."""
    root = tmp_path_factory.mktemp("paper-recipe")
    cc3m_images, tsv, n_train = write_cc3m(root)
    nocaps_images, nocaps_json, n_test = write_nocaps(root)
    recipe = readme_paper_params()
    assert recipe["prepare"]["source"] == "cc3m" and "nocaps" in (REPO / "README.md").read_text()
    recipe["prepare"] |= {"folder": str(cc3m_images), "annotations": str(tsv), "test_source": "nocaps",
                          "test_folder": str(nocaps_images), "test_annotations": str(nocaps_json)}
    work, env, out = repro(root, smollm2.tokenizer, recipe["prepare"], recipe["evaluate"], targets=VLAP_EVALUATIONS)
    return work, env, out, root, n_train, n_test


def test_cc3m_with_nocaps_as_the_test_source(paper_repo):
    work, env, out, _, n_train, n_test = paper_repo
    report = ran_vlap_evaluations(work, out, env)
    assert report["splits"]["train"]["images"] + report["splits"]["val"]["images"] == n_train
    assert report["test"]["domains"] == {d: n_test // 3 for d in NOCAPS_DOMAINS}
    caption = metrics_of(work, "caption")
    assert caption["images"] == n_test
    assert {"CIDEr_in", "CIDEr_near", "CIDEr_out", "CIDEr_overall"} <= caption.keys()
    assert abs(caption["CIDEr_overall"] - caption["CIDEr"]) < 1e-9
    # NoCaps' domain is the source's own, not the zero-shot split's: no seen/unseen anywhere
    arithmetic = metrics_of(work, "arithmetic")
    assert arithmetic["applicable"] and "color_swap_queries" not in arithmetic
    assert not any(k.endswith(("_seen", "_unseen")) for task in ("caption", "retrieval", "arithmetic")
                   for k in metrics_of(work, task))
    summary = (work / "data" / "metrics" / "summary.md").read_text()
    for domain in ("in", "near", "out"):
        assert f"| caption/CIDEr_{domain} |" in summary
    assert "NoCaps: in-, near- and out-of-domain" in summary and "_unseen" not in summary
    assert "* vqa: n/a" in summary and "* zero-shot split: n/a" in summary


def trained(lock_entry: dict) -> list:
    """A train stage's weights and curves in dvc.lock (config.json also names the prototypes file's key)."""
    return sorted((o["path"], o.get("md5")) for o in lock_entry["outs"] if not o["path"].endswith("config.json"))


def test_switching_the_test_source_to_vqav2_gives_the_same_bridges(paper_repo):
    """README: "For each test set, switch prepare.test_* (a dvc exp run -S ...)": only the new test images
    are encoded (the CC3M features are found by content key); the bridges come out byte-identical. VQAv2
    brings questions: VQA is scored, with the README's closed vocabulary (3,129 answers: every answer here)."""
    work, env, _, root, _, _ = paper_repo
    folder, questions, annotations, n_images = write_vqav2(root)
    sh(["git", "add", "-A"], work, env)
    sh(["git", "commit", "-qm", "cc3m + nocaps"], work, env)
    before = yaml.safe_load((work / "dvc.lock").read_text())["stages"]
    # one method's VQA and what it needs (a user after one table; the other methods' stages would be alike)
    out = sh([sys.executable, "-m", "dvc", "exp", "run", "-S", "prepare.test_source=vqav2",
              "-S", f"prepare.test_folder={folder}", "-S", f"prepare.test_annotations={annotations}",
              "-S", f"prepare.test_questions={questions}", "evaluate_vqa@vlap"], work, env, timeout=900)
    after = yaml.safe_load((work / "dvc.lock").read_text())["stages"]
    # Training runs again (its deps are the whole prepared/, features/ and prototypes/ folders, which the new
    # test split changes) and gives the same weights and curves, byte for byte
    assert "Running stage 'train@vlap'" in out and trained(after["train@vlap"]) == trained(before["train@vlap"])
    assert after["train@vlap"] != before["train@vlap"]
    vqa = metrics_of(work, "vqa")
    assert vqa["applicable"] is True and vqa["questions"] == 2 * n_images
    assert 0.0 <= vqa["0shot_closed_accuracy"] <= 100.0 and "0shot_closed_yes_no_accuracy" in vqa


def test_switching_the_test_source_to_karpathy_coco_as_the_readme_yaml_says(paper_repo):
    """The README's yaml block itself: `test_source: karpathy` with COCO's `dataset_coco.json`; the test split is
    the file's own test entries, with every reference of an image, and the training splits stay as they were
    (what training reads; that the bridge then comes out the same is the VQAv2 switch's test)."""
    work, env, _, root, _, _ = paper_repo
    images, split_file, _ = write_karpathy(root / "coco-test")
    recipe = readme_paper_params()["prepare"]
    assert recipe["test_source"] == "karpathy" and recipe["test_annotations"].endswith("dataset_coco.json")
    sh(["git", "add", "-A"], work, env)
    sh(["git", "commit", "-qm", "before the karpathy test source", "--allow-empty"], work, env)
    prepared = work / "data" / "prepared"
    before = {split: read_manifest(prepared, split) for split in ("train", "val")}
    out = sh([sys.executable, "-m", "dvc", "exp", "run", "-S", "prepare.test_source=karpathy",
              "-S", f"prepare.test_folder={images}", "-S", f"prepare.test_annotations={split_file}",
              "-S", "prepare.test_questions=", "prepare"], work, env, timeout=900)
    assert "Running stage 'prepare'" in out, out[-3000:]
    assert {split: read_manifest(prepared, split) for split in before} == before
    test = read_manifest(prepared, "test")
    assert len(test.images) == 9  # the split file's test entries
    assert {len(r.captions) for r in test.images} == {2}
    report = json.loads((prepared / "report.json").read_text())
    assert report["splits"]["test"]["images"] == 9
