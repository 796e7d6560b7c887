"""The evaluation across rounds: one row per (round, temperature), the per-round table and the reward-vs-KL plot.

Every round's policy pi_t samples the same held-out prompts (no round trained on them) with the same seeds;
its samples are judged against pi_0's ("initial") and pi_{t-1}'s ("previous") answers to the same prompt,
sample and temperature. Win rates carry a bootstrap 95% interval that resamples prompts (stats.py), and so
does the mean reward; KL(pi_t || pi_0) is the mean over samples of sum(log pi_t - log pi_0) of its tokens.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.evaluation.plots import _finish, _pyplot
from pipeline.evaluation.stats import bootstrap_ci, win_rate

BASELINES = ("initial", "previous")
_MISSING = "\u2013"


def round_rows(
    round_index: int, samples: pa.Table, judgments: pa.Table, temperatures: Sequence[float], *, n_boot: int, seed: int
) -> list[dict]:
    """One row per temperature of round `round_index`: n, reward_mean [CI], kl_mean, and per baseline
    win_rate_vs_<baseline> [CI] with its unparsed comparisons (None where nothing was judged)."""
    frame, verdicts = samples.to_pandas(), judgments.to_pandas()
    rows = []
    for t in temperatures:
        part = frame[frame.temperature == t]
        row: dict[str, Any] = {"round": round_index, "temperature": float(t), "n": len(part)}
        rewards = part.reward.dropna()
        if len(rewards):
            mean, low, high = bootstrap_ci(
                rewards.to_numpy(), groups=part.prompt_index[rewards.index].to_numpy(), n_boot=n_boot, seed=seed
            )
            row.update(reward_mean=mean, reward_ci_low=low, reward_ci_high=high)
        else:
            row.update(reward_mean=None, reward_ci_low=None, reward_ci_high=None)
        row["kl_mean"] = float(part.kl.mean()) if len(part) else None
        row["mean_tokens"] = float(part.completion_ids.map(len).mean()) if len(part) else None
        for baseline in BASELINES:
            mine = (
                verdicts[(verdicts.baseline == baseline) & (verdicts.temperature == t)] if len(verdicts) else verdicts
            )
            key = f"win_rate_vs_{baseline}"
            if len(mine):
                rate = win_rate(mine.score.to_numpy(), groups=mine.prompt_index.to_numpy(), n_boot=n_boot, seed=seed)
                row.update({k.replace("win_rate", key): v for k, v in rate.items()})
                unparsed = (mine.verdict_first == "unparsed") | (mine.verdict_second == "unparsed")
                row[f"unparsed_vs_{baseline}"] = int(unparsed.sum())
            else:
                row.update({key: None, f"{key}_ci_low": None, f"{key}_ci_high": None, f"unparsed_vs_{baseline}": 0})
        rows.append(row)
    return rows


def _number(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return _MISSING
    return f"{value:.{digits}f}"


def _rate(row: Mapping[str, Any], key: str) -> str:
    if row.get(key) is None:
        return _MISSING
    return f"{row[key]:.3f} [{row[f'{key}_ci_low']:.3f}, {row[f'{key}_ci_high']:.3f}]"


def rounds_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The per-round table in markdown: one line per (round, temperature)."""
    lines = [
        "| round | T | reward [95% CI] | KL to pi_0 | win rate vs pi_0 [95% CI] | win rate vs previous [95% CI] |",
        "|---:|---:|---|---:|---|---|",
    ]
    for r in rows:
        reward = _MISSING
        if r.get("reward_mean") is not None:
            reward = f"{r['reward_mean']:.3f} [{r['reward_ci_low']:.3f}, {r['reward_ci_high']:.3f}]"
        lines.append(
            f"| {r['round']} | {r['temperature']:g} | {reward} | {_number(r.get('kl_mean'), 2)} | "
            f"{_rate(r, 'win_rate_vs_initial')} | {_rate(r, 'win_rate_vs_previous')} |"
        )
    return "\n".join(lines) + "\n"


def plot_rounds_reward_vs_kl(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> None:
    """Reward against KL(pi_t || pi_0): one point per round, a line per temperature, each point labelled with
    its round (r0 is pi_0 itself, at KL 0). Rows without a reward are left out."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for t in sorted({float(r["temperature"]) for r in rows}):
        points = sorted(
            (r["round"], r["kl_mean"], r["reward_mean"])
            for r in rows
            if float(r["temperature"]) == t and r.get("reward_mean") is not None and r.get("kl_mean") is not None
        )
        if not points:
            continue
        ax.plot([p[1] for p in points], [p[2] for p in points], marker="o", label=f"T = {t:g}")
        for k, kl, reward in points:
            ax.annotate(f"r{k}", (kl, reward), textcoords="offset points", xytext=(4, 4), fontsize=8)
    _finish(fig, ax, path, xlabel="KL(pi_t || pi_0), nats", ylabel="mean reward", title="Reward vs KL by round")


def rounds_report(rows: Sequence[Mapping[str, Any]], *, title: str, notes: Sequence[str] = ()) -> str:
    """report.md of the evaluation across rounds: the table, the plot, and notes."""
    body = [f"# {title}", "", rounds_table(rows), "![reward vs KL by round](reward_vs_kl.png)", ""]
    return "\n".join(body + [f"- {note}" for note in notes]) + "\n"


def tracker_values(rows: Sequence[Mapping[str, Any]]) -> dict[int, dict[str, float]]:
    """Per round, the numbers trackers log at that round as the step: rounds/<metric>/T<temperature>."""
    keys = ("reward_mean", "kl_mean", "win_rate_vs_initial", "win_rate_vs_previous", "mean_tokens")
    out: dict[int, dict[str, float]] = {}
    for r in rows:
        for key in keys:
            value = r.get(key)
            if isinstance(value, (int, float)) and np.isfinite(value):
                out.setdefault(int(r["round"]), {})[f"rounds/{key}/T{r['temperature']:g}"] = float(value)
    return out
