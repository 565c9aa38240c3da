"""Visual semantic arithmetic: nearest-image retrieval and attribute-swap accuracy.

A query is z(source image) - e(word_a) + e(word_b); it is correct when the nearest
test image carries word_b for the changed attribute and keeps every other attribute
of the source (the "target" = source with changed_key set to word_b).
"""

from __future__ import annotations

import numpy as np


def _unit_rows(x: np.ndarray, name: str) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    # A zero vector has no direction; cosine with it is undefined, so refuse it
    # rather than let argmax pick gallery item 0.
    zero = np.flatnonzero(norms[:, 0] == 0)
    if zero.size:
        raise ValueError(f"{name} row {int(zero[0])} is a zero vector")
    return x / norms


def nearest_neighbours(
    queries: np.ndarray, gallery: np.ndarray, exclude: np.ndarray | None = None
) -> np.ndarray:
    """Index of each query's most cosine-similar gallery item.

    queries: (Q, D); gallery: (G, D); exclude: (Q,) gallery index each query may not
    return (e.g. its source image, which would otherwise often win). Returns (Q,) int;
    exact ties go to the lowest gallery index.
    """
    q = _unit_rows(np.asarray(queries, dtype=np.float64), "queries")
    g = _unit_rows(np.asarray(gallery, dtype=np.float64), "gallery")
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"queries have dim {q.shape[1]} but gallery has dim {g.shape[1]}")
    sim = q @ g.T  # (Q, G)
    if exclude is not None:
        exclude = np.asarray(exclude, dtype=np.int64)
        if exclude.shape != (len(q),):
            raise ValueError(f"exclude must have shape ({len(q)},), got {exclude.shape}")
        sim[np.arange(len(q)), exclude] = -np.inf
    return sim.argmax(axis=1)


def swap_accuracy(
    retrieved_attrs: list[dict], target_attrs: list[dict], changed_key: str
) -> float:
    """Fraction of queries whose retrieved image matches the target on every target key.

    That is: the retrieved image has the target value for `changed_key` AND keeps all
    other attributes of the target. Keys only the retrieved dict has (ids, paths) are ignored.
    """
    if len(retrieved_attrs) != len(target_attrs):
        raise ValueError(f"{len(retrieved_attrs)} retrieved vs {len(target_attrs)} targets")
    if not target_attrs:
        raise ValueError("swap_accuracy needs at least one query")
    hits = 0
    for i, (got, want) in enumerate(zip(retrieved_attrs, target_attrs)):
        if changed_key not in want:
            raise ValueError(f"target {i} has no attribute {changed_key!r}")
        hits += all(got.get(k) == v for k, v in want.items())
    return hits / len(target_attrs)
