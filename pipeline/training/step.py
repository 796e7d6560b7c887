"""One optimizer step of preference training (torch only, no Ray); the arithmetic around it (how many
steps, how accumulated, when checkpointed) is `pipeline.training.step_plan`, which the driver reads
without torch.

A step takes this worker's micro-batches, runs the objective's loss on each with gradient
accumulation, clips, steps the optimizer and returns the step's metrics by name. The Ray Train worker
(`pipeline.stages.train_worker`) and `benchmarks/train_step.py` both call `train_step`. What differs
between paired losses and KTO lives in the objective (`pipeline.training.objectives`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor

from pipeline.training.objectives import Objective


@dataclass(frozen=True)
class StepResult:
    loss_metrics: dict[str, float | None]  # the objective's named means: loss, rewards/*, logps/* (KTO: kl)
    grad_norm: float  # total gradient norm before clipping
    tokens: int  # non-pad tokens of the step, over every worker
    updated: bool = True  # False: the loss or the gradient norm was NaN or infinite, and the weights were left alone
    local_loss_finite: bool = True  # this worker's own micro-batches gave a finite loss


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Sequence[dict],
    *,
    objective: Objective,
    lr: float,
    max_grad_norm: float,
    world: int = 1,
) -> StepResult:
    """One optimizer step over this worker's micro-batches (numpy dicts of scored rows).

    Each micro-batch's loss is its share of the step's loss: its rows' losses over the whole step's
    denominators, as each loss declares its reduction (`pipeline.training.losses.Reduction`), so the
    shares of every micro-batch and worker add up to the documented loss and the accumulated gradient
    equals that of one large batch. DDP and FSDP (world > 1) average gradients over workers, so each
    worker backpropagates world times its share. DDP synchronises only on the last micro-batch. FSDP
    reduce-scatters after every one, each rank accumulating its gradient shard: skipping that
    (`set_requires_gradient_sync(False)`) would keep every layer's whole gradient in fp32 on each GPU, as
    much memory as DDP's gradients.
    Gradients are clipped to max_grad_norm, or not at all when it is <= 0. The metrics are summed
    over micro-batches and workers. A step whose loss (summed over every worker) or gradient norm is
    not finite leaves the weights and the optimizer as they were (`updated` False): every worker sees
    the same sums, so all of them decide alike.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    shared, metrics = objective.begin_step(model, batches, world=world)
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    for i, batch in enumerate(batches):
        defer = ddp and world > 1 and i < len(batches) - 1
        # defer holds only under DDP, whose no_sync nn.Module's typing cannot see on a plain Module
        with model.no_sync() if defer else nullcontext():  # pyright: ignore[reportCallIssue]
            share, batch_metrics = objective.micro_batch_loss(model, batch, shared, index=i)
            (share * world).backward()
        metrics += batch_metrics
    grad_norm = clip_gradients(model, max_grad_norm)
    local_loss_finite = math.isfinite(metrics.totals()["loss"])
    if world > 1:
        metrics.all_reduce()
    totals = metrics.totals()
    updated = math.isfinite(totals["loss"]) and math.isfinite(grad_norm)
    if updated:
        optimizer.step()
        objective.end_step(totals)  # running states move with the weights, never past a skipped step
    optimizer.zero_grad(set_to_none=True)
    return StepResult(
        objective.loss_metrics(totals, shared), grad_norm, int(totals["tokens"]), updated, local_loss_finite
    )


def clip_gradients(model: torch.nn.Module, max_norm: float) -> float:
    """Clip the gradients to `max_norm` (not at all when <= 0) and return their total norm before
    clipping: the same number on every rank, whether the gradients are whole or FSDP's shards."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else float("inf"))
    if isinstance(norm, DTensor):  # sharded gradients: the norm is a partial sum until gathered
        norm = norm.full_tensor()
    return float(norm)
