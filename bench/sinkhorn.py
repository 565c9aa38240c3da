"""Benchmark: pipeline.ot.sinkhorn vs POT's log-domain solver (torch backend), same problems, same run.

    python bench/sinkhorn.py

B = 256 samples, K words (SmolLM2 49,152 and OPT 50,272), cosine scores of random unit vectors
(D = 576), a shuffled power-law word prior with some 1e-12 entries, eps = 0.01, float32.
Prints a markdown table: median seconds of each solver, the ratio POT/ours, and the max absolute
difference of the assignments (asserted below TOLERANCE).
"""
from __future__ import annotations

import statistics
import time
import warnings
from typing import Callable

import common  # noqa: F401  (offline, repo root, allocator)
import ot as pot
import torch

from pipeline.ot import sinkhorn  # noqa: E402

B, D = 256, 576
VOCAB_SIZES = (49_152, 50_272)
ITERATIONS = (3, 50)
EPSILON = 0.01  # the paper's setting
REPEATS = 5  # median of this many timed runs (solvers alternated), after one warm-up
TOLERANCE = 1e-4  # max |assignment difference| allowed between the two solvers (float32)


def make_problem(K: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine scores S (B, K) and a power-law prior mu (K,) with 1% of words at 1e-12."""
    g = torch.Generator().manual_seed(seed)
    z = torch.nn.functional.normalize(torch.randn(B, D, generator=g), dim=-1)
    e = torch.nn.functional.normalize(torch.randn(K, D, generator=g), dim=-1)
    rank = torch.randperm(K, generator=g).float() + 1
    mu = rank**-1.2
    mu[torch.randperm(K, generator=g)[: K // 100]] = 1e-12
    return z @ e.T, mu / mu.sum()


def ours(scores: torch.Tensor, mu: torch.Tensor, n_iters: int) -> torch.Tensor:
    return sinkhorn(scores, mu, EPSILON, n_iters).assignments


def reference(scores: torch.Tensor, mu: torch.Tensor, n_iters: int) -> torch.Tensor:
    a = torch.full((B,), 1.0 / B)
    with warnings.catch_warnings():  # "did not converge" at a fixed small iteration count
        warnings.simplefilter("ignore")
        plan = pot.sinkhorn(a, mu, -scores, reg=EPSILON, method="sinkhorn_log", numItermax=n_iters, stopThr=0)
    return plan * B


def median_seconds(fns: list[Callable[[], torch.Tensor]]) -> list[tuple[float, torch.Tensor]]:
    """Median wall time and last output of each fn, timed in alternation so both see the same load."""
    outs = [fn() for fn in fns]  # warm-up
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(REPEATS):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            outs[i] = fn()
            times[i].append(time.perf_counter() - start)
    return [(statistics.median(t), out) for t, out in zip(times, outs)]


def main() -> None:
    print(f"torch {torch.__version__}, POT {pot.__version__}, threads {torch.get_num_threads()}, "
          f"B={B}, eps={EPSILON}, float32, median of {REPEATS}\n")
    print("| K | iters | ours (s) | POT sinkhorn_log (s) | POT / ours | max abs diff |")
    print("|---:|---:|---:|---:|---:|---:|")
    for K in VOCAB_SIZES:
        scores, mu = make_problem(K)
        for n_iters in ITERATIONS:
            (t_ours, q_ours), (t_pot, q_pot) = median_seconds(
                [lambda: ours(scores, mu, n_iters), lambda: reference(scores, mu, n_iters)]
            )
            diff = (q_ours - q_pot).abs().max().item()
            print(f"| {K:,} | {n_iters} | {t_ours:.3f} | {t_pot:.3f} | {t_pot / t_ours:.2f} | {diff:.2e} |",
                  flush=True)
            assert torch.isfinite(q_ours).all(), "non-finite assignments"
            assert diff < TOLERANCE, f"solvers disagree: {diff:.2e} >= {TOLERANCE}"


if __name__ == "__main__":
    main()
