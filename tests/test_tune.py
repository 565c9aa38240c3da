"""`vlap tune`: the same grid for every method, scored on the validation split, chosen settings applied."""
from __future__ import annotations

import dataclasses
import json

import pytest

from graph_runner import cut_easyvqa
from pipeline.manifest import Split, read_manifest, write_split
from pipeline.config import load_config, parse_config
from pipeline.errors import ConfigError
from pipeline.paths import Dirs
from stages import extract, prepare, prototypes
from stages.common import run_stage
from dvc_repo import REPO
from tiny_models import save_tiny_clip_vision, save_tiny_opt
from vlap.tune import apply_to_params, beyond_edge, grid, run_tune, tuned_settings
from vlap import study

pytestmark = pytest.mark.slow  # every method trained over a grid


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, smollm2):
    root = tmp_path_factory.mktemp("tune")
    clip, opt = save_tiny_clip_vision(root / "clip"), save_tiny_opt(root / "opt", smollm2.tokenizer)
    cfg = parse_config({
        "prepare": {"validation_fraction": 0.1},
        "extract": {"encoder": f"hf:{clip}", "batch_size": 16},
        "prototypes": {"llm": f"hf:{opt}"},
        "train": {"steps": 3, "batch_size": 4, "warmup_steps": 1, "loader_workers": 0},
        "evaluate": {"common": {"batch_size": 4}, "caption": {"max_new_tokens": 3}},
    })
    base = Dirs.under(root / "data")
    run_stage(prepare, cfg, base)
    cut_easyvqa(base, (24, 4))
    val = read_manifest(base.prepared, "val")
    write_split(base.prepared, Split("val", val.image_root, val.images[:6]))
    run_stage(extract, cfg, base)
    run_stage(prototypes, cfg, base)
    report = run_tune(cfg, base, root / "tune", ["vlap", "limber", "contrastive"], [1e-3, 1e-2], [0.5], val_images=6)
    return cfg, root, report


def test_every_method_gets_the_same_grid_and_the_best_validation_score_is_chosen(tuned):
    _, root, report = tuned
    assert len(report["runs"]) == 2 + 2 + 2  # lr x weight; limber has no weight
    assert grid(["limber", "vlap"], [1e-3], [0.5, 1.0]) == [grid(["limber"], [1e-3], [])[0], *grid(["vlap"], [1e-3],
                                                                                                  [0.5, 1.0])]
    # contrastive may also vary the initial temperature of its logit scale; the others never do
    assert [s.name for s in grid(["vlap", "contrastive"], [1e-3], [0.5], [0.07, 0.01])] == [
        "lr0.001-w0.5", "lr0.001-w0.5-t0.07", "lr0.001-w0.5-t0.01"]
    for method, chosen in report["chosen"].items():
        scores = [r["score"] for r in report["runs"].values() if r["method"] == method]
        assert chosen["score"] == max(scores)
    for r in report["runs"].values():
        assert r["score"] == pytest.approx(0.5 * (100 * r["METEOR"] + max(
            (r[f"{s}_i2t_R@1"] + r[f"{s}_t2i_R@1"]) / 2 for s in ("cosine", "assignment", "centred"))))
    contrastive = [r for r in report["runs"].values() if r["method"] == "contrastive"]
    assert all("logit_scale" in r["final"] for r in contrastive)
    assert "| **vlap** |" in (root / "tune" / "report.md").read_text()
    # validation only: the bridges were scored on val images, never on test
    assert json.loads((root / "tune" / "tune.json").read_text())["val_images"] == 6


def test_a_rerun_keeps_finished_settings_and_apply_writes_params(tuned, tmp_path):
    cfg, root, report = tuned
    bridge = next((root / "tune" / "runs" / "vlap").glob("*/models/vlap/model.safetensors"))
    mtime = bridge.stat().st_mtime_ns
    again = run_tune(cfg, Dirs.under(root / "data"), root / "tune", ["vlap", "limber", "contrastive"], [1e-3, 1e-2],
                     [0.5], val_images=6)
    assert bridge.stat().st_mtime_ns == mtime and again["chosen"] == report["chosen"]
    params = tmp_path / "params.yaml"
    params.write_text("# kept comment\nmethods:\n  vlap:\n    lr: ~  # tuned\n    ap_weight: 0.1\n"
                      "  limber:\n    lr: ~\n  contrastive:\n    nce_weight: 0.1\n")
    apply_to_params(report, params)
    written = load_config(params)
    assert written.methods.vlap.lr == report["chosen"]["vlap"]["lr"]
    assert written.methods.vlap.ap_weight == report["chosen"]["vlap"]["weight"]
    assert written.methods.contrastive.nce_weight == report["chosen"]["contrastive"]["weight"]
    assert "# kept comment" in params.read_text()
    untouched = tmp_path / "untouched.yaml"
    untouched.write_text("methods:\n  vlap:\n    lr: ~  # tuned\n  limber:\n    lr: ~  # train.lr\n")
    apply_to_params({"chosen": {"vlap": {"lr": 0.5, "weight": None}}}, untouched)
    lines = untouched.read_text().splitlines()
    assert lines[2].split() == ["lr:", "0.5", "#", "tuned"] and lines[4] == "    lr: ~  # train.lr"  # nulls stay ~


