"""The score stage's units of work: runs of rows of tokenize's shards, each scored into a shard of its own.

`plan_units` cuts every tokenize shard of a split into runs of at most `shard_rows` rows, from the row counts
that tokenize's manifest lists (no file is read). A unit's output shard is named after its input shard and
its place in it, `<split>/part-<shard>-<unit>.parquet`, so the score shards in name order hold tokenize's rows
in tokenize's order, and a pool started again finds which units are done by their names. Pure.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Unit:
    """Rows [start, stop) of the tokenize shard `source` (relative to the upstream stage's folder), scored into
    `name` (relative to the score stage's). `after` is (source, row) of the row that follows the unit in its
    split, the split's first row for its last unit: KTO borrows its completion for the unit's last row."""

    split: str
    source: str
    start: int
    stop: int
    name: str
    after: tuple[str, int]

    @property
    def rows(self) -> int:
        return self.stop - self.start


def plan_units(files: dict[str, dict], *, split: str, shard_rows: int) -> list[Unit]:
    """The units of `split`, in order. `files` is the upstream manifest's listing ({path: {"rows": ...}})."""
    if shard_rows < 1:
        raise ValueError(f"score.shard_rows: {shard_rows}; give at least 1")
    shards = sorted(
        (path, entry["rows"])
        for path, entry in files.items()
        if path.startswith(f"{split}/") and path.endswith(".parquet") and entry.get("rows")
    )
    runs = [
        (path, start, min(start + shard_rows, rows), number)
        for path, rows in shards
        for number, start in enumerate(range(0, rows, shard_rows))
    ]
    units = []
    for i, (path, start, stop, number) in enumerate(runs):
        following = runs[(i + 1) % len(runs)]
        stem = path.rsplit("/", 1)[1].removesuffix(".parquet")
        units.append(Unit(split, path, start, stop, f"{split}/{stem}-{number:05d}.parquet", following[:2]))
    return units
