"""Confidence intervals for evaluation numbers: a win rate over a few hundred prompts is noisy, so every
reported rate carries a percentile-bootstrap interval (Efron & Tibshirani, 1993, ch. 13).

The unit of resampling is the prompt, not the comparison. A prompt yields several comparisons (one per
sample, each judged in both orders), and they are correlated: an easy prompt is won by every sample. A
bootstrap that resampled comparisons would treat m correlated comparisons as m independent ones and give
an interval up to sqrt(m) times too narrow. Resampling whole prompts (the cluster bootstrap; Davison &
Hinkley, 1997, sec. 3.8) keeps that correlation inside each draw, so the interval reflects how the number
would vary over another set of prompts, which is the question the report answers.
"""

from __future__ import annotations

import numpy as np

# Resample counts drawn per chunk are bounded so that (chunk, clusters) arrays stay small for large n.
_MAX_INDICES_PER_CHUNK = 4_000_000


def cluster_ids(groups: np.ndarray | None, n: int) -> tuple[np.ndarray, int]:
    """(cluster index of each of the n values in 0..G-1, G). groups: shape (n,), any hashable labels (a
    prompt index), or None for n clusters of one value each."""
    if groups is None:
        return np.arange(n), n
    groups = np.asarray(groups).reshape(-1)
    if groups.size != n:
        raise ValueError(f"groups has {groups.size} labels for {n} values")
    _, ids = np.unique(groups, return_inverse=True)
    return ids.reshape(-1), int(ids.max()) + 1


def cluster_resample_counts(rng: np.random.Generator, num_clusters: int, n_boot: int):
    """Yield (B, G) int arrays, B rows per chunk and n_boot rows in all: how often each of the G clusters
    is drawn when G clusters are drawn with replacement. A value's weight in a replicate is its cluster's
    count, so one replicate's statistic is a weighted statistic of the original values."""
    chunk = max(1, _MAX_INDICES_PER_CHUNK // num_clusters)
    for start in range(0, n_boot, chunk):
        rows = min(chunk, n_boot - start)
        idx = rng.integers(0, num_clusters, size=(rows, num_clusters))  # (B, G) drawn clusters
        flat = (idx + num_clusters * np.arange(rows)[:, None]).ravel()  # one bin per (replicate, cluster)
        yield np.bincount(flat, minlength=rows * num_clusters).reshape(rows, num_clusters)


def percentile_interval(replicates: np.ndarray, estimate: float, level: float) -> tuple[float, float]:
    """The (1 - level) / 2 and (1 + level) / 2 quantiles of the bootstrap replicates, widened to contain
    the estimate (quantiles can miss it by rounding, or for a nonlinear statistic; the report promises it)."""
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(replicates, [alpha, 1.0 - alpha])
    return float(min(low, estimate)), float(max(high, estimate))


def check_bootstrap_args(*, level: float, n_boot: int) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")


def bootstrap_ci(
    values: np.ndarray, *, groups: np.ndarray | None = None, n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """(mean, low, high): the mean of `values` (shape (n,)) and its percentile-bootstrap interval.

    groups: shape (n,), the cluster (prompt) of each value; each replicate draws as many clusters as there
    are, with replacement, and takes the mean of all their values. None: every value is its own cluster
    (the plain bootstrap). Deterministic for a seed. With one cluster every replicate is the data, so
    low == high == mean.
    """
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if values.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    if not np.all(np.isfinite(values)):
        raise ValueError("bootstrap_ci got NaN or infinite values")
    check_bootstrap_args(level=level, n_boot=n_boot)

    ids, num_clusters = cluster_ids(groups, values.size)
    sums = np.bincount(ids, weights=values, minlength=num_clusters)  # (G,)
    sizes = np.bincount(ids, minlength=num_clusters).astype(np.float64)  # (G,)
    rng = np.random.default_rng(seed)
    means = np.concatenate(
        [(counts @ sums) / (counts @ sizes) for counts in cluster_resample_counts(rng, num_clusters, n_boot)]
    )
    mean = float(values.mean())
    return (mean, *percentile_interval(means, mean, level))


def win_rate(
    scores: np.ndarray, *, groups: np.ndarray | None = None, n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> dict[str, float]:
    """Win rate of per-comparison scores (1 win, 0.5 tie, 0 loss) with its bootstrap interval over `groups`
    (the prompt of each comparison; see the module docstring for why).

    Returns {"win_rate", "win_rate_ci_low", "win_rate_ci_high"}, the column names of the report table.
    """
    mean, low, high = bootstrap_ci(scores, groups=groups, n_boot=n_boot, level=level, seed=seed)
    return {"win_rate": mean, "win_rate_ci_low": low, "win_rate_ci_high": high}
