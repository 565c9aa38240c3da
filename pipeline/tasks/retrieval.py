"""Cross-modal retrieval over the evaluated test images and their distinct caption texts.

The text gallery is the set of distinct caption texts of the evaluated images: where many
images share a caption (easy-VQA: ~36 texts for 1,000 images), ranking the tied copies of one
wrong caption would make R@1 = R@5 = R@10. Relevance: see pipeline.tasks.retrieval_metrics.

Scorers:
- `cosine`: cosine of z_v (bridge) and z_t (cached);
- `assignment` (optional): the similarity of assignment distributions: each image's and each
  text's Sinkhorn assignment over the word prototypes (the OT VLAP trains with), compared by the
  Bhattacharyya coefficient Σ_k sqrt(q_v q_t);
- `centred` (optional): cosine after subtracting each side's mean over training data (z_v of
  training images, z_t of training captions). z_t of different captions are nearly parallel
  (a shared dominant direction), which a plain cosine cannot see past; centring removes it
  without touching training.
Each method is also reported with its natural scorer (`natural_*`): the one it was trained for.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.cache import FeatureCache
from pipeline.config import Config
from pipeline.data import Manifest
from pipeline.ot import sinkhorn
from pipeline.tasks.inputs import EvalInputs, select_test_images
from pipeline.tasks.retrieval_metrics import rank_of_first_relevant, relevance_from_texts, retrieval_metrics

NATURAL_SCORER = {"vlap": "assignment", "limber": "cosine", "contrastive": "cosine"}


def assignments(z: torch.Tensor, inputs: EvalInputs, epsilon: float, n_iters: int) -> torch.Tensor:
    """(n, K) rows sum to 1: the batch of n samples transported onto the word prior."""
    scores = z @ inputs.protos.prototypes.T  # (n, K)
    return sinkhorn(scores, inputs.protos.prior, epsilon, n_iters).assignments


def recall_curve(ranks: dict[str, np.ndarray], k_max: int = 10) -> list[dict]:
    """R@k for k = 1..k_max in both directions, rows for a DVC plot."""
    return [{"k": k, "i2t": 100.0 * float((ranks["i2t"] <= k).mean()), "t2i": 100.0 * float((ranks["t2i"] <= k).mean())}
            for k in range(1, k_max + 1)]


def gallery_texts(inputs: EvalInputs) -> list[str]:
    """The distinct caption texts of the evaluated images (every reference), in first-seen order."""
    return list(dict.fromkeys(c for i in inputs.image_ids for c in inputs.captions[i]))


def centred_cosine(z_v: torch.Tensor, z_t: torch.Tensor, centres: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    mean_v, mean_t = centres
    return F.normalize(z_v - mean_v, dim=-1) @ F.normalize(z_t - mean_t, dim=-1).T


@torch.inference_mode()
def evaluate_retrieval(inputs: EvalInputs, cfg: Config,
                       centres: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[dict, list[dict], dict]:
    """(metrics of every scorer and of the natural one, the natural scorer's R@k curve, per-query ranks)."""
    rcfg = cfg.evaluate.retrieval
    texts = gallery_texts(inputs)
    relevant = relevance_from_texts([inputs.captions[i] for i in inputs.image_ids], texts)  # (n_images, n_texts)
    z_v = inputs.z_v(cfg.evaluate.common.batch_size)  # (n, D)
    z_t = inputs.protos.text_reps(texts).to(z_v.device)  # (m, D)
    similarities = {"cosine": z_v @ z_t.T}
    if rcfg.assignment_scorer:
        q_v = assignments(z_v, inputs, rcfg.epsilon, rcfg.sinkhorn_iters)
        q_t = assignments(z_t, inputs, rcfg.epsilon, rcfg.sinkhorn_iters)
        similarities["assignment"] = q_v.sqrt() @ q_t.sqrt().T  # Bhattacharyya coefficient
    if centres is not None:
        similarities["centred"] = centred_cosine(z_v, z_t, centres)
    metrics, ranks = {}, {}
    for scorer, similarity in similarities.items():
        sim = similarity.float().cpu().numpy()
        metrics |= {f"{scorer}_{k}": v for k, v in retrieval_metrics(sim, relevant).items()}
        ranks[scorer] = {"i2t": rank_of_first_relevant(sim, relevant), "t2i": rank_of_first_relevant(sim.T, relevant.T)}
    natural = NATURAL_SCORER.get(inputs.method, "cosine")
    natural = natural if natural in similarities else "cosine"
    metrics |= {k.replace(natural, "natural", 1): v for k, v in metrics.items() if k.startswith(natural + "_")}
    metrics |= {"natural_scorer": natural, "images": len(inputs.image_ids), "distinct_texts": len(texts)}
    per_query = {"image_ids": inputs.image_ids, "texts": texts,
                 "ranks": {s: {d: r.tolist() for d, r in by_dir.items()} for s, by_dir in ranks.items()}}
    return metrics, recall_curve(ranks[natural]), per_query


@torch.inference_mode()
def training_centres(inputs: EvalInputs, features_path: Path, manifest: Manifest, limit: int,
                     batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean z_v, mean z_t) over the first `limit` captioned training images with features and their
    captions: the centres of the `centred` scorer. Uses the evaluated bridge; nothing of the test set."""
    with FeatureCache(features_path) as cache:
        ids = select_test_images(manifest, cache, limit)
        rows = cache.rows(ids)
    train = dataclasses.replace(inputs, image_ids=ids, rows=rows, features_path=Path(features_path), reader=None)
    z_v = train.z_v(batch_size)
    captions = manifest.captions_by_id
    z_t = inputs.protos.text_reps([c for i in ids for c in captions[i]]).to(z_v.device)
    return z_v.mean(0), z_t.mean(0)