def test_a_method_best_at_an_edge_of_the_grid_is_tried_one_step_past_it(tuned, tmp_path):
    """--extend-edges: one lr past the edge where a method's best sits, at the grid's ratio there, and one weight
    past the edge where its best weight sits, at its best lr; the runs of another grid in the same folder are
    kept for a later tune but never compete."""
    assert beyond_edge(3e-3, [1e-3, 3e-3]) == 9e-3 and beyond_edge(1e-3, [1e-3, 3e-3]) == 3.33e-4
    assert beyond_edge(3e-3, [1e-3, 3e-3, 1e-2]) is None and beyond_edge(1.0, [0.1, 1.0]) == 10.0
    assert beyond_edge(1e-3, [1e-3]) is None  # one value: no step to take
    cfg, root, _ = tuned
    out = tmp_path / "tune"
    first = run_tune(cfg, Dirs.under(root / "data"), out, ["limber"], [1e-3, 1e-2], [0.5], val_images=6)
    best_lr = first["chosen"]["limber"]["lr"]  # two lrs: the best is at an edge
    past = {1e-3: 1e-4, 1e-2: 0.1}[best_lr]
    extended = run_tune(cfg, Dirs.under(root / "data"), out, ["limber"], [1e-3, 1e-2], [0.5], val_images=6,
                        extend_edges=1)
    assert extended["grid"]["lr_by_method"]["limber"] == sorted([1e-3, 1e-2, past])
    assert sorted(r["lr"] for r in extended["runs"].values()) == sorted([1e-3, 1e-2, past])
    assert extended["chosen"]["limber"]["score"] == max(r["score"] for r in extended["runs"].values())
    assert f"limber: {', '.join(f'{lr:g}' for lr in sorted([1e-3, 1e-2, past]))}" in (out / "report.md").read_text()
    narrower = run_tune(cfg, Dirs.under(root / "data"), out, ["limber"], [1e-2], [0.5], val_images=6)
    assert list(narrower["runs"]) == ["limber/lr0.01"] and narrower["chosen"]["limber"]["lr"] == 1e-2
    saved = json.loads((out / "tune.json").read_text())
    assert set(saved["kept"]) == {"limber/lr0.001", f"limber/lr{past:g}"}  # kept for a later tune, not chosen
    weights = run_tune(cfg, Dirs.under(root / "data"), tmp_path / "weights", ["contrastive"], [1e-3], [0.5, 2.0],
                       val_images=6, extend_edges=1)
    first_round = {r["weight"]: r["score"] for r in weights["runs"].values() if r["weight"] in (0.5, 2.0)}
    past_weight = {0.5: 0.125, 2.0: 8.0}[max(first_round, key=first_round.get)]
    assert weights["grid"]["weight_by_method"]["contrastive"] == sorted([0.5, 2.0, past_weight])
    assert weights["grid"]["lr_by_method"]["contrastive"] == [1e-3]  # one lr: no lr edge to step past
    assert sorted((r["lr"], r["weight"]) for r in weights["runs"].values()) == sorted(
        (1e-3, w) for w in (0.5, 2.0, past_weight))
    assert weights["chosen"]["contrastive"]["score"] == max(r["score"] for r in weights["runs"].values())
    report = (tmp_path / "weights" / "report.md").read_text()
    assert "best weight sat (up to 1 round(s), the same rule for every method): contrastive: " in report


def test_a_study_takes_the_tunes_choices_only_at_the_budget_they_were_tuned_at(tuned, capsys):
    """`vlap study --tuned tune.json`: each method's chosen lr and weight as settings; a tune at another budget
    (length, batch, precision, ...) is refused in one line before anything trains."""
    cfg, root, report = tuned
    tune_json = root / "tune" / "tune.json"
    sets = tuned_settings(tune_json, dataclasses.asdict(cfg.train))
    chosen = report["chosen"]
    assert f"methods.vlap.lr={chosen['vlap']['lr']}" in sets and f"methods.limber.lr={chosen['limber']['lr']}" in sets
    assert f"methods.contrastive.nce_weight={chosen['contrastive']['weight']}" in sets
    assert not any(s.startswith("methods.limber.") and not s.startswith("methods.limber.lr=") for s in sets)
    longer = dataclasses.asdict(dataclasses.replace(cfg.train, steps=cfg.train.steps + 5, seed=3))
    with pytest.raises(ConfigError, match=r"tuned at another budget \(train.steps 3 there, 8 here\)"):
        tuned_settings(tune_json, longer)
    assert tuned_settings(tune_json, dataclasses.asdict(dataclasses.replace(cfg.train, seed=3))) == sets  # not budget
    code = study.main(["--params", str(REPO / "params.yaml"), "--tuned", str(tune_json), "--data", str(root / "data"),
                       "--out", str(root / "study-refused"), "--seeds", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "was tuned at another budget" in err[0] and "train.steps 3 there" in err[0]
    assert not (root / "study-refused").exists()
    with pytest.raises(ConfigError, match="not a tune.json"):
        tuned_settings(root / "tune" / "report.md", dataclasses.asdict(cfg.train))
