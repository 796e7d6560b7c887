"""Plots and a markdown report of an evaluation, drawn from plain rows (lists of dicts).

The figures follow the DPO paper: training curves under the metric names practitioners know, the
reward-vs-KL frontier (Rafailov et al., 2023, fig. 2 left) and win rate against sampling temperature
(fig. 2 right). matplotlib is imported on first use (`_pyplot`), with the Agg backend, so that importing
this module costs nothing and plotting works on a head node without a display.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.evaluation.held_out import describe

_MISSING = "\u2013"  # en dash: shown for a number that does not exist (e.g. KL of the reference to itself)

SUMMARY_COLUMNS = (
    "model",
    "temperature",
    "n",
    "reward_mean",
    "kl_mean",
    "kl_bound",
    "win_rate",
    "win_rate_ci_low",
    "win_rate_ci_high",
    "win_rate_vs_chosen",
    "win_rate_vs_chosen_ci_low",
    "win_rate_vs_chosen_ci_high",
    "samples_per_answer",
    "tokens_per_answer",
)

# (panel title, metric keys drawn in it)
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


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, numbers.Real) and math.isnan(value)):
        return _MISSING
    if isinstance(value, (bool, numbers.Integral)):
        return str(value)
    if isinstance(value, numbers.Real):
        return f"{float(value):.3f}"
    return str(value).replace("|", "\\|")  # a pipe would split the markdown cell


def summary_table(rows: Sequence[Mapping[str, Any]], *, columns: Sequence[str] = SUMMARY_COLUMNS) -> str:
    """A markdown table of `rows`: numbers to 3 decimals, None (or an absent key) as an en dash."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def write_report_md(
    path: str | os.PathLike[str],
    *,
    title: str,
    summary_rows: Sequence[Mapping[str, Any]],
    figures: Mapping[str, str | os.PathLike[str]],
    notes: Sequence[str] = (),
) -> None:
    """Write report.md: the title, the summary table, the figures, then the notes.

    `figures` maps a caption to an image path, absolute or relative to the report's folder; it is embedded
    by its path relative to the report, so the run directory can be moved or uploaded whole.
    """
    path = Path(path)
    parts = [f"# {title}", "", "## Summary", "", summary_table(summary_rows), ""]
    if figures:
        parts += ["## Figures", ""]
        for caption, figure in figures.items():
            figure = Path(figure)
            if figure.is_absolute():
                figure = Path(os.path.relpath(figure, start=path.parent.resolve()))
            parts += [f"### {caption}", "", f"![{caption}]({figure.as_posix()})", ""]
    if notes:
        parts += ["## Notes", ""] + [f"- {note}" for note in notes] + [""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts), encoding="utf-8")


def report_notes(summary: Mapping[str, Any], *, samples_per_prompt: int, accuracy: Mapping[str, dict]) -> list[str]:
    """The notes under an evaluation report: what was judged and how, unparsed verdicts, the baselines'
    costs, and each policy's held-out measure. summary: the summary.json document; accuracy: held-out
    measures by policy name."""
    notes = [
        f"Judge: {summary['judge']}; reward: {summary['reward']}; {summary['num_prompts']} held-out prompts x "
        f"{samples_per_prompt} samples.",
        f"Unparsed judge verdicts: {summary['unparsed_verdicts']} (comparisons with one, by baseline: "
        f"{summary['unparsed_comparisons_by_baseline']}); they score 0.5 and are never dropped.",
        "win_rate: against the reference's sample of the same prompt; win_rate_vs_chosen: against the held-out "
        "pair's chosen response for that prompt. Both judged in both orders, ties and inconsistent verdicts 0.5.",
    ]
    pref = summary["preferred_responses"]
    if pref["judged"]:
        notes.append(
            f"Preferred responses: {pref['prompts_with_chosen']} prompts have one, "
            f"{pref['prompts_without_chosen']} have none (their samples are not judged against one)."
        )
    bon = summary["best_of_n"]
    if bon:
        notes.append(
            f"{bon['model']}: {bon['n']} reference samples per answer, "
            f"the one with the highest {bon['picked_by']} kept; "
            f"cost {bon['candidates_sampled']} samples, {bon['tokens_generated']} tokens generated in all "
            "(samples_per_answer, tokens_per_answer columns). Its KL is the analytic bound "
            f"log N - (N-1)/N = {bon['kl_bound']:.3f} nats (kl_bound; 0 at T = 0, where the N candidates "
            "coincide): best-of-N has no density to take a per-sample log-ratio of."
        )
    return notes + [describe(name, acc) for name, acc in accuracy.items()]


def write_report_files(
    folder: str | os.PathLike[str],
    *,
    title: str,
    summary_rows: Sequence[Mapping[str, Any]],
    training_metrics: Mapping[str, Sequence[Mapping[str, Any]]],
    notes: Sequence[str],
) -> list[str]:
    """Write the figures and report.md of an evaluation into `folder`; the names of the files written.

    training_metrics[policy]: that policy's training metric rows (train/metrics.jsonl); one policy's curves
    are training_curves.png, several policies' training_curves_<name>.png.
    """
    figures = {"Reward vs KL": "reward_vs_kl.png", "Win rate vs temperature": "win_rate_vs_temperature.png"}
    plot_reward_vs_kl(summary_rows, os.path.join(folder, figures["Reward vs KL"]))
    plot_win_rate_vs_temperature(summary_rows, os.path.join(folder, figures["Win rate vs temperature"]))
    for policy, metrics in training_metrics.items():
        name = "training_curves.png" if len(training_metrics) == 1 else f"training_curves_{policy}.png"
        plot_training_curves(metrics, os.path.join(folder, name))
        figures[f"Training curves ({policy})"] = name
    write_report_md(
        os.path.join(folder, "report.md"), title=title, summary_rows=summary_rows, figures=figures, notes=notes
    )
    return [*figures.values(), "report.md"]
