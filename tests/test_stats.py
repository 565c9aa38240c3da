"""Bootstrap intervals over seeds and test items (pipeline/stats.py)."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.stats import bootstrap_means, interval, paired_difference


def test_a_constant_has_a_zero_width_interval():
    i = interval(np.full((3, 50), 7.0), n_boot=200)
    assert (i.mean, i.low, i.high) == (7.0, 7.0, 7.0)


def test_a_shift_by_one_is_exactly_one_and_real():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, 200))
    diff = paired_difference(a + 1.0, a, n_boot=300)
    assert diff.mean == pytest.approx(1.0) and diff.low == pytest.approx(1.0) and diff.high == pytest.approx(1.0)
    assert diff.excludes_zero
    # Unpaired noise of the same size: the difference's interval covers zero.
    noise = paired_difference(rng.normal(size=(3, 200)), rng.normal(size=(3, 200)), n_boot=500)
    assert noise.low < 0 < noise.high and not noise.excludes_zero


def test_the_interval_matches_the_normal_theory_width_for_items():
    """One seed of n iid N(0, 1) items: the mean's 95% interval is about ±1.96/sqrt(n)."""
    rng = np.random.default_rng(1)
    values = rng.normal(size=(1, 2000))
    i = interval(values, n_boot=2000)
    half = (i.high - i.low) / 2
    assert half == pytest.approx(1.96 / np.sqrt(2000), rel=0.15)
    assert i.low < values.mean() < i.high


def test_seeds_add_their_own_spread():
    """Items identical within a seed, seeds far apart: the interval spans the seeds, not zero width."""
    values = np.repeat(np.array([[0.0], [10.0], [20.0]]), 100, axis=1)
    means = bootstrap_means(values, n_boot=500)
    assert set(np.round(means, 6)) <= {round(v, 6) for v in np.arange(0, 20.01, 10 / 3)}
    i = interval(values, n_boot=500)
    assert i.low < 10 < i.high and i.high - i.low >= 10


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="seeds × items"):
        interval(np.zeros(5))
    with pytest.raises(ValueError, match="equal shapes"):
        paired_difference(np.zeros((2, 3)), np.zeros((2, 4)))


def test_holm_and_benjamini_hochberg_by_hand():
    from pipeline.stats import benjamini_hochberg, holm

    p = [0.01, 0.04, 0.03, 0.005]
    # Holm: sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 -> 0.02, 0.03, 0.06, 0.06 (monotone)
    assert holm(p) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # BH: sorted p_(k) * m / k = 0.02, 0.02, 0.04, 0.04, then the running minimum from the top
    assert benjamini_hochberg(p) == pytest.approx([0.02, 0.04, 0.04, 0.02])
    assert holm([]) == [] and benjamini_hochberg([]) == []


def test_paired_test_p_value_agrees_with_its_interval_and_with_normal_theory():
    from pipeline.stats import paired_test

    rng = np.random.default_rng(3)
    a = rng.normal(size=(1, 400))
    shifted, p = paired_test(a + 0.3, a + rng.normal(scale=1.0, size=(1, 400)), n_boot=2000)
    assert shifted.excludes_zero and p < 0.01
    same, p_same = paired_test(a, a + rng.normal(scale=1.0, size=(1, 400)), n_boot=2000)
    assert p_same > 0.05 and not same.excludes_zero
    # One seed of iid items: the Wald p uses the bootstrap SE, close to the t-test's p
    from scipy.stats import ttest_1samp

    d = rng.normal(loc=0.1, size=(1, 300))
    _, p_boot = paired_test(d, np.zeros_like(d), n_boot=4000)
    assert p_boot == pytest.approx(ttest_1samp(d[0], 0.0).pvalue, rel=0.35)
    assert paired_test(np.ones((2, 5)), np.ones((2, 5)))[1] == 1.0
