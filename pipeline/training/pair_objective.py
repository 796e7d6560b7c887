"""The paired losses as a train-step objective (see `pipeline.training.objectives.Objective`; torch only).

Each micro-batch of (prompt, chosen, rejected) pairs runs through the policy once (the rejected response
only when some loss reads it), with the extras the losses ask for: each response's prefix log-prob
(LD-DPO), its squared-probability sum (WPO), and for a batch-wise loss (AOT) the whole step's pairs,
gathered over every micro-batch and worker by one more forward pass without gradient.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.config import TrainConfig
from pipeline.model.logps.dispatch import SequenceStats
from pipeline.training.losses import (
    PairLogps,
    Reduction,
    StepPairs,
    choice_of,
    compute_loss,
    is_batch_wise,
    length_desensitised,
    loss_hyperparameters,
    loss_states,
    needs_prefix_logps,
    needs_sq_logps,
    reads_rejected,
)
from pipeline.training.metrics import StepMetrics, mean_metrics
from pipeline.training.policy import policy_sequence_stats
from pipeline.training.step_rows import column, step_denominators


@dataclass(frozen=True)
class PairStep:
    """What a step's micro-batches of pairs share: the reductions' denominators and, for a batch-wise
    loss, each micro-batch's view of the step's gathered pairs (in micro-batch order)."""

    denominators: dict[Reduction, float]
    pairs: list[StepPairs] | None = None


class PairObjective:
    """Paired losses: micro-batches of (prompt, chosen, rejected) pairs, with or without reference log-probs."""

    def __init__(self, train: TrainConfig, *, pad_id: int, device: torch.device, with_reference: bool):
        self.train, self.pad_id, self.device, self.with_reference = train, pad_id, device, with_reference
        self.choice = choice_of(train)
        self.hyperparameters = loss_hyperparameters(train)
        self.reads_rejected = reads_rejected(self.choice)
        self.batch_wise = is_batch_wise(self.choice)
        self.prefix, self.sq = needs_prefix_logps(train), needs_sq_logps(train)
        self.states = loss_states(self.choice)

    def pair_logps(self, model, batch: dict) -> tuple[PairLogps, int]:
        """The micro-batch's PairLogps under the policy (ref_* from the batch when used) and its token count."""
        prompts = list(batch["prompt_ids"])
        chosen_ids, rejected_ids = list(batch["chosen_ids"]), list(batch["rejected_ids"])
        # LD-DPO's shared length: the tokens both responses of a pair have (the same for either side)
        shared = [min(len(c), len(r)) for c, r in zip(chosen_ids, rejected_ids)] if self.prefix else None
        sides = 2 if self.reads_rejected else 1  # don't pay a forward pass for a response no loss reads
        stats = policy_sequence_stats(
            model,
            prompts * sides,
            chosen_ids + rejected_ids if sides == 2 else chosen_ids,
            prefix_lengths=None if shared is None else shared * sides,
            sq_probs=self.sq,
            train=self.train,
            pad_id=self.pad_id,
            device=self.device,
        )
        fields: dict[str, Any] = _sides(stats, len(prompts))
        if self.with_reference:
            names = ["ref_chosen_logps", "ref_rejected_logps"]
            names += ["ref_chosen_prefix_logps", "ref_rejected_prefix_logps"] if self.prefix else []
            fields.update({name: column(batch, name, self.device) for name in names})
        return PairLogps(**fields), stats.tokens

    def begin_step(self, model, batches: Sequence[dict], *, world: int) -> tuple[PairStep, StepMetrics]:
        denominators = step_denominators(batches, world=world, device=self.device)
        if not self.batch_wise:
            return PairStep(denominators), StepMetrics.of(self.device)
        pairs, tokens = self.step_pairs(model, batches, world=world)
        return PairStep(denominators, pairs), StepMetrics.of(self.device, tokens=tokens)

    def step_pairs(self, model, batches: Sequence[dict], *, world: int) -> tuple[list[StepPairs], int]:
        """The step's pairs over every worker (policy log-probs without gradient), as each micro-batch sees
        them, and the tokens this costs: one more forward pass per micro-batch, the price of a loss that
        compares the rows of a step with each other. Workers hold the same number of rows per step."""
        parts, tokens = [], 0
        with torch.no_grad():
            for batch in batches:
                pair, batch_tokens = self.pair_logps(model, batch)
                if self.hyperparameters["ld_alpha"] is not None:
                    pair = length_desensitised(pair, ld_alpha=self.hyperparameters["ld_alpha"])
                tokens += batch_tokens
                fields = (
                    pair.policy_chosen_logps,
                    pair.policy_rejected_logps,
                    pair.ref_chosen_logps,
                    pair.ref_rejected_logps,
                )
                parts.append(torch.stack([f.float() for f in fields if f is not None]))  # (4, b)
        mine = torch.cat(parts, dim=1)  # (4, n)
        rank, everyone = 0, mine
        if world > 1:
            rank = torch.distributed.get_rank()
            gathered = [torch.empty_like(mine) for _ in range(world)]
            torch.distributed.all_gather(gathered, mine)
            everyone = torch.cat(gathered, dim=1)  # (4, world * n), rank-major
        offsets = np.cumsum([0] + [len(batch["prompt_ids"]) for batch in batches[:-1]]) + rank * mine.shape[1]
        return [StepPairs(*everyone, offset=int(offset)) for offset in offsets], tokens

    def micro_batch_loss(self, model, batch: dict, shared: PairStep, *, index: int) -> tuple[torch.Tensor, StepMetrics]:
        pair, tokens = self.pair_logps(model, batch)
        if shared.pairs is not None:
            pair = dataclasses.replace(pair, step=shared.pairs[index])
        out = compute_loss(self.choice, pair, states=self.states, **self.hyperparameters)
        share = out.reduced(shared.denominators)
        pairs = len(pair.policy_chosen_logps)
        state = next(iter(out.state_sums().values()), None)
        metrics = StepMetrics.of(
            self.device,
            rows=pairs,
            loss=share,
            chosen=pairs,
            rejected=pairs,
            chosen_rewards=out.chosen_rewards,
            rejected_rewards=out.rejected_rewards,
            chosen_logps=pair.policy_chosen_logps,
            rejected_logps=pair.policy_rejected_logps,
            correct=out.chosen_rewards > out.rejected_rewards,
            margins=out.chosen_rewards - out.rejected_rewards,
            tokens=tokens,
            **({} if state is None else {"state_sum": state[0], "state_count": state[1]}),
        )
        return share, metrics

    def end_step(self, totals: dict[str, float]) -> None:
        for name, state in self.states.items():
            self.states[name] = state.updated(totals["state_sum"], totals["state_count"])

    def loss_metrics(self, totals: dict[str, float], shared: PairStep) -> dict[str, float | None]:
        return mean_metrics(totals, paired=True)

    def progress(self, row: dict) -> str:
        return f"margins {row['rewards/margins']:.3f} accuracy {row['rewards/accuracies']:.2f}"

    def state_dict(self) -> dict[str, dict]:
        return {name: dataclasses.asdict(state) for name, state in self.states.items()}

    def load_state_dict(self, state: dict[str, dict]) -> None:
        for name, values in state.items():
            if name not in self.states:
                raise ValueError(f"the checkpoint holds a running state of {name!r}, which train.loss does not use")
            self.states[name] = type(self.states[name])(**values)


def _sides(stats: SequenceStats, b: int) -> dict[str, Any]:
    """PairLogps's policy fields from the stats of 2B sequences (chosen, then rejected) or of B chosen ones
    alone, whose rejected side is then zeros of length 1 (read by no loss)."""
    both = len(stats.logps) == 2 * b

    def split(values: torch.Tensor | None, empty: float) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if values is None:
            return None, None
        return (values[:b], values[b:]) if both else (values, torch.full_like(values, empty))

    (chosen, rejected), (chosen_len, rejected_len) = split(stats.logps, 0.0), split(stats.counts.float(), 1.0)
    (chosen_prefix, rejected_prefix), (chosen_sq, rejected_sq) = (
        split(stats.prefix_logps, 0.0),
        split(stats.sq_logps, 0.0),
    )
    return dict(
        policy_chosen_logps=chosen,
        policy_rejected_logps=rejected,
        chosen_lengths=chosen_len,
        rejected_lengths=rejected_len,
        policy_chosen_prefix_logps=chosen_prefix,
        policy_rejected_prefix_logps=rejected_prefix,
        policy_chosen_sq_logps=chosen_sq,
        policy_rejected_sq_logps=rejected_sq,
    )
