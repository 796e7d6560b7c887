"""KTO's mismatched pairs: each prompt borrows another row's completion (pure; numpy and pyarrow only).

KTO (Ethayarajh et al. 2024) compares each example's log-ratio r = log pi(y|x) - log pi_ref(y|x) with
a reference point z = max(0, E[log pi(y'|x) - log pi_ref(y'|x)]), estimated on completions y' that
belong to OTHER prompts. The reference model is not in training memory, so the mismatch is fixed
before scoring: the score stage adds `with_kl_completions` to each split and writes log pi_ref of the
mismatched pair as `ref_kl_logps` (schema SCORED_KTO); the trainer scores the same pairs under the
policy (`pipeline.training.objectives.KtoObjective`).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

KL_PAIRING_SEED = 0  # fixed: the same tokenized split always gets the same mismatched pairs


def kl_partners(n: int, *, seed: int = KL_PAIRING_SEED) -> np.ndarray:
    """partner[i]: the row whose completion is paired with row i's prompt; (n,) int64.

    A seeded permutation p of the rows is walked as one cycle: row p[k] borrows the completion of row
    p[k + 1 mod n]. One n-cycle means no row is ever its own partner (for n > 1) and every completion
    is borrowed exactly once. n == 1 has no other completion to borrow: ValueError.
    """
    if n < 0:
        raise ValueError(f"kl_partners needs n >= 0, got {n}")
    if n == 1:
        raise ValueError(
            "KTO's reference point pairs each prompt with ANOTHER example's completion, so a split needs "
            "at least 2 unpaired examples (or none); got 1"
        )
    order = np.random.default_rng(seed).permutation(n)
    partners = np.empty(n, dtype=np.int64)
    partners[order] = np.roll(order, -1)
    return partners


def with_kl_completions(table: pa.Table, *, max_length: int, seed: int = KL_PAIRING_SEED) -> pa.Table:
    """Add kl_partner_id and kl_completion_ids to tokenized unpaired rows (pure; no model).

    Row i's kl_completion_ids is the completion (chosen_ids) of row kl_partners(n)[i], cut so that
    this row's prompt plus it fits in `max_length` tokens (the tokenize stage's limit; the prompt
    always leaves room for one token).
    """
    if table.num_rows and pc.any(pc.invert(pc.is_valid(table["label"]))).as_py():
        raise ValueError("with_kl_completions: every row must be unpaired (label set); found paired rows")
    partners = kl_partners(table.num_rows, seed=seed)
    prompts = table["prompt_ids"].to_pylist()
    completions = table["chosen_ids"].to_pylist()
    ids = table["id"].to_pylist()
    kl_ids = [completions[j][: max(1, max_length - len(p))] for p, j in zip(prompts, partners)]
    return table.append_column("kl_partner_id", pa.array([ids[j] for j in partners], pa.string())).append_column(
        "kl_completion_ids", pa.array(kl_ids, pa.list_(pa.int32()))
    )
