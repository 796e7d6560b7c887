"""Pairwise judges and the both-orders protocol that turns their verdicts into win-rate scores.

A judge sees a prompt and two completions and says which is better. The DPO paper judged with GPT-4;
`ApiJudge` (pipeline/evaluation/api_judge) asks any OpenAI-compatible chat model the same way, and a task
may register a judge of its own by name (pipeline/evaluation/plugins.py). LLM judges favour whichever
answer comes first, so `judge_both_orders` asks in both orders and credits a win only when the two
verdicts agree: a judge that always says "A" scores every pair as a tie.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, get_args

import numpy as np

# "unparsed": the judge answered but its answer could not be read (an API judge's free text). Such verdicts
# are counted and reported, never dropped, so a judge that fails on hard pairs cannot inflate a win rate.
Verdict = Literal["A", "B", "tie", "unparsed"]
_VERDICTS = frozenset(get_args(Verdict))


class Judge(Protocol):
    """Anything that judges batches of pairs. `name` identifies it in reports and Parquet of judgments."""

    name: str

    def judge(self, prompts: Sequence[str], first: Sequence[str], second: Sequence[str]) -> list[Verdict]:
        """For each i: "A" if first[i] is the better completion of prompts[i], "B" if second[i], else
        "tie"; "unparsed" where the judge's answer could not be read."""
        ...


@dataclass
class PairwiseResult:
    """Outcome of judging policy against baseline in both orders.

    scores: float64, shape (n,): 1.0 policy won in both orders, 0.0 baseline won in both, 0.5 otherwise
    (a tie, an inconsistent pair, or an unparsed verdict). wins + ties + losses + unparsed == n; the
    unparsed pairs are counted apart from ties but still score 0.5: shown, never dropped.
    verdicts_ab: the judge's verdicts with the policy first; verdicts_ba: with the baseline first.
    """

    scores: np.ndarray
    wins: int
    ties: int
    losses: int
    unparsed: int
    verdicts_ab: list[Verdict] = field(default_factory=list)
    verdicts_ba: list[Verdict] = field(default_factory=list)

    @property
    def n(self) -> int:
        """Number of judged pairs."""
        return int(self.scores.shape[0])


def judge_both_orders(
    judge: Judge, prompts: Sequence[str], policy: Sequence[str], baseline: Sequence[str]
) -> PairwiseResult:
    """Judge each (policy[i], baseline[i]) pair as (policy, baseline) and as (baseline, policy).

    A win needs the policy preferred in both orders ("A" then "B"), a loss the baseline in both; anything
    else is worth 0.5, which cancels position bias instead of crediting it to whichever model came first.
    """
    check_pair_lengths(prompts, policy, baseline)
    verdicts_ab = list(judge.judge(prompts, policy, baseline))
    verdicts_ba = list(judge.judge(prompts, baseline, policy))
    for order, verdicts in (("policy-first", verdicts_ab), ("baseline-first", verdicts_ba)):
        if len(verdicts) != len(prompts):
            raise ValueError(
                f"judge {judge.name!r} returned {len(verdicts)} verdicts for {len(prompts)} pairs ({order})"
            )
        unknown = set(verdicts) - _VERDICTS
        if unknown:
            # A bug in the judge, not a parse failure of its answer: stop rather than guess.
            raise ValueError(
                f"judge {judge.name!r} returned verdicts outside {sorted(_VERDICTS)}: {sorted(map(str, unknown))}"
            )

    scores = np.full(len(prompts), 0.5, dtype=np.float64)
    wins = ties = losses = unparsed = 0
    for i, (ab, ba) in enumerate(zip(verdicts_ab, verdicts_ba)):
        if ab == "unparsed" or ba == "unparsed":
            unparsed += 1
        elif ab == "A" and ba == "B":
            scores[i] = 1.0
            wins += 1
        elif ab == "B" and ba == "A":
            scores[i] = 0.0
            losses += 1
        else:
            ties += 1
    return PairwiseResult(
        scores=scores,
        wins=wins,
        ties=ties,
        losses=losses,
        unparsed=unparsed,
        verdicts_ab=verdicts_ab,
        verdicts_ba=verdicts_ba,
    )


def check_pair_lengths(prompts: Sequence[str], first: Sequence[str], second: Sequence[str]) -> None:
    """Raise ValueError unless the three sequences of a batch of pairs have one length."""
    if not len(prompts) == len(first) == len(second):
        raise ValueError(f"prompts, first and second differ in length: {len(prompts)}, {len(first)}, {len(second)}")
