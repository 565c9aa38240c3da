"""The paper's presets: each one runs every stage end to end, on tiny local stand-ins of its models.

A preset sets the encoder, the LLM, the prompt, the OT settings and the optimiser and schedule;
the tests override only the model paths (tiny randomly initialised CLIP / BEiT and OPT / T5 saved
to a folder, loaded through `hf:<folder>` as the real ones would be) and the run's size.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from graph_runner import run_graph
from pipeline.bridge import load_bridge
from pipeline.config import PRESET_KEYS, PRESETS, ConfigError, load_config, parse_config, value_at
from pipeline.paths import Dirs
from vlap import cli
from vlap.params_file import preset_values
from tiny_models import save_tiny_beit, save_tiny_clip_vision, save_tiny_opt, save_tiny_t5

PAPER_PRESETS = [p for p in PRESETS if p != "default"]
TASKS = ("caption", "vqa", "retrieval", "arithmetic", "taxonomy")


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory, smollm2):
    folder = tmp_path_factory.mktemp("models")
    tokenizer = smollm2.tokenizer
    return {"clip-vitb32": save_tiny_clip_vision(folder / "clip"), "beit-b16": save_tiny_beit(folder / "beit"),
            "opt-1.3b": save_tiny_opt(folder / "opt", tokenizer), "t5-base": save_tiny_t5(folder / "t5", tokenizer)}


def preset_on_tiny_models(preset: str, models: dict):
    encoder, llm = preset.split("_")
    return parse_config({
        "preset": preset,
        "extract": {"encoder": f"hf:{models[encoder]}", "batch_size": 16},
        "prototypes": {"llm": f"hf:{models[llm]}"},
        # One epoch of 24 images at batch 8: the preset's epoch schedule, sized down.
        "train": {"batch_size": 8, "epochs": 1, "warmup_epochs": 0.34, "checkpoint_every": 2},
        "evaluate": {"common": {"test_images": 8, "batch_size": 4}, "caption": {"max_new_tokens": 3, "examples": 1},
                     "vqa": {"questions": 3, "shots": 1, "max_new_tokens": 2},
                     "arithmetic": {"queries": 2, "examples": 1}},
    })


@pytest.mark.slow
@pytest.mark.parametrize("preset", PAPER_PRESETS)
def test_each_paper_preset_runs_every_stage(preset, tiny_models, tmp_path):
    """Every stage VLAP runs through, on tiny models of the preset's encoder and LLM architectures (the
    baselines' stages are the same code with another loss: the full graph is tests/test_graph.py's)."""
    cfg = preset_on_tiny_models(preset, tiny_models)
    dirs = Dirs.under(tmp_path)
    run_graph(cfg, dirs, record=False, sizes=(24, 8), methods=("vlap",))
    _, meta = load_bridge(dirs.models / "vlap")
    paper = PRESETS[preset]
    assert meta["prompt"] == paper["train"]["prompt"] == "A picture of "
    assert meta["train"]["lr"] == paper["train"]["lr"] == (1e-4 if "opt" in preset else 1e-2)
    assert paper["methods"]["vlap"].items() <= meta["method_config"].items()
    assert (meta["steps"], meta["warmup_steps"]) == (3, 1)  # 1 epoch of 24 // 8 batches, 0.34 epoch warm-up
    for task in TASKS:
        metrics = json.loads((dirs.metrics / task / "vlap.json").read_text())
        assert metrics["applicable"] is True, (task, metrics)
    answers = json.loads((dirs.plots / "vqa" / "vlap" / "answers.json").read_text())
    assert len(answers["0shot"]) == 3 and all(isinstance(r["open"], str) for r in answers["0shot"])


def test_presets_set_the_paper_values_and_explicit_keys_win():
    for name in PAPER_PRESETS:
        cfg = parse_config({"preset": name})
        assert (cfg.train.batch_size, cfg.train.epochs, cfg.train.warmup_epochs) == (256, 32, 3)
        assert (cfg.methods.vlap.epsilon, cfg.methods.vlap.sinkhorn_iters, cfg.methods.vlap.tau,
                cfg.methods.vlap.ap_weight) == (0.01, 3, 0.01, 0.1)
        assert cfg.extract.encoder.startswith("hf:") and cfg.prototypes.llm.startswith("hf:")
        leaves = {f"{s}.{k}" for s, v in PRESETS[name].items() for k, x in v.items() if not isinstance(x, dict)}
        leaves |= {f"{s}.{k}.{kk}" for s, v in PRESETS[name].items() for k, x in v.items() if isinstance(x, dict)
                   for kk in x}
        assert leaves <= set(PRESET_KEYS)
    cfg = parse_config({"preset": "clip-vitb32_t5-base", "train": {"lr": 3e-3, "prompt": None}})
    assert cfg.train.lr == 3e-3 and cfg.train.prompt == "A picture of "  # explicit wins; null = the preset's
    assert parse_config({}).extract.encoder == "efficientnet-lite0"


@pytest.mark.parametrize("raw, message", [
    ({"preset": "clip_opt"}, "preset: expected one of default, clip-vitb32_opt-1.3b"),
    ({"train": {"warmup_epochs": 1}}, "train.warmup_epochs: needs train.epochs > 0"),
    ({"train": {"seed": None}}, "train.seed: expected an integer, got None"),
])
def test_invalid_combinations_fail_in_one_line(raw, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        parse_config(raw)
    assert "\n" not in str(err.value)


REPO_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def nulls(node, prefix=""):
    if isinstance(node, dict):
        return [n for k, v in node.items() for n in nulls(v, f"{prefix}{k}.")]
    return [prefix.rstrip(".")] if node is None else []


def test_params_yaml_holds_every_value_so_dvc_lock_records_what_ran():
    assert nulls(yaml.safe_load(REPO_PARAMS.read_text())) == []
    cfg = load_config(REPO_PARAMS)
    assert {k: value_at(cfg, k) for k in PRESET_KEYS} == preset_values("default")  # the default preset's


def test_vlap_preset_writes_the_paper_values_and_keeps_comments(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text(REPO_PARAMS.read_text())
    assert cli.main(["preset", "clip-vitb32_opt-1.3b", "--params", str(params)]) == 0
    assert "train.lr: 0.0001" in capsys.readouterr().out
    text = params.read_text()
    cfg = load_config(params)
    assert {k: value_at(cfg, k) for k in PRESET_KEYS} == preset_values("clip-vitb32_opt-1.3b")
    assert cfg.train.lr == 1e-4 and cfg.train.batch_size == 256 and cfg.prototypes.llm == "hf:facebook/opt-1.3b"
    assert "  prompt: 'A picture of '" in text or '  prompt: "A picture of "' in text  # the trailing space kept
    assert "# preset (default: 40): optimiser steps, when epochs is 0" in text  # comments stay
    assert nulls(yaml.safe_load(text)) == []
    assert cli.main(["config", "--params", str(params)]) == 0
    printed = capsys.readouterr().out
    shown = yaml.safe_load(printed)
    assert shown["train"]["epochs"] == 32.0 and shown["extract"]["encoder"] == "hf:openai/clip-vit-base-patch32"
    (tmp_path / "printed.yaml").write_text(printed)
    assert load_config(tmp_path / "printed.yaml") == cfg  # what `vlap config` prints is a params file


@pytest.mark.parametrize("text, message", [
    ("train:\n  lr: ~\n", "train.lr: null; give a value (`vlap preset NAME` writes a preset's values)"),
    ("preset: default\n", "preset: a params file holds values, not a preset name; `vlap preset default` writes"),
])
def test_a_params_file_with_a_preset_name_or_a_null_fails_in_one_line(tmp_path, text, message):
    params = tmp_path / "params.yaml"
    params.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("`", ".")) as err:
        load_config(params)
    assert "\n" not in str(err.value)
