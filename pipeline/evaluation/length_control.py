"""Length-controlled win rate: the win rate a judge would give if policy and baseline answers were equally
long.

LLM judges favour longer answers, and DPO tends to lengthen them, so a raw win rate mixes "better" with
"longer". In the spirit of AlpacaEval 2's length control (Dubois et al., 2024), we regress each
comparison's outcome on the length difference and read the win rate off the fit at a difference of zero:

    P(policy wins | d) = sigmoid(intercept + slope * d / s),   d = len(policy) - len(baseline),

with s the standard deviation of d over the comparisons. The length-controlled win rate is
sigmoid(intercept). Outcomes are the both-orders scores of `judge_both_orders` (1 win, 0.5 tie, 0 loss),
used as soft labels in the cross-entropy. d is scaled but deliberately not centred: centring would move
the intercept to the mean length difference, which is the very confounder we want to remove.
"""

from __future__ import annotations

import numpy as np

from pipeline.evaluation.stats import (
    bootstrap_ci,
    check_bootstrap_args,
    cluster_ids,
    cluster_resample_counts,
    percentile_interval,
)

# Ridge on the mean loss: enough to keep the fit finite when lengths separate wins from losses exactly,
# small enough to move a well-posed estimate by well under 0.1%.
_L2 = 1e-4
_MAX_NEWTON_STEPS = 100
# Rows (bootstrap replicates x comparisons) per batched fit, so that memory stays bounded for large n.
_MAX_CELLS_PER_CHUNK = 2_000_000


def length_controlled_win_rate(
    scores: np.ndarray,
    length_diff: np.ndarray,
    *,
    groups: np.ndarray | None = None,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, float]:
    """Win rate at zero length difference, with a bootstrap interval over `groups` (the prompt of each
    comparison, resampled whole as in stats.py; None resamples single comparisons).

    scores: shape (n,), each in [0, 1] (1 policy won, 0.5 tie, 0 lost). length_diff: shape (n,), policy
    length minus baseline length, in tokens or characters. Returns lc_win_rate, lc_win_rate_ci_low,
    lc_win_rate_ci_high, length_slope (log-odds of a win per standard deviation of length difference) and
    length_diff_std (that standard deviation, in the units of length_diff).

    When the fit is not identified (n == 1, all length differences equal, or all scores equal) the plain
    mean and its bootstrap interval are returned with slope 0.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    length_diff = np.asarray(length_diff, dtype=np.float64).reshape(-1)
    if scores.size == 0:
        raise ValueError("length_controlled_win_rate needs at least one comparison")
    if scores.shape != length_diff.shape:
        raise ValueError(f"scores and length_diff differ in length: {scores.size} vs {length_diff.size}")
    if not (np.all(np.isfinite(scores)) and np.all(np.isfinite(length_diff))):
        raise ValueError("length_controlled_win_rate got NaN or infinite values")
    if np.any(scores < 0.0) or np.any(scores > 1.0):
        raise ValueError("scores must lie in [0, 1]")
    check_bootstrap_args(level=level, n_boot=n_boot)

    n = scores.size
    scale = float(length_diff.std())
    if n < 2 or scale == 0.0 or np.all(scores == scores[0]):
        mean, low, high = bootstrap_ci(scores, groups=groups, n_boot=n_boot, level=level, seed=seed)
        return {
            "lc_win_rate": mean,
            "lc_win_rate_ci_low": low,
            "lc_win_rate_ci_high": high,
            "length_slope": 0.0,
            "length_diff_std": scale,
        }

    z = length_diff / scale  # (n,)
    fit = _fit_logistic(z[None, :], scores[None, :])[0]
    intercept, slope = fit
    estimate = float(_sigmoid(intercept))

    # A replicate weights each comparison by how often its prompt was drawn: the fit on the resampled data.
    ids, num_clusters = cluster_ids(groups, n)
    rng = np.random.default_rng(seed)
    boot = [
        _sigmoid(
            _fit_logistic(
                np.broadcast_to(z, (len(c), n)),
                np.broadcast_to(scores, (len(c), n)),
                c[:, ids].astype(np.float64),
                init=fit,
            )[:, 0]
        )
        for counts in cluster_resample_counts(rng, num_clusters, n_boot)
        for c in np.array_split(counts, max(1, len(counts) * n // _MAX_CELLS_PER_CHUNK))
    ]
    low, high = percentile_interval(np.concatenate(boot), estimate, level)
    return {
        "lc_win_rate": estimate,
        "lc_win_rate_ci_low": low,
        "lc_win_rate_ci_high": high,
        "length_slope": float(slope),
        "length_diff_std": scale,
    }


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # no overflow for large |x|


def _wmean(x: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted mean over the last axis: (B, n), (B, n) -> (B,)."""
    return (x * weights).sum(axis=1) / weights.sum(axis=1)


