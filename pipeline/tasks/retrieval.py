"""Cross-modal retrieval over the evaluated test images and their distinct caption texts.

The text gallery is the set of distinct caption texts of the evaluated images: where many
images share a caption (easy-VQA: ~36 texts for 1,000 images), ranking the tied copies of one
wrong caption would make R@1 = R@5 = R@10. Relevance: see pipeline.tasks.retrieval_metrics.

Every scorer is inductive: a query's score depends on the query, the candidate and what was
fitted on training data (`TrainingFit`), never on which other test items are present. Every
method is scored by every scorer, so methods are compared under one scorer at a time:
- `cosine`: cosine of z_v (bridge) and z_t (cached);
- `assignment`: the similarity of assignment distributions. The word columns of the OT problem
  are fixed by one Sinkhorn solve per modality on training data (z_v of training images, z_t of
  their captions); a test item's assignment over the word prototypes is then Sinkhorn's row update
  against those columns, softmax(S / eps + log b), and image and text are compared by the
  Bhattacharyya coefficient sum_k sqrt(q_v q_t);
- `centred`: cosine after subtracting each side's mean over the same training data. z_t of
  different captions are nearly parallel (a shared dominant direction), which a plain cosine
  cannot see past; centring removes it without touching training.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.bridge import visual_representation
from pipeline.distributed import Ranks, gather_in_order, shard
from pipeline.features import FeatureCache
from pipeline.config import Config, RetrievalEvalConfig
from pipeline.manifest import Manifest, report_group
from pipeline.ot import assign_with_columns, sinkhorn
from pipeline.prototypes import Prototypes
from pipeline.tasks.inputs import EvalInputs, select_test_images
from pipeline.tasks.retrieval_metrics import (SCORERS, chance_metrics, rank_of_first_relevant,
                                              relevance_from_texts, retrieval_metrics)


@dataclass(frozen=True)
class TrainingFit:
    """What the scorers take from training data: each side's mean, and each modality's OT columns."""

    mean_v: torch.Tensor  # (D,)
    mean_t: torch.Tensor  # (D,)
    log_b_v: torch.Tensor  # (K,) column potentials / eps of the image problem
    log_b_t: torch.Tensor  # (K,) of the text problem
    epsilon: float


def fit_columns(z: torch.Tensor, protos: Prototypes, epsilon: float, n_iters: int) -> torch.Tensor:
    """(K,) log b of one Sinkhorn solve of training samples z (n, D) onto the word prior."""
    return sinkhorn(z.float() @ protos.prototypes.T, protos.prior, epsilon, n_iters).log_b


def assignments(z: torch.Tensor, protos: Prototypes, log_b: torch.Tensor, epsilon: float,
                block: int = 256) -> torch.Tensor:
    """(n, K) each row sums to 1: every sample assigned on its own against the fitted columns."""
    return torch.cat([assign_with_columns(z[i : i + block].float() @ protos.prototypes.T, log_b, epsilon)
                      for i in range(0, len(z), block)])


def scorer_similarities(z_v: torch.Tensor, z_t: torch.Tensor, protos: Prototypes, fit: TrainingFit | None,
                        scorers: tuple[str, ...] = SCORERS) -> dict[str, torch.Tensor]:
    """scorer -> (n_images, n_texts) similarity; the fitted scorers only when `fit` is given."""
    out = {"cosine": z_v @ z_t.T} if "cosine" in scorers else {}
    if fit is not None and "assignment" in scorers:
        q_v = assignments(z_v, protos, fit.log_b_v, fit.epsilon)
        q_t = assignments(z_t, protos, fit.log_b_t, fit.epsilon)
        out["assignment"] = q_v.sqrt() @ q_t.sqrt().T  # Bhattacharyya coefficient
    if fit is not None and "centred" in scorers:
        out["centred"] = F.normalize(z_v - fit.mean_v, dim=-1) @ F.normalize(z_t - fit.mean_t, dim=-1).T
    return out


def recall_curve(ranks: dict[str, dict[str, np.ndarray]], k_max: int = 10) -> list[dict]:
    """R@k for k = 1..k_max, every scorer in both directions, rows for a DVC plot."""
    return [{"k": k} | {f"{scorer}_{d}": 100.0 * float((r[d] <= k).mean()) for scorer, r in ranks.items()
                        for d in ("i2t", "t2i")} for k in range(1, k_max + 1)]


def gallery_texts(inputs: EvalInputs) -> list[str]:
    """The distinct caption texts of the evaluated images (every reference), in first-seen order."""
    return list(dict.fromkeys(c for i in inputs.image_ids for c in inputs.captions[i]))


def text_domains(inputs: EvalInputs, texts: list[str]) -> dict[str, str]:
    """text -> the domain of the images it describes, where they all share one (zero-shot: seen/unseen)."""
    seen: dict[str, set[str]] = {}
    for i in inputs.image_ids:
        for c in inputs.captions[i]:
            seen.setdefault(c, set()).add(report_group(inputs.attributes[i]) or "")
    return {t: next(iter(seen[t])) for t in texts if len(seen[t]) == 1 and "" not in seen[t]}


def bridged_representations(inputs: EvalInputs, batch_size: int, ranks: Ranks = Ranks()) -> torch.Tensor | None:
    """(n, D) z_v of the evaluated images, as `inputs.z_v` gives them. On several ranks each bridges its shard
    of the batches and rank 0 gets every row, in image order (None on the others)."""
    if ranks.world == 1:
        return inputs.z_v(batch_size)
    mine = [visual_representation(inputs.bridged(slice(i, i + batch_size))).cpu()
            for i in shard(range(0, len(inputs.image_ids), batch_size), ranks)]
    parts = gather_in_order(mine, ranks)
    return None if parts is None else torch.cat(parts).to(inputs.device)


@torch.inference_mode()
def evaluate_retrieval(inputs: EvalInputs, cfg: Config, fit: TrainingFit | None,
                       ranks: Ranks = Ranks()) -> tuple[dict, list[dict], dict] | None:
    """(metrics of every scorer, overall and per domain, with chance levels; R@k curves; per-query ranks).
    On several ranks each bridges its shard of the images and rank 0 alone scores (None on the others)."""
    z_v = bridged_representations(inputs, cfg.evaluate.common.batch_size, ranks)  # (n, D)
    if z_v is None:
        return None
    texts = gallery_texts(inputs)
    relevant = relevance_from_texts([inputs.captions[i] for i in inputs.image_ids], texts)  # (n_images, n_texts)
    z_t = inputs.protos.text_reps(texts).to(z_v.device)  # (m, D)
    metrics = chance_metrics(relevant)
    ranks = {}
    for scorer, similarity in scorer_similarities(z_v, z_t, inputs.protos, fit).items():
        sim = similarity.float().cpu().numpy()
        metrics |= {f"{scorer}_{k}": v for k, v in retrieval_metrics(sim, relevant).items()}
        ranks[scorer] = {"i2t": rank_of_first_relevant(sim, relevant), "t2i": rank_of_first_relevant(sim.T, relevant.T)}
    by_text = text_domains(inputs, texts)
    query_domains = {"i2t": [report_group(inputs.attributes[i]) for i in inputs.image_ids],
                     "t2i": [by_text.get(t) for t in texts]}  # images by their own domain, texts by their images'
    metrics |= domain_recalls(query_domains, ranks)
    metrics |= {"images": len(inputs.image_ids), "distinct_texts": len(texts)}
    per_query = {"image_ids": inputs.image_ids, "texts": texts, "domains": query_domains,
                 "ranks": {s: {d: r.tolist() for d, r in by_dir.items()} for s, by_dir in ranks.items()}}
    return metrics, recall_curve(ranks), per_query


def domain_recalls(query_domain: dict[str, list[str | None]], ranks: dict) -> dict[str, float]:
    """`<scorer>_<dir>_R@1_<domain>`: R@1 over the queries of each domain (direction -> each query's
    domain or None), ranked against the whole gallery."""
    out = {}
    for scorer, by_dir in ranks.items():
        for d, r in by_dir.items():
            for domain in sorted({x for x in query_domain[d] if x}):
                keep = np.array([x == domain for x in query_domain[d]])
                out[f"{scorer}_{d}_R@1_{domain}"] = 100.0 * float((r[keep] <= 1).mean())
    return out


@torch.inference_mode()
def fit_on_training(inputs: EvalInputs, features_path: Path, manifest: Manifest, rcfg: RetrievalEvalConfig,
                    batch_size: int, ranks: Ranks = Ranks()) -> TrainingFit | None:
    """Means and OT columns from the first `fit_images` captioned training images with features and their
    captions, through the evaluated bridge; nothing of the test set. On several ranks each bridges its shard
    of the images and rank 0 alone fits (None on the others)."""
    with FeatureCache(features_path) as cache:
        ids = select_test_images(manifest, cache, rcfg.fit_images)
        rows = cache.rows(ids)
    train = dataclasses.replace(inputs, image_ids=ids, rows=rows, features_path=Path(features_path), reader=None)
    z_v = bridged_representations(train, batch_size, ranks)
    if z_v is None:
        return None
    captions = manifest.captions_by_id
    z_t = inputs.protos.text_reps([c for i in ids for c in captions[i]]).to(z_v.device)
    return TrainingFit(mean_v=z_v.mean(0), mean_t=z_t.mean(0),
                       log_b_v=fit_columns(z_v, inputs.protos, rcfg.epsilon, rcfg.sinkhorn_iters),
                       log_b_t=fit_columns(z_t, inputs.protos, rcfg.epsilon, rcfg.sinkhorn_iters),
                       epsilon=rcfg.epsilon)
