"""`vlap study`: seeds × methods on the same cached inputs, scored per item, with intervals."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from graph_runner import cut_easyvqa
from pipeline.bridge import load_bridge
from pipeline.config import parse_config
from pipeline.paths import Dirs
from dvc_repo import REPO
from stages import extract, prepare, prototypes
from stages.common import run_stage
from tiny_models import save_tiny_clip_vision, save_tiny_opt
from pipeline.digests import tree_digest
from pipeline.tasks.registry import PRIMARY
from vlap.study import per_item_scores, run_study

pytestmark = pytest.mark.slow  # 2 seeds x 2 methods trained and evaluated


@pytest.fixture(scope="module")
def study(tmp_path_factory, smollm2):
    root = tmp_path_factory.mktemp("study")
    clip, opt = save_tiny_clip_vision(root / "clip"), save_tiny_opt(root / "opt", smollm2.tokenizer)
    cfg = parse_config({
        "extract": {"encoder": f"hf:{clip}", "batch_size": 16},
        "prototypes": {"llm": f"hf:{opt}"},
        "train": {"batch_size": 4, "warmup_steps": 1, "checkpoint_every": 10, "loader_workers": 0},
        "evaluate": {"common": {"batch_size": 4}, "caption": {"max_new_tokens": 3, "examples": 1},
                     "vqa": {"shots": 1, "max_new_tokens": 2}, "arithmetic": {"queries": 4, "examples": 1},
                     "taxonomy": {"min_images": 1, "bootstrap": 50, "permutations": 50}},
    })
    base = Dirs.under(root / "data")
    run_stage(prepare, cfg, base)
    cut_easyvqa(base, (24, 10))
    run_stage(extract, cfg, base)
    run_stage(prototypes, cfg, base)
    before = {name: tree_digest(getattr(base, name)) for name in ("features", "prototypes", "prepared")}
    out = root / "data" / "study"
    released = dataclasses.replace(cfg, methods=dataclasses.replace(cfg.methods, vlap=dataclasses.replace(
        cfg.methods.vlap, target="released")), prototypes=dataclasses.replace(cfg.prototypes, prior="released"))
    report = run_study(cfg, base, out, seeds=[0, 1], methods=["vlap", "limber"], steps=3,
                       test_images=10, vqa_questions=6, n_boot=200, variants={"released": released})
    return cfg, base, out, report, before


def test_nothing_is_encoded_again_and_seeds_train_different_bridges(study):
    cfg, base, out, _, before = study
    assert {name: tree_digest(getattr(base, name)) for name in before} == before
    for seed in (0, 1):
        for name in ("features", "prototypes", "prepared"):
            link = out / "runs" / f"seed-{seed}" / name
            assert link.is_symlink() and link.resolve() == getattr(base, name).resolve()
    w0, w1 = (load_bridge(out / "runs" / f"seed-{s}" / "models" / "vlap")[0].proj.weight for s in (0, 1))
    assert not torch.equal(w0, w1)


def test_per_item_scores_average_to_the_stage_metrics(study):
    _, _, out, _, _ = study
    dirs = Dirs.under(out / "runs" / "seed-1")
    for method in ("vlap", "limber"):
        items = per_item_scores(dirs, method)
        for task, key in (("caption", "CIDEr"), ("vqa", "0shot_open_accuracy"), ("vqa", "1shot_closed_accuracy"),
                          ("retrieval", "assignment_i2t_R@1"), ("retrieval", "cosine_t2i_R@1"),
                          ("arithmetic", "color_swap_top1")):
            saved = json.loads((dirs.metrics / task / f"{method}.json").read_text())
            assert np.mean(list(items[f"{task}/{key}"].values())) == pytest.approx(saved[key], abs=1e-3), (method, key)


def test_report_has_intervals_and_paired_differences(study):
    _, _, out, report, _ = study
    assert {"caption/CIDEr", "vqa/0shot_open_accuracy", "retrieval/assignment_i2t_R@1", "retrieval/cosine_t2i_R@1",
            "arithmetic/color_swap_top1"} <= report.keys()
    for metric, entry in report.items():
        for m, i in entry["methods"].items():
            assert i["low"] <= i["mean"] <= i["high"] and len(i["per_seed"]) == 2, (metric, m)
            assert i["mean"] == pytest.approx(np.mean(i["per_seed"]))
        for base, d in entry["vlap_minus"].items():
            assert d["mean"] == pytest.approx(entry["methods"]["vlap"]["mean"] - entry["methods"][base]["mean"])
            assert d["excludes_zero"] == (d["low"] > 0 or d["high"] < 0)
            assert 0 <= d["p"] <= d["p_adjusted"] <= 1 and d["real"] == (d["p_adjusted"] < 0.05)
            assert 0 <= d["seeds_agreeing"] <= d["seeds"] == 2
        assert entry["primary"] == (metric in PRIMARY)
    text = (out / "report.md").read_text()
    assert "vlap − limber" in text and "vlap − contrastive" not in text
    assert "| chance |" in text and "| **caption/CIDEr** | 10 |" in text and "Holm" in text
    assert {"taxonomy/rsa", "taxonomy/modality_gap", "taxonomy/paired_minus_unpaired_cosine"} <= report.keys()
    assert report["taxonomy/rsa"]["items"] == 1 and report["taxonomy/paired_minus_unpaired_cosine"]["items"] == 10
    assert (out / "intervals.png").stat().st_size > 1000
    saved = json.loads((out / "study.json").read_text())
    assert saved["seeds"] == [0, 1]
    assert saved["variants"] == {"released": {"methods.vlap.target": "released", "prototypes.prior": "released"}}
    assert "vlap − released" in text and "variant released: vlap with prototypes.prior=released, methods.vlap.target=released" in text


def test_a_variant_trains_vlap_with_its_params_on_its_own_prototypes(study):
    """The released variant: its own prototypes (the authors' prior), the shared features, and a bridge
    that differs from VLAP's of the same seed."""
    _, base, out, report, _ = study
    root = out / "runs" / "seed-0" / "variant-released"
    assert (root / "features").is_symlink() and not (root / "prototypes").is_symlink()
    bridge, meta = load_bridge(root / "models" / "vlap")
    assert meta["method_config"]["target"] == "released"
    assert not torch.equal(bridge.proj.weight, load_bridge(out / "runs" / "seed-0" / "models" / "vlap")[0].proj.weight)
    for entry in report.values():
        assert set(entry["methods"]) == {"vlap", "limber", "released"} and set(entry["vlap_minus"]) == {"limber",
                                                                                                      "released"}


def test_a_rerun_runs_only_the_stages_whose_inputs_changed(study):
    cfg, base, out, report, _ = study
    seed0 = Dirs.under(out / "runs" / "seed-0")
    files = {"bridge": seed0.models / "limber" / "model.safetensors", "caption": seed0.metrics / "caption" / "limber.json",
             "vqa": seed0.metrics / "vqa" / "limber.json"}
    mtimes = {k: f.stat().st_mtime_ns for k, f in files.items()}
    again = run_study(cfg, base, out, seeds=[0], methods=["limber"], steps=3, test_images=10, vqa_questions=6,
                      n_boot=200)
    assert {k: f.stat().st_mtime_ns for k, f in files.items()} == mtimes
    assert again["caption/CIDEr"]["methods"]["limber"]["per_seed"] == \
        report["caption/CIDEr"]["methods"]["limber"]["per_seed"][:1]
    # Fewer VQA questions: evaluate_vqa's declared params changed, nothing else's.
    run_study(cfg, base, out, seeds=[0], methods=["limber"], steps=3, test_images=10, vqa_questions=4, n_boot=200)
    now = {k: f.stat().st_mtime_ns for k, f in files.items()}
    assert now["bridge"] == mtimes["bridge"] and now["caption"] == mtimes["caption"] and now["vqa"] != mtimes["vqa"]
    assert json.loads(files["vqa"].read_text())["questions"] == 4
    # An output changed by hand is stale, as DVC's outs check would say.
    files["caption"].write_text("{}")
    run_study(cfg, base, out, seeds=[0], methods=["limber"], steps=3, test_images=10, vqa_questions=4, n_boot=200)
    assert json.loads(files["caption"].read_text())["CIDEr"] >= 0



def test_finished_cells_carried_to_another_study_folder_are_kept_unless_changed(study, tmp_path, caplog):
    """`--carry`: a cell copied out of one study folder is restored into an empty one and nothing runs again;
    a carried output that no longer matches its record runs that stage again (the record keys on content)."""
    import logging
    import shutil

    from vlap.study import study_nodes

    cfg, base, out, _, _ = study
    carry = tmp_path / "cells"
    args = dict(seeds=[0], methods=["limber"], steps=3, test_images=10, vqa_questions=4, n_boot=200, carry=carry)
    first = run_study(cfg, base, out, **args)  # the cell is up to date there: it is only copied into `carry`
    assert (carry / "seed-0" / "models" / "limber" / "model.safetensors").read_bytes() == \
        (out / "runs" / "seed-0" / "models" / "limber" / "model.safetensors").read_bytes()
    assert not (carry / "seed-0" / "models" / "vlap").exists()  # only the cells this study ran
    elsewhere = tmp_path / "elsewhere"
    with caplog.at_level(logging.INFO, logger="vlap.study"):
        again = run_study(cfg, base, elsewhere, **args)
    kept = [r.getMessage() for r in caplog.records if r.getMessage().endswith("up to date, kept")]
    assert len(kept) == len(study_nodes()), kept
    assert again["caption/CIDEr"]["methods"]["limber"] == first["caption/CIDEr"]["methods"]["limber"]
    # A carried file edited after it was recorded: that stage runs again, the others are kept.
    shutil.rmtree(elsewhere)
    (carry / "seed-0" / "metrics" / "caption" / "limber.json").write_text("{}")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vlap.study"):
        run_study(cfg, base, elsewhere, **args)
    kept = {r.getMessage() for r in caplog.records if r.getMessage().endswith("up to date, kept")}
    assert len(kept) == len(study_nodes()) - 1 and not any("caption" in k for k in kept)
    assert json.loads((elsewhere / "runs" / "seed-0" / "metrics" / "caption" / "limber.json").read_text())["CIDEr"] >= 0

def test_a_study_without_cached_inputs_fails_in_one_line(tmp_path):
    from pipeline.errors import MissingInputError

    with pytest.raises(MissingInputError, match="run `dvc repro extract prototypes` first"):
        run_study(parse_config({}), Dirs.under(tmp_path / "data"), tmp_path / "study", [0], ["vlap"])


def test_a_study_is_shown_only_beside_a_run_of_its_setting(tmp_path):
    """The summary's verdict column comes from a study made with this run's data, models and budget, whose
    verdicts are corrected for multiplicity."""
    import dataclasses
    import json

    from pipeline.config import load_config
    from pipeline.tasks.summary import study_mismatch, study_setting
    from stages.summarize import STUDY

    cfg = load_config(REPO / "params.yaml")
    study = tmp_path / "study.json"
    study.write_text(json.dumps({"setting": study_setting(cfg), "correction": "Holm", "metrics": {}}))
    assert study_mismatch(study, study_setting(cfg)) is None
    coco = dataclasses.replace(cfg, prepare=dataclasses.replace(cfg.prepare, source="karpathy", heldout=()))
    why = study_mismatch(study, study_setting(coco))
    assert "source 'easyvqa' (this run: 'karpathy')" in why and "heldout" in why
    longer = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=3000))
    assert "steps 40 (this run: 3000)" in study_mismatch(study, study_setting(longer))
    uncorrected = tmp_path / "uncorrected.json"
    uncorrected.write_text(json.dumps({"setting": study_setting(cfg), "metrics": {}}))
    assert "not corrected for multiplicity" in study_mismatch(uncorrected, study_setting(cfg))
    assert study_mismatch(REPO / STUDY, study_setting(cfg)) is not None  # the committed study is either
    old = tmp_path / "study.json"
    old.write_text(json.dumps({"metrics": {}}))
    assert study_mismatch(old, study_setting(cfg)) == "it records no setting (data, models, budget)"
    assert study_mismatch(tmp_path / "none.json", study_setting(cfg)) is None
