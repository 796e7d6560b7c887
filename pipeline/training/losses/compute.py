"""`compute_loss`: the losses of a choice over one batch, and the one place their rows are reduced.

A choice {name: weight} trains sum_k w_k * (sum over the step's rows of loss_k) / D_k, where D_k is the
denominator of loss k's declared `Reduction` over the whole optimizer step (rows, or chosen tokens).
The objective knows the step's denominators before any micro-batch runs and passes them to
`ChoiceOutput.reduced`, so the micro-batches' values add up to exactly that number; `ChoiceOutput.loss`
is the same for one batch taken as a whole step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.training.losses.interface import KtoLogps, LossOutput, PairLogps
from pipeline.training.losses.loss_config import check_modifiers, check_values
from pipeline.training.losses.loss_spec import HYPERPARAMETERS, MODIFIERS, LossSpec, Reduction
from pipeline.training.losses.modifiers import length_desensitised, wpo_weights
from pipeline.training.losses.registry import LOSSES, LossChoice, loss_weights


def denominators(batch: PairLogps | KtoLogps) -> dict[Reduction, float]:
    """Each reduction's denominator over `batch` alone: its rows, and its chosen responses' tokens."""
    if isinstance(batch, KtoLogps):
        return {Reduction.ROWS: float(len(batch.policy_logps)), Reduction.CHOSEN_TOKENS: 0.0}
    tokens = 0.0 if batch.chosen_lengths is None else float(batch.chosen_lengths.sum())
    return {Reduction.ROWS: float(len(batch.policy_chosen_logps)), Reduction.CHOSEN_TOKENS: tokens}


@dataclass(frozen=True)
class ChoiceOutput:
    """Each loss of a choice on one batch: terms (spec, weight, per-row output), in the choice's order.

    The rewards reported are those of the first loss (every loss defines rewards: beta (pi - ref) for the
    losses that read the reference, beta * mean log-prob for simpo / orpo, beta * summed log-prob for
    sft / unlikelihood).
    """

    terms: tuple[tuple[LossSpec, float, LossOutput], ...]
    alone: Mapping[Reduction, float]  # the batch's own denominators

    def reduced(self, denominators: Mapping[Reduction, float]) -> torch.Tensor:
        """sum_k w_k * sum(losses_k) / denominators[reduction_k]: this batch's share of a step's loss, ()."""
        total = self.terms[0][2].losses.new_zeros(())
        for spec, weight, out in self.terms:
            denominator = denominators[spec.reduction]
            if denominator <= 0:
                raise ValueError(f"loss {spec.name!r}: the step has no {spec.reduction.value} to average over")
            total = total + weight * out.losses.sum() / denominator
        return total

    @property
    def loss(self) -> torch.Tensor:
        """The loss that trains when this batch is the whole step: ()."""
        return self.reduced(self.alone)

    @property
    def chosen_rewards(self) -> torch.Tensor:
        return self.terms[0][2].chosen_rewards

    @property
    def rejected_rewards(self) -> torch.Tensor:
        return self.terms[0][2].rejected_rewards

    def state_sums(self) -> dict[str, torch.Tensor]:
        """{loss name: (2,) state sums} of the losses that keep a running state."""
        return {spec.name: out.state_sums for spec, _, out in self.terms if out.state_sums is not None}


def compute_loss(
    loss: LossChoice,
    batch: PairLogps | KtoLogps,
    *,
    weights: Sequence[float] | None = None,
    states: Mapping[str, Any] | None = None,
    **hyperparameters: Any,
) -> ChoiceOutput:
    """The losses of `loss` (a name, names with their `weights`, or {name: weight}) over one batch.

    hyperparameters: beta (required) and any of HYPERPARAMETERS and MODIFIERS; each loss gets those its
    signature names and its own defaults for the rest, after the values are checked as
    `check_loss_config` checks them. With use_weighting every row's loss is multiplied by WPO's weight
    (of the log-probs before LD-DPO, as TRL does); with ld_alpha every log-prob is length-desensitised.
    states: the running state of each loss that keeps one (missing: its initial state).
    """
    unknown = sorted(set(hyperparameters) - {*HYPERPARAMETERS, *MODIFIERS})
    if unknown or "beta" not in hyperparameters:
        raise TypeError(
            f"compute_loss takes beta and any of {', '.join((*HYPERPARAMETERS, *MODIFIERS))}; "
            f"got {', '.join(sorted(hyperparameters))}"
        )
    choice = loss_weights(loss, weights)
    specs = [LOSSES[name] for name in choice]
    check_values(specs, hyperparameters)
    check_modifiers(specs, hyperparameters)
    row_weights = None
    if isinstance(batch, PairLogps):
        if hyperparameters.get("use_weighting"):
            row_weights = wpo_weights(batch)
        if hyperparameters.get("ld_alpha") is not None:
            batch = length_desensitised(batch, ld_alpha=hyperparameters["ld_alpha"])
    terms = []
    for spec in specs:
        expected = KtoLogps if spec.unpaired else PairLogps
        if not isinstance(batch, expected):
            raise ValueError(f"loss {spec.name!r} takes a {expected.__name__}, got {type(batch).__name__}")
        params = {k: v for k, v in hyperparameters.items() if k in spec.hyperparameters}
        if spec.state is not None:
            params["state"] = (states or {}).get(spec.name) or spec.state()
        out = spec.function(batch, **params)
        if row_weights is not None:
            out = dataclasses.replace(out, losses=out.losses * row_weights.to(out.losses.dtype))
        terms.append((spec, choice[spec.name], out))
    return ChoiceOutput(tuple(terms), denominators(batch))
