"""The arithmetic around the optimizer steps: how many, how each is accumulated, the learning rate at each,
when to checkpoint, and what a non-finite step does. Plain Python (no torch): the driver plans and checks
with it before any worker starts; the workers' step itself is `pipeline.training.step`.
"""

from __future__ import annotations

import math

from pipeline.config import TrainConfig

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


NONFINITE_REPORT = "nonfinite_step"  # the key of the worker report that stops training at a non-finite step
NONFINITE_CHOICES = ("error", "skip")


def checkpoint_every(train: TrainConfig, steps: int) -> int:
    """Steps between checkpoints: train.checkpoint_steps, by default about a tenth of the run; 0: only the last."""
    return train.checkpoint_steps if train.checkpoint_steps is not None else max(1, steps // 10)
