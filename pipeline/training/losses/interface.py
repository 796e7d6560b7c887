"""What every loss takes and returns: `PairLogps` or `KtoLogps` in, a `LossOutput` out. Imports torch only."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, kw_only=True)
class PairLogps:
    """Per-pair sequence log-probs of B preference pairs; every tensor has shape (B,).

    Log-probs are sums over the response tokens (what `pipeline.model.logps.dispatch.batch_sequence_logps` returns).
    Reference fields may be None for reference-free losses and lengths may be None for losses that do
    not length-normalise; a loss that needs a missing field raises ValueError naming it.
    """

    policy_chosen_logps: torch.Tensor  # (B,) float
    policy_rejected_logps: torch.Tensor  # (B,) float
    ref_chosen_logps: torch.Tensor | None = None  # (B,) float
    ref_rejected_logps: torch.Tensor | None = None  # (B,) float
    chosen_lengths: torch.Tensor | None = None  # (B,) int or float, response tokens
    rejected_lengths: torch.Tensor | None = None  # (B,) int or float, response tokens


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
    """What every loss returns.

    loss: scalar to backpropagate (mean over pairs, except where a loss documents otherwise: sft).
    losses: (B,) per-pair loss. chosen_rewards / rejected_rewards: (B,) detached, for logging
    reward accuracy and margins (for KTO: rewards of the desirable / undesirable examples).
    """

    loss: torch.Tensor  # () scalar
    losses: torch.Tensor  # (B,)
    chosen_rewards: torch.Tensor  # (B,) detached
    rejected_rewards: torch.Tensor  # (B,) detached

    @classmethod
    def mean_of(cls, losses: torch.Tensor, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> LossOutput:
        """The usual output: loss = losses.mean(), rewards detached."""
        return cls(
            loss=losses.mean(),
            losses=losses,
            chosen_rewards=chosen_rewards.detach(),
            rejected_rewards=rejected_rewards.detach(),
        )
