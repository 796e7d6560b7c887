"""The whole set of outcomes to the rows a run keeps: duplicates out, a stable order, the held-out split."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def finish_outcomes(outcomes: pa.Table) -> tuple[pa.Table, pa.Table]:
    """Split good rows from rejected ones and reject later copies of an already seen pair.

    Returns (good rows sorted by id, rejected rows with source, reason and raw text). Sorting by the
    content hash gives a stable order that is also well mixed for training.
    """
    bad_mask = pc.is_valid(outcomes["reason"])
    good = outcomes.filter(pc.invert(bad_mask))
    rejected = outcomes.filter(bad_mask)
    seen: set[str] = set()
    keep = np.ones(good.num_rows, dtype=bool)
    for i, row_id in enumerate(good["id"].to_pylist()):
        if row_id in seen:
            keep[i] = False
        seen.add(row_id)
    if not keep.all():
        dupes = good.filter(pa.array(~keep))
        reasons = pa.array(["duplicate_pair"] * dupes.num_rows, pa.string())
        dupes = dupes.set_column(dupes.schema.get_field_index("reason"), "reason", reasons)
        rejected = pa.concat_tables([rejected, dupes])
        good = good.filter(pa.array(keep))
    good = good.take(pc.sort_indices(good, sort_keys=[("id", "ascending")]))
    return good, rejected


def with_lengths(good: pa.Table) -> pa.Table:
    """The rows with prompt_len, chosen_len and rejected_len (int32) appended."""
    for name in ("prompt", "chosen", "rejected"):
        good = good.append_column(f"{name}_len", pc.list_value_length(good[f"{name}_ids"]).cast(pa.int32()))
    return good


def is_eval(prompt_ids: pa.Array, fraction: float) -> np.ndarray:
    """Held-out membership from a hash of the prompt alone.

    Hashing the prompt (not the pair) keeps every pair of a held-out prompt out of training, and
    adding rows never moves an old row across the split.
    """

    def bucket(ids: list[int]) -> int:
        return int(hashlib.sha256(np.asarray(ids, dtype=np.int32).tobytes()).hexdigest()[:8], 16)

    buckets = np.array([bucket(ids) for ids in prompt_ids.to_pylist()], dtype=np.float64)
    return buckets / 2**32 < fraction


def held_out_rows(
    good: pa.Table, rejected: pa.Table, *, eval_sources: frozenset[str] | None, fraction: float
) -> np.ndarray:
    """Which good rows (after `finish_outcomes`) go to eval.

    With no eval split (`eval_sources` None), the prompt-hash split (`is_eval`). With one, the pairs its
    records produced: a pair that both splits hold is kept once (its other copy rejected as a duplicate
    pair) and held out, so that nothing evaluated on was trained on.
    """
    if eval_sources is None:
        return is_eval(good["prompt_ids"], fraction)
    eval_ids = {
        row_id
        for table in (good, rejected)
        for source, row_id in zip(table["source"].to_pylist(), table["id"].to_pylist())
        if row_id is not None and source in eval_sources
    }
    return np.array([row_id in eval_ids for row_id in good["id"].to_pylist()], dtype=bool)
