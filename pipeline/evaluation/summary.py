"""The evaluation's numbers: one summary row per (model, temperature), and the summary.json document.

Win rates carry a bootstrap 95% interval over prompts (stats.py) and, against the reference, a length-controlled twin
(length_control.py), since DPO is known to lengthen answers.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any, cast

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline.config import EvaluateConfig
from pipeline.evaluation.baselines import best_of_n_kl_bound, best_of_n_name
from pipeline.evaluation.length_control import length_controlled_win_rate
from pipeline.evaluation.stats import win_rate

# The judged columns of a summary row, None until a comparison fills them.
_JUDGED_COLUMNS = (
    "win_rate",
    "win_rate_ci_low",
    "win_rate_ci_high",
    "lc_win_rate",
    "lc_win_rate_ci_low",
    "lc_win_rate_ci_high",
    "length_slope",
    "win_rate_vs_chosen",
    "win_rate_vs_chosen_ci_low",
    "win_rate_vs_chosen_ci_high",
)
_LC_COLUMNS = ("lc_win_rate", "lc_win_rate_ci_low", "lc_win_rate_ci_high", "length_slope")


def summarize(
    samples: pa.Table,
    judgments: pa.Table,
    temperatures: Sequence[float],
    *,
    n_boot: int,
    seed: int,
    costs: Mapping[tuple[str, float], dict] | None = None,
    kl_bounds: Mapping[tuple[str, float], float] | None = None,
) -> list[dict]:
    """One row per (model, temperature): n, reward_mean, kl_mean, win_rate with its 95% interval, and the
    same against the held-out chosen responses (win_rate_vs_chosen).

    costs[(model, t)]: samples_per_answer and tokens_per_answer (sampling cost of one kept answer);
    kl_bounds[(model, t)]: an analytic KL bound for a model without a per-sample estimate (best-of-N).
    """
    costs, kl_bounds = costs or {}, kl_bounds or {}
    frame, verdicts = samples.to_pandas(), judgments.to_pandas()
    rows = []
    for model in dict.fromkeys(cast("list[str]", samples["model"].to_pylist())):
        for t in temperatures:
            part = frame[(frame.model == model) & (frame.temperature == t)]
            mine = _where(verdicts, (verdicts.model == model) & (verdicts.temperature == t))
            cost = costs.get((model, t), {})
            rows.append(
                {
                    "model": model,
                    "temperature": t,
                    "n": len(part),
                    "reward_mean": _mean(part.reward),
                    "kl_mean": _mean(part.kl),
                    "kl_bound": kl_bounds.get((model, t)),
                    "samples_per_answer": cost.get("samples_per_answer"),
                    "tokens_per_answer": cost.get("tokens_per_answer"),
                    **_judged(
                        _where(mine, mine.baseline == "reference"),
                        _where(mine, mine.baseline == "chosen"),
                        n_boot=n_boot,
                        seed=seed,
                    ),
                }
            )
    return rows


def _where(frame: pd.DataFrame, mask: pd.Series) -> pd.DataFrame:
    """frame[mask]: the rows where the boolean Series `mask` holds (pandas types a [] lookup more widely)."""
    return cast(pd.DataFrame, frame[mask])


def _mean(column: pd.Series) -> float | None:
    return float(column.mean()) if column.notna().any() else None


def _judged(vs_reference: pd.DataFrame, vs_chosen: pd.DataFrame, *, n_boot: int, seed: int) -> dict:
    """The judged columns of one summary row, from its comparisons against each baseline."""
    row: dict[str, Any] = dict.fromkeys(_JUDGED_COLUMNS)
    row.update(judged_vs_chosen=len(vs_chosen), unparsed_vs_chosen=unparsed_comparisons(vs_chosen))
    # Intervals resample prompts: a prompt's comparisons are correlated (stats.py).
    if len(vs_chosen):
        rate = win_rate(vs_chosen.score.to_numpy(), groups=vs_chosen.prompt_index.to_numpy(), n_boot=n_boot, seed=seed)
        row.update({k.replace("win_rate", "win_rate_vs_chosen"): v for k, v in rate.items()})
    if len(vs_reference):
        scores, prompts = vs_reference.score.to_numpy(), vs_reference.prompt_index.to_numpy()
        row.update(win_rate(scores, groups=prompts, n_boot=n_boot, seed=seed))
        # DPO is known to lengthen answers: the judge's preference with length regressed out.
        lc = length_controlled_win_rate(
            scores, vs_reference.length_diff.to_numpy(dtype=float), groups=prompts, n_boot=n_boot, seed=seed
        )
        row.update({k: lc[k] for k in _LC_COLUMNS})
    return row


def unparsed_comparisons(verdicts: pd.DataFrame) -> int:
    """Comparisons with at least one unparsed verdict (they score 0.5 and are counted, never dropped)."""
    return int(((verdicts.verdict_first == "unparsed") | (verdicts.verdict_second == "unparsed")).sum())


def sampling_costs(rows: Sequence[dict]) -> dict[tuple[str, float], dict]:
    """Per (model, temperature): samples drawn and tokens generated per kept answer, on average."""
    groups: dict[tuple[str, float], list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["model"], r["temperature"])].append(r)
    return {
        key: {
            "samples_per_answer": float(np.mean([r["candidates"] for r in group])),
            "tokens_per_answer": float(np.mean([r["tokens_generated"] for r in group])),
        }
        for key, group in groups.items()
    }


def evaluation_summary(
    rows: Sequence[dict],
    samples: pa.Table,
    judgments: pa.Table,
    ev: EvaluateConfig,
    *,
    kl_bounds: Mapping[tuple[str, float], float],
    accuracy: Mapping[str, dict],
    policy_names: Sequence[str],
    num_prompts: int,
    chosen_texts: Sequence[str | None] | None,
    candidates: Sequence[dict],
    engines: Mapping[str, str] | None = None,
    skipped: Sequence[dict[str, str]] = (),
    judge_name: str | None = None,
) -> dict:
    """The document written as summary.json.

    rows: the sample rows behind `samples` (with their sampling costs); accuracy: held-out measures per
    policy (a single policy's given bare); chosen_texts: each prompt's preferred response or None, or
    None for all when the samples were not judged against preferred responses;
    candidates: the best-of-N candidates drawn (empty without that baseline); engines: the engine that
    sampled each model, named in the summary ("engine": one name when all agree, else the mapping;
    "engine_requested": evaluate.engine as configured, e.g. "auto"); skipped: the judgments left out, each
    {what, why, enable} (pipeline/evaluation/scope.py); judge_name: the judge as it names itself (api:<model>).
    """
    used = sorted(set((engines or {}).values()))
    verdicts = judgments.to_pandas()
    return {
        "rows": summarize(
            samples,
            judgments,
            ev.temperatures,
            n_boot=ev.bootstrap_samples,
            seed=ev.seed,
            costs=sampling_costs(rows),
            kl_bounds=kl_bounds,
        ),
        "implicit_reward_accuracy": accuracy.get(policy_names[0]) if len(policy_names) == 1 else dict(accuracy),
        "judge": ev.judge,
        "judge_name": judge_name,
        "reward": ev.reward,
        "skipped": list(skipped),
        "engine_requested": ev.engine,
        "engine": used[0] if len(used) == 1 else dict(engines or {}) or ev.engine,
        "unparsed_verdicts": int(
            sum(v == "unparsed" for col in ("verdict_first", "verdict_second") for v in judgments[col].to_pylist())
        ),
        "unparsed_comparisons_by_baseline": {
            b: unparsed_comparisons(_where(verdicts, verdicts.baseline == b)) for b in ("reference", "chosen")
        },
        "num_prompts": num_prompts,
        "preferred_responses": {
            "judged": chosen_texts is not None,
            "prompts_with_chosen": sum(c is not None for c in chosen_texts or []),
            "prompts_without_chosen": sum(c is None for c in chosen_texts or []),
        },
        "best_of_n": None
        if not ev.best_of_n
        else {
            "n": ev.best_of_n,
            "model": best_of_n_name(ev.best_of_n),
            "picked_by": f"reward ({ev.reward})",
            "kl_bound": best_of_n_kl_bound(ev.best_of_n),
            "candidates_sampled": len(candidates),
            "tokens_generated": int(sum(len(c["completion_ids"]) for c in candidates)),
        },
    }
