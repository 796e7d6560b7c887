"""KTO's mismatched pairs: each prompt borrows another row's completion (pure; numpy and pyarrow only).

KTO (Ethayarajh et al. 2024) compares each example's log-ratio r = log pi(y|x) - log pi_ref(y|x) with
a reference point z = max(0, E[log pi(y'|x) - log pi_ref(y'|x)]), estimated on completions y' that
belong to OTHER prompts. The reference model is not in training memory, so the mismatch is fixed
before scoring: the score stage adds `with_kl_completions` to each of its shards and writes log pi_ref of
the mismatched pair as `ref_kl_logps` (schema SCORED_KTO); the trainer scores the same pairs under the
policy (`pipeline.training.objectives.KtoObjective`).

Row k of a split borrows the completion of row k + 1 in the split's order, the last row the first's. The
split is in content-hash order, so a row's neighbour is as good as a random draw of another row, and the
pairing needs no more than each shard's rows and the one row after it: the score stage pairs shard by shard
on its workers, never reading a split whole.
"""

from __future__ import annotations

from typing import cast

import numpy as np
import pyarrow as pa


def kl_partners(n: int) -> np.ndarray:
    """partner[i]: the row whose completion is paired with row i's prompt, the next one; (n,) int64.

    One n-cycle: no row is ever its own partner (for n > 1) and every completion is borrowed exactly once.
    n == 1 has no other completion to borrow: ValueError.
    """
    if n < 0:
        raise ValueError(f"kl_partners needs n >= 0, got {n}")
    if n == 1:
        raise ValueError(
            "KTO's reference point pairs each prompt with ANOTHER example's completion, so a split needs "
            "at least 2 unpaired examples (or none); got 1"
        )
    return (np.arange(n, dtype=np.int64) + 1) % max(n, 1)


def with_kl_completions(table: pa.Table, *, max_length: int, following: pa.Table | None = None) -> pa.Table:
    """Add kl_partner_id and kl_completion_ids to tokenized unpaired rows (pure; no model).

    `table` is a whole split, or a run of consecutive rows of one with `following` holding the one row after
    them (the split's first row after its last). Row i borrows the completion (chosen_ids) of the next row, cut
    so that this row's prompt plus it fits in `max_length` tokens (the tokenize stage's limit; the prompt
    always leaves room for one token).
    """
    if table["label"].null_count:
        raise ValueError("with_kl_completions: every row must be unpaired (label set); found paired rows")
    ids = table["id"].to_pylist()
    completions = cast("list[list[int]]", table["chosen_ids"].to_pylist())
    if following is None:
        partners = kl_partners(table.num_rows)
        partner_ids = [ids[j] for j in partners]
        partner_completions = [completions[j] for j in partners]
    else:
        partner_ids = ids[1:] + following["id"].to_pylist()[:1]
        partner_completions = completions[1:] + cast("list[list[int]]", following["chosen_ids"].to_pylist())[:1]
        if partner_ids and partner_ids[-1] == ids[-1]:
            raise ValueError("with_kl_completions: the row after the last one is the last one itself")
    prompts = cast("list[list[int]]", table["prompt_ids"].to_pylist())
    kl_ids = [c[: max(1, max_length - len(p))] for p, c in zip(prompts, partner_completions)]
    return table.append_column("kl_partner_id", pa.array(partner_ids, pa.string())).append_column(
        "kl_completion_ids", pa.array(kl_ids, pa.list_(pa.int32()))
    )
