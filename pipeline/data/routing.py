"""Tokenize's map side: each outcome of a batch, with what the whole-set step needs and the shard it goes to.

Deduplication, the content-hash order and the rejected file need rows gathered by shard. A good row goes to
the shard its id falls in: ids are uniform 64-bit hashes, so shard s of n holds the ids whose leading 32 bits
are in [s * 2**32 / n, (s + 1) * 2**32 / n). Every copy of a pair meets in one shard, and the shards in order,
each sorted by id, are the whole set sorted by id. A rejected row goes to a shard by a hash of its ordinal,
so rejections spread over the shards too. Pure: pyarrow and numpy.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipeline.data.split import is_eval

ROUTED_EXTRA = pa.schema(
    [
        pa.field("ordinal", pa.int64()),  # the record's (pipeline.data.pieces)
        pa.field("first_of_record", pa.bool_()),  # the record's first outcome: counts the records
        pa.field("last_in_file", pa.bool_()),  # the record's, on its first outcome only
        pa.field("held_out", pa.bool_()),  # this copy belongs to the eval split (prompt hash, or data.eval_split)
        pa.field("shard", pa.int32()),
    ]
)

_GOLDEN = 0x9E3779B97F4A7C15  # Fibonacci hashing: spreads consecutive ordinals over the shards


def id_shard(ids: list[str], shards: int) -> np.ndarray:
    """The shard of each id (16 hex digits, the content hash), in id order across shards; (n,) int32."""
    top = np.array([int(row_id[:8], 16) for row_id in ids], dtype=np.uint64)
    return ((top * np.uint64(shards)) >> np.uint64(32)).astype(np.int32)


def ordinal_shard(ordinals: np.ndarray, shards: int) -> np.ndarray:
    """The shard of each rejected row, from its ordinal; (n,) int32."""
    mixed = (ordinals.astype(np.uint64) * np.uint64(_GOLDEN)) >> np.uint64(32)  # wraps modulo 2**64 as it should
    return ((mixed * np.uint64(shards)) >> np.uint64(32)).astype(np.int32)


def route_outcomes(
    records: pa.Table, outcomes: pa.Table, *, shards: int, eval_fraction: float, named_eval: bool
) -> pa.Table:
    """`outcomes` (process_records of `records`, in record order) with `ROUTED_EXTRA`'s columns appended.

    `records` has the columns of `pipeline.data.pieces.PIECE_SCHEMA`. held_out is `eval_split` of the record
    with `named_eval` (data.eval_split), else the prompt hash against `eval_fraction`; never for a rejection.
    """
    n = outcomes.num_rows
    position = {source: i for i, source in enumerate(records["source"].to_pylist())}
    sources = outcomes["source"].to_pylist()
    index = np.array([position[s] for s in sources], dtype=np.int64)
    first = np.ones(n, dtype=bool)
    if n:
        first[1:] = index[1:] != index[:-1]
    ordinal = records["ordinal"].to_numpy()[index] if n else np.zeros(0, np.int64)
    last = records["last_in_file"].to_numpy(zero_copy_only=False)[index] & first if n else np.zeros(0, bool)
    good = outcomes["reason"].is_null().to_numpy(zero_copy_only=False) if n else np.zeros(0, bool)
    if named_eval:
        held = records["eval_split"].to_numpy(zero_copy_only=False)[index] if n else np.zeros(0, bool)
    else:
        held = is_eval(outcomes["prompt_ids"], eval_fraction) if n else np.zeros(0, bool)
    held = held & good
    shard = ordinal_shard(ordinal, shards)
    ids = outcomes["id"].to_pylist()
    good_rows = np.flatnonzero(good)
    shard[good_rows] = id_shard([ids[i] for i in good_rows], shards)
    extra = {
        "ordinal": pa.array(ordinal, pa.int64()),
        "first_of_record": pa.array(first),
        "last_in_file": pa.array(last),
        "held_out": pa.array(held),
        "shard": pa.array(shard, pa.int32()),
    }
    for name, column in extra.items():
        outcomes = outcomes.append_column(name, column)
    return outcomes
