"""Paired losses that anchor each response's own reward, not only the margin between them.

DPO sees only r_w - r_l, so both rewards may fall together. These losses give each of r_w = beta u_w
and r_l = beta u_l a target of its own: NCA, BCO (with its running reward shift), SPPO (hard labels)
and APO (zero and down anchors). Notation: `pipeline.training.losses.ratios`. Imports torch only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.training.losses.interface import LossOutput, PairLogps
from pipeline.training.losses.ratios import log_ratios
from pipeline.training.losses.reward_mean import RewardMean


def nca_pair_loss(batch: PairLogps, *, beta: float) -> LossOutput:
    """NCA, pairwise (Chen et al. 2024, "Noise Contrastive Alignment of Language Models with Explicit Rewards").

    loss = -logsigmoid(r_w) - 1/2 logsigmoid(-r_w) - 1/2 logsigmoid(-r_l),  r = beta u.

    Noise-contrastive estimation over the pair: the chosen response is classified as data against a
    noise of both, so r_w is pushed up towards a finite optimum while r_l is pushed down; unlike DPO
    the chosen likelihood does not fall. At step 0 (r = 0) the loss is 2 log 2. Rewards: beta * u.
    """
    chosen, rejected = log_ratios(batch, loss="nca_pair")
    r_w, r_l = beta * chosen, beta * rejected
    losses = -F.logsigmoid(r_w) - 0.5 * F.logsigmoid(-r_w) - 0.5 * F.logsigmoid(-r_l)
    return LossOutput.of(losses, r_w, r_l)


def bco_pair_loss(batch: PairLogps, *, beta: float, state: RewardMean = RewardMean()) -> LossOutput:
    """BCO on pairs (Jung et al. 2024, "Binary Classifier Optimization for Large Language Model Alignment").

    loss = -logsigmoid(r_w - delta) - logsigmoid(-(r_l - delta)),  r = beta u,  delta = state.mean.

    The chosen and the rejected response are two examples of a binary classifier whose logit is the
    implicit reward; the reward shift delta, a running mean of the rewards (`RewardMean`), centres that
    logit so the classifier does not drift with the rewards' common level. TRL 1.16's bco_pair keeps
    delta = 0 (earlier TRL releases kept the running mean). At step 0 the loss is 2 log 2.
    state_sums: the sum and count of the 2B rewards, which the running mean takes after the step.
    """
    chosen, rejected = log_ratios(batch, loss="bco_pair")
    r_w, r_l = beta * chosen, beta * rejected
    delta = state.mean
    losses = -F.logsigmoid(r_w - delta) - F.logsigmoid(-(r_l - delta))
    sums = torch.stack([(r_w.sum() + r_l.sum()).detach(), torch.tensor(2.0 * len(r_w), dtype=r_w.dtype)])
    return LossOutput(
        losses=losses, chosen_rewards=r_w.detach(), rejected_rewards=r_l.detach(), state_sums=sums.to(r_w.device)
    )


def sppo_hard_loss(batch: PairLogps, *, beta: float) -> LossOutput:
    """SPPO with hard labels (Wu et al. 2024, "Self-Play Preference Optimization for Language Model Alignment",
    eq. 4.7 with the win probability P set to 1 for the chosen response and 0 for the rejected).

    loss = (u_w - 1 / (2 beta))^2 + (u_l + 1 / (2 beta))^2.

    Each log-ratio regresses onto its own target, +-1/(2 beta) (the paper's eta (P - 1/2) with
    eta = 1 / beta): the chosen response is made more likely and the rejected less, each by a bounded
    amount. Rewards: beta * u.
    """
    chosen, rejected = log_ratios(batch, loss="sppo_hard")
    target = 0.5 / beta
    losses = (chosen - target) ** 2 + (rejected + target) ** 2
    return LossOutput.of(losses, beta * chosen, beta * rejected)


def apo_zero_loss(batch: PairLogps, *, beta: float) -> LossOutput:
    """APO-zero (D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive Revisions", eq. 7).

    loss = (1 - sigmoid(r_w)) + sigmoid(r_l),  r = beta u.

    For data whose chosen responses are better than the model's own outputs: raise the chosen reward
    and lower the rejected one, each anchored at zero. At step 0 the loss is 1. Rewards: beta * u.
    """
    chosen, rejected = log_ratios(batch, loss="apo_zero")
    r_w, r_l = beta * chosen, beta * rejected
    return LossOutput.of(torch.sigmoid(-r_w) + torch.sigmoid(r_l), r_w, r_l)


def apo_down_loss(batch: PairLogps, *, beta: float) -> LossOutput:
    """APO-down (D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive Revisions", eq. 8).

    loss = sigmoid(r_w) + (1 - sigmoid(r_w - r_l)),  r = beta u.

    For data whose chosen responses are worse than the model's own outputs: lower the chosen reward,
    and the rejected one further, so the margin still grows. At step 0 the loss is 1. Rewards: beta * u.
    """
    chosen, rejected = log_ratios(batch, loss="apo_down")
    r_w, r_l = beta * chosen, beta * rejected
    return LossOutput.of(torch.sigmoid(r_w) + torch.sigmoid(r_l - r_w), r_w, r_l)
