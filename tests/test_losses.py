"""Assignment prediction loss and InfoNCE."""
import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.losses import assignment_prediction_loss, info_nce_loss
from pipeline.ot import sinkhorn

B, D, K = 8, 16, 50
AP_KW = dict(epsilon=0.05, n_iters=3, tau=0.1)


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z_v = F.normalize(torch.randn(B, D, generator=g), dim=-1)
    z_t = F.normalize(torch.randn(B, D, generator=g), dim=-1)
    prototypes = F.normalize(torch.randn(K, D, generator=g), dim=-1)
    prior = torch.rand(K, generator=g) + 0.1
    return z_v, z_t, prototypes, prior / prior.sum()


def test_ap_loss_gradient_reaches_z_v_only() -> None:
    z_v, z_t, prototypes, prior = _inputs()
    z_v.requires_grad_(True)
    prototypes.requires_grad_(True)  # even if a caller forgets to freeze Ê, the loss must not train it
    before = prototypes.detach().clone()
    loss = assignment_prediction_loss(z_v, z_t, prototypes, prior, **AP_KW)
    loss.total.backward()
    assert z_v.grad is not None and torch.isfinite(z_v.grad).all() and z_v.grad.abs().sum() > 0
    assert prototypes.grad is None and torch.equal(prototypes, before)
    assert z_t.grad is None and not loss.text_term.requires_grad
    for term in (loss.visual_term, loss.text_term):
        assert torch.isfinite(term) and term.item() > 0
    torch.testing.assert_close(loss.total, 0.5 * (loss.visual_term + loss.text_term))
    assert 0 <= loss.marginal_error < 2


def test_ap_loss_values_match_definition() -> None:
    z_v, z_t, prototypes, prior = _inputs(1)
    loss = assignment_prediction_loss(z_v, z_t, prototypes, prior, **AP_KW)
    q_t = sinkhorn(z_t @ prototypes.T, prior, AP_KW["epsilon"], AP_KW["n_iters"]).assignments
    log_p_v = torch.log(torch.softmax(z_v @ prototypes.T / AP_KW["tau"], dim=-1))
    torch.testing.assert_close(loss.visual_term, -(q_t * log_p_v).sum(-1).mean())
    # swapping the modalities swaps the two terms
    swapped = assignment_prediction_loss(z_t, z_v, prototypes, prior, **AP_KW)
    torch.testing.assert_close(swapped.visual_term, loss.text_term)
    torch.testing.assert_close(swapped.text_term, loss.visual_term)


def test_sgd_on_z_v_reduces_visual_term() -> None:
    z_v, z_t, prototypes, prior = _inputs(2)
    param = torch.nn.Parameter(z_v.clone())
    opt = torch.optim.SGD([param], lr=0.05)
    history = []
    for _ in range(10):
        loss = assignment_prediction_loss(F.normalize(param, dim=-1), z_t, prototypes, prior, **AP_KW)
        history.append(loss.visual_term.item())
        opt.zero_grad()
        loss.visual_term.backward()
        opt.step()
    assert history[-1] < history[0] - 0.1, history


def test_info_nce_alignment_beats_random() -> None:
    z_v, z_t, _, _ = _inputs(3)
    aligned = info_nce_loss(z_v, z_v.clone(), logit_scale=10.0)
    random = info_nce_loss(z_v, z_t, logit_scale=10.0)
    assert aligned < random
    # no duplicates: text_ids = arange is plain InfoNCE
    torch.testing.assert_close(info_nce_loss(z_v, z_t, 10.0, text_ids=torch.arange(B)), random)


