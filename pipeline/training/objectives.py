"""What a train step optimises: the paired losses, or KTO on unpaired rows (torch only, no Ray).

`objective_for` picks one from the loss's declaration (`pipeline.training.losses.is_unpaired`), once; the
step (`pipeline.training.step.train_step`) then calls the same three methods either way:

- `PairObjective`: each micro-batch of pairs stands alone; the rejected response is run through the
  model only when some loss in use reads it.
- `KtoObjective`: KTO's reference point z comes from mismatched prompt/completion pairs, fixed by the
  score stage (`pipeline.data.kto_pairs`) with their reference log-probs. `begin_step` scores the same
  pairs under the policy for the whole optimizer step (no gradient: z is detached), over every worker,
  and each micro-batch's loss uses that step's z, so accumulated micro-batches and several workers
  reproduce the one-big-batch gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from pipeline.config import TrainConfig
from pipeline.training.losses import (
    KtoLogps,
    PairLogps,
    compute_loss,
    is_unpaired,
    kto_reference_point,
    loss_hyperparameters,
    reads_rejected,
)
from pipeline.training.metrics import StepMetrics, mean_metrics
from pipeline.training.policy import policy_sequence_logps


class Objective(Protocol):
    """What a step optimises: the paired losses or KTO (below)."""

    def begin_step(self, model, batches: Sequence[dict], *, world: int) -> tuple[Any, StepMetrics]:
        """What every micro-batch of the step shares (None, or KTO's mismatched-pair log-probs) and its metrics."""

    def micro_batch_loss(self, model, batch: dict, shared: Any, *, scale: float) -> tuple[torch.Tensor, StepMetrics]:
        """Forward one micro-batch: the loss to backpropagate (per-row losses summed, times scale) and its sums."""

    def loss_metrics(self, totals: dict[str, float], shared: Any) -> dict[str, float | None]:
        """The step's logged loss metrics from the summed `StepMetrics.totals()`."""

    def progress(self, row: dict) -> str:
        """The few metrics worth printing from a logged row."""


def _column(batch: dict, name: str, device: torch.device) -> torch.Tensor:
    """A float column of a numpy micro-batch as a (B,) float32 tensor on `device`."""
    return torch.tensor(np.asarray(batch[name], dtype=np.float64), dtype=torch.float32, device=device)


class PairObjective:
    """Paired losses: micro-batches of (prompt, chosen, rejected) pairs, with or without reference log-probs."""

    def __init__(self, train: TrainConfig, *, pad_id: int, device: torch.device, with_reference: bool):
        self.train, self.pad_id, self.device, self.with_reference = train, pad_id, device, with_reference
        self.reads_rejected = reads_rejected(train.loss)
        self.hyperparameters = loss_hyperparameters(train)

    def begin_step(self, model, batches: Sequence[dict], *, world: int) -> tuple[None, StepMetrics]:
        return None, StepMetrics.of(self.device)

    def pair_logps(self, model, batch: dict) -> tuple[PairLogps, int]:
        """The micro-batch's PairLogps under the policy (ref_* from the batch when used) and its token count."""
        b, prompts = len(batch["prompt_ids"]), list(batch["prompt_ids"])
        if self.reads_rejected:
            logps, counts, tokens = policy_sequence_logps(
                model,
                prompts + prompts,
                list(batch["chosen_ids"]) + list(batch["rejected_ids"]),
                train=self.train,
                pad_id=self.pad_id,
                device=self.device,
            )
            chosen, rejected, chosen_len, rejected_len = logps[:b], logps[b:], counts[:b], counts[b:]
        else:  # don't pay a forward pass for a response no loss reads
            chosen, chosen_len, tokens = policy_sequence_logps(
                model, prompts, batch["chosen_ids"], train=self.train, pad_id=self.pad_id, device=self.device
            )
            rejected, rejected_len = torch.zeros_like(chosen), torch.ones_like(chosen_len)
        ref = {}
        if self.with_reference:
            ref = dict(
                ref_chosen_logps=_column(batch, "ref_chosen_logps", self.device),
                ref_rejected_logps=_column(batch, "ref_rejected_logps", self.device),
            )
        pair = PairLogps(
            policy_chosen_logps=chosen,
            policy_rejected_logps=rejected,
            chosen_lengths=chosen_len.float(),
            rejected_lengths=rejected_len.float(),
            **ref,
        )
        return pair, tokens

    def micro_batch_loss(self, model, batch: dict, shared: None, *, scale: float) -> tuple[torch.Tensor, StepMetrics]:
        pair, tokens = self.pair_logps(model, batch)
        out = compute_loss(self.train.loss, pair, **self.hyperparameters)
        pairs = len(out.losses)
        metrics = StepMetrics.of(
            self.device,
            rows=pairs,
            loss=out.losses,
            chosen=pairs,
            rejected=pairs,
            chosen_rewards=out.chosen_rewards,
            rejected_rewards=out.rejected_rewards,
            chosen_logps=pair.policy_chosen_logps,
            rejected_logps=pair.policy_rejected_logps,
            correct=out.chosen_rewards > out.rejected_rewards,
            margins=out.chosen_rewards - out.rejected_rewards,
            tokens=tokens,
        )
        return out.losses.sum() * scale, metrics

    def loss_metrics(self, totals: dict[str, float], shared: None) -> dict[str, float | None]:
        return mean_metrics(totals, paired=True)

    def progress(self, row: dict) -> str:
        return f"margins {row['rewards/margins']:.3f} accuracy {row['rewards/accuracies']:.2f}"


@dataclass(frozen=True)
class KtoReference:
    """The step's mismatched pairs over every worker: log-probs (M,) under the policy and the reference."""

    policy_logps: torch.Tensor
    ref_logps: torch.Tensor

    def point(self) -> float:
        """KTO's reference point z of the step."""
        return float(kto_reference_point(self.policy_logps, self.ref_logps))


def kl_logps(
    model, batches: Sequence[dict], *, train: TrainConfig, pad_id: int, device: torch.device, world: int = 1
) -> tuple[KtoReference, int]:
    """The step's mismatched pairs scored under the policy, beside their reference log-probs, and the tokens run.

    `batches` are this worker's micro-batches of one optimizer step (numpy dicts of SCORED_KTO rows).
    The policy pass runs without gradient: z is detached, so building a graph for it is waste. With
    world > 1 the pairs of every worker are gathered, so every worker uses the same z, that of the
    whole step; workers hold the same number of rows per step (train.batch_size / num_workers).
    """
    policy, tokens = [], 0
    with torch.no_grad():
        for batch in batches:
            logps, _, batch_tokens = policy_sequence_logps(
                model, batch["prompt_ids"], batch["kl_completion_ids"], train=train, pad_id=pad_id, device=device
            )
            tokens += batch_tokens
            policy.append(logps.float())
    ref = torch.tensor(
        np.concatenate([np.asarray(b["ref_kl_logps"], dtype=np.float64) for b in batches]),
        dtype=torch.float32,
        device=device,
    )
    policy = torch.cat(policy)
    if world > 1:
        policy, ref = _all_gather(torch.stack([policy, ref]), world)  # one collective for both
    return KtoReference(policy, ref), tokens


def _all_gather(tensor: torch.Tensor, world: int) -> torch.Tensor:
    """Every worker's `tensor` (2, n) side by side in rank order: (2, world * n)."""
    parts = [torch.empty_like(tensor) for _ in range(world)]
    torch.distributed.all_gather(parts, tensor)
    return torch.cat(parts, dim=1)


class KtoObjective:
    """KTO: micro-batches of (prompt, completion, label) rows against the step's reference point."""

    def __init__(self, train: TrainConfig, *, pad_id: int, device: torch.device):
        self.train, self.pad_id, self.device = train, pad_id, device
        self.hyperparameters = loss_hyperparameters(train)

    def begin_step(self, model, batches: Sequence[dict], *, world: int) -> tuple[KtoReference, StepMetrics]:
        reference, tokens = kl_logps(
            model, batches, train=self.train, pad_id=self.pad_id, device=self.device, world=world
        )
        return reference, StepMetrics.of(self.device, tokens=tokens)

    def micro_batch_loss(
        self, model, batch: dict, shared: KtoReference, *, scale: float
    ) -> tuple[torch.Tensor, StepMetrics]:
        """Desirable rows count as chosen and undesirable ones as rejected in the metrics."""
        policy, _, tokens = policy_sequence_logps(
            model, batch["prompt_ids"], batch["chosen_ids"], train=self.train, pad_id=self.pad_id, device=self.device
        )
        labels = torch.as_tensor(np.asarray(batch["label"], dtype=bool), device=self.device)
        logps = KtoLogps(
            policy_logps=policy,
            ref_logps=_column(batch, "ref_chosen_logps", self.device),
            labels=labels,
            kl_policy_logps=shared.policy_logps,
            kl_ref_logps=shared.ref_logps,
        )
        out = compute_loss(self.train.loss, logps, **self.hyperparameters)
        policy = policy.detach()
        metrics = StepMetrics.of(
            self.device,
            rows=len(out.losses),
            loss=out.losses,
            chosen=labels,
            rejected=~labels,
            chosen_rewards=out.chosen_rewards,
            rejected_rewards=out.rejected_rewards,
            chosen_logps=policy[labels],
            rejected_logps=policy[~labels],
            tokens=tokens,
        )
        return out.losses.sum() * scale, metrics

    def loss_metrics(self, totals: dict[str, float], shared: KtoReference) -> dict[str, float | None]:
        return {**mean_metrics(totals, paired=False), "kl": shared.point()}

    def progress(self, row: dict) -> str:
        return f"kl {row['kl']:.4f}"  # no pairs, so no accuracy: the reference point is what to watch


def objective_for(train: TrainConfig, *, pad_id: int, device: torch.device, with_reference: bool) -> Objective:
    """KtoObjective when train.loss is unpaired (it always reads the reference), else PairObjective."""
    if is_unpaired(train.loss):
        return KtoObjective(train, pad_id=pad_id, device=device)
    return PairObjective(train, pad_id=pad_id, device=device, with_reference=with_reference)
