"""Held-out implicit-reward measures: pair accuracy (DPO) and label separation (KTO), against hand values."""

import itertools

import numpy as np
import pytest

from pipeline.evaluation.held_out import describe, pair_accuracy, unpaired_separation


def test_pair_accuracy_counts_pairs_whose_chosen_reward_is_larger():
    # margins / beta: (0 - 1) - (0 - 0) = -1, (2 - 0) - (1 - 0) = 1, (1 - 0) - (0 - 0) = 1
    result = pair_accuracy([0.0, 2.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0], beta=0.5)
    assert result["pairs"] == 3 and result["accuracy"] == pytest.approx(2 / 3)
    assert result["margin_mean"] == pytest.approx(0.5 * 1 / 3)
    assert describe("policy", result) == (
        "Implicit-reward accuracy of policy on 3 held-out pairs: 0.667 (0.5 is chance); "
        "mean margin beta * (log-ratio chosen - log-ratio rejected): 0.1667."
    )


def test_unpaired_separation_is_the_probability_a_desirable_reward_wins():
    policy = np.array([3.0, 1.0, 2.0, 0.0, 2.0])
    ref = np.zeros(5)
    desirable = [True, True, False, False, True]  # rewards: good 3, 1, 2; bad 2, 0
    result = unpaired_separation(policy, ref, desirable, beta=0.1)
    # Every (good, bad) combination by hand: 3>2, 3>0, 1<2, 1>0, 2=2 (a half), 2>0 -> 4.5 of 6.
    wins = sum(1.0 if g > b else 0.5 if g == b else 0.0 for g, b in itertools.product([3, 1, 2], [2, 0]))
    assert wins == 4.5
    assert result["auc"] == pytest.approx(4.5 / 6)
    assert (result["rows"], result["desirable"], result["undesirable"]) == (5, 3, 2)
    assert result["reward_desirable_mean"] == pytest.approx(0.2) and result["reward_undesirable_mean"] == pytest.approx(
        0.1
    )
    assert "P(a desirable completion's reward > an undesirable one's) = 0.750" in describe("kto", result)


def test_unpaired_separation_is_undefined_with_one_label_and_says_so():
    result = unpaired_separation([1.0, 2.0], [0.0, 0.0], [True, True], beta=1.0)
    assert result["auc"] is None and result["reward_undesirable_mean"] is None
    assert "all of one label (2 desirable, 0 undesirable)" in describe("kto", result)
