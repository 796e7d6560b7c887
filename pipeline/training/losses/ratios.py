"""The numbers the paired losses are built from: log-ratios, per-token means, f-divergence scores.

Notation used by every loss docstring, all per pair, shape (B,):
    pi_w, pi_l    policy log-prob of the chosen (w) / rejected (l) response, summed over its tokens
    ref_w, ref_l  the same under the frozen reference model
    len_w, len_l  response token counts
    u_w = pi_w - ref_w, u_l = pi_l - ref_l          log-ratios
    h = u_w - u_l                                   log-ratio margin
    m = beta * h                                    implicit-reward margin r_w - r_l (DPO, eq. 5/7)

Imports torch only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pipeline.training.losses.interface import PairLogps
from pipeline.training.losses.limits import F_DIVERGENCES


def need(batch: PairLogps, field: str, *, loss: str) -> torch.Tensor:
    """batch.<field>, or a ValueError that says which loss needed which missing field."""
    value = getattr(batch, field)
    if value is None:
        raise ValueError(f"loss {loss!r} needs PairLogps.{field}, which is None")
    return value


def log_ratios(batch: PairLogps, *, loss: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(u_w, u_l) = (pi_w - ref_w, pi_l - ref_l), each (B,)."""
    chosen = batch.policy_chosen_logps - need(batch, "ref_chosen_logps", loss=loss)
    rejected = batch.policy_rejected_logps - need(batch, "ref_rejected_logps", loss=loss)
    return chosen, rejected


def lengths(batch: PairLogps, *, loss: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(len_w, len_l) as `dtype`, clamped to >= 1 so an empty response (sum 0, length 0) divides to 0, not NaN."""
    chosen = need(batch, "chosen_lengths", loss=loss).to(dtype).clamp(min=1)
    rejected = need(batch, "rejected_lengths", loss=loss).to(dtype).clamp(min=1)
    return chosen, rejected


def mean_logps(batch: PairLogps, *, loss: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token mean log-probs (pi_w / len_w, pi_l / len_l), each (B,)."""
    chosen_len, rejected_len = lengths(batch, loss=loss, dtype=batch.policy_chosen_logps.dtype)
    return batch.policy_chosen_logps / chosen_len, batch.policy_rejected_logps / rejected_len


def f_scores(
    log_ratio: torch.Tensor, *, f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5
) -> torch.Tensor:
    """f'(pi / ref) of f-DPO (Wang et al. 2023, eq. 9 and Table 1), up to an additive constant, from log u.

    With u = pi / ref the f-DPO loss replaces the log-ratio log u by f'(u):
        reverse_kl        f'(u) = log u                 (plain DPO)
        forward_kl        f'(u) = 1 - 1/u               (paper: -1/u; the constant cancels in a margin)
        js_divergence     f'(u) = log(2u / (1 + u))     = log 2 + logsigmoid(log u)
        alpha_divergence  f'(u) = (u^(c-1) - 1) / (c - 1), c = f_alpha_divergence_coef
    The paper writes the alpha-divergence's f'(u) = (1 - u^-alpha) / alpha: that is this with alpha = 1 - c
    (c is TRL's parameter; both are 1/2 at the default), and c -> 1 is reverse KL. Only differences of
    scores enter a loss, which is why the additive constants may differ from the paper's.
    """
    if f_divergence_type == "reverse_kl":
        return log_ratio
    if f_divergence_type == "forward_kl":
        return -torch.expm1(-log_ratio)
    if f_divergence_type == "js_divergence":
        return math.log(2.0) + F.logsigmoid(log_ratio)
    if f_divergence_type == "alpha_divergence":
        c = f_alpha_divergence_coef
        if abs(c - 1.0) < 1e-6:  # the limit is log u
            return log_ratio
        # u^(c-1) overflows for a large log-ratio of the wrong sign: exp(80) is still finite in float32.
        exponent = ((c - 1.0) * log_ratio).clamp(max=80.0)
        return torch.expm1(exponent) / (c - 1.0)
    raise ValueError(f"train.f_divergence_type: {f_divergence_type!r} is not one of {', '.join(F_DIVERGENCES)}")


def score_margin(
    batch: PairLogps,
    *,
    loss: str,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    per_token: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(score margin, u_w, u_l): f'(u_w) - f'(u_l) (per-token means of the scores when `per_token`), each (B,)."""
    chosen, rejected = log_ratios(batch, loss=loss)
    chosen_score, rejected_score = (
        f_scores(u, f_divergence_type=f_divergence_type, f_alpha_divergence_coef=f_alpha_divergence_coef)
        for u in (chosen, rejected)
    )
    if per_token:
        chosen_len, rejected_len = lengths(batch, loss=loss, dtype=chosen.dtype)
        chosen_score, rejected_score = chosen_score / chosen_len, rejected_score / rejected_len
    return chosen_score - rejected_score, chosen, rejected


def log1m_exp(x: torch.Tensor) -> torch.Tensor:
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


def smoothed_sigmoid_loss(margin: torch.Tensor, *, label_smoothing: float) -> torch.Tensor:
    """-(1 - eps) logsigmoid(m) - eps logsigmoid(-m): Bradley-Terry NLL with labels flipped w.p. eps."""
    return -(1.0 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
