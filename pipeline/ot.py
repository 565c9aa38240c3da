"""Entropic optimal transport (Sinkhorn-Knopp) in the log domain, batched over leading dims."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SinkhornResult:
    assignments: torch.Tensor  # (..., B, K) each row sums to 1 (= plan * B)
    log_plan: torch.Tensor  # (..., B, K) log Q; rows sum to 1/B, columns to mu (-inf where mu_k = 0)
    marginal_error: torch.Tensor  # (...,) L1 distance of Q's column sums from mu (rows are exact)


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, col_mass: torch.Tensor, epsilon: float, n_iters: int) -> SinkhornResult:
    """Q = argmax_{Q in U(1/B, mu)} <Q, S> + eps H(Q) for scores S (..., B, K), mu (K,) or (..., K).

    Log-domain updates (exp(S/eps) overflows float32 for eps ~ 0.01), potentials start at zero,
    and each iteration updates the column potential then the row potential, as POT's
    `sinkhorn_log` does, so the returned rows are exact and the columns carry the residual error.
    """
    if scores.dim() < 2:
        raise ValueError(f"scores: expected shape (..., B, K), got {tuple(scores.shape)}")
    if epsilon <= 0 or n_iters < 1:
        raise ValueError(f"sinkhorn: need epsilon > 0 and n_iters >= 1, got {epsilon=}, {n_iters=}")
    mu = col_mass.to(scores.dtype)
    if not torch.allclose(mu.sum(-1), torch.ones((), dtype=mu.dtype), atol=1e-3) or (mu < 0).any():
        raise ValueError("col_mass: must be a non-negative distribution over the K words (sum 1)")
    B = scores.shape[-2]
    log_a = -math.log(B)  # row constraint: every sample b carries mass 1/B
    log_b = torch.log(mu).unsqueeze(-2)  # (..., 1, K) column constraint: word k receives mu_k; log 0 = -inf
    shape = torch.broadcast_shapes(scores.shape, log_b.shape)  # (..., B, K)
    log_K = (scores / epsilon).expand(shape).contiguous()  # log Gibbs kernel S / eps
    u = torch.zeros(shape[:-1] + (1,), dtype=scores.dtype, device=scores.device)  # (..., B, 1)
    scratch = torch.empty_like(log_K)  # one reused (..., B, K) buffer: the loop allocates no big tensor
    for _ in range(n_iters):
        # u is finite, so the column logsumexp is finite and a -inf in log_b stays a zero-mass column.
        v = log_b - _logsumexp_(torch.add(log_K, u, out=scratch), dim=-2)  # (..., 1, K) columns to mu
        u = log_a - _logsumexp_(torch.add(log_K, v, out=scratch), dim=-1)  # (..., B, 1) rows to 1/B
    # (log_K + v) + u: the same rounded sum as the last row update, so rows stay exact in float32.
    log_plan = log_K.add_(v).add_(u)  # (..., B, K)
    assignments = (log_plan - log_a).exp()  # rescale each row from 1/B to 1
    return SinkhornResult(
        assignments=assignments,
        log_plan=log_plan,
        marginal_error=(assignments.sum(-2) / B - mu).abs().sum(-1),
    )


def _logsumexp_(x: torch.Tensor, dim: int) -> torch.Tensor:
    """logsumexp over dim (keepdim) that overwrites x; ~2x faster than torch.logsumexp(a + b) here."""
    m = x.amax(dim, keepdim=True)
    m = m.masked_fill(m.isinf(), 0.0)  # as torch.logsumexp: an all -inf slice gives -inf, not NaN
    return x.sub_(m).exp_().sum(dim, keepdim=True).log_().add_(m)
