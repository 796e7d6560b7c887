"""One optimizer step of preference training, and the arithmetic around it (torch only, no Ray).

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

from pipeline.config import TrainConfig
from pipeline.training.objectives import Objective

LR_SCHEDULES = ("cosine", "linear", "constant")  # train.lr_schedule, after warmup


def lr_factor(step: int, *, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base learning rate at optimizer step `step` (0-based): warmup, then decay."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "constant":
        return 1.0
    raise ValueError(f"train.lr_schedule: unknown schedule {schedule!r} ({', '.join(LR_SCHEDULES)})")


def total_steps(train: TrainConfig, num_rows: int) -> int:
    """Optimizer steps of a run over `num_rows` training rows: train.max_steps, else whole epochs."""
    if train.max_steps is not None:
        return train.max_steps
    return max(1, train.epochs * math.ceil(num_rows / train.batch_size))


def accumulation(train: TrainConfig) -> int:
    """Micro-batches per worker per optimizer step; ValueError when the batch sizes do not divide."""
    per_worker = train.batch_size // train.num_workers
    if per_worker * train.num_workers != train.batch_size or per_worker % train.micro_batch_size:
        raise ValueError(
            f"train.batch_size ({train.batch_size}) must be num_workers ({train.num_workers}) x "
            f"micro_batch_size ({train.micro_batch_size}) x a whole number of accumulation steps"
        )
    return per_worker // train.micro_batch_size


@dataclass(frozen=True)
class StepResult:
    loss_metrics: dict[str, float | None]  # the objective's named means: loss, rewards/*, logps/* (KTO: kl)
    grad_norm: float  # total gradient norm before clipping
    tokens: int  # non-pad tokens of the step, over every worker
    updated: bool = True  # False: the loss or the gradient norm was NaN or infinite, and the weights were left alone
    local_loss_finite: bool = True  # this worker's own micro-batches gave a finite loss


NONFINITE_REPORT = "nonfinite_step"  # the key of the worker report that stops training at a non-finite step
NONFINITE_CHOICES = ("error", "skip")


def checkpoint_every(train: TrainConfig, steps: int) -> int:
    """Steps between checkpoints: train.checkpoint_steps, by default about a tenth of the run; 0: only the last."""
    return train.checkpoint_steps if train.checkpoint_steps is not None else max(1, steps // 10)


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