def _objective(w: np.ndarray, z: np.ndarray, y: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted mean soft-label cross-entropy plus ridge, per replicate. w: (B, 2); z, y, weights: (B, n) -> (B,)."""
    eta = w[:, :1] + w[:, 1:] * z  # (B, n)
    return _wmean(np.logaddexp(0.0, eta) - y * eta, weights) + 0.5 * _L2 * (w**2).sum(axis=1)


def _fit_logistic(
    z: np.ndarray, y: np.ndarray, weights: np.ndarray | None = None, init: np.ndarray | None = None
) -> np.ndarray:
    """Ridge logistic regression of soft labels y on [1, z], one weighted fit per row, by damped Newton (IRLS).

    z, y, weights: (B, n), weights >= 0 with a positive sum per row (a bootstrap replicate's counts; None
    weighs every comparison once); init: (2,), the starting point of every row (zero if None). Returns
    (B, 2): intercept and slope per row. The objective is strictly convex (ridge), so Newton steps with backtracking
    converge from any start, separable rows included; bootstrap rows start at the full-data fit, which
    saves most of the steps.
    """
    batch = z.shape[0]
    weights = np.ones_like(z) if weights is None else weights
    w = np.zeros((batch, 2)) if init is None else np.tile(np.asarray(init, dtype=np.float64), (batch, 1))
    active = np.ones(batch, dtype=bool)
    for _ in range(_MAX_NEWTON_STEPS):
        if not active.any():
            break
        wa, za, ya, va = w[active], z[active], y[active], weights[active]
        p = _sigmoid(wa[:, :1] + wa[:, 1:] * za)  # (b, n)
        r = p - ya
        g0 = _wmean(r, va) + _L2 * wa[:, 0]
        g1 = _wmean(r * za, va) + _L2 * wa[:, 1]
        s = p * (1.0 - p)
        h00 = _wmean(s, va) + _L2
        h01 = _wmean(s * za, va)
        h11 = _wmean(s * za * za, va) + _L2
        det = h00 * h11 - h01 * h01
        step = np.stack([(h11 * g0 - h01 * g1) / det, (h00 * g1 - h01 * g0) / det], axis=1)  # (b, 2)
        decrement = step[:, 0] * g0 + step[:, 1] * g1  # Newton decrement squared, >= 0
        # Near the optimum a full step is exact to rounding, and rounding would only confuse the search.
        t = np.ones(wa.shape[0])
        search = np.flatnonzero(decrement >= 1e-12)
        if search.size:
            # Backtracking (Armijo): halve the step of the rows where it does not lower the objective enough.
            current = _objective(wa[search], za[search], ya[search], va[search])
            for _ in range(50):
                trial = wa[search] - t[search, None] * step[search]
                bad = (
                    _objective(trial, za[search], ya[search], va[search])
                    > current - 1e-4 * t[search] * decrement[search]
                )
                if not bad.any():
                    break
                search, current = search[bad], current[bad]
                t[search] *= 0.5
        w[active] = wa - t[:, None] * step
        idx = np.flatnonzero(active)
        active[idx[decrement < 1e-12]] = False
    return w
