"""Entropic optimal transport (Sinkhorn-Knopp), batched over leading dims.

Three forms of the same iterations, picked by how far the scores of a row spread (in units of eps):
- the scaling domain in float32 (one float32 exponential per kernel entry, then per iteration a
  column and a row matrix-vector product, the row sums added up over blocks of columns in float64)
  where every kernel entry is a normal float32 number and the scores are float32;
- the scaling domain in float64 where float64 can hold the kernel;
- the log domain (two logsumexps per iteration, safe for any range) elsewhere.

Sharded over data-parallel ranks (torchrun), as SwAV does: each rank holds only its own rows of
the batch; a column update sums its K column terms over ranks (one all-reduce of K values per
iteration and problem, and on the float32 kernel one of the largest row scaling, which sets the
scale the column terms are summed in), and row updates are local. No rank builds the global (B, K)
kernel.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pipeline.distributed import Ranks

LOCAL = Ranks()  # one process: for a row update (each rank's own rows), and the one-process default

# float64 exp underflows below e^-745: a kernel whose rows span less than this (in units of eps)
# keeps every entry of its row-stabilised exp(S / eps) positive, so the scaling domain is exact.
# Cosine scores span at most 2, i.e. any eps >= 2 / SCALING_SPAN (~0.003).
SCALING_SPAN = 700.0
# float32 exp stays a normal number down to e^-87: below this span every entry of the row-stabilised
# float32 kernel is in [e^-80, 1], and a ratio of two scalings fits float32 (SmolLM2's caption-to-word
# cosines span ~0.25, i.e. 25 at eps = 0.01).
FLOAT32_SPAN = 80.0
# Columns per block of a float32 row product: each block's sums add this many float32 terms before
# the blocks add up in float64. One product over all 49,152 words moves a 50-iteration plan by ~1e-6;
# blocks of 8,192 keep it within ~5e-7 of a float64 solve for ~0.3 ms more per iteration (bench/RESULTS.md).
ROW_SUM_COLUMNS = 8192


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
    solved = None
    if scores.dtype in (torch.float32, torch.float16, torch.bfloat16):
        kernel, high, span = _float32_kernel(scores.float().expand(shape), epsilon)
        span = ranks.all_max(span)  # every rank takes the same branch
        if span.item() < FLOAT32_SPAN:
            solved = _scaling_domain_float32(kernel, high, epsilon, mu, n_iters, ranks)
        high = high.to(scores.dtype)
        del kernel
    else:
        high = scores.amax(-1, keepdim=True).expand(shape[:-1] + (1,))  # (..., b, 1)
        span = ranks.all_max((high - scores.amin(-1, keepdim=True)).max() / epsilon)
    if solved is not None:
        assignments, log_b, column_sums = solved
        assignments = assignments.to(scores.dtype)
    else:
        if span.item() < SCALING_SPAN:
            assignments, log_b = _scaling_domain(scores.expand(shape), high, epsilon, mu, n_iters, ranks)
            assignments = assignments.to(scores.dtype)
        else:
            assignments, log_b = _log_domain((scores / epsilon).expand(shape).contiguous(), mu, n_iters, ranks)
        column_sums = assignments.sum(-2)
    return SinkhornResult(
        assignments=assignments,
        marginal_error=(ranks.all_sum(column_sums) / B - mu).abs().sum(-1),
        log_b=log_b.squeeze(-2).to(scores.dtype),
    )


@torch.no_grad()
def released_targets(scores: torch.Tensor, prior: torch.Tensor, epsilon: float, n_iters: int) -> torch.Tensor:
    """The per-sample target of the authors' released script (park-jungin/vlap train.py, distributed_sinkhorn):
    Q = exp(S / eps), then n_iters times: every word's entry times mu, each sample renormalised. No coupling
    between samples: row b is ∝ exp(S_b / eps) · mu^n_iters. Computed as that softmax, which is the loop's
    result exactly (their exp(S / eps) overflows float32 above a cosine of 0.887 at eps = 0.01). (..., B, K)."""
    log_mu = prior.to(scores.dtype).clamp_min(torch.finfo(scores.dtype).tiny).log()
    return torch.softmax(scores / epsilon + n_iters * log_mu, dim=-1)


@torch.no_grad()
def assign_with_columns(scores: torch.Tensor, log_b: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Assignments (..., n, K) of new samples against columns fixed by an earlier solve (`log_b`):
    softmax(S / eps + log_b) row by row, Sinkhorn's last row update. Each row depends on its own
    scores only, so a sample's assignment does not depend on which other samples are present."""
    return torch.softmax(scores.float() / epsilon + log_b.float(), dim=-1)


