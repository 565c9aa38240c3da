import numpy as np
import pytest

from pipeline.tasks.retrieval_metrics import (
    rank_of_first_relevant,
    relevance_from_texts,
    retrieval_metrics,
)

# Image 0 and image 1 share the caption "a red circle"; text 3 repeats it in other case.
IMAGE_CAPTIONS = [["a red circle", "a circle"], ["a red circle"], ["a blue square"]]
TEXTS = ["a red circle", " A circle", "a blue square", "A Red Circle"]
SIMILARITY = np.array(
    [
        [0.2, 0.9, 0.9, 0.1],  # img0: best relevant t1 = 0.9 ties irrelevant t2 -> rank 2
        [0.1, 0.8, 0.5, 0.3],  # img1: best relevant t3 = 0.3, t1 and t2 above -> rank 3
        [0.4, 0.4, 0.4, 0.4],  # img2: constant scores -> worst rank 4
    ]
)


def test_relevance_from_texts_with_duplicate_captions():
    expected = np.array(
        [
            [True, True, False, True],
            [True, False, False, True],
            [False, False, True, False],
        ]
    )
    np.testing.assert_array_equal(relevance_from_texts(IMAGE_CAPTIONS, TEXTS), expected)


def test_hand_computed_ranks_both_directions():
    relevant = relevance_from_texts(IMAGE_CAPTIONS, TEXTS)
    np.testing.assert_array_equal(rank_of_first_relevant(SIMILARITY, relevant), [2, 3, 4])
    # t0: img2 (0.4) beats best relevant img0 (0.2) -> 2; t1: img0 wins -> 1;
    # t2: img0, img1 beat img2 -> 3; t3: img2 (0.4) beats img1 (0.3) -> 2.
    np.testing.assert_array_equal(rank_of_first_relevant(SIMILARITY.T, relevant.T), [2, 1, 3, 2])


def test_hand_computed_metrics():
    m = retrieval_metrics(SIMILARITY, relevance_from_texts(IMAGE_CAPTIONS, TEXTS))
    assert m == pytest.approx(
        {
            "i2t_R@1": 0.0, "i2t_R@5": 100.0, "i2t_R@10": 100.0,
            "i2t_median_rank": 3.0, "i2t_mean_rank": 3.0,
            "t2i_R@1": 25.0, "t2i_R@5": 100.0, "t2i_R@10": 100.0,
            "t2i_median_rank": 2.0, "t2i_mean_rank": 2.0,
        }
    )


def test_recall_at_5_and_10_cut_offs():
    n = 12
    relevant = np.roll(np.eye(n, dtype=bool), 6, axis=1)  # image i <-> text (i + 6) % n
    scores = np.where(relevant, 100.0, 0.0)  # every image ranks its text first ...
    scores[0] = np.arange(n, 0, -1)  # ... except image 0: text c has rank c + 1, so rank 7
    m = retrieval_metrics(scores, relevant)
    assert m["i2t_R@1"] == m["i2t_R@5"] == pytest.approx(100.0 * 11 / 12)
    assert m["i2t_R@10"] == 100.0
    assert m["i2t_mean_rank"] == pytest.approx((7 + 11) / 12)


def test_constant_scores_give_worst_rank():
    n = 20
    relevant = np.eye(n, dtype=bool)
    ranks = rank_of_first_relevant(np.zeros((n, n)), relevant)
    np.testing.assert_array_equal(ranks, np.full(n, n))
    m = retrieval_metrics(np.ones((n, n)), relevant)
    assert m["i2t_R@10"] == 0.0 and m["t2i_median_rank"] == n


def test_query_without_relevant_candidate_is_an_error():
    relevant = np.array([[True, False], [False, False]])
    with pytest.raises(ValueError, match="query 1"):
        rank_of_first_relevant(np.zeros((2, 2)), relevant)
    # Text 1 is relevant to no image: the error names the direction.
    with pytest.raises(ValueError, match="t2i: query 1"):
        retrieval_metrics(np.zeros((2, 2)), np.array([[True, False], [True, False]]))


def test_nan_scores_are_an_error():
    with pytest.raises(ValueError, match="NaN"):
        rank_of_first_relevant(np.array([[np.nan, 0.0]]), np.array([[True, False]]))


def test_every_scorer_is_inductive():
    """A query's scores do not change when other test items leave the gallery (the transductive
    variant, one Sinkhorn over the test set, failed this)."""
    import torch
    import torch.nn.functional as F

    from pipeline.prototypes import Prototypes
    from pipeline.tasks.retrieval import TrainingFit, fit_columns, scorer_similarities

    g = torch.Generator().manual_seed(0)
    E = F.normalize(torch.randn(50, 8, generator=g), dim=-1)
    protos = Prototypes(path=None, key="", prototypes=E, token_ids=torch.arange(50), prior=torch.full((50,), 0.02),
                        text_index={}, z_t=E[:0], attrs={})
    train_v, train_t = (F.normalize(torch.randn(30, 8, generator=g), dim=-1) for _ in range(2))
    fit = TrainingFit(train_v.mean(0), train_t.mean(0), fit_columns(train_v, protos, 0.05, 3),
                      fit_columns(train_t, protos, 0.05, 3), 0.05)
    z_v, z_t = (F.normalize(torch.randn(n, 8, generator=g), dim=-1) for n in (10, 6))
    full = scorer_similarities(z_v, z_t, protos, fit)
    part = scorer_similarities(z_v[:4], z_t[2:5], protos, fit)
    assert set(full) == {"cosine", "assignment", "centred"}
    for scorer in full:
        torch.testing.assert_close(part[scorer], full[scorer][:4, 2:5])


def test_chance_recall_counts_draws_without_replacement():
    from pipeline.tasks.retrieval_metrics import chance_recall

    relevant = np.zeros((2, 10), dtype=bool)
    relevant[0, 0] = True  # 1 relevant of 10
    relevant[1, :2] = True  # 2 relevant of 10
    assert chance_recall(relevant, 1) == pytest.approx(100 * (0.1 + 0.2) / 2)
    assert chance_recall(relevant, 5) == pytest.approx(100 * (0.5 + (1 - (8 * 7 * 6 * 5 * 4) / (10 * 9 * 8 * 7 * 6))) / 2)
