"""AOT: alignment by optimal transport, the batch-wise losses (declared `batch_wise` in the registry).

AOT compares distributions, not pairs: it sorts the step's margins (paired) or the step's chosen and
rejected log-ratios (unpaired) and matches them quantile by quantile, which in one dimension is the
optimal transport plan. The sort runs over the whole optimizer step (`PairLogps.step`, gathered over
every worker and micro-batch by the objective), so accumulation and several workers give the
one-big-batch loss. Without `step` a batch is its own step. Notation: `pipeline.training.losses.ratios`.

Each row's value is its term of the sorted sum: row i, whose value has rank k in the step, is matched
with the k-th smallest value of the other side. The sum over rows is the sum over quantiles, and its
gradient is the sorted loss's (a sort is a permutation: it routes each gradient to the row it came from).
Imports torch only.
"""

from __future__ import annotations

import torch

from pipeline.training.losses.interface import LossOutput, PairLogps, StepPairs
from pipeline.training.losses.ratios import log_ratios, need, smoothed_sigmoid_loss


def _step_of(batch: PairLogps, *, loss: str) -> StepPairs:
    """The step's pairs, or this batch alone (detached) as the whole step."""
    if batch.step is not None:
        return batch.step
    return StepPairs(
        batch.policy_chosen_logps.detach(),
        batch.policy_rejected_logps.detach(),
        need(batch, "ref_chosen_logps", loss=loss).detach(),
        need(batch, "ref_rejected_logps", loss=loss).detach(),
    )


def _ranks(values: torch.Tensor) -> torch.Tensor:
    """The rank of each entry of values (G,) in ascending order, ties broken by position: (G,) long."""
    order = torch.sort(values, stable=True).indices
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(len(values), device=values.device)
    return ranks


def _matched(mine: torch.Tensor, others: torch.Tensor, *, offset: int, count: int) -> torch.Tensor:
    """For rows offset .. offset+count of the step: the value of `others` (G,) at each row's rank in `mine` (G,)."""
    ranks = _ranks(mine)[offset : offset + count]
    return torch.sort(others).values[ranks]


def aot_loss(batch: PairLogps, *, beta: float, label_smoothing: float = 0.0) -> LossOutput:
    """AOT, paired (Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via Optimal Transport").

    loss = mean over k of -(1 - eps) logsigmoid(beta d_k) - eps logsigmoid(-beta d_k),
    d_k = (pi_w - pi_l)_(k) - (ref_w - ref_l)_(k),  (.)_(k) the k-th smallest over the step's pairs.

    The policy's distribution of margins is made to dominate the reference's, quantile by quantile
    (first-order stochastic dominance, relaxed by the logistic loss). eps = label_smoothing. Needs the
    whole step's pairs. Rewards: beta * u.
    """
    step = _step_of(batch, loss="aot")
    margin = batch.policy_chosen_logps - batch.policy_rejected_logps  # (B,)
    matched = _matched(
        step.policy_chosen_logps - step.policy_rejected_logps,
        step.ref_chosen_logps - step.ref_rejected_logps,
        offset=step.offset,
        count=len(margin),
    )
    losses = smoothed_sigmoid_loss(beta * (margin - matched.to(margin.dtype)), label_smoothing=label_smoothing)
    chosen, rejected = log_ratios(batch, loss="aot")
    return LossOutput.of(losses, beta * chosen, beta * rejected)


def aot_unpaired_loss(batch: PairLogps, *, beta: float, label_smoothing: float = 0.0) -> LossOutput:
    """AOT, unpaired (Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via Optimal Transport").

    loss = mean over k of -(1 - eps) logsigmoid(beta d_k) - eps logsigmoid(-beta d_k),  d_k = (u_w)_(k) - (u_l)_(k).

    The chosen log-ratios' distribution is made to dominate the rejected ones', quantile by quantile,
    without using which response was paired with which. Row i's value is its chosen log-ratio's term
    (matched with the rejected log-ratio of the same rank); its rejected log-ratio's term carries only
    gradient (value minus itself, detached), so the values sum to the sorted loss and the gradient
    reaches both sides. Needs the whole step's pairs. Rewards: beta * u.
    """
    step = _step_of(batch, loss="aot_unpaired")
    chosen, rejected = log_ratios(batch, loss="aot_unpaired")  # (B,) each, with gradient
    all_chosen = step.policy_chosen_logps - step.ref_chosen_logps
    all_rejected = step.policy_rejected_logps - step.ref_rejected_logps
    where = dict(offset=step.offset, count=len(chosen))
    rejected_at_chosen_rank = _matched(all_chosen, all_rejected, **where).to(chosen.dtype)
    chosen_at_rejected_rank = _matched(all_rejected, all_chosen, **where).to(chosen.dtype)
    eps = label_smoothing
    value = smoothed_sigmoid_loss(beta * (chosen - rejected_at_chosen_rank), label_smoothing=eps)
    through_rejected = smoothed_sigmoid_loss(beta * (chosen_at_rejected_rank - rejected), label_smoothing=eps)
    losses = value + (through_rejected - through_rejected.detach())
    return LossOutput.of(losses, beta * chosen, beta * rejected)