def _scaling_domain(scores: torch.Tensor, row_max: torch.Tensor, epsilon: float, mu: torch.Tensor, n_iters: int,
                    ranks: Ranks) -> tuple[torch.Tensor, torch.Tensor]:
    """Assignments (..., B, K) in float64 from Q = diag(a) G diag(b), G = exp((S - row max) / eps).

    One exponential per entry, then per iteration one column and one row matrix-vector product:
    b = mu / (G^T a), a = (1/B) / (G b). Starting from a = exp(row max - M) is the log domain's
    u = 0 up to the global factor exp(M), which cancels in a b. For spans float32's exp cannot hold
    and for float64 scores."""
    B = scores.shape[-2] * ranks.world
    G = torch.sub(scores, row_max).div_(epsilon).double().exp_()  # (..., b, K), each row's largest entry is 1
    log_row_max = row_max.double() / epsilon  # (..., b, 1)
    a = torch.exp(log_row_max - ranks.all_max(log_row_max.amax(-2, keepdim=True)))  # (..., b, 1)
    mu_row = mu.double().unsqueeze(-2)  # (..., 1, K); a zero-mass word gets b_k = 0
    for _ in range(n_iters):
        b = mu_row / ranks.all_sum(torch.matmul(a.transpose(-1, -2), G))  # (..., 1, K) columns to mu
        a = (1.0 / B) / torch.matmul(G, b.transpose(-1, -2))  # (..., b, 1) rows to 1/B
    return G.mul_(a).mul_(b * B), b.log()  # each row rescaled from 1/B to 1


def _float32_kernel(scores: torch.Tensor, epsilon: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """G = exp((S - row max) / eps) (..., b, K) in float32, the row max (..., b, 1) and the widest row
    span over eps. Whole-tensor passes: a few calls, each over the full tensor, beat many calls on
    cache-sized chunks (bench/RESULTS.md), and on a GPU they are a few kernel launches."""
    high = scores.amax(-1, keepdim=True)
    G = torch.sub(scores, high)  # contiguous, on the scores' device, whatever their strides
    span = -G.amin() / epsilon
    return G.mul_(1.0 / epsilon).exp_(), high, span


def _scaling_domain_float32(G: torch.Tensor, row_max: torch.Tensor, epsilon: float, mu: torch.Tensor,
                            n_iters: int, ranks: Ranks) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Assignments (..., b, K) in float32 (overwriting the float32 kernel G = exp((S - row max) / eps),
    each row's largest entry 1, every entry >= e^-FLOAT32_SPAN), log b and the plan's column sums.

    The same iterations as `_scaling_domain` at half its bytes and a quarter of its exponential
    time: per iteration one column and one row matrix-vector product over the whole kernel, the row
    product in blocks of ROW_SUM_COLUMNS added in float64; a is float64. Each iteration scales a to
    a largest entry of 1 (a_row) and carries the scale s: with c = G^T a_row, b = mu / (s c), and
    b' = mu / c is b up to s. Then c_k >= e^-span (the row whose a_row is 1), so b' <= e^span and a
    row's sum of G b' stays within float32. The last row
    update is the plan's own normalisation: G b' with each row divided by its sum (torch's cascade
    summation, exact to ~1e-7), which saves that iteration's row product. The plan stays within
    ~5e-7 of a float64 solve at K = 49,152 (bench/sinkhorn.py)."""
    B = G.shape[-2] * ranks.world
    mu_row = mu.double().unsqueeze(-2)  # (..., 1, K); zero mass gives b = 0
    log_row_max = row_max.double() / epsilon  # (..., b, 1)
    a = torch.exp(log_row_max - ranks.all_max(log_row_max.amax(-2, keepdim=True)))  # (..., b, 1)
    for iteration in range(n_iters):
        scale = ranks.all_max(a.amax(-2, keepdim=True))  # (..., 1, 1)
        a_row = (a / scale).float().transpose(-1, -2)  # (..., 1, b)
        b = (mu_row / ranks.all_sum(torch.matmul(a_row, G).double())).float()  # (..., 1, K) columns to mu
        if iteration < n_iters - 1:
            a = (scale / B) / _row_products(G, b)  # (..., b, 1) rows to 1/B
    plan = G.mul_(b)  # Q B = diag(a B) G diag(b' / s): G b' with each row scaled to sum 1
    inverse_row_sums = 1.0 / plan.sum(-1, keepdim=True)
    column_sums = torch.matmul(inverse_row_sums.transpose(-1, -2), plan).squeeze(-2)
    return plan.mul_(inverse_row_sums), b.double().log() - scale.log(), column_sums


def _row_products(G: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """G b^T (..., b, 1) in float64, from float32 products over blocks of ROW_SUM_COLUMNS columns."""
    row_sums = torch.zeros(G.shape[:-1] + (1,), dtype=torch.float64, device=G.device)
    for block, b_block in zip(G.split(ROW_SUM_COLUMNS, -1), b.split(ROW_SUM_COLUMNS, -1)):
        row_sums += torch.matmul(block, b_block.transpose(-1, -2))
    return row_sums


def _log_domain(log_K: torch.Tensor, mu: torch.Tensor, n_iters: int, ranks: Ranks
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
        u = log_a - _logsumexp_(torch.add(log_K, v, out=scratch), dim=-1, ranks=LOCAL)  # (..., B, 1) rows to 1/B
    # (log_K + v) + u: the same rounded sum as the last row update, so rows stay exact in float32.
    return torch.add(log_K, v, out=scratch).add_(u).sub_(log_a).exp_(), v


def _logsumexp_(x: torch.Tensor, dim: int, ranks: Ranks) -> torch.Tensor:
    """logsumexp over dim (keepdim) that overwrites x; ~2x faster than torch.logsumexp(a + b) here.
    Over the row dim under several ranks, the max and the sum run over every rank's rows."""
    m = ranks.all_max(x.amax(dim, keepdim=True))
    m = m.masked_fill(m.isinf(), 0.0)  # as torch.logsumexp: an all -inf slice gives -inf, not NaN
    return ranks.all_sum(x.sub_(m).exp_().sum(dim, keepdim=True)).log_().add_(m)