def test_info_nce_multi_positive_hand_computed() -> None:
    # samples 0 and 1 are marked as positives of each other (equal text_ids); sample 2 stands alone
    z_v = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]], dtype=torch.float64)
    z_t = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]], dtype=torch.float64)
    text_ids = torch.tensor([7, 7, 3])
    T = 0.5
    got = info_nce_loss(z_v, z_t, 1 / T, text_ids=text_ids)

    sim = [[sum(a * b for a, b in zip(v, t)) / T for t in z_t.tolist()] for v in z_v.tolist()]
    pos = [[1.0 if text_ids[i] == text_ids[j] else 0.0 for j in range(3)] for i in range(3)]

    def ce(logits_rows: list[list[float]]) -> float:
        total = 0.0
        for i, row in enumerate(logits_rows):
            log_z = math.log(sum(math.exp(x) for x in row))
            n_pos = sum(pos[i])
            total += -sum(pos[i][j] / n_pos * (row[j] - log_z) for j in range(3))
        return total / 3

    sim_t = [list(col) for col in zip(*sim)]
    expected = 0.5 * (ce(sim) + ce(sim_t))
    assert math.isfinite(got.item())
    assert abs(got.item() - expected) < 1e-12
    assert abs(info_nce_loss(z_v, z_t, 1 / T).item() - got.item()) > 1e-3  # single-positive differs


def test_info_nce_identical_duplicate_captions() -> None:
    """Duplicates with the *same* cached z_t: multi-positive and plain InfoNCE are the same function.

    A negative identical to the positive cannot be pushed away (it only adds log(n_dup) to the
    loss), so text_ids only matter when positives have different text vectors.
    """
    z_v = F.normalize(torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5)), dim=-1)
    z_t = F.normalize(torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]], dtype=torch.float64), dim=-1)
    multi = info_nce_loss(z_v, z_t, 5.0, text_ids=torch.tensor([0, 0, 1, 2]))
    assert torch.isfinite(multi)
    torch.testing.assert_close(multi, info_nce_loss(z_v, z_t, 5.0))


def test_info_nce_equals_a_loop_over_queries() -> None:
    """Plain InfoNCE recomputed query by query: -log softmax of the matching pair, both directions."""
    g = torch.Generator().manual_seed(11)
    z_v = F.normalize(torch.randn(5, 4, dtype=torch.float64, generator=g), dim=-1)
    z_t = F.normalize(torch.randn(5, 4, dtype=torch.float64, generator=g), dim=-1)
    t = 0.3
    i2t = [-(z_v[i] @ z_t[i] / t - torch.logsumexp(z_v[i] @ z_t.T / t, 0)) for i in range(5)]
    t2i = [-(z_t[j] @ z_v[j] / t - torch.logsumexp(z_t[j] @ z_v.T / t, 0)) for j in range(5)]
    expected = 0.5 * (torch.stack(i2t).mean() + torch.stack(t2i).mean())
    torch.testing.assert_close(info_nce_loss(z_v, z_t, 1 / t), expected)


