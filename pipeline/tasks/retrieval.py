"""Cross-modal retrieval over the evaluated test images and their captions.

Scorers: cosine of z_v (bridge) and z_t (cached), and -- optionally -- the
similarity of assignment distributions: each image's and each text's Sinkhorn
assignment over the word prototypes (the same OT VLAP trains with), compared by
the Bhattacharyya coefficient sum_k sqrt(q_v q_t).
Relevance: see pipeline.tasks.retrieval_metrics (equal caption text = correct hit).
"""
from __future__ import annotations

import numpy as np
import torch

from pipeline.config import Config
from pipeline.ot import sinkhorn
from pipeline.tasks.inputs import EvalInputs
from pipeline.tasks.retrieval_metrics import rank_of_first_relevant, relevance_from_texts, retrieval_metrics


def assignments(z: torch.Tensor, inputs: EvalInputs, epsilon: float, n_iters: int) -> torch.Tensor:
    """(n, K) rows sum to 1: the batch of n samples transported onto the word prior."""
    scores = z @ inputs.protos.prototypes.T  # (n, K)
    return sinkhorn(scores, inputs.protos.prior, epsilon, n_iters).assignments


def recall_curve(similarity: np.ndarray, relevant: np.ndarray, k_max: int = 10) -> list[dict]:
    """R@k for k = 1..k_max in both directions, rows for a DVC plot."""
    i2t = rank_of_first_relevant(similarity, relevant)
    t2i = rank_of_first_relevant(similarity.T, relevant.T)
    return [{"k": k, "i2t": 100.0 * float((i2t <= k).mean()), "t2i": 100.0 * float((t2i <= k).mean())}
            for k in range(1, k_max + 1)]


@torch.inference_mode()
def evaluate_retrieval(inputs: EvalInputs, cfg: Config) -> tuple[dict, list[dict]]:
    """Metrics of both scorers, and the cosine scorer's R@k curve."""
    texts = [inputs.captions[i][0] for i in inputs.image_ids]  # one caption per image: the text gallery
    relevant = relevance_from_texts([inputs.captions[i] for i in inputs.image_ids], texts)
    z_v = inputs.z_v(cfg.evaluate.common.batch_size)  # (n, D)
    z_t = inputs.protos.text_reps(texts).to(z_v.device)  # (n, D)
    cosine = (z_v @ z_t.T).cpu().numpy()  # (n_images, n_texts)
    metrics = {f"cosine_{k}": v for k, v in retrieval_metrics(cosine, relevant).items()}
    if cfg.evaluate.retrieval.assignment_scorer:
        rcfg = cfg.evaluate.retrieval
        q_v = assignments(z_v, inputs, rcfg.epsilon, rcfg.sinkhorn_iters)
        q_t = assignments(z_t, inputs, rcfg.epsilon, rcfg.sinkhorn_iters)
        similarity = q_v.sqrt() @ q_t.sqrt().T  # (n, n) Bhattacharyya coefficient
        metrics |= {f"assignment_{k}": v for k, v in retrieval_metrics(similarity.cpu().numpy(), relevant).items()}
    return metrics | {"images": len(texts), "distinct_texts": len(set(texts))}, recall_curve(cosine, relevant)
