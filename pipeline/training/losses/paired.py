"""The paired preference losses: small pure tensor functions, each citing its paper and equation.

Every loss here takes a `PairLogps` (per-pair sequence log-probs, each a sum over response tokens) and
keyword hyperparameters, and returns a `LossOutput`. What each one needs (the reference or not, the
rejected response or not) is declared once, in `pipeline.training.losses.registry`.

Notation in the docstrings, all per pair, shape (B,):
    pi_w, pi_l    policy log-prob of the chosen (w) / rejected (l) response, summed over its tokens
    ref_w, ref_l  the same under the frozen reference model
    len_w, len_l  response token counts
    h = (pi_w - ref_w) - (pi_l - ref_l)            log-ratio margin
    m = beta * h                                   implicit-reward margin r_w - r_l (DPO, eq. 5/7)

All losses are written with logsigmoid / softplus so margins of +-50 (and far beyond) stay finite.
This module imports torch only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pipeline.training.losses.interface import LossOutput, PairLogps

# ---------------------------------------------------------------------------------------------------
# helpers


def _need(batch: PairLogps, field: str, *, loss: str) -> torch.Tensor:
    """batch.<field>, or a ValueError that says which loss needed which missing field."""
    value = getattr(batch, field)
    if value is None:
        raise ValueError(f"loss {loss!r} needs PairLogps.{field}, which is None")
    return value


def _log_ratios(batch: PairLogps, *, loss: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(pi_w - ref_w, pi_l - ref_l), each (B,)."""
    chosen = batch.policy_chosen_logps - _need(batch, "ref_chosen_logps", loss=loss)
    rejected = batch.policy_rejected_logps - _need(batch, "ref_rejected_logps", loss=loss)
    return chosen, rejected


