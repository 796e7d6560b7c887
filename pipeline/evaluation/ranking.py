"""Ranking one prompt's completions with a pairwise judge: every two of them compared in both orders.

The label stage of on-policy rounds needs a best and a worst completion per prompt, and a judge only says
which of two is better. So every pair (i, j) of a prompt's n completions is judged as (i, j) and as (j, i)
(`judge_both_orders`): a win needs both verdicts to agree, so a judge that favours the first answer gives
ties, not a ranking. A completion's score is its mean result over its n - 1 comparisons (1 a win, 0.5 a tie,
an inconsistent pair or an unparsed verdict, 0 a loss): the Copeland score of a round-robin tournament,
in [0, 1]. Two completions with the same text tie without asking the judge. The cost is n (n - 1) verdicts
per prompt: 12 for n = 4, 56 for n = 8.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.evaluation.judges import Judge, judge_both_orders


@dataclass
class RankCounts:
    """What the judge said, counted over every comparison (a pair judged in both orders)."""

    comparisons: int = 0  # pairs of different texts sent to the judge
    decided: int = 0  # one completion preferred in both orders
    ties: int = 0  # "tie" verdicts, and pairs whose two orders disagree
    unparsed: int = 0  # a verdict the judge gave but that could not be read (scored as a tie, counted)
    identical: int = 0  # two completions with the same text: a tie, not sent to the judge

    def add(self, other: RankCounts) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


def rank_by_judge(
    judge: Judge, prompts: Sequence[str], completions: Sequence[Sequence[str]]
) -> tuple[list[list[float]], RankCounts]:
    """Per prompt i, a score per completion of completions[i] (see the module docstring), and the counts.

    All the batch's comparisons go to the judge in one `judge_both_orders` call (an API judge then sends
    them concurrently). A prompt with fewer than two completions gets a score of 0.5 for each.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} lists of completions")
    counts = RankCounts()
    pairs: list[tuple[int, int, int]] = []  # (prompt, i, j) sent to the judge
    totals = [np.zeros(len(texts)) for texts in completions]
    for p, texts in enumerate(completions):
        for i in range(len(texts)):
            for j in range(i + 1, len(texts)):
                if texts[i] == texts[j]:
                    totals[p][[i, j]] += 0.5
                    counts.identical += 1
                else:
                    pairs.append((p, i, j))
    if pairs:
        result = judge_both_orders(
            judge,
            [prompts[p] for p, _, _ in pairs],
            [completions[p][i] for p, i, _ in pairs],
            [completions[p][j] for p, _, j in pairs],
        )
        for (p, i, j), score in zip(pairs, result.scores):
            totals[p][i] += score
            totals[p][j] += 1.0 - score
        counts.add(
            RankCounts(
                comparisons=len(pairs), decided=result.wins + result.losses, ties=result.ties, unparsed=result.unparsed
            )
        )
    scores = [(t / (len(t) - 1)).tolist() if len(t) > 1 else [0.5] * len(t) for t in totals]
    return scores, counts
