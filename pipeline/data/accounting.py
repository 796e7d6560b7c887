"""The shards' summaries (`pipeline.data.split.finish_shard`) added up, and the proof that no row went missing.

Every input file's rows are numbered 0..n-1 (`pipeline.data.pieces`) and its last row is marked. Each record
is counted once, at its first outcome, with its row number; so the records of a file came back exactly once
each when their count is n, their row numbers sum to n (n - 1) / 2, and the marked last row is n - 1. A lost
batch, a batch that came back twice, or a lost tail of a file breaks one of these. Pure.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from pipeline.data.audit import merge_audits
from pipeline.data.checksums import combine

SPLITS = ("train", "eval")


def add_up(summaries: Iterable[dict]) -> dict:
    """The whole set's figures from the shards' summaries: rows_in (records), outcomes, reasons, per split
    the checksum and label counts, the audit, and `records` per input file (for `missing_rows`)."""
    summaries = list(summaries)
    reasons: Counter = Counter()
    records: dict[str, list[int]] = {}
    for summary in summaries:
        reasons.update(summary["reasons"])
        for file, (count, total, last) in summary["records"].items():
            have = records.setdefault(file, [0, 0, -1])
            have[0] += count
            have[1] += total
            have[2] = max(have[2], last)
    labels = {
        s: {k: sum(x["labels"][s][k] for x in summaries) for k in ("pairs", "desirable", "undesirable")} for s in SPLITS
    }
    return {
        "rows_in": sum(count for count, _, _ in records.values()),
        "outcomes": sum(x["outcomes"] for x in summaries),
        "reasons": reasons,
        "checksums": {s: combine(x["checksums"][s] for x in summaries) for s in SPLITS},
        "labels": labels,
        "audit": merge_audits((x["audit"] for x in summaries), reasons),
        "records": records,
    }


def missing_rows(records: dict[str, list[int]], names: dict[int, str]) -> list[str]:
    """What does not add up, per input file ([] when every row of every file came back exactly once).

    `records`: file index -> [records, sum of row numbers, last row number or -1] (`add_up`); `names`: file
    index -> how the file is shown.
    """
    problems = []
    for file, (count, total, last) in sorted(records.items(), key=lambda item: int(item[0])):
        name = names.get(int(file), f"file {file}")
        if last < 0:
            problems.append(f"{name}: its last row came back from no worker ({count} rows did)")
        elif count != last + 1 or total != last * (last + 1) // 2:
            problems.append(f"{name}: {count} rows came back for {last + 1} rows read")
    return problems
