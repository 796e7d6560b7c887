"""Options that change any paired loss, applied in one place by `compute_loss`: LD-DPO and WPO.

(The third such option, f-DPO's `f_divergence_type`, changes how a loss reads its margin, so the
losses that support it take it themselves: `pipeline.training.losses.ratios.f_scores`.)
Imports torch only.
"""

from __future__ import annotations

import dataclasses

import torch

from pipeline.training.losses.interface import PairLogps
from pipeline.training.losses.ratios import lengths, need


def _desensitised(full: torch.Tensor, prefix: torch.Tensor, ld_alpha: float) -> torch.Tensor:
    return prefix + ld_alpha * (full - prefix)


def length_desensitised(batch: PairLogps, *, ld_alpha: float) -> PairLogps:
    """LD-DPO (Liu et al. 2024, "Length Desensitization in Directly Preference Optimization"): `batch`
    with every log-prob, policy and reference, replaced by

        logp_ld = logp(first l_p tokens) + alpha * logp(the tokens after them),  l_p = min(len_w, len_l),

    alpha = ld_alpha in [0, 1]. The tokens both responses have in common count in full; the excess of
    the longer one is damped, so the likelihood's bias towards length (a longer response has a
    smaller log-prob, and DPO learns to favour length) shrinks. alpha = 1 is the loss unchanged. Needs the
    *_prefix_logps fields, which the score stage writes for the reference when `train.ld_alpha` is set.
    """
    loss = "ld_alpha"
    return dataclasses.replace(
        batch,
        policy_chosen_logps=_desensitised(
            batch.policy_chosen_logps, need(batch, "policy_chosen_prefix_logps", loss=loss), ld_alpha
        ),
        policy_rejected_logps=_desensitised(
            batch.policy_rejected_logps, need(batch, "policy_rejected_prefix_logps", loss=loss), ld_alpha
        ),
        ref_chosen_logps=None
        if batch.ref_chosen_logps is None
        else _desensitised(batch.ref_chosen_logps, need(batch, "ref_chosen_prefix_logps", loss=loss), ld_alpha),
        ref_rejected_logps=None
        if batch.ref_rejected_logps is None
        else _desensitised(batch.ref_rejected_logps, need(batch, "ref_rejected_prefix_logps", loss=loss), ld_alpha),
    )


def wpo_weights(batch: PairLogps) -> torch.Tensor:
    """WPO's pair weights (Zhou et al. 2024, "WPO: Enhancing RLHF with Weighted Preference Optimization", eq. 2),
    without gradient: (B,).

        w = exp(a_w / len_w) * exp(a_l / len_l),  a = sum over the response's tokens of log(pi(y_t) / sum_v pi(v)^2),

    the policy's length-normalised probability of each response, "aligned" by the sum of squared
    probabilities of each position (the paper's weight alignment: an on-policy greedy sample gets weight
    near 1 whatever the entropy). Pairs the current policy would itself produce weigh more: WPO
    re-weights off-policy preference data towards on-policy. Needs policy_*_sq_logps.
    """
    chosen_len, rejected_len = lengths(batch, loss="use_weighting", dtype=batch.policy_chosen_logps.dtype)
    chosen = batch.policy_chosen_logps.detach() - need(batch, "policy_chosen_sq_logps", loss="use_weighting")
    rejected = batch.policy_rejected_logps.detach() - need(batch, "policy_rejected_sq_logps", loss="use_weighting")
    return torch.exp(chosen / chosen_len + rejected / rejected_len)
