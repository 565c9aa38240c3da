"""Cross-modal retrieval scores: R@1/5/10 and median/mean rank, both directions.

Relevance rule: image i and text j are a correct pair iff text j equals one of image
i's captions (after strip + lower-case). So where several images share one caption
text, every image with that caption is a correct hit for the text, and every equal
caption text is a correct hit for the image. Synthetic sets (easy-VQA-style shapes)
repeat captions a lot, and counting only the "own" image would punish a model for
a retrieval no one could tell apart from the right one.

Ties are resolved pessimistically: an irrelevant candidate scoring the same as the
best relevant one ranks above it, so a constant scorer gets the worst rank, not the best.
"""

from __future__ import annotations

import numpy as np

# The retrieval scorers (pipeline/tasks/retrieval.py), every one inductive and reported for every method: the one
# list the task's headlines, its stage, the training validation and the dvc.yaml plots are derived from.
SCORERS = ("cosine", "assignment", "centred")

_RECALL_AT = (1, 5, 10)


def relevance_from_texts(image_captions: list[list[str]], texts: list[str]) -> np.ndarray:
    """(n_images, n_texts) bool: text j equals (strip + lower) one of image i's captions."""
    keys = [{c.strip().lower() for c in caps} for caps in image_captions]
    texts_norm = [t.strip().lower() for t in texts]
    return np.array([[t in k for t in texts_norm] for k in keys], dtype=bool).reshape(
        len(image_captions), len(texts)
    )


def rank_of_first_relevant(scores: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """1-based rank of each query's best-placed relevant candidate, ties pessimistic.

    scores, relevant: (n_query, n_candidates). Returns (n_query,) int:
    rank = 1 + #irrelevant candidates with score >= the best relevant score.
    """
    scores = np.asarray(scores, dtype=np.float64)
    relevant = np.asarray(relevant, dtype=bool)
    if scores.ndim != 2 or scores.shape != relevant.shape:
        raise ValueError(f"scores {scores.shape} and relevant {relevant.shape} must be equal 2-D shapes")
    # NaN compares False with everything and would silently give a good rank.
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or inf")
    no_relevant = np.flatnonzero(~relevant.any(axis=1))
    if no_relevant.size:
        raise ValueError(f"query {int(no_relevant[0])} has no relevant candidate")
    best_relevant = np.where(relevant, scores, -np.inf).max(axis=1, keepdims=True)  # (Q, 1)
    beaten_by = (~relevant) & (scores >= best_relevant)  # (Q, C)
    return 1 + beaten_by.sum(axis=1)


def _direction_metrics(prefix: str, ranks: np.ndarray) -> dict[str, float]:
    out = {f"{prefix}_R@{k}": 100.0 * float(np.mean(ranks <= k)) for k in _RECALL_AT}
    out[f"{prefix}_median_rank"] = float(np.median(ranks))
    out[f"{prefix}_mean_rank"] = float(np.mean(ranks))
    return out


def retrieval_metrics(similarity: np.ndarray, relevant: np.ndarray) -> dict[str, float]:
    """Image->text (`i2t_*`) and text->image (`t2i_*`) R@1/5/10 in percent, median and mean rank.

    similarity, relevant: (n_images, n_texts); rows are image queries, columns text queries.
    """
    similarity = np.asarray(similarity)
    relevant = np.asarray(relevant, dtype=bool)
    out: dict[str, float] = {}
    for prefix, scores, rel in (("i2t", similarity, relevant), ("t2i", similarity.T, relevant.T)):
        try:
            ranks = rank_of_first_relevant(scores, rel)
        except ValueError as e:  # say which direction the bad query index refers to
            raise ValueError(f"{prefix}: {e}") from e
        out.update(_direction_metrics(prefix, ranks))
    return out


def chance_recall(relevant: np.ndarray, k: int) -> float:
    """Expected R@k (%) of a uniformly random ranking: the mean over queries (rows) of
    P(one of r relevant among n candidates lands in the top k) = 1 - C(n - r, k) / C(n, k)."""
    relevant = np.asarray(relevant, dtype=bool)
    n = relevant.shape[1]
    misses = []
    for r in relevant.sum(axis=1):
        p_miss = 1.0
        for i in range(min(k, n)):  # the first k draws all irrelevant
            p_miss *= max(0.0, (n - r - i) / (n - i))
        misses.append(p_miss)
    return 100.0 * float(1.0 - np.mean(misses))


def chance_metrics(relevant: np.ndarray) -> dict[str, float]:
    """`chance_i2t_R@k`, `chance_t2i_R@k`: what a random ranking scores, to print beside the methods."""
    relevant = np.asarray(relevant, dtype=bool)
    return {f"chance_{prefix}_R@{k}": chance_recall(rel, k)
            for prefix, rel in (("i2t", relevant), ("t2i", relevant.T)) for k in _RECALL_AT}
