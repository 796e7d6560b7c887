"""Test helpers: micro-batches as the train workers read them from the scored shards (numpy-style dicts)."""

from __future__ import annotations

import numpy as np
import torch


def _random_ids(seed: int):
    g = torch.Generator().manual_seed(seed)
    return lambda k: torch.randint(3, 250, (k,), generator=g).tolist()


def pair_rows(n: int, *, seed: int = 0) -> dict:
    """n scored pairs of ragged lengths: prompt, chosen and rejected ids with reference log-probs."""
    rand = _random_ids(seed)
    return {
        "prompt_ids": [rand(3 + i % 3) for i in range(n)],
        "chosen_ids": [rand(2 + i % 4) for i in range(n)],
        "rejected_ids": [rand(1 + i % 5) for i in range(n)],
        "ref_chosen_logps": [-30.0 + i for i in range(n)],
        "ref_rejected_logps": [-28.0 - i for i in range(n)],
    }


def kto_rows(n: int, *, seed: int) -> dict:
    """n scored unpaired (KTO) rows, two desirable in three, each with a mismatched completion."""
    rand = _random_ids(seed)
    return {
        "prompt_ids": [rand(2 + i % 3) for i in range(n)],
        "chosen_ids": [rand(1 + i % 4) for i in range(n)],
        "kl_completion_ids": [rand(2 + i % 2) for i in range(n)],
        "label": np.array([i % 3 != 1 for i in range(n)]),
        "ref_chosen_logps": [-25.0 + i for i in range(n)],
        "ref_kl_logps": [-12.0 + 0.5 * i for i in range(n)],
    }


def split(batch: dict, size: int) -> list[dict]:
    """`batch` as consecutive micro-batches of `size` rows."""
    n = len(batch["prompt_ids"])
    return [{k: v[i : i + size] for k, v in batch.items()} for i in range(0, n, size)]
