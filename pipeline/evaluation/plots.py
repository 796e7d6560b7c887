"""The evaluation's figures, drawn from plain rows (lists of dicts).

They follow the DPO paper: training curves under the metric names practitioners know, the reward-vs-KL
frontier (Rafailov et al., 2023, fig. 2 left) and win rate against sampling temperature (fig. 2 right); and,
for an evaluation with no reward, KL to the reference against temperature. matplotlib is imported on first
use (`_pyplot`), with the Agg backend, so that importing this module costs nothing and plotting works on a
head node without a display.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

_TRAINING_PANELS = (
    ("loss", ("loss",)),
    ("implicit rewards", ("rewards/chosen", "rewards/rejected")),
    ("reward accuracy", ("rewards/accuracies",)),
    ("reward margin", ("rewards/margins",)),
)


def _pyplot() -> Any:
    import matplotlib  # deferred: heavy, and only plotting needs it (see the module docstring)

    matplotlib.use("Agg")  # no display on cluster nodes; must precede the pyplot import
    import matplotlib.pyplot as plt

    return plt


def _is_number(value: Any) -> bool:
    """A finite real number (NumPy scalars included); None, NaN and booleans are not."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _finish(fig: Any, ax: Any, path: str | os.PathLike[str], *, xlabel: str, ylabel: str, title: str) -> None:
    """Label, grid and (when there are series) a legend, then write the figure."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    _save(fig, path)


def _save(fig: Any, path: str | os.PathLike[str]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)  # figures are kept alive by pyplot until closed: long evaluations would leak


def _by_model(rows: Iterable[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    """Rows grouped by model, each group sorted by temperature; models in first-seen order."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault(str(row["model"]), []).append(row)
    return {m: sorted(g, key=lambda r: float(r["temperature"])) for m, g in groups.items()}


def plot_training_curves(metrics: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> None:
    """Write a 2x2 PNG of training metrics against step: loss; chosen vs rejected implicit rewards;
    reward accuracy; reward margin. Rows hold "step" and any of the metric keys; absent or None values
    are skipped, and a panel with no data says so."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (title, keys) in zip(axes.flat, _TRAINING_PANELS):
        drawn = False
        for key in keys:
            points = [(r["step"], r[key]) for r in metrics if "step" in r and _is_number(r.get(key))]
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, label=key, marker="." if len(points) < 30 else None)
                drawn = True
        if title == "loss" and drawn:
            # log 2 is the DPO loss at step 0 (policy == reference): the reference line shows progress.
            ax.axhline(math.log(2), color="grey", linestyle=":", linewidth=1, label="log 2")
        if title == "reward accuracy":
            ax.set_ylim(-0.05, 1.05)
        if not drawn:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")
        ax.set_title(title)
        ax.set_xlabel("step")
        if drawn:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    _save(fig, path)


def plot_reward_vs_kl(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> None:
    """Write the reward-vs-KL frontier: x = KL(pi || pi_ref), y = mean reward, one series per model,
    each point annotated with its sampling temperature. A model with an analytic KL bound instead of an
    estimate (best-of-N: `kl_bound`, no `kl_mean`) is drawn at its bound with square markers, labelled so.
    Rows with neither (the reference itself, whose KL is zero by definition) are drawn at KL 0 with a
    hollow marker."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    for model, group in _by_model(rows).items():
        points = [r for r in group if _is_number(r.get("reward_mean"))]
        bounded = all(not _is_number(r.get("kl_mean")) and _is_number(r.get("kl_bound")) for r in points)
        if points and bounded:
            points = [{**r, "kl_mean": r["kl_bound"]} for r in points]
        with_kl = [r for r in points if _is_number(r.get("kl_mean"))]
        without_kl = [r for r in points if not _is_number(r.get("kl_mean"))]
        color = None
        if with_kl:
            (line,) = ax.plot(
                [r["kl_mean"] for r in with_kl],
                [r["reward_mean"] for r in with_kl],
                marker="s" if bounded else "o",
                linestyle="--" if bounded else "-",
                label=f"{model} (at its KL bound)" if bounded else model,
            )
            color = line.get_color()
        if without_kl:
            (hollow,) = ax.plot(
                [0.0] * len(without_kl),
                [r["reward_mean"] for r in without_kl],
                linestyle="none",
                marker="o",
                markerfacecolor="none",
                color=color,
                label=f"{model} (no KL, drawn at 0)",
            )
            color = hollow.get_color()
        for r in with_kl:
            ax.annotate(
                f"T={float(r['temperature']):g}",
                (r["kl_mean"], r["reward_mean"]),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=7,
                color=color,
            )
        for k, r in enumerate(without_kl):
            # Points stacked at x = 0 would print their labels on top of each other: fan them out.
            ax.annotate(
                f"T={float(r['temperature']):g}",
                (0.0, r["reward_mean"]),
                textcoords="offset points",
                xytext=(6, 4 + 9 * k),
                fontsize=7,
                color=color,
            )
    _finish(fig, ax, path, xlabel="KL(\u03c0 || \u03c0_ref)", ylabel="reward", title="reward vs KL to the reference")


def plot_win_rate_vs_temperature(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> None:
    """Write win rate against sampling temperature, one series per model, with bootstrap CI error bars
    and a dashed line at 0.5 (no better than the baseline). Rows whose win_rate is None (the reference
    judged against itself) are skipped."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    for model, group in _by_model(rows).items():
        points = [r for r in group if _is_number(r.get("win_rate"))]
        if not points:
            continue
        temps = [float(r["temperature"]) for r in points]
        rates = [float(r["win_rate"]) for r in points]
        # Missing CI bounds draw as zero-length bars rather than failing the plot.
        lower = [
            rate - r["win_rate_ci_low"] if _is_number(r.get("win_rate_ci_low")) else 0.0
            for rate, r in zip(rates, points)
        ]
        upper = [
            r["win_rate_ci_high"] - rate if _is_number(r.get("win_rate_ci_high")) else 0.0
            for rate, r in zip(rates, points)
        ]
        ax.errorbar(temps, rates, yerr=[lower, upper], marker="o", capsize=3, label=model)
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_ylim(-0.02, 1.02)
    _finish(
        fig, ax, path, xlabel="sampling temperature", ylabel="win rate vs baseline", title="win rate vs temperature"
    )


def plot_kl_vs_temperature(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> None:
    """Write KL(pi || pi_ref) against sampling temperature, one series per model that has a per-sample
    estimate (the reference, at 0 by definition, and best-of-N, which has only a bound, are left out):
    how far each policy moved from the reference, with no reward or judge needed."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    for model, group in _by_model(rows).items():
        points = [r for r in group if _is_number(r.get("kl_mean"))]
        if points and model != "reference":
            ax.plot([float(r["temperature"]) for r in points], [r["kl_mean"] for r in points], marker="o", label=model)
    ax.axhline(0.0, color="grey", linestyle=":", linewidth=1)
    _finish(
        fig, ax, path, xlabel="sampling temperature", ylabel="KL(\u03c0 || \u03c0_ref), nats", title="KL vs temperature"
    )


def has_values(rows: Iterable[Mapping[str, Any]], key: str) -> bool:
    """Whether any row holds a number under `key` (a figure of an empty series is left out)."""
    return any(_is_number(r.get(key)) for r in rows)
