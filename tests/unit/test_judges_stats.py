"""Pairwise judging in both orders, and bootstrap confidence intervals."""

from collections.abc import Sequence

import numpy as np
import pytest

from pipeline.evaluation.judges import Verdict, judge_both_orders
from pipeline.evaluation.stats import bootstrap_ci, win_rate


class AlwaysFirstJudge:
    """A judge with pure position bias: whatever comes first wins."""

    name = "always-first"

    def judge(self, prompts: Sequence[str], first: Sequence[str], second: Sequence[str]) -> list[Verdict]:
        return ["A"] * len(prompts)


class ScriptedJudge:
    """Answers from fixed lists, one per call: policy-first order, then baseline-first."""

    name = "scripted"

    def __init__(self, *answers: list[str]):
        self._answers = list(answers)

    def judge(self, prompts, first, second):
        return self._answers.pop(0)


def test_position_bias_scores_every_pair_as_a_tie():
    result = judge_both_orders(AlwaysFirstJudge(), ["p"] * 5, [" x"] * 5, [" y"] * 5)
    np.testing.assert_array_equal(result.scores, np.full(5, 0.5))
    assert (result.wins, result.ties, result.losses, result.unparsed) == (0, 5, 0, 0)
    assert result.verdicts_ab == ["A"] * 5 and result.verdicts_ba == ["A"] * 5


def test_both_orders_counts_wins_losses_ties_and_unparsed():
    ab = ["A", "B", "tie", "A", "unparsed", "A"]
    ba = ["B", "A", "tie", "A", "B", "unparsed"]
    result = judge_both_orders(ScriptedJudge(ab, ba), ["p"] * 6, [" x"] * 6, [" y"] * 6)
    np.testing.assert_array_equal(result.scores, [1.0, 0.0, 0.5, 0.5, 0.5, 0.5])
    assert (result.wins, result.losses, result.ties, result.unparsed) == (1, 1, 2, 2)
    assert result.wins + result.losses + result.ties + result.unparsed == result.n == 6


def test_both_orders_rejects_verdicts_outside_the_vocabulary():
    with pytest.raises(ValueError, match="outside"):
        judge_both_orders(ScriptedJudge(["A"], ["first"]), ["p"], [" x"], [" y"])
    with pytest.raises(ValueError, match="verdicts for"):
        judge_both_orders(ScriptedJudge(["A"], []), ["p"], [" x"], [" y"])


def test_bootstrap_ci_contains_the_mean_and_is_deterministic_by_seed():
    values = np.random.default_rng(1).normal(size=200)
    mean, low, high = bootstrap_ci(values, seed=3)
    assert mean == pytest.approx(values.mean())
    assert low < mean < high
    assert bootstrap_ci(values, seed=3) == (mean, low, high)
    assert bootstrap_ci(values, seed=4) != (mean, low, high)


def test_bootstrap_ci_narrows_with_more_values():
    rng = np.random.default_rng(2)
    widths = []
    for n in (25, 400):
        _, low, high = bootstrap_ci(rng.normal(size=n))
        widths.append(high - low)
    # The width shrinks like 1/sqrt(n): 16x the data, about a quarter of the width.
    assert widths[1] < 0.4 * widths[0]


def test_bootstrap_ci_of_one_value_is_that_value():
    assert bootstrap_ci(np.array([0.7])) == (0.7, 0.7, 0.7)
    with pytest.raises(ValueError, match="bootstrap_ci needs at least one value"):
        bootstrap_ci(np.array([]))


def test_win_rate_of_70_wins_in_100_matches_the_binomial_interval():
    scores = np.array([1.0] * 70 + [0.0] * 30)
    result = win_rate(scores)
    assert set(result) == {"win_rate", "win_rate_ci_low", "win_rate_ci_high"}
    assert result["win_rate"] == pytest.approx(0.7)
    # Normal approximation: 0.7 +- 1.96 * sqrt(0.7 * 0.3 / 100) = (0.610, 0.790).
    assert result["win_rate_ci_low"] == pytest.approx(0.61, abs=0.02)
    assert result["win_rate_ci_high"] == pytest.approx(0.79, abs=0.02)
