"""The rows of an optimizer step as the objectives read them from numpy micro-batches (torch only)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from pipeline.training.losses import Reduction


def column(batch: dict, name: str, device: torch.device) -> torch.Tensor:
    """A float column of a numpy micro-batch as a (B,) float32 tensor on `device`."""
    return torch.tensor(np.asarray(batch[name], dtype=np.float64), dtype=torch.float32, device=device)


def step_denominators(batches: Sequence[dict], *, world: int, device: torch.device) -> dict[Reduction, float]:
    """Rows and chosen-response tokens of the whole step: this worker's micro-batches, summed over workers.

    Known from the token ids alone, before any forward pass, so each micro-batch's loss can be divided
    by the step's totals as it runs (one small all-reduce per step with several workers).
    """
    rows = sum(len(batch["prompt_ids"]) for batch in batches)
    tokens = sum(len(ids) for batch in batches for ids in batch["chosen_ids"])
    sums = torch.tensor([rows, tokens], dtype=torch.float64, device=device)
    if world > 1:
        torch.distributed.all_reduce(sums)
    rows_all, tokens_all = sums.tolist()
    return {Reduction.ROWS: rows_all, Reduction.CHOSEN_TOKENS: tokens_all}
