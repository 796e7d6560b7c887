"""What every loss takes and returns: `PairLogps` or `KtoLogps` in, a `LossOutput` of per-row values out.

A loss never averages: it returns one value per row, and its declaration (`LossSpec.reduction`, a `Reduction`) says
how the rows of an optimizer step become the number that trains. The objective applies that
reduction once, over the whole step (every micro-batch, every worker). Imports torch only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StepPairs:
    """Every pair of one optimizer step, over all workers and micro-batches, detached: (G,) each.

    Batch-wise losses (AOT sorts the step's log-ratios) read it; `offset` is where the current
    micro-batch's B rows sit among the G, so row i of the micro-batch is row offset + i here.
    """

    policy_chosen_logps: torch.Tensor  # (G,)
    policy_rejected_logps: torch.Tensor  # (G,)
    ref_chosen_logps: torch.Tensor  # (G,)
    ref_rejected_logps: torch.Tensor  # (G,)
    offset: int = 0


@dataclass(frozen=True, kw_only=True)
class PairLogps:
    """Per-pair sequence log-probs of B preference pairs; every tensor has shape (B,).

    Log-probs are sums over the response tokens (what `pipeline.model.logps.dispatch.batch_sequence_logps`
    returns). Reference fields may be None for reference-free losses and lengths may be None for losses
    that do not length-normalise; a loss that needs a missing field raises ValueError naming it.

    The optional fields exist only when the objective was asked for them:
    - *_prefix_logps: the sum over each response's first min(len_w, len_l) tokens (LD-DPO, `train.ld_alpha`).
    - policy_*_sq_logps: sum over each response's tokens of log sum_v pi(v | prefix)^2, without gradient
      (WPO's sampling-aligned weights, `train.use_weighting`).
    - step: the whole optimizer step's pairs, for losses declared `batch_wise` (AOT). When it is None a
      batch-wise loss takes this batch as the whole step.
    """

    policy_chosen_logps: torch.Tensor  # (B,) float
    policy_rejected_logps: torch.Tensor  # (B,) float
    ref_chosen_logps: torch.Tensor | None = None  # (B,) float
    ref_rejected_logps: torch.Tensor | None = None  # (B,) float
    chosen_lengths: torch.Tensor | None = None  # (B,) int or float, response tokens
    rejected_lengths: torch.Tensor | None = None  # (B,) int or float, response tokens
    policy_chosen_prefix_logps: torch.Tensor | None = None  # (B,)
    policy_rejected_prefix_logps: torch.Tensor | None = None  # (B,)
    ref_chosen_prefix_logps: torch.Tensor | None = None  # (B,)
    ref_rejected_prefix_logps: torch.Tensor | None = None  # (B,)
    policy_chosen_sq_logps: torch.Tensor | None = None  # (B,) detached
    policy_rejected_sq_logps: torch.Tensor | None = None  # (B,) detached
    step: StepPairs | None = None


@dataclass(frozen=True, kw_only=True)
class KtoLogps:
    """Unpaired examples for KTO; every tensor has shape (N,).

    `labels` is True where the completion is desirable. `kl_policy_logps` / `kl_ref_logps` are the
    log-probs of mismatched prompt/completion pairs (the caller builds them, e.g. completion i with
    prompt i+1); they only estimate KTO's reference point and may have their own length M.
    """

    policy_logps: torch.Tensor  # (N,) float, summed over completion tokens
    ref_logps: torch.Tensor  # (N,) float
    labels: torch.Tensor  # (N,) bool, True = desirable
    kl_policy_logps: torch.Tensor  # (M,) float
    kl_ref_logps: torch.Tensor  # (M,) float


@dataclass(frozen=True)
class LossOutput:
    """What every loss returns: per-row values, never a mean (the declared `Reduction` makes that).

    losses: (B,) per-row loss. chosen_rewards / rejected_rewards: (B,) detached, for logging reward
    accuracy and margins (for KTO: rewards of the desirable / undesirable examples, (N_D,) and (N_U,)).
    state_sums: for a loss with a running state (BCO), what the state takes from these rows, detached:
    (2,) = (sum, count); the objective adds it up over the step and updates the state after it.
    """

    losses: torch.Tensor  # (B,)
    chosen_rewards: torch.Tensor  # (B,) detached
    rejected_rewards: torch.Tensor  # (B,) detached
    state_sums: torch.Tensor | None = None  # (2,) detached

    @classmethod
    def of(cls, losses: torch.Tensor, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> LossOutput:
        """The usual output: per-row losses, rewards detached."""
        return cls(losses=losses, chosen_rewards=chosen_rewards.detach(), rejected_rewards=rejected_rewards.detach())
