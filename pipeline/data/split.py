"""Tokenize's reduce side: one shard's outcomes to the rows it keeps, in content-hash order, split train/eval.

A shard (`pipeline.data.routing`) holds every copy of each of its pairs, so deduplicating it alone
deduplicates the whole set: the copy read first (lowest ordinal) is kept, later ones are rejected as
"duplicate_pair". A pair is held out when any copy of it is (a pair in both a training split and
data.eval_split is evaluated on, never trained on). The summary is everything the driver needs of the
shard, small whatever its size: counts, reasons, checksums, label counts, the audit's sums and, per
input file, which rows came back (`pipeline.data.accounting`). Pure: pyarrow and numpy.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from typing import cast

import numpy as np
import pyarrow as pa

from pipeline.data.audit import partial_audit
from pipeline.data.checksums import checksum
from pipeline.data.pieces import split_ordinals
from pipeline.data.schemas import TOKENIZED

REJECTED_COLUMNS = ("source", "reason", "raw")


@dataclass(frozen=True)
class FinishedShard:
    """What one shard keeps and rejects: train and eval rows (`TOKENIZED`, sorted by id), rejected rows
    (source, reason, raw; in input order) and the summary (plain JSON values)."""

    train: pa.Table
    eval: pa.Table
    rejected: pa.Table
    summary: dict


def is_eval(prompt_ids: pa.Array | pa.ChunkedArray, fraction: float) -> np.ndarray:
    """Held-out membership from a hash of the prompt alone.

    Hashing the prompt (not the pair) keeps every pair of a held-out prompt out of training, and
    adding rows never moves an old row across the split.
    """

    def bucket(ids: list[int]) -> int:
        return int(hashlib.sha256(np.asarray(ids, dtype=np.int32).tobytes()).hexdigest()[:8], 16)

    buckets = np.array([bucket(ids) for ids in cast("list[list[int]]", prompt_ids.to_pylist())], dtype=np.float64)
    return buckets / 2**32 < fraction


def with_lengths(good: pa.Table) -> pa.Table:
    """The rows with prompt_len, chosen_len and rejected_len (int32) appended."""
    for name in ("prompt", "chosen", "rejected"):
        lengths = [cast(pa.ListArray, chunk).value_lengths() for chunk in good[f"{name}_ids"].chunks]
        good = good.append_column(f"{name}_len", pa.chunked_array(lengths, pa.int32()).cast(pa.int32()))
    return good


def finish_shard(rows: pa.Table) -> FinishedShard:
    """Deduplicate, order and split one shard's routed outcomes (`pipeline.data.routing.route_outcomes`)."""
    good_mask = rows["reason"].is_null().to_numpy(zero_copy_only=False)
    good = rows.filter(pa.array(good_mask))
    bad = rows.filter(pa.array(~good_mask))
    good = good.sort_by([("id", "ascending"), ("ordinal", "ascending")])
    ids = np.array(good["id"].to_pylist(), dtype=object)
    first = np.ones(len(ids), dtype=bool)
    first[1:] = ids[1:] != ids[:-1]
    group = np.cumsum(first) - 1
    held = np.zeros(int(first.sum()), dtype=bool)
    np.logical_or.at(held, group, good["held_out"].to_numpy(zero_copy_only=False))
    kept = with_lengths(good.filter(pa.array(first)))
    copies = good.filter(pa.array(~first))
    copies = copies.set_column(
        copies.schema.get_field_index("reason"), "reason", pa.array(["duplicate_pair"] * copies.num_rows, pa.string())
    )
    rejected = pa.concat_tables(
        [bad.select([*REJECTED_COLUMNS, "ordinal"]), copies.select([*REJECTED_COLUMNS, "ordinal"])]
    )
    rejected = rejected.sort_by([("ordinal", "ascending")])
    splits = {"train": kept.filter(pa.array(~held)), "eval": kept.filter(pa.array(held))}
    summary = {
        "outcomes": rows.num_rows,
        "records": records_seen(rows),
        "reasons": dict(Counter(rejected["reason"].to_pylist())),
        "checksums": {s: checksum(cast("list[str]", t["id"].to_pylist())) for s, t in splits.items()},
        "labels": {s: label_counts(t) for s, t in splits.items()},
        "audit": partial_audit(kept),
    }
    return FinishedShard(
        train=splits["train"].select(TOKENIZED.names),
        eval=splits["eval"].select(TOKENIZED.names),
        rejected=rejected.select(list(REJECTED_COLUMNS)),
        summary=summary,
    )


def records_seen(rows: pa.Table) -> dict[str, list[int]]:
    """Per input file (its index, as a string): [records, sum of their row numbers, the row number of the
    file's last row or -1 when it is not among them], from each record's first outcome."""
    firsts = rows.filter(rows["first_of_record"])
    ordinals = firsts["ordinal"].to_numpy()
    files, numbers = split_ordinals(ordinals)
    last = firsts["last_in_file"].to_numpy(zero_copy_only=False)
    seen: dict[str, list[int]] = {}
    for file in np.unique(files):
        mine = files == file
        ends = numbers[mine & last]
        seen[str(int(file))] = [int(mine.sum()), int(numbers[mine].sum()), int(ends[0]) if len(ends) else -1]
    return seen


def label_counts(split: pa.Table) -> dict[str, int]:
    """{"pairs", "desirable", "undesirable"} row counts of a split, from its label column (null for a pair,
    true or false for an unpaired row)."""
    label = split["label"]
    desirable = int(label.drop_null().to_numpy().sum()) if len(label) else 0
    return {"pairs": label.null_count, "desirable": desirable, "undesirable": len(label) - label.null_count - desirable}