def _mean_logps(batch: PairLogps, *, loss: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token mean log-probs (pi_w / len_w, pi_l / len_l), each (B,).

    Lengths come in as integer counts; they are cast to the log-probs' dtype and clamped to >= 1 so an
    empty response (sum 0, length 0) gives mean 0 rather than NaN.
    """
    chosen_len = _need(batch, "chosen_lengths", loss=loss)
    rejected_len = _need(batch, "rejected_lengths", loss=loss)
    chosen = batch.policy_chosen_logps / chosen_len.to(batch.policy_chosen_logps.dtype).clamp(min=1)
    rejected = batch.policy_rejected_logps / rejected_len.to(batch.policy_rejected_logps.dtype).clamp(min=1)
    return chosen, rejected


def _log1m_exp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends (Maechler 2012, "Accurately computing log(1-exp(-|a|))").

    Near 0, 1 - exp(x) cancels, so use log(-expm1(x)); far below, exp(x) underflows, so use
    log1p(-exp(x)); the switch is at -log 2. x is clamped just below 0 because a mean log-prob of
    exactly 0 (probability 1) has infinite odds. Each branch sees only inputs in its own range so the
    branch torch.where discards cannot put inf * 0 = NaN into the gradient.
    """
    tiny = float(torch.finfo(x.dtype).eps)
    x = x.clamp(max=-tiny)
    near_zero = x > -math.log(2.0)
    cut = torch.full_like(x, -math.log(2.0))
    near = torch.log(-torch.expm1(torch.where(near_zero, x, cut)))
    far = torch.log1p(-torch.exp(torch.where(near_zero, cut, x)))
    return torch.where(near_zero, near, far)


def _sigmoid_pair_loss(margin: torch.Tensor, *, label_smoothing: float) -> torch.Tensor:
    """-(1 - eps) logsigmoid(m) - eps logsigmoid(-m): Bradley-Terry NLL with labels flipped w.p. eps."""
    return -(1.0 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)


# ---------------------------------------------------------------------------------------------------
# paired losses that read the reference


def dpo_loss(batch: PairLogps, *, beta: float, label_smoothing: float = 0.0) -> LossOutput:
    """DPO (Rafailov et al. 2023, eq. 7); with label_smoothing eps > 0, conservative DPO (cDPO).

    loss = -(1 - eps) logsigmoid(m) - eps logsigmoid(-m),  m = beta (pi_w - ref_w) - beta (pi_l - ref_l).

    eps = 0 is eq. 7 exactly. eps > 0 is cDPO (Mitchell 2023, "A note on DPO with noisy preferences
    and relationship to IPO"): the expected DPO loss when each label is flipped with probability eps.
    Rewards: beta * (pi - ref). Shapes: (B,) in, scalar loss out.
    """
    if not 0.0 <= label_smoothing <= 0.5:
        # Above 0.5 the labels are believed wrong more often than right: flip them in the data instead.
        raise ValueError(f"dpo needs 0 <= label_smoothing <= 0.5, got {label_smoothing}")
    chosen_ratio, rejected_ratio = _log_ratios(batch, loss="dpo")
    chosen_rewards, rejected_rewards = beta * chosen_ratio, beta * rejected_ratio
    losses = _sigmoid_pair_loss(chosen_rewards - rejected_rewards, label_smoothing=label_smoothing)
    return LossOutput.mean_of(losses, chosen_rewards, rejected_rewards)


def ipo_loss(batch: PairLogps, *, beta: float) -> LossOutput:
    """IPO (Azar et al. 2023, "A General Theoretical Paradigm...", eq. 17).

    loss = (h - 1 / (2 beta))^2,  h = (pi_w - ref_w) - (pi_l - ref_l); beta is the paper's tau.

    The paper's h is a log-ratio of whole-sequence probabilities, so our per-response sums are its
    form. (Some implementations average log-probs over tokens instead, which rescales h by about
    1/length and so changes what a given beta means; we keep sums.) The loss is minimal, zero, at
    h = 1/(2 beta): IPO regresses the margin onto a target instead of pushing it to infinity.
    Rewards: beta * (pi - ref).
    """
    if beta <= 0:
        raise ValueError(f"ipo needs beta > 0 (its target margin is 1/(2 beta)), got {beta}")
    chosen_ratio, rejected_ratio = _log_ratios(batch, loss="ipo")
    losses = (chosen_ratio - rejected_ratio - 1.0 / (2.0 * beta)) ** 2
    return LossOutput.mean_of(losses, beta * chosen_ratio, beta * rejected_ratio)


def hinge_loss(batch: PairLogps, *, beta: float) -> LossOutput:
    """Hinge / SLiC (Zhao et al. 2023, "SLiC-HF", the rank calibration loss of Sec. 2) on DPO's margin.

    loss = relu(1 - beta h),  h = (pi_w - ref_w) - (pi_l - ref_l).

    SLiC-HF's calibration loss is max(0, delta - log P(y_w) + log P(y_l)) with no reference; here the
    margin is the reference-normalised one (as in Liu et al. 2023, RSO) and delta = 1 / beta after
    scaling. Rewards: beta * (pi - ref).
    """
    chosen_ratio, rejected_ratio = _log_ratios(batch, loss="hinge")
    chosen_rewards, rejected_rewards = beta * chosen_ratio, beta * rejected_ratio
    losses = torch.relu(1.0 - (chosen_rewards - rejected_rewards))
    return LossOutput.mean_of(losses, chosen_rewards, rejected_rewards)


def robust_loss(batch: PairLogps, *, beta: float, label_smoothing: float = 0.0) -> LossOutput:
    """Robust DPO, rDPO (Chowdhury, Kini & Natarajan 2024, "Provably Robust DPO", the unbiased loss of Sec. 3).

    loss = ((1 - eps) softplus(-m) - eps softplus(m)) / (1 - 2 eps),  m = beta h,  eps = label_smoothing.

    Where cDPO averages the loss over the label-flip noise, rDPO de-biases it: its expectation under
    flips with rate eps equals the clean DPO loss. The price is that it is unbounded below in m (a
    per-pair loss can go negative) and it needs eps < 1/2. Rewards: beta * (pi - ref).
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust needs 0 <= label_smoothing < 0.5 (it divides by 1 - 2 eps), got {label_smoothing}")
    chosen_ratio, rejected_ratio = _log_ratios(batch, loss="robust")
    chosen_rewards, rejected_rewards = beta * chosen_ratio, beta * rejected_ratio
    margin = chosen_rewards - rejected_rewards
    eps = label_smoothing
    losses = ((1.0 - eps) * -F.logsigmoid(margin) - eps * -F.logsigmoid(-margin)) / (1.0 - 2.0 * eps)
    return LossOutput.mean_of(losses, chosen_rewards, rejected_rewards)


def rpo_loss(batch: PairLogps, *, beta: float, label_smoothing: float = 0.0, alpha: float = 1.0) -> LossOutput:
    """Iterative RPO (Pang et al. 2024, "Iterative Reasoning Preference Optimization", DPO+NLL loss of Sec. 2).

    loss = dpo + alpha * (-pi_w / len_w).

    The NLL on the chosen response keeps its likelihood from falling while the margin grows. The paper
    puts its weight on the DPO term and normalises the NLL by the full chosen sequence length (prompt
    included); we weight the NLL instead (same optimum direction; alpha = 1 makes them equal) and
    normalise by response tokens, the only ones we score. Rewards: beta * (pi - ref), as DPO.
    """
    dpo = dpo_loss(batch, beta=beta, label_smoothing=label_smoothing)
    chosen_mean, _ = _mean_logps(batch, loss="rpo")
    losses = dpo.losses - alpha * chosen_mean
    return LossOutput.mean_of(losses, dpo.chosen_rewards, dpo.rejected_rewards)


# ---------------------------------------------------------------------------------------------------
# paired losses that never read the reference (declared reference_free in the registry)


def simpo_loss(batch: PairLogps, *, beta: float, gamma: float = 0.5) -> LossOutput:
    """SimPO (Meng, Xia & Chen 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward", eq. 6).

    loss = -logsigmoid(beta pi_w / len_w - beta pi_l / len_l - gamma).

    gamma is the absolute target reward margin, in reward units, as written in eq. 6 (not the
    gamma/beta ratio the authors' later configs expose: to hold that ratio fixed while sweeping beta,
    set gamma = ratio * beta in the config). The default 0.5 sits in the paper's searched range;
    the paper's beta is much larger than DPO's (2.0 to 2.5) because mean log-probs are small.
    No reference is read. Rewards: beta * mean log-prob.
    """
    chosen_mean, rejected_mean = _mean_logps(batch, loss="simpo")
    chosen_rewards, rejected_rewards = beta * chosen_mean, beta * rejected_mean
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)
    return LossOutput.mean_of(losses, chosen_rewards, rejected_rewards)


def orpo_loss(batch: PairLogps, *, beta: float, alpha: float = 1.0) -> LossOutput:
    """ORPO (Hong, Lee & Thorne 2024, "ORPO: Monolithic Preference Optimization without Reference Model", eqs. 4-7).

    loss = -pi_w / len_w + alpha * -logsigmoid(log_odds_w - log_odds_l),
    log_odds = p - log(1 - exp(p)),  p = pi / len (the per-token mean log-prob).

    alpha is the paper's lambda on the odds-ratio term (the paper reports lambda = 0.1 for its main
    runs; the default 1.0 here is shared with the other losses, set it in the config). beta does not
    enter the loss: it only scales the logged rewards, beta * mean log-prob. No reference is read.
    """
    chosen_mean, rejected_mean = _mean_logps(batch, loss="orpo")
    chosen_log_odds = chosen_mean - _log1m_exp(chosen_mean)
    rejected_log_odds = rejected_mean - _log1m_exp(rejected_mean)
    losses = -chosen_mean - alpha * F.logsigmoid(chosen_log_odds - rejected_log_odds)
    return LossOutput.mean_of(losses, beta * chosen_mean, beta * rejected_mean)


def sft_loss(batch: PairLogps, *, beta: float) -> LossOutput:
    """Preferred-FT (the SFT-on-chosen baseline of Rafailov et al. 2023, Sec. 6): NLL of the chosen response.

    loss = -(sum_b pi_w) / (sum_b len_w),  losses_b = -pi_w / len_w.

    `loss` is the token mean over the whole batch (each token weighs the same, as in ordinary SFT), so
    unlike the other losses it is not losses.mean() when lengths differ. The rejected response is
    unused. Rewards: beta * pi (summed policy log-probs), for logging only.
    """
    chosen_len = _need(batch, "chosen_lengths", loss="sft").to(batch.policy_chosen_logps.dtype)
    chosen_mean, _ = _mean_logps(batch, loss="sft")
    loss = -batch.policy_chosen_logps.sum() / chosen_len.sum().clamp(min=1)
    return LossOutput(
        loss=loss,
        losses=-chosen_mean,
        chosen_rewards=(beta * batch.policy_chosen_logps).detach(),
        rejected_rewards=(beta * batch.policy_rejected_logps).detach(),
    )


def unlikelihood_loss(batch: PairLogps, *, beta: float, alpha: float = 1.0) -> LossOutput:
    """Unlikelihood (Welleck et al. 2019; the DPO paper's baseline, Rafailov et al. 2023, Sec. 6), sequence form.

    loss = -pi_w / len_w - alpha * log(1 - exp(pi_l / len_l)).

    Welleck et al. push down the probability of unwanted tokens with -log(1 - p); over our summed
    log-probs we apply it to the rejected response's mean per-token probability exp(pi_l / len_l),
    computed stably, while the first term keeps the chosen response likely. Rewards: beta * pi
    (summed policy log-probs), for logging only.
    """
    chosen_mean, rejected_mean = _mean_logps(batch, loss="unlikelihood")
    losses = -chosen_mean - alpha * _log1m_exp(rejected_mean)
    return LossOutput.mean_of(losses, beta * batch.policy_chosen_logps, beta * batch.policy_rejected_logps)
