"""What a user should know about their data before training on it, and the rejections they will not accept.

The audit is computed where the rows are: `partial_audit` sums one shard's kept rows into small counts
(length counts by value, truncations, boundary merges, chosen-longer pairs), and `merge_audits` turns the
shards' sums into the manifest's audit, the same whichever way the rows were sharded.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import numpy as np
import pyarrow as pa

LENGTHS = ("prompt", "chosen", "rejected")


def partial_audit(good: pa.Table) -> dict:
    """One shard's sums: {"lengths": {name: {length: count}}, "prompt_truncated", "response_truncated",
    "boundary_mismatches", "paired", "chosen_longer"} (JSON keys are strings).

    `good` holds kept rows with their `*_len` columns (`pipeline.data.split.with_lengths`).
    """
    lengths = {n: good[f"{n}_len"].to_numpy() for n in LENGTHS}
    paired = good["label"].is_null().to_numpy(zero_copy_only=False) if good.num_rows else np.zeros(0, bool)
    return {
        "lengths": {n: {str(k): int(c) for k, c in zip(*np.unique(v, return_counts=True))} for n, v in lengths.items()},
        "prompt_truncated": _count(good["prompt_truncated"]),
        "response_truncated": _count(good["response_truncated"]),
        "boundary_mismatches": _count(good["boundary_mismatch"]),
        "paired": int(paired.sum()),
        "chosen_longer": int((lengths["chosen"] > lengths["rejected"])[paired].sum()),
    }


def _count(flags: pa.ChunkedArray) -> int:
    """How many of a never-null bool column are true."""
    return int(flags.to_numpy(zero_copy_only=False).sum()) if len(flags) else 0


def merge_audits(partials: Iterable[dict], rejected_reasons: Counter) -> dict:
    """The manifest's audit from the shards' sums: length histograms, truncation and boundary counts, the
    chosen-longer share and the duplicates."""
    partials = list(partials)
    counts = {n: Counter() for n in LENGTHS}
    for part in partials:
        for n in LENGTHS:
            counts[n].update({int(k): c for k, c in part["lengths"][n].items()})
    total = {k: sum(p[k] for p in partials) for k in ("prompt_truncated", "response_truncated", "boundary_mismatches")}
    paired, longer = sum(p["paired"] for p in partials), sum(p["chosen_longer"] for p in partials)
    return {
        "length_histograms": {n: _histogram(counts[n]) for n in LENGTHS},
        **total,
        # DPO learns length if the data rewards it: show the bias before training on it.
        "chosen_longer_share": longer / paired if paired else None,
        "duplicates": int(rejected_reasons.get("duplicate_pair", 0)),
    }


def audit(good: pa.Table, rejected_reasons: Counter) -> dict:
    """The audit of one table of kept rows (the whole set in one piece)."""
    return merge_audits([partial_audit(good)], rejected_reasons)


def _histogram(counts: Counter) -> dict:
    """Up to 20 equal bins between the least and the greatest length, as np.histogram makes them."""
    if not counts:
        return {"edges": [], "counts": []}
    values = np.array(sorted(counts), dtype=np.int64)
    weights = np.array([counts[v] for v in values], dtype=np.int64)
    hist, edges = np.histogram(values, bins=min(20, max(1, len(values))), weights=weights)
    return {
        "edges": [float(e) for e in edges],
        "counts": [int(c) for c in hist],
        "max": int(values.max()),
        "mean": float((values * weights).sum() / weights.sum()),
    }


def check_strict(strict: bool | list[str], reasons: Counter) -> None:
    """Raise ValueError when a rejection reason that `strict` makes fatal (True: any) occurred."""
    fatal = set(reasons) if strict is True else set(strict or []) & set(reasons)
    if fatal:
        detail = ", ".join(f"{r}: {reasons[r]}" for r in sorted(fatal))
        raise ValueError(f"tokenize.strict: rejected rows ({detail}); see the reasons above or turn strict off")
