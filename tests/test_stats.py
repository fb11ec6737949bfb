"""Paired statistics on hand-made scores with known answers."""

import math

import pytest

from molf.lab import stats


def test_mcnemar_exact_p_on_a_known_table():
    # 10 discordant items, 9 for a: p = 2 * (C(10,0) + C(10,1)) / 2^10 = 22 / 1024
    a = [1] * 9 + [0] * 1 + [1] * 5 + [0] * 5
    b = [0] * 9 + [1] * 1 + [1] * 5 + [0] * 5
    result = stats.mcnemar(a, b)
    assert result.p == pytest.approx(22 / 1024)
    assert result.diff == pytest.approx(8 / 20) and result.n == 20
    assert stats.verdict(result) == "reproduced"


def test_mcnemar_without_discordant_items_is_p_one():
    result = stats.mcnemar([1, 0, 1], [1, 0, 1])
    assert result.p == 1.0 and result.diff == 0.0
    assert stats.verdict(result) == "not reproduced"  # b is exactly as good: the interval is [0, 0]


def test_paired_bootstrap_sees_a_consistent_small_gain_that_is_hidden_by_item_variance():
    # Items range widely in difficulty; a is always 0.05 better on the same item.
    b = [i / 50 for i in range(50)]
    a = [x + 0.05 for x in b]
    result = stats.paired_bootstrap(a, b)
    assert result.diff == pytest.approx(0.05)
    assert result.low == pytest.approx(0.05) and result.high == pytest.approx(0.05)
    assert result.p < 0.01 and stats.verdict(result) == "reproduced"


def test_paired_bootstrap_of_noise_is_inconclusive_and_deterministic():
    a = [1, 0, 1, 0, 1, 1, 0, 0, 1, 0]
    b = [0, 1, 1, 0, 0, 1, 1, 0, 1, 0]
    first, second = stats.paired_bootstrap(a, b, seed=3), stats.paired_bootstrap(a, b, seed=3)
    assert first == second
    assert first.low < 0 < first.high and first.p > 0.5
    assert stats.verdict(first) == "inconclusive"
    assert "diff +0.000" in first.line("molf", "lora")


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="same items: got 2 and 3"):
        stats.paired_bootstrap([1, 0], [1, 0, 1])
    with pytest.raises(ValueError, match="no paired items"):
        stats.mcnemar([], [])
    with pytest.raises(ValueError, match="NaN or inf"):
        stats.paired_bootstrap([1.0, math.nan], [0.0, 1.0])
    with pytest.raises(ValueError, match="needs 0/1 scores"):
        stats.mcnemar([0.5, 1], [0, 1])
    with pytest.raises(ValueError, match="resamples must be an integer >= 100, got 10"):
        stats.paired_bootstrap([1], [0], resamples=10)
    with pytest.raises(ValueError, match=r"one per item \(1-D\) or seeds x items \(2-D\), got shape \(1, 1, 2\)"):
        stats.paired_bootstrap([[[1, 0]]], [[[1, 0]]])
    with pytest.raises(ValueError, match="same items: got 2 x 3 and 3 x 3"):
        stats.paired_bootstrap([[1, 0, 1]] * 2, [[1, 0, 1]] * 3)


def seed_spread(deltas, items: int = 50):
    """seeds x items scores: b spans the items' difficulty, a = b + that seed's delta on every item."""
    b = [[i / items for i in range(items)] for _ in deltas]
    a = [[x + delta for x in row] for row, delta in zip(b, deltas)]
    return a, b


def test_seed_to_seed_spread_widens_the_interval_that_pooled_items_hide():
    # Runs differ by seed far more than items differ within a run: pooling the 250 (seed, item) pairs
    # as independent items makes the mean gain look certain; resampling seeds shows it is not.
    a, b = seed_spread([0.20, -0.10, 0.15, -0.05, 0.10])
    pooled = stats.paired_bootstrap([x for row in a for x in row], [x for row in b for x in row])
    by_seed = stats.paired_bootstrap(a, b)
    assert by_seed.diff == pytest.approx(pooled.diff) == pytest.approx(0.06)
    assert stats.verdict(pooled) == "reproduced" and pooled.low > 0.03
    assert by_seed.low < 0 < by_seed.high and stats.verdict(by_seed) == "inconclusive"
    assert by_seed.n == pooled.n == 250


def test_identical_seeds_add_no_spread_and_one_seed_is_the_item_bootstrap():
    a = [1, 0, 1, 1, 0, 1, 1, 0, 1, 1, 0, 1]
    b = [0, 0, 1, 0, 0, 1, 1, 0, 0, 1, 1, 0]
    one = stats.paired_bootstrap(a, b)
    assert stats.paired_bootstrap([a], [b]) == one
    three = stats.paired_bootstrap([a] * 3, [b] * 3)  # the same item draw; every seed draw gives the same row
    assert (three.diff, three.low, three.high, three.p) == pytest.approx((one.diff, one.low, one.high, one.p))


def test_compare_uses_exact_mcnemar_for_one_seed_and_the_bootstrap_across_seeds():
    a = [1] * 9 + [0] * 1 + [1] * 5 + [0] * 5
    b = [0] * 9 + [1] * 1 + [1] * 5 + [0] * 5
    assert stats.compare(a, b).p == pytest.approx(22 / 1024)  # McNemar's exact p
    assert stats.compare([a, a], [b, b]) == stats.paired_bootstrap([a, a], [b, b])
    assert stats.compare([0.5, 1.0], [0.0, 1.0]) == stats.paired_bootstrap([0.5, 1.0], [0.0, 1.0])
    with pytest.raises(ValueError, match="takes one seed's scores; got 2 seeds"):
        stats.mcnemar([a, a], [b, b])
