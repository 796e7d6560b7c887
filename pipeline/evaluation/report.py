"""The markdown report of an evaluation, drawn from plain rows (lists of dicts), with its figures (plots.py).

The report opens with what judged it (or that nothing did) and the judgments it skipped, then the summary
table (columns that hold no number in any row are left out), the figures, samples of each model side by
side, and the notes.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.evaluation import plots
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

KEY_COLUMNS = ("model", "temperature", "n")  # always shown; the other columns only where some row has a number
SAMPLE_PROMPTS = 4  # held-out prompts shown with every model's completion side by side
SAMPLE_CHARS = 400  # a completion longer than this is cut in the report (samples.parquet has it whole)


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, numbers.Real) and math.isnan(value)):
        return _MISSING
    if isinstance(value, (bool, numbers.Integral)):
        return str(value)
    if isinstance(value, numbers.Real):
        return f"{float(value):.3f}"
    return str(value).replace("|", "\\|")  # a pipe would split the markdown cell


def _filled(value: Any) -> bool:
    return value is not None and not (isinstance(value, numbers.Real) and math.isnan(value))


def summary_table(rows: Sequence[Mapping[str, Any]], *, columns: Sequence[str] = SUMMARY_COLUMNS) -> str:
    """A markdown table of `rows`: numbers to 3 decimals, None (or an absent key) as an en dash."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def filled_columns(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] = SUMMARY_COLUMNS) -> list[str]:
    """`columns` less those no row fills: an evaluation without a judge has no win-rate columns to show."""
    return [c for c in columns if c in KEY_COLUMNS or any(_filled(r.get(c)) for r in rows)]


def _text(value: str, limit: int = SAMPLE_CHARS) -> str:
    """A completion or prompt as one markdown table cell."""
    value = value if len(value) <= limit else value[: limit - 1] + "\u2026"
    return _cell(value).replace("\r", "").replace("\n", "<br>") or " "


def samples_section(samples: Sequence[Mapping[str, Any]], *, prompts: int = SAMPLE_PROMPTS) -> list[str]:
    """Markdown lines: the first `prompts` held-out prompts, each with every model's first completion at the
    lowest sampling temperature (the most typical answer) side by side. samples: rows of samples.parquet."""
    if not samples:
        return []
    temperature = min(float(r["temperature"]) for r in samples)
    shown = [r for r in samples if float(r["temperature"]) == temperature and r["sample_index"] == 0]
    indices = sorted({r["prompt_index"] for r in shown})[:prompts]
    lines = [f"## Samples (T = {temperature:g})", ""]
    for index in indices:
        mine = [r for r in shown if r["prompt_index"] == index]
        lines += [f"Prompt {index}: {_text(mine[0]['prompt'])}", "", "| model | completion |", "|---|---|"]
        lines += [f"| {_cell(r['model'])} | {_text(r['completion'])} |" for r in mine]
        lines.append("")
    return lines


def write_report_md(
    path: str | os.PathLike[str],
    *,
    title: str,
    summary_rows: Sequence[Mapping[str, Any]],
    figures: Mapping[str, str | os.PathLike[str]],
    notes: Sequence[str] = (),
    header: Sequence[str] = (),
    samples: Sequence[Mapping[str, Any]] = (),
) -> None:
    """Write report.md: the title, the `header` lines (what judged it, what was skipped), the summary table,
    the figures, the samples side by side, then the notes.

    `figures` maps a caption to an image path, absolute or relative to the report's folder; it is embedded
    by its path relative to the report, so the run directory can be moved or uploaded whole.
    """
    path = Path(path)
    parts = [f"# {title}", ""]
    if header:
        parts += [f"- {line}" for line in header] + [""]
    parts += ["## Summary", "", summary_table(summary_rows, columns=filled_columns(summary_rows)), ""]
    if figures:
        parts += ["## Figures", ""]
        for caption, figure in figures.items():
            figure = Path(figure)
            if figure.is_absolute():
                figure = Path(os.path.relpath(figure, start=path.parent.resolve()))
            parts += [f"### {caption}", "", f"![{caption}]({figure.as_posix()})", ""]
    parts += samples_section(samples)
    if notes:
        parts += ["## Notes", ""] + [f"- {note}" for note in notes] + [""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts), encoding="utf-8")


def report_notes(summary: Mapping[str, Any], *, samples_per_prompt: int, accuracy: Mapping[str, dict]) -> list[str]:
    """The notes under an evaluation report: what was sampled, how judging worked (when a judge ran),
    the baselines' costs, and each policy's held-out measure. summary: the summary.json document;
    accuracy: held-out measures by policy name."""
    notes = [
        f"{summary['num_prompts']} held-out prompts x {samples_per_prompt} samples per model and temperature. "
        "kl_mean: the mean over samples of sum(log pi - log pi_ref) over the sampled tokens, in nats."
    ]
    if summary["judge"] is not None:
        notes += [
            f"Unparsed judge verdicts: {summary['unparsed_verdicts']} (comparisons with one, by baseline: "
            f"{summary['unparsed_comparisons_by_baseline']}); they score 0.5 and are never dropped.",
            "win_rate: against the reference's sample of the same prompt; win_rate_vs_chosen: against the "
            "held-out pair's chosen response for that prompt. Both judged in both orders, ties and inconsistent "
            "verdicts 0.5.",
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
    header: Sequence[str] = (),
    samples: Sequence[Mapping[str, Any]] = (),
) -> list[str]:
    """Write the figures and report.md of an evaluation into `folder`; the names of the files written.

    The reward-vs-KL frontier is drawn where a reward was measured (else KL against temperature), the win
    rates where a judge gave some. training_metrics[policy]: that policy's training metric rows
    (train/metrics.jsonl); one policy's curves are training_curves.png, several policies'
    training_curves_<name>.png. header and samples: see `write_report_md`.
    """
    figures = {}
    if plots.has_values(summary_rows, "reward_mean"):
        figures["Reward vs KL"] = "reward_vs_kl.png"
        plots.plot_reward_vs_kl(summary_rows, os.path.join(folder, figures["Reward vs KL"]))
    else:
        figures["KL vs temperature"] = "kl_vs_temperature.png"
        plots.plot_kl_vs_temperature(summary_rows, os.path.join(folder, figures["KL vs temperature"]))
    if plots.has_values(summary_rows, "win_rate") or plots.has_values(summary_rows, "win_rate_vs_chosen"):
        figures["Win rate vs temperature"] = "win_rate_vs_temperature.png"
        plots.plot_win_rate_vs_temperature(summary_rows, os.path.join(folder, figures["Win rate vs temperature"]))
    for policy, metrics in training_metrics.items():
        name = "training_curves.png" if len(training_metrics) == 1 else f"training_curves_{policy}.png"
        plots.plot_training_curves(metrics, os.path.join(folder, name))
        figures[f"Training curves ({policy})"] = name
    write_report_md(
        os.path.join(folder, "report.md"),
        title=title,
        summary_rows=summary_rows,
        figures=figures,
        notes=notes,
        header=header,
        samples=samples,
    )
    return [*figures.values(), "report.md"]
