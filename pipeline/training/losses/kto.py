"""KTO, the unpaired loss: single completions labelled desirable or not, against a KL reference point.

Imports torch only. The mismatched pairs behind the reference point are fixed by
`pipeline.data.kto_pairs` and scored under the policy by `pipeline.training.objectives.KtoObjective`.
"""

from __future__ import annotations

import torch

from pipeline.training.losses.interface import KtoLogps, LossOutput


def kto_reference_point(kl_policy_logps: torch.Tensor, kl_ref_logps: torch.Tensor) -> torch.Tensor:
    """KTO's z = max(0, mean(kl_policy - kl_ref)), detached: a () tensor in log-ratio units (nats).

    The mean log-ratio of mismatched prompt/completion pairs estimates KL(policy || ref) (Ethayarajh
    et al. 2024, Sec. 4.1); clamped at 0 because a KL is never negative, and detached so the policy
    cannot lower its loss by moving the reference point. Shapes: (M,), (M,) -> ().
    """
    if kl_policy_logps.numel() == 0:
        raise ValueError(
            "kto needs at least one mismatched pair (kl_policy_logps is empty) to estimate its reference point"
        )
    return (kl_policy_logps - kl_ref_logps).mean().clamp(min=0).detach()


def kto_loss(
    batch: KtoLogps, *, beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0
) -> LossOutput:
    """KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", eq. 8).

    desirable:   lambda_D (1 - sigmoid(beta (r - z))),   undesirable: lambda_U (1 - sigmoid(beta (z - r))),
    r = pi - ref,  z = max(0, mean(kl_policy - kl_ref)), detached.

    z, the reference point, estimates KL(policy || ref) from mismatched prompt/completion pairs; it is
    detached as in the paper so the policy cannot lower its loss by moving the reference point.
    desirable_weight / undesirable_weight are lambda_D / lambda_U (the paper keeps
    lambda_D n_D / (lambda_U n_U) in [1, 4/3] when the classes are unbalanced).
    Shapes: (N,) in; losses (N,) per example (declared with the ROWS reduction: the mean over the step's
    examples trains); chosen_rewards = beta r of the desirable
    examples (N_D,), rejected_rewards = beta r of the undesirable ones (N_U,): lengths may differ.
    """
    if desirable_weight < 0 or undesirable_weight < 0:  # checked up front too (checks.py); a direct call lands here
        raise ValueError(
            f"kto needs desirable_weight, undesirable_weight >= 0, got {desirable_weight}, {undesirable_weight}"
        )
    labels = batch.labels.to(torch.bool)
    ratio = batch.policy_logps - batch.ref_logps  # (N,)
    kl = kto_reference_point(batch.kl_policy_logps, batch.kl_ref_logps)
    # 1 - sigmoid(x) == sigmoid(-x), which keeps full precision when sigmoid(x) is close to 1.
    desirable = desirable_weight * torch.sigmoid(-beta * (ratio - kl))
    undesirable = undesirable_weight * torch.sigmoid(-beta * (kl - ratio))
    losses = torch.where(labels, desirable, undesirable)
    rewards = beta * ratio
    return LossOutput.of(losses, rewards[labels], rewards[~labels])
