"""Confidence intervals for metrics that are means over test items, across training seeds.

A headline metric of one method is a matrix `values[seed, item]` (per-item scores on the same
test items for every seed: VQA accuracy per question, R@1 per query, CIDEr per image, a hit per
arithmetic query). Its point estimate is the mean of the matrix. The interval is a two-level
percentile bootstrap: resample the seeds with replacement and, independently, the items with
replacement, and take the mean of the resampled matrix; this counts both the variation from
training (seed) and from the finite test set (items). A paired difference between two methods
uses the same resampled seeds and items for both (the items and seed indices are shared), so
the interval of VLAP − baseline is narrower than the two separate intervals suggest.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def as_dict(self) -> dict:
        return {"mean": self.mean, "low": self.low, "high": self.high}


def bootstrap_means(values: np.ndarray, n_boot: int = 2000, seed: int = 0) -> np.ndarray:
    """(n_boot,) means of `values` (seeds × items) resampled over seeds and over items."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2 or min(values.shape) == 0:
        raise ValueError(f"values must be a non-empty seeds × items matrix, got shape {values.shape}")
    rng = np.random.default_rng(seed)
    n_seeds, n_items = values.shape
    seeds = rng.integers(0, n_seeds, size=(n_boot, n_seeds))
    items = rng.integers(0, n_items, size=(n_boot, n_items))
    # mean over the resampled (seed, item) grid = mean over seeds of each resampled seed's item mean
    return np.stack([values[s][:, i].mean() for s, i in zip(seeds, items)])


def interval(values: np.ndarray, level: float = 0.95, n_boot: int = 2000, seed: int = 0) -> Interval:
    """The mean of `values` (seeds × items) and its percentile-bootstrap interval."""
    means = bootstrap_means(values, n_boot, seed)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return Interval(float(np.mean(values)), float(low), float(high))


def paired_difference(a: np.ndarray, b: np.ndarray, level: float = 0.95, n_boot: int = 2000,
                      seed: int = 0) -> Interval:
    """mean(a − b) and its interval; a, b: seeds × items on the same items (and seed indices)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values need equal shapes, got {a.shape} and {b.shape}")
    return interval(a - b, level, n_boot, seed)


def paired_test(a: np.ndarray, b: np.ndarray, level: float = 0.95, n_boot: int = 2000, seed: int = 0
                ) -> tuple[Interval, float]:
    """mean(a − b), its percentile interval, and the two-sided p-value of "no difference" from the same
    bootstrap: a Wald test on the bootstrap's standard error (a percentile count cannot go below
    1 / n_boot, which a correction over many tests would need)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values need equal shapes, got {a.shape} and {b.shape}")
    diff = a - b
    means = bootstrap_means(diff, n_boot, seed)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    mean, se = float(diff.mean()), float(means.std(ddof=1))
    p = float(math.erfc(abs(mean) / se / math.sqrt(2))) if se > 0 else float(mean == 0)
    return Interval(mean, float(low), float(high)), p


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error): the k-th smallest p times (m − k + 1), made
    monotone and capped at 1. scipy has Benjamini–Hochberg (below) but not Holm."""
    m = len(p_values)
    order = np.argsort(p_values, kind="stable")
    adjusted, running = np.empty(m), 0.0
    for k, i in enumerate(order):
        running = max(running, min(1.0, (m - k) * p_values[i]))
        adjusted[i] = running
    return adjusted.tolist()


def benjamini_hochberg(p_values: list[float]) -> list[float]:
    """Benjamini–Hochberg adjusted p-values (false discovery rate)."""
    from scipy.stats import false_discovery_control

    return false_discovery_control(np.asarray(p_values, dtype=np.float64), method="bh").tolist() if p_values else []