def test_logit_scale_starts_at_one_over_temperature_learns_and_is_clamped_at_100() -> None:
    """CLIP's learnable logit scale: init 1/0.07; when aligned pairs are separable, raising the scale lowers
    InfoNCE, so the optimiser raises it; the clamp keeps it at most 100."""
    from pipeline.losses import LogitScale

    scale = LogitScale(0.07)
    assert scale().item() == pytest.approx(1 / 0.07)
    z = F.normalize(torch.randn(8, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    opt = torch.optim.SGD(scale.parameters(), lr=100.0)
    info_nce_loss(z, z, scale()).backward()
    opt.step()
    assert scale().item() > 1 / 0.07  # aligned pairs: a sharper softmax lowers the loss
    with torch.no_grad():
        scale.log_scale.fill_(10.0)
    scale.clamp_()
    assert scale().item() == pytest.approx(100.0)
    fixed = LogitScale(0.07, learnable=False)
    assert not fixed.log_scale.requires_grad


# ---------------------------------------------------------------- the authors' released objective
def authors_word_distribution(token_rows: list[list[int]], vocab_size: int) -> torch.Tensor:
    """Transcribed from park-jungin/vlap (commit f206b6c, "generate word distributions"): padded rows of
    caption token ids (pad 0); indexing with repeated ids adds once per caption."""
    width = max(len(r) for r in token_rows)
    labels = torch.tensor([r + [0] * (width - len(r)) for r in token_rows])
    vocab_dist = torch.zeros(vocab_size, dtype=torch.float64)
    for row in labels[:]:
        vocab_dist[row] += 1
    vocab_dist[0] = 0.
    return (vocab_dist / vocab_dist.sum()).unsqueeze(1)  # (K, 1), as the script loads it


def authors_sinkhorn(out: torch.Tensor, vocab_dist: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    """Transcribed from the released train.py's distributed_sinkhorn, 2-D branch, one process."""
    Q = torch.exp(out / epsilon).t()
    B = Q.shape[1]
    for _ in range(iterations):
        Q *= (vocab_dist / 2.5e-1).softmax(dim=0)
        Q /= torch.sum(Q, dim=0, keepdim=True)
        Q /= B
    Q *= B
    return Q.t()


def test_released_prior_and_targets_equal_a_transcription_of_the_authors_loop() -> None:
    import numpy as np

    from pipeline.config import PrototypesConfig
    from pipeline.ot import released_targets
    from pipeline.prototypes import word_prior

    g = torch.Generator().manual_seed(3)
    rows = [torch.randint(1, K, (int(n),), generator=g).tolist() for n in torch.randint(2, 9, (40,), generator=g)]
    rows[0] += [rows[0][0]] * 3 + [0]  # a repeated id counts once; a pad id in the ids counts nothing
    df = np.zeros(K)
    for ids in rows:  # document frequency, as pipeline.prototypes.document_frequency counts it
        df[np.unique(ids)] += 1
    vocab_dist = authors_word_distribution(rows, K)
    mu = word_prior(df, np.arange(K), [0], PrototypesConfig(prior="released", temperature=0.25), pad_id=0)
    np.testing.assert_allclose(mu, (vocab_dist / 0.25).softmax(dim=0).squeeze(1).numpy(), rtol=1e-12)
    assert mu.max() / mu.min() < math.exp(1 / 0.25)  # nearly uniform, as the recipe is

    z_v, _, prototypes, _ = _inputs(4)
    scores = (z_v @ prototypes.T).double()  # cosines: exp(S / 0.05) stays finite for the transcription
    for epsilon, iterations in ((0.05, 3), (0.1, 1)):
        expected = authors_sinkhorn(scores.clone(), vocab_dist, epsilon, iterations)
        got = released_targets(scores, torch.from_numpy(mu), epsilon, iterations)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-14)
    # batch-independent: a sample's target does not move when the others change (no transport coupling)
    torch.testing.assert_close(released_targets(scores[:3], torch.from_numpy(mu), 0.05, 3),
                               released_targets(scores, torch.from_numpy(mu), 0.05, 3)[:3])
    # the paper's transport plan does depend on the batch, so the two objectives differ
    plan = sinkhorn(scores, torch.from_numpy(mu), 0.05, 3).assignments
    assert not torch.allclose(plan, released_targets(scores, torch.from_numpy(mu), 0.05, 3), atol=1e-3)


def test_released_target_trains_through_the_ap_loss() -> None:
    z_v, z_t, prototypes, prior = _inputs(5)
    z_v.requires_grad_(True)
    loss = assignment_prediction_loss(z_v, z_t, prototypes, prior, target="released", **AP_KW)
    loss.total.backward()
    assert z_v.grad.abs().sum() > 0 and torch.isfinite(loss.total)
    transport = assignment_prediction_loss(z_v.detach(), z_t, prototypes, prior, **AP_KW)
    assert not math.isclose(loss.text_term.item(), transport.text_term.item(), rel_tol=1e-4)
    assert 0 < loss.marginal_error < 2  # reported: the released target does not hold the word marginal
