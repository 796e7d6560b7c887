"""Length-controlled win rate: a logistic fit of outcome on length difference, read at zero difference."""

import numpy as np
import pytest

from pipeline.evaluation.length_control import _L2, _fit_logistic, length_controlled_win_rate

KEYS = {"lc_win_rate", "lc_win_rate_ci_low", "lc_win_rate_ci_high", "length_slope"}


def _check_interval(result: dict) -> None:
    assert KEYS <= set(result)
    assert 0.0 <= result["lc_win_rate_ci_low"] <= result["lc_win_rate"] <= result["lc_win_rate_ci_high"] <= 1.0


def test_wins_explained_by_length_alone_give_one_half():
    # Policy answers run ~150 characters longer; the judge's preference depends on length only.
    rng = np.random.default_rng(0)
    length_diff = rng.normal(150.0, 200.0, size=1000)
    scores = (rng.random(1000) < 1.0 / (1.0 + np.exp(-length_diff / 50.0))).astype(np.float64)
    result = length_controlled_win_rate(scores, length_diff, n_boot=400)
    assert scores.mean() > 0.7  # the raw win rate credits length
    assert result["lc_win_rate"] == pytest.approx(0.5, abs=0.06)
    assert result["lc_win_rate_ci_low"] < 0.5 < result["lc_win_rate_ci_high"]
    assert result["length_slope"] > 1.0
    _check_interval(result)


def test_wins_exactly_when_longer_give_one_half():
    # Deterministic: the policy wins exactly when it is longer; it is longer in 80 of 100 comparisons,
    # by amounts mirrored by those of the 20 where it is shorter. The data are separable: the ridge
    # keeps the fit finite and the boundary sits at zero.
    length_diff = np.concatenate([np.arange(1, 81), -np.arange(1, 21)]).astype(np.float64)
    scores = (length_diff > 0).astype(np.float64)
    result = length_controlled_win_rate(scores, length_diff, n_boot=200)
    assert scores.mean() == 0.8
    assert result["lc_win_rate"] == pytest.approx(0.5, abs=1e-3)
    assert np.isfinite(result["length_slope"]) and result["length_slope"] > 5.0
    _check_interval(result)


def test_wins_independent_of_length_keep_the_raw_rate():
    rng = np.random.default_rng(1)
    length_diff = rng.normal(100.0, 80.0, size=800)  # policy mostly longer, but the judge ignores length
    scores = rng.choice([0.0, 0.5, 1.0], p=[0.2, 0.15, 0.65], size=800)  # ties are soft labels
    result = length_controlled_win_rate(scores, length_diff, n_boot=400)
    assert result["lc_win_rate"] == pytest.approx(scores.mean(), abs=0.03)
    assert abs(result["length_slope"]) < 0.3
    _check_interval(result)


def test_fit_is_the_ridge_optimum():
    # The gradient of the penalised soft-label cross-entropy vanishes at the fit.
    rng = np.random.default_rng(2)
    z = rng.normal(size=(3, 200))
    y = rng.choice([0.0, 0.5, 1.0], size=(3, 200))
    w = _fit_logistic(z, y)
    p = 1.0 / (1.0 + np.exp(-(w[:, :1] + w[:, 1:] * z)))
    grad = np.stack([(p - y).mean(axis=1), ((p - y) * z).mean(axis=1)], axis=1) + _L2 * w
    np.testing.assert_allclose(grad, 0.0, atol=1e-9)


def test_deterministic_for_a_seed():
    rng = np.random.default_rng(3)
    length_diff, scores = rng.normal(size=100), rng.choice([0.0, 1.0], size=100)
    a = length_controlled_win_rate(scores, length_diff, n_boot=100, seed=7)
    b = length_controlled_win_rate(scores, length_diff, n_boot=100, seed=7)
    assert a == b


@pytest.mark.parametrize(
    "scores, length_diff",
    [
        ([1.0], [12.0]),  # one comparison
        ([1.0, 0.0, 0.5, 1.0], [5.0, 5.0, 5.0, 5.0]),  # all the same length difference
        ([1.0, 0.0, 0.5, 1.0], [0.0, 0.0, 0.0, 0.0]),  # all the same length
        ([1.0, 1.0, 1.0], [-3.0, 0.0, 8.0]),  # the policy always wins: no finite intercept
    ],
)
def test_degenerate_inputs_fall_back_to_the_mean(scores, length_diff):
    result = length_controlled_win_rate(np.array(scores), np.array(length_diff), n_boot=50)
    assert result["lc_win_rate"] == pytest.approx(np.mean(scores))
    assert result["length_slope"] == 0.0
    _check_interval(result)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="at least one"):
        length_controlled_win_rate(np.array([]), np.array([]))
    with pytest.raises(ValueError, match="differ in length"):
        length_controlled_win_rate(np.array([1.0, 0.0]), np.array([1.0]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        length_controlled_win_rate(np.array([2.0, 0.0]), np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="NaN"):
        length_controlled_win_rate(np.array([1.0, 0.0]), np.array([np.nan, 2.0]))
