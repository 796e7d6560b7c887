"""Paired losses on the reward margin h = u_w - u_l: small pure tensor functions, each citing its paper.

Every loss here takes a `PairLogps` and keyword hyperparameters (named like the `train.*` keys that set
them) and returns per-pair values in a `LossOutput`. What each one needs is declared once, in
`pipeline.training.losses.registry`. The losses TRL builds on the chosen-minus-rejected reward take
`f_divergence_type` (f-DPO): their margin is then f'(u_w) - f'(u_l) instead of u_w - u_l
(`pipeline.training.losses.ratios.f_scores`). Notation: `pipeline.training.losses.ratios`.

All losses are written with logsigmoid / softplus so margins of +-50 (and far beyond) stay finite.
This module imports torch only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pipeline.training.losses.interface import LossOutput, PairLogps
from pipeline.training.losses.ratios import mean_logps, score_margin, smoothed_sigmoid_loss


def dpo_loss(
    batch: PairLogps,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
) -> LossOutput:
    """DPO (Rafailov et al. 2023, eq. 7); with label_smoothing eps > 0, conservative DPO (cDPO). TRL: sigmoid.

    loss = -(1 - eps) logsigmoid(m) - eps logsigmoid(-m),  m = beta (u_w - u_l).

    eps = 0 is eq. 7 exactly. eps > 0 is cDPO (Mitchell 2023, "A note on DPO with noisy preferences
    and relationship to IPO"): the expected DPO loss when each label is flipped with probability eps
    (TRL 1.16's sigmoid ignores label_smoothing). Rewards: beta * u.
    """
    margin, chosen, rejected = score_margin(
        batch, loss="dpo", f_divergence_type=f_divergence_type, f_alpha_divergence_coef=f_alpha_divergence_coef
    )
    losses = smoothed_sigmoid_loss(beta * margin, label_smoothing=label_smoothing)
    return LossOutput.of(losses, beta * chosen, beta * rejected)


def sigmoid_norm_loss(
    batch: PairLogps, *, beta: float, f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5
) -> LossOutput:
    """Length-normalised DPO (as trained in Tülu 3, Lambert et al. 2024). TRL: sigmoid_norm.

    loss = -logsigmoid(beta (u_w / len_w - u_l / len_l)).

    Dividing each log-ratio by its response's length removes DPO's pull towards longer responses (a
    summed log-ratio grows with length). Rewards: beta * u (not normalised, as logged by TRL).
    """
    margin, chosen, rejected = score_margin(
        batch,
        loss="sigmoid_norm",
        f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef,
        per_token=True,
    )
    return LossOutput.of(-F.logsigmoid(beta * margin), beta * chosen, beta * rejected)


def ipo_loss(
    batch: PairLogps, *, beta: float, f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5
) -> LossOutput:
    """IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences", eq. 17).

    loss = (u_w / len_w - u_l / len_l - 1 / (2 beta))^2; beta is the paper's tau.

    Each log-ratio is averaged over its response's tokens before the square: the paper writes h with
    whole-sequence probabilities, but its authors confirmed to TRL that the reported results use the
    per-token mean (TRL 1.16's ipo). With summed log-ratios the same beta would mean a target margin
    len times larger. The loss is minimal, zero, at a per-token margin of 1/(2 beta): IPO regresses the
    margin onto a target instead of pushing it to infinity. Rewards: beta * u.
    """
    margin, chosen, rejected = score_margin(
        batch,
        loss="ipo",
        f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef,
        per_token=True,
    )
    return LossOutput.of((margin - 1.0 / (2.0 * beta)) ** 2, beta * chosen, beta * rejected)


def hinge_loss(
    batch: PairLogps, *, beta: float, f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5
) -> LossOutput:
    """Hinge / SLiC (Zhao et al. 2023, "SLiC-HF", the rank calibration loss of Sec. 2) on DPO's margin.

    loss = relu(1 - beta h),  h = u_w - u_l.

    SLiC-HF's calibration loss is max(0, delta - log P(y_w) + log P(y_l)) with no reference; here the
    margin is the reference-normalised one (as in Liu et al. 2023, RSO) and delta = 1 / beta after
    scaling. Rewards: beta * u.
    """
    margin, chosen, rejected = score_margin(
        batch, loss="hinge", f_divergence_type=f_divergence_type, f_alpha_divergence_coef=f_alpha_divergence_coef
    )
    return LossOutput.of(torch.relu(1.0 - beta * margin), beta * chosen, beta * rejected)


def robust_loss(
    batch: PairLogps,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
) -> LossOutput:
    """Robust DPO, rDPO (Chowdhury, Kini & Natarajan 2024, "Provably Robust DPO", the unbiased loss of Sec. 3).

    loss = ((1 - eps) softplus(-m) - eps softplus(m)) / (1 - 2 eps),  m = beta h,  eps = label_smoothing.

    Where cDPO averages the loss over the label-flip noise, rDPO de-biases it: its expectation under
    flips with rate eps equals the clean DPO loss. The price is that it is unbounded below in m (a
    per-pair loss can go negative) and it needs eps < 1/2. Rewards: beta * u.
    """
    margin, chosen, rejected = score_margin(
        batch, loss="robust", f_divergence_type=f_divergence_type, f_alpha_divergence_coef=f_alpha_divergence_coef
    )
    m, eps = beta * margin, label_smoothing
    losses = ((1.0 - eps) * -F.logsigmoid(m) - eps * -F.logsigmoid(-m)) / (1.0 - 2.0 * eps)
    return LossOutput.of(losses, beta * chosen, beta * rejected)


def exo_pair_loss(
    batch: PairLogps,
    *,
    beta: float,
    label_smoothing: float = 1e-3,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
) -> LossOutput:
    """EXO, pairwise (Ji et al. 2024, "Towards Efficient Exact Optimization of Language Model Alignment", eq. 16).

    loss = KL(q || p) = q_w (log q_w - log(1 - eps)) + q_l (log q_l - log eps),
    q_w = sigmoid(m), q_l = sigmoid(-m), m = beta h,  eps = label_smoothing.

    q is the policy's distribution over {chosen, rejected} (a softmax of the implicit rewards) and p
    the labels smoothed by eps; EXO minimises the reverse KL from q to p, which is mode-seeking where
    DPO's forward KL is mean-seeking. eps must lie in (0, 1) (the paper uses 1e-3). Rewards: beta * u.
    """
    margin, chosen, rejected = score_margin(
        batch, loss="exo_pair", f_divergence_type=f_divergence_type, f_alpha_divergence_coef=f_alpha_divergence_coef
    )
    m, eps = beta * margin, label_smoothing
    losses = torch.sigmoid(m) * (F.logsigmoid(m) - math.log1p(-eps)) + torch.sigmoid(-m) * (
        F.logsigmoid(-m) - math.log(eps)
    )
    return LossOutput.of(losses, beta * chosen, beta * rejected)


def discopop_loss(
    batch: PairLogps,
    *,
    beta: float,
    discopop_tau: float = 0.05,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
) -> LossOutput:
    """DiscoPOP, the log-ratio modulated loss (Lu et al. 2024, "Discovering Preference Optimization Algorithms
    with and for Large Language Models", LRML, eq. 5).

    loss = (1 - sigmoid(m / tau)) * -logsigmoid(m) + sigmoid(m / tau) * exp(-m),  m = beta h, tau = discopop_tau.

    A blend of DPO's logistic loss and an exponential loss, switched by the margin's sign at the
    temperature tau (0.05 in the paper). The exponential part is computed as exp(logsigmoid(m / tau) - m),
    which stays finite where sigmoid(m / tau) underflows and exp(-m) overflows. Rewards: beta * u.
    """
    margin, chosen, rejected = score_margin(
        batch, loss="discopop", f_divergence_type=f_divergence_type, f_alpha_divergence_coef=f_alpha_divergence_coef
    )
    m = beta * margin
    modulation = torch.sigmoid(m / discopop_tau)
    losses = (1.0 - modulation) * -F.logsigmoid(m) + torch.exp(F.logsigmoid(m / discopop_tau) - m)
    return LossOutput.of(losses, beta * chosen, beta * rejected)


def dpop_loss(batch: PairLogps, *, beta: float, dpop_lambda: float = 50.0) -> LossOutput:
    """DPO-Positive (Pal et al. 2024, "Smaug: Fixing Failure Modes of Preference Optimisation with DPO-Positive").

    loss = -logsigmoid(beta (u_w - u_l - lambda * max(0, ref_w - pi_w))),  lambda = dpop_lambda.

    DPO can raise the margin while the chosen response's own likelihood falls (both fall, the rejected
    faster); DPOP adds a penalty that is zero while pi_w >= ref_w and grows as the chosen response
    becomes less likely than under the reference (the paper uses lambda = 50). Rewards: beta * u.
    """
    margin, chosen, rejected = score_margin(batch, loss="dpop")
    penalty = dpop_lambda * torch.relu(-chosen)
    return LossOutput.of(-F.logsigmoid(beta * (margin - penalty)), beta * chosen, beta * rejected)


def rpo_loss(batch: PairLogps, *, beta: float, label_smoothing: float = 0.0, alpha: float = 1.0) -> LossOutput:
    """Iterative RPO (Pang et al. 2024, "Iterative Reasoning Preference Optimization", DPO+NLL loss of Sec. 2).

    loss = dpo + alpha * (-pi_w / len_w).

    The NLL on the chosen response keeps its likelihood from falling while the margin grows. The paper
    puts its weight on the DPO term and normalises the NLL by the full chosen sequence length (prompt
    included); we weight the NLL instead (same optimum direction; alpha = 1 makes them equal) and
    normalise by response tokens, the only ones we score. Rewards: beta * u, as DPO.
    """
    dpo = dpo_loss(batch, beta=beta, label_smoothing=label_smoothing)
    chosen_mean, _ = mean_logps(batch, loss="rpo")
    return LossOutput.of(dpo.losses - alpha * chosen_mean, dpo.chosen_rewards, dpo.rejected_rewards)
