"""Row identity without lists: a split's rows as a count and an order-independent sum of their ids' hashes.

Two stages that must hold the same rows (score keeps tokenize's) compare these instead of id lists, so the
check costs the driver a few numbers however many rows there are. Summing 64-bit hashes modulo 2**64 does
not depend on order or on how the rows are sharded, and a lost row, a repeated one, or one swapped for
another changes the sum unless hashes collide by chance (about 2**-64).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

MASK = (1 << 64) - 1


def id_hash(row_id: str) -> int:
    """A 64-bit hash of an id: ids are content hashes already, but any string must do."""
    return int.from_bytes(hashlib.blake2b(row_id.encode("utf-8"), digest_size=8).digest(), "little")


def checksum(ids: Iterable[str]) -> dict:
    """{"rows": count, "id_sum": 16 hex digits} of the ids."""
    rows, total = 0, 0
    for row_id in ids:
        rows += 1
        total += id_hash(row_id)
    return {"rows": rows, "id_sum": f"{total & MASK:016x}"}


def combine(parts: Iterable[dict]) -> dict:
    """The checksum of the union of disjoint parts (shards of one split)."""
    rows, total = 0, 0
    for part in parts:
        rows += part["rows"]
        total += int(part["id_sum"], 16)
    return {"rows": rows, "id_sum": f"{total & MASK:016x}"}
