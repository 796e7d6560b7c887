"""A step's metrics: sums over its rows, all-reduced in one call, and the means that are logged."""

from __future__ import annotations

import torch


class StepMetrics:
    """Sums over the rows of a step, in one float64 tensor (so workers all-reduce them in one call), read by name.

    rows: rows of the step (pairs, or KTO examples); loss: the step's loss, each micro-batch adding its
    share (already divided by the step's denominators, `pipeline.training.losses.ChoiceOutput.reduced`). chosen /
    rejected: rows whose reward counts as chosen / rejected (every pair counts for both, a KTO example
    for one), and chosen_rewards, rejected_rewards, chosen_logps, rejected_logps their sums. correct:
    pairs whose chosen reward beats the rejected one; margins: sum of the pairs' reward margins.
    tokens: non-pad tokens the step put through the model. state_sum / state_count: what a loss's
    running state takes from the step (BCO: the sum and number of its rewards).
    """

    NAMES = (
        "rows",
        "loss",
        "chosen",
        "rejected",
        "chosen_rewards",
        "rejected_rewards",
        "chosen_logps",
        "rejected_logps",
        "correct",
        "margins",
        "tokens",
        "state_sum",
        "state_count",
    )

    def __init__(self, sums: torch.Tensor):
        self.sums = sums  # (len(NAMES),) float64

    @classmethod
    def of(cls, device: torch.device | str, **values: torch.Tensor | float) -> StepMetrics:
        """Named sums, the rest 0; a tensor value is detached (a () tensor, or summed when it has rows)."""
        unknown = sorted(set(values) - set(cls.NAMES))
        if unknown:
            raise KeyError(f"StepMetrics has no {', '.join(unknown)} (names: {', '.join(cls.NAMES)})")
        sums = torch.zeros(len(cls.NAMES), dtype=torch.float64, device=device)
        for name, value in values.items():
            sums[cls.NAMES.index(name)] = value.detach().sum() if isinstance(value, torch.Tensor) else float(value)
        return cls(sums)

    def __add__(self, other: StepMetrics) -> StepMetrics:
        return StepMetrics(self.sums + other.sums)

    def all_reduce(self) -> StepMetrics:
        """The sums over every worker of the default process group (in place; returns self)."""
        torch.distributed.all_reduce(self.sums)
        return self

    def totals(self) -> dict[str, float]:
        """{name: sum}, read back from the device in one copy."""
        return dict(zip(self.NAMES, self.sums.tolist()))


def _mean(total: float, count: float) -> float | None:
    return total / count if count else None


def mean_metrics(totals: dict[str, float], *, paired: bool) -> dict[str, float | None]:
    """The logged loss and per-row means of `StepMetrics.totals()`; a class with no rows in the step gives None.

    paired: rewards/accuracies and rewards/margins are means over pairs. Unpaired rows have no pairs
    to compare, so no accuracy (None), and the margin is the difference of the two classes' means.
    """
    chosen = _mean(totals["chosen_rewards"], totals["chosen"])
    rejected = _mean(totals["rejected_rewards"], totals["rejected"])
    if paired:
        accuracy, margin = totals["correct"] / totals["rows"], totals["margins"] / totals["rows"]
    else:
        accuracy, margin = None, None if chosen is None or rejected is None else chosen - rejected
    return {
        "loss": totals["loss"],
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/accuracies": accuracy,
        "rewards/margins": margin,
        "logps/chosen": _mean(totals["chosen_logps"], totals["chosen"]),
        "logps/rejected": _mean(totals["rejected_logps"], totals["rejected"]),
    }
