"""Entropic optimal transport (Sinkhorn-Knopp) in the log domain, batched over leading dims."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

log = logging.getLogger("pipeline.ot")

# torch.compile fuses each iteration's add + logsumexp into passes with no (B, K) temporaries: about
# 4x less time per iteration on this CPU, for ~20 s of compiling once per process (bench/sinkhorn.py).
# It pays from about this many element-iterations (elements x iterations x calls), e.g. ~70 training
# steps of batch 256 x 49,152 words x 3 iterations x 2 problems; below it the eager loop is cheaper.
COMPILE_BREAK_EVEN = 5e9


@dataclass(frozen=True)
class SinkhornResult:
    assignments: torch.Tensor  # (..., B, K) each row sums to 1 (= plan * B)
    log_plan: torch.Tensor  # (..., B, K) log Q; rows sum to 1/B, columns to mu (-inf where mu_k = 0)
    marginal_error: torch.Tensor  # (...,) L1 distance of Q's column sums from mu (rows are exact)


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, col_mass: torch.Tensor, epsilon: float, n_iters: int, compiled: bool = False
             ) -> SinkhornResult:
    """Q = argmax_{Q in U(1/B, mu)} <Q, S> + eps H(Q) for scores S (..., B, K), mu (K,) or (..., K).

    Log-domain updates (exp(S/eps) overflows float32 for eps ~ 0.01), potentials start at zero,
    and each iteration updates the column potential then the row potential, as POT's
    `sinkhorn_log` does, so the returned rows are exact and the columns carry the residual error.
    `compiled`: run the iterations through torch.compile (see COMPILE_BREAK_EVEN; the eager loop if
    this machine cannot compile).
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
    u, v = (compiled and _run_compiled(log_K, log_b, log_a, n_iters)) or _iterations(log_K, log_b, log_a, n_iters)
    # (log_K + v) + u: the same rounded sum as the last row update, so rows stay exact in float32.
    log_plan = log_K.add_(v).add_(u)  # (..., B, K)
    assignments = (log_plan - log_a).exp()  # rescale each row from 1/B to 1
    return SinkhornResult(
        assignments=assignments,
        log_plan=log_plan,
        marginal_error=(assignments.sum(-2) / B - mu).abs().sum(-1),
    )


def worth_compiling(elements: int, n_iters: int, calls: int) -> bool:
    """Whether `calls` solves of `elements` (batch x B x K) entries pay for compiling the iterations."""
    return elements * n_iters * calls >= COMPILE_BREAK_EVEN


def _iterations(log_K: torch.Tensor, log_b: torch.Tensor, log_a: float, n_iters: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The potentials (u (..., B, 1), v (..., 1, K)) after n_iters column-then-row updates (eager)."""
    u = log_K.new_zeros(log_K.shape[:-1] + (1,))
    scratch = torch.empty_like(log_K)  # one reused (..., B, K) buffer: the loop allocates no big tensor
    for _ in range(n_iters):
        # u is finite, so the column logsumexp is finite and a -inf in log_b stays a zero-mass column.
        v = log_b - _logsumexp_(torch.add(log_K, u, out=scratch), dim=-2)  # (..., 1, K) columns to mu
        u = log_a - _logsumexp_(torch.add(log_K, v, out=scratch), dim=-1)  # (..., B, 1) rows to 1/B
    return u, v


def _fused_iterations(log_K: torch.Tensor, log_b: torch.Tensor, log_a: float, n_iters: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The same updates written for torch.compile, which fuses each add into its logsumexp."""
    u = log_K.new_zeros(log_K.shape[:-1] + (1,))
    for _ in range(n_iters):
        v = log_b - _logsumexp64(log_K + u, -2)
        u = log_a - _logsumexp64(log_K + v, -1)
    return u, v


def _logsumexp64(x: torch.Tensor, dim: int) -> torch.Tensor:
    """logsumexp over dim (keepdim) with a float64 sum: the compiled kernel adds a row's K terms in a
    few long sequential chains, whose float32 rounding puts the plan ~7e-6 from a float64 solve at
    K = 49,152 (the eager loop: ~5e-7); a float64 accumulator brings it back below, at no cost here."""
    m = x.amax(dim, keepdim=True)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)  # an all -inf slice gives -inf, not NaN
    return torch.exp(x - m).sum(dim, keepdim=True, dtype=torch.float64).log().to(x.dtype) + m


_COMPILED: dict[str, object] = {}  # "fn": the compiled iterations once they ran; None where compiling failed


def _run_compiled(log_K: torch.Tensor, log_b: torch.Tensor, log_a: float, n_iters: int
                  ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The compiled iterations' potentials, or None (use the eager loop) where compiling fails,
    e.g. on a machine without a C++ compiler; that is found on the first call and remembered."""
    fn = _COMPILED.get("fn", False)
    if fn is None:
        return None
    if fn:
        return fn(log_K, log_b, log_a, n_iters)
    compiled = torch.compile(_fused_iterations)
    try:
        result = compiled(log_K, log_b, log_a, n_iters)
    except Exception as err:  # noqa: BLE001 - any backend failure means: stay eager
        log.warning("sinkhorn: torch.compile unavailable (%s); using the eager loop", str(err).splitlines()[0][:200])
        _COMPILED["fn"] = None
        return None
    _COMPILED["fn"] = compiled
    return result


def _logsumexp_(x: torch.Tensor, dim: int) -> torch.Tensor:
    """logsumexp over dim (keepdim) that overwrites x; ~2x faster than torch.logsumexp(a + b) here."""
    m = x.amax(dim, keepdim=True)
    m = m.masked_fill(m.isinf(), 0.0)  # as torch.logsumexp: an all -inf slice gives -inf, not NaN
    return x.sub_(m).exp_().sum(dim, keepdim=True).log_().add_(m)
