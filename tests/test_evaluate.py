"""Evaluation stages on real cached easy-VQA features, the real SmolLM2 and real pycocoevalcap."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline import data
from pipeline.bridge import load_bridge, save_bridge
from pipeline.cache import FeatureCache, features_file
from pipeline.errors import MismatchError
from pipeline.prototypes import prototypes_file
from pipeline.generation import greedy_decode, left_pad, rank_candidates, text_embeds
from pipeline.tasks.inputs import load_eval_inputs
from stages import evaluate_arithmetic, evaluate_caption, evaluate_retrieval, evaluate_vqa, summarize, train

from conftest import sharing_inputs

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tiny_pipeline, smollm2, tmp_path_factory):
    """A limber bridge trained briefly on the 64 cached training images; eval on 8 test images."""
    cfg, dirs = tiny_pipeline
    eval_dirs = sharing_inputs(dirs, tmp_path_factory.mktemp("eval") / "data")
    cfg = dataclasses.replace(
        cfg,
        train=dataclasses.replace(cfg.train, steps=15, batch_size=8, checkpoint_every=100),
        evaluate=dataclasses.replace(
            cfg.evaluate,
            common=dataclasses.replace(cfg.evaluate.common, test_images=8, batch_size=4),
            vqa=dataclasses.replace(cfg.evaluate.vqa, questions=6, shots=1),
            arithmetic=dataclasses.replace(cfg.evaluate.arithmetic, queries=4, examples=2),
        ),
    )
    train.run(cfg, eval_dirs, "limber", lm=smollm2)
    return cfg, eval_dirs


def test_captioning_eval_on_8_images(trained, smollm2):
    cfg, dirs = trained
    metrics = evaluate_caption.run(cfg, dirs, "limber", lm=smollm2)
    assert metrics["images"] == 8
    assert set(metrics) >= {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"}
    assert all(0.0 <= metrics[k] <= 1.0 for k in ("BLEU-1", "METEOR", "ROUGE-L"))
    captions = json.loads((dirs.plots / "caption" / "limber" / "captions.json").read_text())
    assert len(captions) == 8 and all(v["references"] for v in captions.values())
    page = (dirs.pages / "caption" / "limber.html").read_text()
    assert page.count("data:image/png;base64,") == 8
    saved = json.loads((dirs.metrics / "caption" / "limber.json").read_text())
    assert saved["CIDEr"] == pytest.approx(metrics["CIDEr"], abs=1e-4)


def test_vqa_eval_zero_and_few_shot(trained, smollm2):
    cfg, dirs = trained
    metrics = evaluate_vqa.run(cfg, dirs, "limber", lm=smollm2)
    assert metrics["questions"] == 6
    for key in ("0shot_open_accuracy", "0shot_closed_accuracy", "1shot_open_accuracy", "1shot_closed_accuracy"):
        assert 0.0 <= metrics[key] <= 100.0
    answers = json.loads((dirs.plots / "vqa" / "limber" / "answers.json").read_text())
    vocab = {"yes", "no", "red", "green", "blue", "black", "gray", "teal", "brown", "yellow", "circle", "rectangle",
             "triangle"}
    assert all(r["closed"] in vocab for r in answers["0shot"])  # closed mode always answers from the set
    assert {r["question_type"] for r in answers["0shot"]} <= {"color", "shape", "yes_no"}


def independent_ranks(scores: np.ndarray, relevant: np.ndarray) -> list[int]:
    """1 + the number of irrelevant candidates scoring at least the best relevant one, query by query."""
    out = []
    for row, rel in zip(scores, relevant):
        best = max(v for v, r in zip(row, rel) if r)
        out.append(1 + sum(1 for v, r in zip(row, rel) if not r and v >= best))
    return out


def test_retrieval_stage_equals_an_independent_calculation(trained, smollm2):
    cfg, dirs = trained
    metrics = evaluate_retrieval.run(cfg, dirs, "limber")
    saved = json.loads((dirs.plots / "retrieval" / "limber" / "ranks.json").read_text())
    ids, texts = saved["image_ids"], saved["texts"]
    # Independently: the bridge on the cached tokens, z_t from the prototypes file, the relevance by caption text.
    bridge, _ = load_bridge(dirs.models / "limber" / "bridge.pt")
    with FeatureCache(features_file(dirs.features, "test")) as cache:
        tokens = torch.from_numpy(cache.tokens(ids)).float()
    with torch.inference_mode():
        z_v = F.normalize(bridge(tokens).mean(1), dim=-1).numpy()
    with h5py.File(prototypes_file(dirs.prototypes), "r") as f:
        all_texts = [t.decode() for t in f["texts"][:]]
        z_t = f["z_t"][:][[all_texts.index(t) for t in texts]].astype(np.float64)
    captions = {r["image_id"]: r["captions"] for r in data.read_manifest(dirs.prepared, "test").images}
    assert texts == list(dict.fromkeys(c for i in ids for c in captions[i]))  # distinct texts, no tied copies
    assert len(ids) == 8 and metrics["distinct_texts"] == len(texts) == len(set(texts))
    relevant = np.array([[t in captions[i] for t in texts] for i in ids])
    cosine = z_v.astype(np.float64) @ z_t.T
    for name, sim in (("cosine", cosine),):
        i2t, t2i = independent_ranks(sim, relevant), independent_ranks(sim.T, relevant.T)
        assert saved["ranks"][name] == {"i2t": i2t, "t2i": t2i}
        for k in (1, 5):
            assert metrics[f"{name}_i2t_R@{k}"] == pytest.approx(100 * np.mean(np.array(i2t) <= k), abs=1e-3)
            assert metrics[f"{name}_t2i_R@{k}"] == pytest.approx(100 * np.mean(np.array(t2i) <= k), abs=1e-3)
    assert metrics["natural_scorer"] == "cosine" and metrics["natural_i2t_R@1"] == metrics["cosine_i2t_R@1"]
    assert set(saved["ranks"]) == {"cosine", "assignment", "centred"}
    curve = json.loads((dirs.plots / "retrieval" / "limber" / "recall_at_k.json").read_text())
    assert [row["k"] for row in curve] == list(range(1, 11))
    assert curve[0]["i2t"] == pytest.approx(metrics["natural_i2t_R@1"], abs=1e-3)


def test_arithmetic_and_summary_cells_equal_the_metrics_files(trained, smollm2):
    cfg, dirs = trained
    arith = evaluate_arithmetic.run(cfg, dirs, "limber", lm=smollm2)
    assert {"color_swap_top1", "shape_swap_top1"} <= arith.keys()
    assert (dirs.pages / "arithmetic" / "limber.html").exists()
    evaluate_retrieval.run(cfg, dirs, "limber")
    summarize.run(cfg, dirs)
    rows = {}
    for line in (dirs.metrics / "summary.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if "/" in cells[0] and len(cells) == 4:
            rows[cells[0]] = cells[2]  # the limber column (vlap, limber, contrastive)
    for task in ("retrieval", "arithmetic"):
        saved = json.loads((dirs.metrics / task / "limber.json").read_text())
        for key, shown in rows.items():
            if key.startswith(task + "/") and shown != "–":
                value = saved[key.split("/", 1)[1]]
                assert shown == (value if isinstance(value, str) else f"{value:.1f}"), key
    assert rows["retrieval/natural_scorer"] == "cosine"
    assert (dirs.plots / "summary.png").stat().st_size > 1000


def test_ranking_with_shared_prefix_equals_full_sequences(smollm2):
    prompts = ["Question: what color is the sky? Answer:", "The shape is a"]
    embeds, mask = left_pad([text_embeds(smollm2, p) for p in prompts])
    candidates = [" blue", " teal", " circle"]  # " teal" is two tokens: exercises the KV-cache path
    scores = rank_candidates(smollm2, embeds, mask, candidates)
    for i, p in enumerate(prompts):
        for j, c in enumerate(candidates):
            ids = smollm2.tokenizer(p, add_special_tokens=False)["input_ids"]
            cid = smollm2.tokenizer(c, add_special_tokens=False)["input_ids"]
            with torch.inference_mode():
                logp = F.log_softmax(smollm2.model(torch.tensor([ids + cid])).logits[0].float(), -1)
            expected = sum(logp[len(ids) - 1 + k, t].item() for k, t in enumerate(cid))
            assert scores[i, j].item() == pytest.approx(expected, abs=1e-3)


def test_batched_greedy_equals_one_at_a_time(smollm2):
    seqs = [text_embeds(smollm2, p) for p in ["The capital of France is", "One, two, three,"]]
    batched = greedy_decode(smollm2, *left_pad(seqs), max_new_tokens=5)
    single = [greedy_decode(smollm2, *left_pad([s]), max_new_tokens=5)[0] for s in seqs]
    assert batched == single and "Paris" in batched[0]


def test_bridge_from_another_encoder_is_refused(trained, smollm2, tmp_path):
    cfg, dirs = trained
    bridge, meta = load_bridge(dirs.models / "limber" / "bridge.pt")
    other = sharing_inputs(dirs, tmp_path / "data")
    save_bridge(other.models / "limber" / "bridge.pt", bridge, meta | {"encoder_weights_sha256": "0" * 64})
    with pytest.raises(MismatchError) as err:
        load_eval_inputs(cfg, "limber", other, lm=smollm2)
    assert "another encoder" in str(err.value) and "\n" not in str(err.value)


def test_missing_bridge_fails_in_one_line(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("evaluate:\n  common:\n    test_images: 4\n")
    row = {"image_id": "1", "image_path": "1.png", "image_sha256": "0" * 64, "captions": ["a red circle"],
           "attributes": "{}"}
    data.write_split(tmp_path / "prepared", data.Split("test", "package:easy_vqa", [row]))
    proc = subprocess.run(
        [sys.executable, "-m", "stages.evaluate_caption", "--method", "vlap", "--params", str(params),
         "--data", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {tmp_path}/models/vlap/bridge.pt: trained bridge not found (run the train stage first)"]
