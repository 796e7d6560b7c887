"""Judging samples against a baseline's answers to the same prompts, in both orders.

Judgment rows are those of `pipeline.data.schemas.JUDGMENTS`: model, baseline, temperature, prompt_index,
the two verdicts (the model's answer shown first, then second), the score (1 win, 0.5 tie, inconsistent
or unparsed, 0 loss) and length_diff (the model's completion tokens minus the baseline's).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from pipeline.evaluation.judges import Judge, Verdict, judge_both_orders

log = logging.getLogger(__name__)


class JudgeProgress:
    """A judge that logs how many of the `total` verdicts asked of it are in, with the request, cache and
    parse counts of a judge that keeps them (the API judge's `stats`): after the batch that crosses each
    tenth of the total, and after the last, so a long evaluation logs about ten lines, not one a batch."""

    def __init__(self, judge: Judge, total: int):
        self.inner, self.name, self.total, self.done = judge, judge.name, total, 0
        self.tenths_logged = 0

    def judge(self, prompts: Sequence[str], first: Sequence[str], second: Sequence[str]) -> list[Verdict]:
        verdicts = self.inner.judge(prompts, first, second)
        self.done += len(verdicts)
        tenths = self.done * 10 // max(self.total, 1)
        if tenths <= self.tenths_logged and self.done < self.total:
            return verdicts
        self.tenths_logged = tenths
        stats = getattr(self.inner, "stats", None)
        counts = (
            f"; {stats.requests} requests, {stats.cache_hits} from the cache, {stats.unparsed} unparsed"
            if stats is not None
            else ""
        )
        log.info("evaluate: judged %d of %d (%s)%s", self.done, self.total, self.name, counts)
        return verdicts


def judge_samples(
    judge: Judge, samples: Sequence[dict], baseline: str, baseline_texts: Sequence[str], baseline_lengths: Sequence[int]
) -> list[dict]:
    """Each sample row against baseline_texts[i] (baseline_lengths[i] tokens long): one judgment row each."""
    result = judge_both_orders(
        judge, [r["prompt"] for r in samples], [r["completion"] for r in samples], baseline_texts
    )
    return [
        {
            "model": r["model"],
            "baseline": baseline,
            "temperature": float(r["temperature"]),
            "prompt_index": r["prompt_index"],
            "verdict_first": a,
            "verdict_second": b,
            "score": float(score),
            "length_diff": len(r["completion_ids"]) - length,
        }
        for r, length, a, b, score in zip(
            samples, baseline_lengths, result.verdicts_ab, result.verdicts_ba, result.scores
        )
    ]


def judge_against_reference(
    judge: Judge, rows: Sequence[dict], models: Sequence[str], temperatures: Sequence[float]
) -> list[dict]:
    """Each sample of `models` against the reference's sample of the same prompt, index and temperature.

    rows: sample rows of every model, the reference's included. Returns judgment rows with baseline
    "reference", one judge call per (model, temperature).
    """
    reference = {(r["temperature"], r["prompt_index"], r["sample_index"]): r for r in rows if r["model"] == "reference"}
    out = []
    for name in models:
        for t in temperatures:
            mine = [r for r in rows if r["model"] == name and r["temperature"] == t]
            theirs = [reference[(r["temperature"], r["prompt_index"], r["sample_index"])] for r in mine]
            out += judge_samples(
                judge, mine, "reference", [r["completion"] for r in theirs], [len(r["completion_ids"]) for r in theirs]
            )
    return out
