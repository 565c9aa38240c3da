"""Benchmark: pipeline.ot.sinkhorn vs POT's log-domain solver (torch backend), same problems, same run.

    python bench/sinkhorn.py

B = 256 samples, K words (SmolLM2 49,152 and OPT 50,272), cosine scores of random unit vectors
(D = 576, a row span of ~0.3 as SmolLM2's caption-to-word cosines), a shuffled power-law word prior
with some 1e-12 entries, eps = 0.01, float32. Three solvers on the same problems: `sinkhorn` (what
these scores take: the float32 kernel, its row products added over blocks of columns in float64), its log
domain alone (`_log_domain`: what kernels beyond float64's range take; 2 B K exps per iteration)
and POT in float32. Prints a markdown table: median seconds of each, the ratios POT/ours, the max
absolute difference of the assignments from POT's float64 solve (the exact plan; asserted below
TOLERANCE) and from the timed float32 POT, and the floor: `sinkhorn` must take B K float32
exponentials once and read the (B, K) float32 kernel once per iteration and twice more (to build it
and to scale it into the plan); the floor is those exps at the exp rate plus those bytes at the read
bandwidth, both measured here.
"""
from __future__ import annotations

import warnings
from typing import Callable

import common  # noqa: F401  (offline, repo root, allocator)
import ot as pot
import torch

from harness import time_call, time_calls  # noqa: E402
from pipeline.ot import LOCAL, _log_domain, sinkhorn  # noqa: E402

B, D = 256, 576
VOCAB_SIZES = (49_152, 50_272)
ITERATIONS = (3, 50)
EPSILON = 0.01  # the paper's setting
REPEATS = 5  # median of this many timed runs (solvers alternated), after one warm-up
TOLERANCE = 1e-6  # max |assignment difference| allowed from POT's float64 plan


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


def ours_log_domain(scores: torch.Tensor, mu: torch.Tensor, n_iters: int) -> torch.Tensor:
    return _log_domain((scores / EPSILON).contiguous(), mu, n_iters, LOCAL)[0]


def read_bandwidth(n_bytes: int = 1 << 29) -> float:
    """Bytes/s of a sum over a float32 tensor far larger than the caches (median of 5)."""
    x = torch.ones(n_bytes // 4)
    return n_bytes / time_call(x.sum, repeats=5, warmup=1).median


def exp_rate(n: int = 1 << 16, repeats: int = 400) -> float:
    """exps/s of torch.exp on a cache-resident float32 block (no memory traffic to speak of), large
    enough for torch to split it over every thread."""
    x, y = torch.randn(n), torch.empty(n)
    torch.exp(x, out=y)  # warm-up: one call, not one more loop

    def loop() -> None:  # timed as one block: a single exp is too short for a clock read of its own
        for _ in range(repeats):
            torch.exp(x, out=y)

    return n * repeats / time_call(loop, repeats=1, warmup=0).median


def reference(scores: torch.Tensor, mu: torch.Tensor, n_iters: int) -> torch.Tensor:
    a = torch.full((B,), 1.0 / B, dtype=scores.dtype)
    with warnings.catch_warnings():  # "did not converge" at a fixed small iteration count
        warnings.simplefilter("ignore")
        plan = pot.sinkhorn(a, mu, -scores, reg=EPSILON, method="sinkhorn_log", numItermax=n_iters, stopThr=0)
    return plan * B


def median_seconds(fns: list[Callable[[], torch.Tensor]]) -> list[tuple[float, torch.Tensor]]:
    """Median wall time and last output of each fn, timed in alternation so both see the same load."""
    return [(t.median, t.result) for t in time_calls(fns, repeats=REPEATS, warmup=1)]


def main() -> None:
    bandwidth, exps = read_bandwidth(), exp_rate()
    print(f"torch {torch.__version__}, POT {pot.__version__}, threads {torch.get_num_threads()}, "
          f"B={B}, eps={EPSILON}, float32 in and out, median of {REPEATS}; read bandwidth {bandwidth / 1e9:.1f} GB/s, "
          f"float32 exp rate {exps / 1e9:.2f} G/s\n")
    print("| K | iters | sinkhorn (s) | log domain (s) | POT sinkhorn_log (s) | POT / sinkhorn | POT / log domain | "
          "max abs diff from POT float64 (sinkhorn, log domain, POT float32) | floor (s) | floor / sinkhorn |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for K in VOCAB_SIZES:
        scores, mu = make_problem(K)
        for n_iters in ITERATIONS:
            (t_ours, q_ours), (t_log, q_log), (t_pot, q_pot) = median_seconds(
                [lambda: ours(scores, mu, n_iters), lambda: ours_log_domain(scores, mu, n_iters),
                 lambda: reference(scores, mu, n_iters)]
            )
            exact = reference(scores.double(), mu.double(), n_iters)
            diffs = [(q.double() - exact).abs().max().item() for q in (q_ours, q_log, q_pot)]
            floor = B * K / exps + (n_iters + 2) * B * K * 4 / bandwidth
            print(f"| {K:,} | {n_iters} | {t_ours:.3f} | {t_log:.3f} | {t_pot:.3f} | {t_pot / t_ours:.2f} | "
                  f"{t_pot / t_log:.2f} | {diffs[0]:.2e}, {diffs[1]:.2e}, {diffs[2]:.2e} | {floor:.3f} | "
                  f"{floor / t_ours:.2f} |", flush=True)
            for q, d in zip((q_ours, q_log), diffs):
                assert torch.isfinite(q).all(), "non-finite assignments"
                assert d < TOLERANCE, f"the plan is {d:.2e} >= {TOLERANCE} from POT's float64 plan"


if __name__ == "__main__":
    main()
