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
