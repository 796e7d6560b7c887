"""Rows of the evaluate stage's samples table, built from what the sampler engines return.

A sample row holds model, temperature, prompt_index, sample_index, prompt, completion, completion_ids,
logps (the sampling model's own log-probability of the completion), candidates and tokens_generated (its
sampling cost), and once scored ref_logps, kl and reward: the keys of `pipeline.data.schemas.SAMPLES`
plus the cost columns.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa


def sample_rows(
    model: str, by_temp: dict[float, list[list[dict]]], prompt_texts: Sequence[str], *, group: int
) -> list[dict]:
    """Sample rows from an engine's output, by_temp[t][p]: the completions of prompt p at temperature t
    (dicts with text, token_ids, token_logps). With group > 1, each `group` consecutive completions of a
    prompt are the candidates of one answer (sample_index = completion index // group)."""
    rows = []
    for t, per_prompt in by_temp.items():
        for p, completions in enumerate(per_prompt):
            for s, c in enumerate(completions):
                rows.append(
                    {
                        "model": model,
                        "temperature": float(t),
                        "prompt_index": p,
                        "sample_index": s // group,
                        "prompt": prompt_texts[p],
                        "completion": c["text"],
                        "completion_ids": c["token_ids"],
                        "logps": float(np.sum(c["token_logps"])),
                        "candidates": 1,
                        "tokens_generated": len(c["token_ids"]),
                    }
                )
    return rows


def completions_to_score(prompts: Sequence[Sequence[int]], rows: Sequence[dict]) -> pa.Table:
    """Each row's completion as a scorer input (prompt_ids, chosen_ids, and an empty rejected_ids), so that
    the scorer's chosen log-probs are log pi_ref(completion | prompt)."""
    return pa.table(
        {
            "prompt_ids": [prompts[r["prompt_index"]] for r in rows],
            "chosen_ids": [r["completion_ids"] for r in rows],
            "rejected_ids": [[] for _ in rows],
        }
    )


def add_kl_and_reward(
    rows: Sequence[dict], ref_logps: np.ndarray, rewards: np.ndarray | Sequence[float | None]
) -> None:
    """Set each row's ref_logps, its one-sample KL estimate logps - ref_logps, and its reward (None where
    the task has none), in place. ref_logps and rewards: one per row, in row order."""
    for r, lp, rw in zip(rows, ref_logps, rewards):
        r["ref_logps"] = float(lp)
        r["kl"] = r["logps"] - float(lp)
        r["reward"] = None if rw is None else float(rw)
