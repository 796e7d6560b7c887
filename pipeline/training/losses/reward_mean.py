"""BCO's running reward shift, a plain value the registry and the checkpoints hold without torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RewardMean:
    """BCO's reward shift delta: the running mean of the implicit rewards over the optimizer steps so far.

    Each step contributes the mean of its 2G rewards beta u (chosen and rejected, over every worker and
    micro-batch); delta is the mean of those step means. A step uses the delta of the steps before it
    (0 at the first), so every micro-batch and worker of a step sees the same number and the state is
    one (mean, steps) pair that a checkpoint keeps.
    """

    mean: float = 0.0
    steps: int = 0

    def updated(self, total: float, count: float) -> RewardMean:
        """The state after a step whose rewards sum to `total` over `count` of them."""
        if not count:
            return self
        step_mean = total / count
        return RewardMean(self.mean + (step_mean - self.mean) / (self.steps + 1), self.steps + 1)
