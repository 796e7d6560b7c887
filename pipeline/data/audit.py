"""What a user should know about their data before training on it, and the rejections they will not accept."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def audit(good: pa.Table, rejected_reasons: Counter) -> dict:
    """Length histograms, truncation and boundary counts, the chosen-longer share and the duplicates.

    `good` holds the kept rows with their `*_len` columns (`pipeline.data.split.with_lengths`).
    """
    lengths = {n: good[f"{n}_len"].to_numpy() for n in ("prompt", "chosen", "rejected")}
    paired = ~pc.is_valid(good["label"]).to_numpy(zero_copy_only=False) if good.num_rows else np.zeros(0, bool)
    chosen_longer = (lengths["chosen"] > lengths["rejected"])[paired]
    return {
        "length_histograms": {n: _histogram(v) for n, v in lengths.items()},
        "prompt_truncated": int(pc.sum(good["prompt_truncated"]).as_py() or 0),
        "response_truncated": int(pc.sum(good["response_truncated"]).as_py() or 0),
        "boundary_mismatches": int(pc.sum(good["boundary_mismatch"]).as_py() or 0),
        # DPO learns length if the data rewards it: show the bias before training on it.
        "chosen_longer_share": float(chosen_longer.mean()) if len(chosen_longer) else None,
        "duplicates": int(rejected_reasons.get("duplicate_pair", 0)),
    }


def _histogram(values: np.ndarray) -> dict:
    if len(values) == 0:
        return {"edges": [], "counts": []}
    counts, edges = np.histogram(values, bins=min(20, max(1, len(np.unique(values)))))
    return {
        "edges": [float(e) for e in edges],
        "counts": [int(c) for c in counts],
        "max": int(values.max()),
        "mean": float(values.mean()),
    }


def check_strict(strict: bool | list[str], reasons: Counter) -> None:
    """Raise ValueError when a rejection reason that `strict` makes fatal (True: any) occurred."""
    fatal = set(reasons) if strict is True else set(strict or []) & set(reasons)
    if fatal:
        detail = ", ".join(f"{r}: {reasons[r]}" for r in sorted(fatal))
        raise ValueError(f"tokenize.strict: rejected rows ({detail}); see the reasons above or turn strict off")
