"""Entropic optimal transport (Sinkhorn-Knopp), batched over leading dims.

Two exact forms of the same iterations: the scaling domain (one exponential per kernel entry,
then two matrix-vector products per iteration, in float64) wherever float64 can hold the kernel,
and the log domain (two logsumexps per iteration, float32-safe for any range) elsewhere.

Sharded over data-parallel ranks (torchrun), as SwAV does: each rank holds only its own rows of
the batch; a column update sums its K column terms over ranks (one all-reduce of K values per
iteration and problem), and row updates are local. No rank builds the global (B, K) kernel.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pipeline.distributed import Ranks

# float64 exp underflows below e^-745: a kernel whose rows span less than this (in units of eps)
# keeps every entry of its row-stabilised exp(S / eps) positive, so the scaling domain is exact.
# Cosine scores span at most 2, i.e. any eps >= 2 / SCALING_SPAN (~0.003).
SCALING_SPAN = 700.0


@dataclass(frozen=True)
class SinkhornResult:
    assignments: torch.Tensor  # (..., B, K) = plan Q * B: each row sums to 1; 0 where mu_k = 0
    marginal_error: torch.Tensor  # (...,) L1 distance of Q's column sums from mu (rows are exact)
    # (..., K) the column potential over eps, log b (up to a constant): each row's assignment is
    # softmax(S_row / eps + log_b), so a new sample can be assigned with the columns held fixed.
    log_b: torch.Tensor


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, col_mass: torch.Tensor, epsilon: float, n_iters: int,
             ranks: Ranks = Ranks()) -> SinkhornResult:
    """Q = argmax_{Q in U(1/B, mu)} <Q, S> + eps H(Q) for scores S (..., B, K), mu (K,) or (..., K).

    Potentials start at zero, and each iteration updates the column potential then the row
    potential, as POT's `sinkhorn_log` does, so the returned rows are exact and the columns carry
    the residual error. The result has the input's dtype (float32 or wider).
    Under several ranks `scores` is this rank's rows (every rank the same number, B = rows × ranks),
    and so are the returned assignments; log_b and marginal_error are the global problem's.
    """
    if scores.dim() < 2:
        raise ValueError(f"scores: expected shape (..., B, K), got {tuple(scores.shape)}")
    if epsilon <= 0 or n_iters < 1:
        raise ValueError(f"sinkhorn: need epsilon > 0 and n_iters >= 1, got {epsilon=}, {n_iters=}")
    mu = col_mass.to(scores.dtype)
    if not torch.allclose(mu.sum(-1), torch.ones((), dtype=mu.dtype), atol=1e-3) or (mu < 0).any():
        raise ValueError("col_mass: must be a non-negative distribution over the K words (sum 1)")
    B = scores.shape[-2] * ranks.world
    shape = torch.broadcast_shapes(scores.shape, mu.unsqueeze(-2).shape)  # (..., b, K)
    low, high = torch.aminmax(scores, dim=-1, keepdim=True)  # (..., b, 1) each, one pass
    span = ranks.all_max((high - low).max() / epsilon)  # every rank takes the same branch
    if span.item() < SCALING_SPAN:
        assignments, log_b = _scaling_domain(scores.expand(shape), high.expand(shape[:-1] + (1,)), epsilon, mu,
                                             n_iters, ranks)
        assignments = assignments.to(scores.dtype)
    else:
        assignments, log_b = _log_domain((scores / epsilon).expand(shape).contiguous(), mu, n_iters, ranks)
    return SinkhornResult(
        assignments=assignments,
        marginal_error=(ranks.all_sum(assignments.sum(-2)) / B - mu).abs().sum(-1),
        log_b=log_b.squeeze(-2).to(scores.dtype),
    )


@torch.no_grad()
def assign_with_columns(scores: torch.Tensor, log_b: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Assignments (..., n, K) of new samples against columns fixed by an earlier solve (`log_b`):
    softmax(S / eps + log_b) row by row, Sinkhorn's last row update. Each row depends on its own
    scores only, so a sample's assignment does not depend on which other samples are present."""
    return torch.softmax(scores.float() / epsilon + log_b.float(), dim=-1)


def _scaling_domain(scores: torch.Tensor, row_max: torch.Tensor, epsilon: float, mu: torch.Tensor, n_iters: int,
                    ranks: Ranks = Ranks()) -> tuple[torch.Tensor, torch.Tensor]:
    """Assignments (..., B, K) in float64 from Q = diag(a) G diag(b), G = exp((S - row max) / eps).

    One exponential per entry, then per iteration one column and one row matrix-vector product:
    b = mu / (G^T a), a = (1/B) / (G b). Starting from a = exp(row max - M) is the log domain's
    u = 0 up to the global factor exp(M), which cancels in a b. Float64 because the row products
    add K terms: in float32 their rounding would move the plan by ~2e-5 at K = 49,152."""
    B = scores.shape[-2] * ranks.world
    G = torch.sub(scores, row_max).div_(epsilon).double().exp_()  # (..., b, K), each row's largest entry is 1
    log_row_max = row_max.double() / epsilon  # (..., b, 1)
    a = torch.exp(log_row_max - ranks.all_max(log_row_max.amax(-2, keepdim=True)))  # (..., b, 1)
    mu_row = mu.double().unsqueeze(-2)  # (..., 1, K); a zero-mass word gets b_k = 0
    for _ in range(n_iters):
        b = mu_row / ranks.all_sum(torch.matmul(a.transpose(-1, -2), G))  # (..., 1, K) columns to mu
        a = (1.0 / B) / torch.matmul(G, b.transpose(-1, -2))  # (..., b, 1) rows to 1/B
    return G.mul_(a).mul_(b * B), b.log()  # each row rescaled from 1/B to 1


def _log_domain(log_K: torch.Tensor, mu: torch.Tensor, n_iters: int, ranks: Ranks = Ranks()
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Assignments (..., b, K) by log-domain updates, for kernels beyond float64's range."""
    B = log_K.shape[-2] * ranks.world
    log_a = -math.log(B)  # row constraint: every sample b carries mass 1/B
    log_b = torch.log(mu).unsqueeze(-2)  # (..., 1, K) column constraint; log 0 = -inf
    u = log_K.new_zeros(log_K.shape[:-1] + (1,))  # (..., B, 1)
    scratch = torch.empty_like(log_K)  # one reused (..., B, K) buffer: the loop allocates no big tensor
    for _ in range(n_iters):
        # u is finite, so the column logsumexp is finite and a -inf in log_b stays a zero-mass column.
        v = log_b - _logsumexp_(torch.add(log_K, u, out=scratch), dim=-2, ranks=ranks)  # (..., 1, K) columns to mu
        u = log_a - _logsumexp_(torch.add(log_K, v, out=scratch), dim=-1)  # (..., B, 1) rows to 1/B
    # (log_K + v) + u: the same rounded sum as the last row update, so rows stay exact in float32.
    return torch.add(log_K, v, out=scratch).add_(u).sub_(log_a).exp_(), v


def _logsumexp_(x: torch.Tensor, dim: int, ranks: Ranks = Ranks()) -> torch.Tensor:
    """logsumexp over dim (keepdim) that overwrites x; ~2x faster than torch.logsumexp(a + b) here.
    Over the row dim under several ranks, the max and the sum run over every rank's rows."""
    m = ranks.all_max(x.amax(dim, keepdim=True))
    m = m.masked_fill(m.isinf(), 0.0)  # as torch.logsumexp: an all -inf slice gives -inf, not NaN
    return ranks.all_sum(x.sub_(m).exp_().sum(dim, keepdim=True)).log_().add_(m)
