"""What a train step optimises: the paired losses, or KTO on unpaired rows (torch only, no Ray).

`objective_for` picks one from the loss's declaration (`pipeline.training.losses.is_unpaired`), once; the
step (`pipeline.training.step.train_step`) then calls the same methods either way:

- `begin_step`: what every micro-batch of the step shares: the denominators of the losses' declared
  reductions over the whole step (rows, chosen tokens; summed over every worker), and what a loss
  needs of the whole step (KTO's reference point; AOT's gathered pairs).
- `micro_batch_loss`: one micro-batch's share of the step's loss, already divided by those
  denominators, so the shares of every micro-batch and worker add up to the documented loss.
- `end_step`: after an applied step, the running states (BCO's reward mean) take the step's sums.

The objectives: `pipeline.training.pair_objective.PairObjective` and
`pipeline.training.kto_objective.KtoObjective`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch

from pipeline.config import TrainConfig
from pipeline.training.kto_objective import KtoObjective
from pipeline.training.losses import is_unpaired
from pipeline.training.metrics import StepMetrics
from pipeline.training.pair_objective import PairObjective

__all__ = ["KtoObjective", "Objective", "PairObjective", "objective_for"]


class Objective(Protocol):
    """What a step optimises: the paired losses or KTO."""

    def begin_step(self, model, batches: Sequence[dict], *, world: int) -> tuple[Any, StepMetrics]:
        """What every micro-batch of the step shares (the reductions' denominators, and what a loss needs of
        the whole step) and the metrics of computing it."""
        ...

    def micro_batch_loss(self, model, batch: dict, shared: Any, *, index: int) -> tuple[torch.Tensor, StepMetrics]:
        """Forward micro-batch `index` of the step: its share of the step's loss, () and its metric sums."""
        ...

    def end_step(self, totals: dict[str, float]) -> None:
        """An applied step's summed metrics (over every worker): running states take theirs."""
        ...

    def loss_metrics(self, totals: dict[str, float], shared: Any) -> dict[str, float | None]:
        """The step's logged loss metrics from the summed `StepMetrics.totals()`."""
        ...

    def progress(self, row: dict) -> str:
        """The few metrics worth printing from a logged row."""
        ...

    def state_dict(self) -> dict[str, dict]:
        """The running states, as JSON, for a checkpoint."""
        ...

    def load_state_dict(self, state: dict[str, dict]) -> None:
        """Restore the running states of a checkpoint."""
        ...


def objective_for(train: TrainConfig, *, pad_id: int, device: torch.device, with_reference: bool) -> Objective:
    """KtoObjective when train.loss is unpaired (it always reads the reference), else PairObjective."""
    if is_unpaired(train.loss):
        return KtoObjective(train, pad_id=pad_id, device=device)
    return PairObjective(train, pad_id=pad_id, device=device, with_reference=with_reference)
