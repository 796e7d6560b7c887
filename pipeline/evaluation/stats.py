"""Confidence intervals for evaluation numbers: a win rate over a few hundred prompts is noisy, so every
reported rate carries a percentile-bootstrap interval (Efron & Tibshirani, 1993, ch. 13)."""

from __future__ import annotations

import numpy as np

# Resamples drawn per chunk are bounded so that (chunk, n) index arrays stay small for large n.
_MAX_INDICES_PER_CHUNK = 4_000_000


def bootstrap_ci(
    values: np.ndarray, *, n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """(mean, low, high): the mean of `values` (shape (n,)) and its percentile-bootstrap interval.

    `n_boot` resamples of size n are drawn with replacement; low and high are the (1 - level) / 2 and
    (1 + level) / 2 quantiles of their means. Deterministic for a seed. With n == 1 every resample is the
    one value, so low == high == mean.
    """
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if values.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    if not np.all(np.isfinite(values)):
        raise ValueError("bootstrap_ci got NaN or infinite values")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")

    n = values.size
    rng = np.random.default_rng(seed)
    chunk = max(1, _MAX_INDICES_PER_CHUNK // n)
    means = np.empty(n_boot, dtype=np.float64)
    for start in range(0, n_boot, chunk):
        stop = min(start + chunk, n_boot)
        idx = rng.integers(0, n, size=(stop - start, n))  # (chunk, n)
        means[start:stop] = values[idx].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    mean = float(values.mean())
    # Quantiles of resampled means can differ from the mean by rounding when all values are equal.
    return mean, float(min(low, mean)), float(max(high, mean))


def win_rate(
    scores: np.ndarray, *, n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> dict[str, float]:
    """Win rate of per-pair scores (1 win, 0.5 tie, 0 loss) with its bootstrap interval.

    Returns {"win_rate", "win_rate_ci_low", "win_rate_ci_high"}, the column names of the report table.
    """
    mean, low, high = bootstrap_ci(scores, n_boot=n_boot, level=level, seed=seed)
    return {"win_rate": mean, "win_rate_ci_low": low, "win_rate_ci_high": high}
