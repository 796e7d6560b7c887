"""KTO as a train-step objective (see `pipeline.training.objectives.Objective`; torch only).

KTO's reference point z comes from mismatched prompt/completion pairs, fixed by the score stage
(`pipeline.data.kto_pairs`) with their reference log-probs. `begin_step` scores the same pairs under the
policy for the whole optimizer step (no gradient: z is detached), over every worker, and each
micro-batch's loss uses that step's z, so accumulated micro-batches and several workers reproduce the
one-big-batch gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.config import TrainConfig
from pipeline.training.losses import (
    KtoLogps,
    Reduction,
    choice_of,
    compute_loss,
    kto_reference_point,
    loss_hyperparameters,
)
from pipeline.training.metrics import StepMetrics, mean_metrics
from pipeline.training.policy import policy_sequence_logps
from pipeline.training.step_rows import column, step_denominators


@dataclass(frozen=True)
class KtoReference:
    """The step's mismatched pairs over every worker: log-probs (M,) under the policy and the reference."""

    policy_logps: torch.Tensor
    ref_logps: torch.Tensor

    def point(self) -> float:
        """KTO's reference point z of the step."""
        return float(kto_reference_point(self.policy_logps, self.ref_logps))


@dataclass(frozen=True)
class KtoStep:
    """What a KTO step's micro-batches share: the reductions' denominators and the step's reference point."""

    denominators: dict[Reduction, float]
    reference: KtoReference


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
        self.choice = choice_of(train)
        self.hyperparameters = loss_hyperparameters(train)

    def begin_step(self, model, batches: Sequence[dict], *, world: int) -> tuple[KtoStep, StepMetrics]:
        denominators = step_denominators(batches, world=world, device=self.device)
        reference, tokens = kl_logps(
            model, batches, train=self.train, pad_id=self.pad_id, device=self.device, world=world
        )
        return KtoStep(denominators, reference), StepMetrics.of(self.device, tokens=tokens)

    def micro_batch_loss(self, model, batch: dict, shared: KtoStep, *, index: int) -> tuple[torch.Tensor, StepMetrics]:
        """Desirable rows count as chosen and undesirable ones as rejected in the metrics."""
        policy, _, tokens = policy_sequence_logps(
            model, batch["prompt_ids"], batch["chosen_ids"], train=self.train, pad_id=self.pad_id, device=self.device
        )
        labels = torch.as_tensor(np.asarray(batch["label"], dtype=bool), device=self.device)
        logps = KtoLogps(
            policy_logps=policy,
            ref_logps=column(batch, "ref_chosen_logps", self.device),
            labels=labels,
            kl_policy_logps=shared.reference.policy_logps,
            kl_ref_logps=shared.reference.ref_logps,
        )
        out = compute_loss(self.choice, logps, **self.hyperparameters)
        share = out.reduced(shared.denominators)
        policy = policy.detach()
        metrics = StepMetrics.of(
            self.device,
            rows=len(policy),
            loss=share,
            chosen=labels,
            rejected=~labels,
            chosen_rewards=out.chosen_rewards,
            rejected_rewards=out.rejected_rewards,
            chosen_logps=policy[labels],
            rejected_logps=policy[~labels],
            tokens=tokens,
        )
        return share, metrics

    def end_step(self, totals: dict[str, float]) -> None:
        return None  # KTO keeps no state across steps: its reference point is each step's own

    def loss_metrics(self, totals: dict[str, float], shared: KtoStep) -> dict[str, float | None]:
        return {**mean_metrics(totals, paired=False), "kl": shared.reference.point()}

    def progress(self, row: dict) -> str:
        return f"kl {row['kl']:.4f}"  # no pairs, so no accuracy: the reference point is what to watch

    def state_dict(self) -> dict[str, dict]:
        return {}

    def load_state_dict(self, state: dict[str, dict]) -> None:
        if state:
            raise ValueError(f"kto keeps no running state, but the checkpoint holds one for {', '.join(state)}")
