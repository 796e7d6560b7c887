"""Paired losses that never read the reference (declared reference_free in the registry).

When every loss in use is one of these, the score stage is skipped. Notation:
`pipeline.training.losses.ratios`. This module imports torch only.
"""

from __future__ import annotations

import torch.nn.functional as F

from pipeline.training.losses.interface import LossOutput, PairLogps
from pipeline.training.losses.ratios import log1m_exp, mean_logps, need


def simpo_loss(batch: PairLogps, *, beta: float, gamma: float = 0.5) -> LossOutput:
    """SimPO (Meng, Xia & Chen 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward", eq. 6).

    loss = -logsigmoid(beta pi_w / len_w - beta pi_l / len_l - gamma).

    gamma is the absolute target reward margin, in reward units, as written in eq. 6 (not the
    gamma/beta ratio the authors' later configs expose: to hold that ratio fixed while sweeping beta,
    set gamma = ratio * beta in the config). The default 0.5 sits in the paper's searched range;
    the paper's beta is much larger than DPO's (2.0 to 2.5) because mean log-probs are small.
    No reference is read. Rewards: beta * mean log-prob.
    """
    chosen_mean, rejected_mean = mean_logps(batch, loss="simpo")
    chosen_rewards, rejected_rewards = beta * chosen_mean, beta * rejected_mean
    return LossOutput.of(-F.logsigmoid(chosen_rewards - rejected_rewards - gamma), chosen_rewards, rejected_rewards)


def orpo_loss(batch: PairLogps, *, beta: float, alpha: float = 1.0) -> LossOutput:
    """ORPO (Hong, Lee & Thorne 2024, "ORPO: Monolithic Preference Optimization without Reference Model", eqs. 4-7).

    loss = -pi_w / len_w + alpha * -logsigmoid(log_odds_w - log_odds_l),
    log_odds = p - log(1 - exp(p)),  p = pi / len (the per-token mean log-prob).

    alpha is the paper's lambda on the odds-ratio term (the paper reports lambda = 0.1 for its main
    runs; the default 1.0 here is shared with the other losses, set it in the config). beta does not
    enter the loss: it only scales the logged rewards, beta * mean log-prob. No reference is read.
    """
    chosen_mean, rejected_mean = mean_logps(batch, loss="orpo")
    chosen_log_odds = chosen_mean - log1m_exp(chosen_mean)
    rejected_log_odds = rejected_mean - log1m_exp(rejected_mean)
    losses = -chosen_mean - alpha * F.logsigmoid(chosen_log_odds - rejected_log_odds)
    return LossOutput.of(losses, beta * chosen_mean, beta * rejected_mean)


def sft_loss(batch: PairLogps, *, beta: float) -> LossOutput:
    """Preferred-FT (the SFT-on-chosen baseline of Rafailov et al. 2023, Sec. 6): NLL of the chosen response.

    losses_b = -pi_w (the chosen response's summed NLL); declared with the CHOSEN_TOKENS reduction, so
    what trains is -(sum_b pi_w) / (sum_b len_w) over the whole optimizer step: the token mean, each
    token weighing the same, as in ordinary SFT. The rejected response is unused. Rewards: beta * pi
    (summed policy log-probs), for logging only.
    """
    need(batch, "chosen_lengths", loss="sft")  # the reduction divides by them
    return LossOutput.of(
        -batch.policy_chosen_logps, beta * batch.policy_chosen_logps, beta * batch.policy_rejected_logps
    )


def unlikelihood_loss(batch: PairLogps, *, beta: float, alpha: float = 1.0) -> LossOutput:
    """Unlikelihood (Welleck et al. 2019; the DPO paper's baseline, Rafailov et al. 2023, Sec. 6), sequence form.

    loss = -pi_w / len_w - alpha * log(1 - exp(pi_l / len_l)).

    Welleck et al. push down the probability of unwanted tokens with -log(1 - p); over our summed
    log-probs we apply it to the rejected response's mean per-token probability exp(pi_l / len_l),
    computed stably, while the first term keeps the chosen response likely. Rewards: beta * pi
    (summed policy log-probs), for logging only.
    """
    chosen_mean, rejected_mean = mean_logps(batch, loss="unlikelihood")
    losses = -chosen_mean - alpha * log1m_exp(rejected_mean)
    return LossOutput.of(losses, beta * batch.policy_chosen_logps, beta * batch.policy_rejected_logps)
