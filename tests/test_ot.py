"""Log-domain Sinkhorn: agreement with POT, marginals, numerical stability, batching."""
import warnings

import ot as pot
import pytest
import torch

from pipeline.distributed import Ranks

from pipeline import ot as ot_module
from pipeline.ot import sinkhorn


def _problem(B: int, K: int, seed: int, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine scores (B, K) and a non-uniform word prior mu (K,)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.nn.functional.normalize(torch.randn(B, 8, generator=g, dtype=dtype), dim=-1)
    e = torch.nn.functional.normalize(torch.randn(K, 8, generator=g, dtype=dtype), dim=-1)
    mu = torch.rand(K, generator=g, dtype=dtype) ** 3 + 1e-3
    return z @ e.T, mu / mu.sum()


def _pot_plan(scores: torch.Tensor, mu: torch.Tensor, epsilon: float, n_iters: int) -> torch.Tensor:
    B = scores.shape[0]
    a = torch.full((B,), 1.0 / B, dtype=scores.dtype)
    with warnings.catch_warnings():  # POT warns that it did not converge at small iteration counts
        warnings.simplefilter("ignore")
        return pot.sinkhorn(a, mu, -scores, reg=epsilon, method="sinkhorn_log", numItermax=n_iters, stopThr=0)


@pytest.mark.parametrize("epsilon", [0.05, 0.1])
@pytest.mark.parametrize("n_iters", [3, 2000])
def test_matches_pot_sinkhorn_log(epsilon: float, n_iters: int) -> None:
    """Same update order as POT (column then row potential), so plans agree after 3 iterations too."""
    scores, mu = _problem(16, 40, seed=0)
    ours = sinkhorn(scores, mu, epsilon, n_iters)
    ref = _pot_plan(scores, mu, epsilon, n_iters)
    torch.testing.assert_close(ours.assignments / 16, ref, rtol=1e-6, atol=1e-15)
    torch.testing.assert_close(ours.assignments, ref * 16, rtol=1e-6, atol=1e-13)


def test_marginals() -> None:
    scores, mu = _problem(32, 50, seed=1)
    errors = []
    for n_iters in [1, 10, 100, 1000]:
        res = sinkhorn(scores, mu, 0.05, n_iters)
        torch.testing.assert_close(res.assignments.sum(-1), torch.ones(32, dtype=torch.float64))
        errors.append(res.marginal_error.item())
    assert all(a > b for a, b in zip(errors, errors[1:])), errors  # error decreases with n_iters
    torch.testing.assert_close((res.assignments / 32).sum(0), mu, rtol=0, atol=1e-9)  # columns reach mu
    assert errors[-1] < 1e-8
    # marginal_error is exactly the L1 column error of the plan
    torch.testing.assert_close(res.marginal_error, ((res.assignments / 32).sum(0) - mu).abs().sum())


@pytest.mark.parametrize("epsilon", [1e-3, 1e-2, 1.0])
def test_stable_in_float32_with_tiny_and_zero_mass(epsilon: float) -> None:
    scores, mu = _problem(64, 300, seed=2, dtype=torch.float32)
    mu[:20] = 1e-12
    mu[20:30] = 0.0
    mu = mu / mu.sum()
    res = sinkhorn(scores, mu, epsilon, 3)
    assert res.assignments.dtype == torch.float32
    assert torch.isfinite(res.assignments).all() and torch.isfinite(res.marginal_error).all()
    assert (res.assignments[:, 20:30] == 0).all()  # zero-mass words receive nothing
    torch.testing.assert_close(res.assignments.sum(-1), torch.ones(64), rtol=0, atol=1e-5)
    # the float32 plan is the float64 reference's (POT on the same problem) up to float32 rounding, which
    # is relative and grows as 1/eps: log-kernel entries |S|/eps <= 1/eps carry an ulp of ~6e-8/eps
    keep = torch.cat([torch.arange(20), torch.arange(30, 300)])  # POT cannot take mu_k = 0
    ref = _pot_plan(scores.double()[:, keep], mu.double()[keep] / mu.double()[keep].sum(), epsilon, 3) * 64
    torch.testing.assert_close(res.assignments[:, keep].double(), ref, rtol=max(1e-5, 5e-7 / epsilon), atol=1e-6)


@pytest.mark.parametrize("epsilon", [0.01, 0.05])
def test_scaling_and_log_domains_give_the_same_plan(epsilon: float) -> None:
    """The scaling domain (what cosine scores use) and the log domain (beyond float64's range) are
    the same iterations: in float32 both are within float32 rounding of a float64 solve, zero-mass
    words included, batched over two problems as the AP loss solves them."""
    scores, mu = _problem(64, 300, seed=3, dtype=torch.float32)
    mu[:10] = 0.0
    mu = mu / mu.sum()
    both = torch.stack([scores, scores.flip(0)])
    log_K = both / epsilon
    truth = ot_module._log_domain(log_K.double(), mu.double(), 3, Ranks())[0]
    scaling = ot_module._scaling_domain(both, both.amax(-1, keepdim=True), epsilon, mu, 3, Ranks())[0].float()
    log_domain = ot_module._log_domain(log_K, mu, 3, Ranks())[0]
    for plan in (scaling, log_domain):
        torch.testing.assert_close(plan.double(), truth, rtol=1e-5, atol=1e-6)
        assert (plan[..., :10] == 0).all()
    assert (scaling.double() - truth).abs().max() <= (log_domain.double() - truth).abs().max() + 1e-7


def test_float32_blocks_stay_within_float32_rounding_of_pot_in_float64() -> None:
    """Cosine scores spanning < FLOAT32_SPAN * eps in float32 take the float32 kernel, its row products in
    blocks of columns (several blocks, the last one short) added in float64: the
    plan is within 1e-6 of POT's float64 solve, tiny and zero-mass words included, batched as the
    AP loss solves it; float64 scores and wider spans keep the float64 kernel."""
    g = torch.Generator().manual_seed(5)
    K = 2 * ot_module.ROW_SUM_COLUMNS + 300
    z = torch.nn.functional.normalize(torch.randn(2, 64, 48, generator=g), dim=-1)
    words = torch.nn.functional.normalize(torch.randn(K, 48, generator=g), dim=-1)
    scores = z @ words.T  # (2, 64, K) float32, span ~0.9 < 80 * 0.02
    mu = torch.rand(K, generator=g) ** 4
    mu[:10], mu[10:30] = 0.0, 1e-12
    mu = mu / mu.sum()
    epsilon = 0.02
    assert ((scores.amax(-1) - scores.amin(-1)).max() / epsilon) < ot_module.FLOAT32_SPAN
    res = sinkhorn(scores, mu, epsilon, 3)
    assert res.assignments.dtype == torch.float32 and (res.assignments[..., :10] == 0).all()
    torch.testing.assert_close(res.assignments.sum(-1), torch.ones(2, 64), rtol=0, atol=2e-6)
    keep = torch.arange(10, K)  # POT cannot take mu_k = 0
    mu_kept = mu.double()[keep] / mu.double()[keep].sum()
    for problem in range(2):
        ref = _pot_plan(scores[problem].double()[:, keep], mu_kept, epsilon, 3) * 64
        assert (res.assignments[problem][:, keep].double() - ref).abs().max() < 1e-6
    # the same iterations as the float64 kernel: the log potentials agree too
    float64_kernel = ot_module._scaling_domain(scores, scores.amax(-1, keepdim=True), epsilon, mu, 3, Ranks())
    torch.testing.assert_close(res.log_b[..., 10:].double(), float64_kernel[1].squeeze(-2)[..., 10:], rtol=0, atol=1e-5)
    # float64 scores are solved in float64 (a plan within float64 rounding of POT's)
    exact = sinkhorn(scores[0].double(), mu.double(), epsilon, 3).assignments
    assert (exact[:, keep] - _pot_plan(scores[0].double()[:, keep], mu_kept, epsilon, 3) * 64).abs().max() < 1e-12


def test_a_kernel_beyond_float64_range_takes_the_log_domain() -> None:
    """Scores spanning more than SCALING_SPAN * eps: the scaling domain would underflow to zero
    columns; the result is still finite, with exact rows, and equals POT's log-domain plan."""
    scores, mu = _problem(32, 60, seed=4)
    scores = scores * 4  # span ~8 at eps 0.005: 1,600 > SCALING_SPAN
    assert ((scores.amax(-1) - scores.amin(-1)).max() / 0.005) > ot_module.SCALING_SPAN
    res = sinkhorn(scores, mu, 0.005, 3)
    assert torch.isfinite(res.assignments).all()
    torch.testing.assert_close(res.assignments.sum(-1), torch.ones(32, dtype=torch.float64))
    torch.testing.assert_close(res.assignments, _pot_plan(scores, mu, 0.005, 3) * 32, rtol=1e-6, atol=1e-12)


def test_batched_equals_per_problem_loop() -> None:
    problems = [_problem(12, 30, seed=s) for s in range(3)]
    scores = torch.stack([s for s, _ in problems])  # (3, B, K)
    mus = torch.stack([m for _, m in problems])  # (3, K)
    shared = sinkhorn(scores, mus[0], 0.05, 5)
    per_problem_mu = sinkhorn(scores, mus, 0.05, 5)
    for i, (s, m) in enumerate(problems):
        torch.testing.assert_close(shared.assignments[i], sinkhorn(s, mus[0], 0.05, 5).assignments)
        one = sinkhorn(s, m, 0.05, 5)
        torch.testing.assert_close(per_problem_mu.assignments[i], one.assignments)
        torch.testing.assert_close(per_problem_mu.marginal_error[i], one.marginal_error)


def test_rejects_bad_input() -> None:
    scores, mu = _problem(4, 6, seed=3)
    with pytest.raises(ValueError, match="col_mass"):
        sinkhorn(scores, mu * 2, 0.1, 3)
    with pytest.raises(ValueError, match="epsilon"):
        sinkhorn(scores, mu, 0.0, 3)


def test_fixed_columns_reproduce_the_solve_and_assign_each_row_on_its_own():
    """assign_with_columns with the solve's own log_b gives back its assignments (Sinkhorn's last step
    is that row update), in both domains; a row's assignment does not depend on the other rows."""
    from pipeline.ot import assign_with_columns

    g = torch.Generator().manual_seed(3)
    scores = torch.nn.functional.normalize(torch.randn(12, 40, generator=g), dim=-1) @ \
        torch.nn.functional.normalize(torch.randn(40, 40, generator=g), dim=-1).T
    mu = torch.softmax(torch.randn(40, generator=g), 0)
    mu[0] = 0.0
    mu = mu / mu.sum()
    for eps in (0.05, 0.001):  # the scaling domain, then the log domain (span / eps > 700)
        solved = sinkhorn(scores, mu, eps, 5)
        again = assign_with_columns(scores, solved.log_b, eps)
        torch.testing.assert_close(again, solved.assignments.float(), atol=1e-5, rtol=1e-4)
        assert (again[:, 0] == 0).all()  # a zero-mass word stays empty
        alone = assign_with_columns(scores[3:4], solved.log_b, eps)
        torch.testing.assert_close(alone[0], again[3])
