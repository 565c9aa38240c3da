"""The taxonomy task: RSA of bridged label classes against their words, and the modality gap."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from pipeline.tasks.registry import TASKS
from pipeline.tasks.taxonomy import gap_metrics, label_classes, rsa, taxonomy_metrics
from stages import evaluate_taxonomy, train


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_label_classes_skip_groups_and_small_classes():
    attrs = {"a": {"color": "red", "shape": "circle", "zero_shot": "seen"}, "b": {"color": "red", "shape": "square"},
             "c": {"color": "blue", "shape": "circle", "domain": "in"}}
    assert label_classes(attrs, ["a", "b", "c"], 1) == {("color", "blue"): [2], ("color", "red"): [0, 1],
                                                        ("shape", "circle"): [0, 2], ("shape", "square"): [1]}
    assert label_classes(attrs, ["a", "b", "c"], 2) == {("color", "red"): [0, 1], ("shape", "circle"): [0, 2]}


def test_rsa_is_one_when_images_sit_on_their_words_and_near_zero_when_unrelated():
    rng = np.random.default_rng(0)
    words = unit(rng.normal(size=(8, 16)))
    # 5 images per class, each its class word plus small noise: the class means keep the words' geometry
    z_v = unit(np.repeat(words, 5, axis=0) + 0.01 * rng.normal(size=(40, 16)))
    classes = {("color", f"c{k}"): list(range(5 * k, 5 * k + 5)) for k in range(8)}
    m = taxonomy_metrics(z_v, classes, words, n_boot=50, n_perm=200, seed=0)
    assert m["rsa"] == pytest.approx(1.0, abs=0.02) and m["rsa_low"] > 0.9 and m["rsa_p"] < 0.01
    assert (m["classes"], m["pairs"], m["rsa_color"]) == (8, 28, m["rsa"])
    unrelated = taxonomy_metrics(unit(rng.normal(size=(40, 16))), classes, words, n_boot=50, n_perm=200, seed=0)
    assert abs(unrelated["rsa"]) < 0.5 and unrelated["rsa_p"] > 0.05
    # rsa is Spearman over the upper triangle of the two cosine matrices, written out
    a, b = unit(rng.normal(size=(5, 4))), unit(rng.normal(size=(5, 4)))
    iu = np.triu_indices(5, 1)
    assert rsa(a, b) == pytest.approx(spearmanr((a @ a.T)[iu], (b @ b.T)[iu]).statistic)


def test_gap_metrics_by_hand():
    z_v = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z_t = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    m, per_image = gap_metrics(z_v, z_t)
    # cos = [[1, -1], [0, 0]]: paired (1, 0), unpaired (-1, 0)
    assert (m["paired_cosine"], m["unpaired_cosine"], m["paired_minus_unpaired_cosine"]) == (0.5, -0.5, 1.0)
    assert per_image.tolist() == [2.0, 0.0]
    assert m["modality_gap"] == pytest.approx(np.linalg.norm([0.5, 0.5] - np.array([0.0, 0.0])))


@pytest.mark.slow
def test_stage_on_easyvqa_labels_and_the_study_items(tiny_pipeline, smollm2, tmp_path):
    cfg, dirs = tiny_pipeline
    work = dirs.sharing_inputs(tmp_path / "data")
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=4, batch_size=8, checkpoint_every=100),
                              evaluate=dataclasses.replace(cfg.evaluate, taxonomy=dataclasses.replace(
                                  cfg.evaluate.taxonomy, min_images=2, bootstrap=50, permutations=50)))
    train.run(cfg, work, "limber", lm=smollm2)
    metrics = evaluate_taxonomy.run(cfg, work, "limber", lm=smollm2)
    saved = json.loads((work.metrics / "taxonomy" / "limber.json").read_text())
    assert saved == metrics and saved["applicable"] and saved["classes"] >= 3
    # (with 2-image classes the percentile interval is biased and need not hold the estimate)
    assert -1 <= saved["rsa_low"] <= saved["rsa_high"] <= 1 and -1 <= saved["rsa"] <= 1 and 0 < saved["rsa_p"] <= 1
    items = json.loads((work.plots / "taxonomy" / "limber" / "items.json").read_text())
    assert sum(n for k, n in items["classes"].items() if k.startswith("shape:")) == 32  # every test image, once
    scores, domains = TASKS["taxonomy"].per_item(evaluate_taxonomy.STAGE.items_path(work, "limber"), work.prepared)
    assert np.mean(list(scores["taxonomy/paired_minus_unpaired_cosine"].values())) == \
        pytest.approx(saved["paired_minus_unpaired_cosine"], abs=1e-4)
    assert scores["taxonomy/rsa"] == {"all": pytest.approx(saved["rsa"], abs=1e-4)}
    assert set(domains["taxonomy/paired_minus_unpaired_cosine"].values()) <= {"seen", "unseen"}
