"""The demo's pairwise judge: VADER's compound score, the reward the demo task labels its pairs with.

Registered as the "vader" judge (entry point group raydpo.judges in pyproject.toml), so that
`evaluate.judge: vader` finds it without evaluation importing the demo.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pipeline.config import EvaluateConfig
from pipeline.demo.task import sentiment_reward
from pipeline.evaluation.judges import Verdict, check_pair_lengths


@dataclass(frozen=True)
class VaderJudge:
    """Prefers the completion whose prompt + completion has the higher VADER compound score.

    `tie_margin`: compounds closer than this are a tie, so that near-equal texts do not count as wins.
    """

    tie_margin: float = 0.05
    name: str = "vader"

    def judge(self, prompts: Sequence[str], first: Sequence[str], second: Sequence[str]) -> list[Verdict]:
        """Verdicts by compound difference; see the class docstring."""
        check_pair_lengths(prompts, first, second)
        # Completions continue the prompt text (with their own leading space), so they are joined as is.
        first_reward = sentiment_reward([p + c for p, c in zip(prompts, first)])
        second_reward = sentiment_reward([p + c for p, c in zip(prompts, second)])
        verdicts: list[Verdict] = []
        for diff in first_reward - second_reward:
            verdicts.append("A" if diff > self.tie_margin else "B" if diff < -self.tie_margin else "tie")
        return verdicts


def vader_judge(evaluate_config: EvaluateConfig) -> VaderJudge:
    """The "vader" judge entry point. It has no settings of its own in the evaluate section."""
    return VaderJudge()
