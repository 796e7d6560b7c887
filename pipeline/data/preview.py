"""A look at the first rows of the input before any stage runs: which columns it has, which format each row
is, and what `data.columns` mapping would fit when none is. Pure: reads the first rows, nothing else.

The tokenize stage decides row by row (pipeline/data/encode.py); this looks at the same rows the same way
(`map_columns`, `detect_format`), so that data whose columns match no format fails in a second with one
line naming `data.columns`, instead of a finished stage of "60 rows in, 0 pairs out".
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass

from pipeline.config import DataConfig
from pipeline.data.outcomes import Reject
from pipeline.data.rows import detect_format, map_columns
from pipeline.data.sources import first_records

PREVIEW_ROWS = 200

# Column names seen in public preference data sets, by the name we use for them (first match wins).
SYNONYMS: dict[str, tuple[str, ...]] = {
    "prompt": ("prompt", "question", "instruction", "query", "input", "context", "prompt_text", "user", "history"),
    "chosen": ("chosen", "preferred", "chosen_response", "response_chosen", "better", "accepted", "good", "win"),
    "rejected": (
        "rejected",
        "dispreferred",
        "rejected_response",
        "response_rejected",
        "worse",
        "declined",
        "bad",
        "lose",
    ),
    "completion": ("completion", "response", "output", "answer", "generation"),
    "label": ("label", "desirable", "is_desirable", "thumbs_up", "is_good", "preferred_label"),
    "completions": ("completions", "responses", "candidates", "outputs"),
}
# The fields each format needs (our names); "auto" takes the first that fits.
FORMAT_FIELDS: dict[str, tuple[str, ...]] = {
    "standard": ("prompt", "chosen", "rejected"),
    "conversational": ("prompt", "chosen", "rejected"),
    "implicit_prompt": ("chosen", "rejected"),
    "unpaired": ("prompt", "completion", "label"),
    "scored": ("prompt", "completions"),
}


UNFIT = ("missing_field", "wrong_type")


@dataclass(frozen=True)
class Preview:
    """What the first rows of an input hold.

    rows: how many were read; columns: their keys, in order of first appearance; formats: the detected
    format of each row that parsed (after `data.columns`), "missing_field" for one that fits none; unreadable:
    rows that were not JSON objects; messages: whether any row holds message lists (needs a chat template).
    A row whose fields are text where `data.format` wants messages (or the other way round) is "wrong_type".
    """

    rows: int
    columns: tuple[str, ...]
    formats: Counter
    unreadable: int
    messages: bool

    @property
    def fitting(self) -> int:
        """Rows that fit a format."""
        return sum(n for kind, n in self.formats.items() if kind not in UNFIT)

    @property
    def kinds(self) -> set[str]:
        return {kind for kind in self.formats if kind not in UNFIT}


def preview(data: DataConfig, *, limit: int = PREVIEW_ROWS) -> Preview | None:
    """The first `limit` rows of `data.path` (its `data.split`), or None for a hub dataset."""
    records = first_records(data.path, split=data.split, limit=limit)
    if records is None:
        return None
    columns: dict[str, None] = {}
    formats: Counter = Counter()
    unreadable, messages = 0, False
    for _source, raw, error in records:
        try:
            row = json.loads(raw) if error is None else None
        except ValueError:
            row = None
        if not isinstance(row, dict):
            unreadable += 1
            continue
        columns.update(dict.fromkeys(row))
        mapped = map_columns(row, dict(data.columns))
        messages = messages or any(isinstance(v, list) and v and isinstance(v[0], dict) for v in mapped.values())
        formats[_format_of(mapped, data.format)] += 1
    return Preview(len(records), tuple(columns), formats, unreadable, messages)


def _format_of(row: dict, format: str) -> str:
    """The row's format, as the tokenize stage finds it, or "missing_field" when it has the fields of none
    (of `format`, where one is named)."""
    try:
        detected = detect_format(row)
    except Reject:
        return "missing_field"
    kind = detected if format == "auto" else format
    if any(row.get(field) is None for field in FORMAT_FIELDS.get(kind, ())):
        return "missing_field"
    if {kind, detected} == {"standard", "conversational"}:
        return "wrong_type"  # text where the named format wants messages, or the other way round
    return kind


def suggest_columns(columns: tuple[str, ...] | list[str]) -> dict[str, str]:
    """A `data.columns` mapping (ours -> theirs) for columns named as public data sets name them: the
    fields of the first format that all of them cover; {} when none does."""
    lowered = {c.lower(): c for c in columns}
    found = {}
    for ours, names in SYNONYMS.items():
        match = next((lowered[n] for n in names if n in lowered), None)
        if match is not None and match not in found.values():
            found[ours] = match
    for fields in FORMAT_FIELDS.values():
        if all(f in found for f in fields):
            return {f: found[f] for f in fields if found[f] != f}
    return {}


def fits_format(data: DataConfig, view: Preview) -> str | None:
    """Why the previewed rows fit no format (one line naming `data.columns` or `data.format`); None if some do."""
    if view.fitting:
        return None
    found = ", ".join(view.columns) or "none"
    if not view.columns:
        return f"none of the first {view.rows} rows of {data.path} is a JSON object with columns"
    missing = [f"{ours}: {theirs!r}" for ours, theirs in data.columns.items() if theirs not in view.columns]
    if missing:
        return f"data.columns maps {', '.join(missing)}, which is not a column of {data.path} (columns found: {found})"
    if view.formats["wrong_type"]:
        other = "conversational" if data.format == "standard" else "standard"
        return (
            f"data.format is {data.format}, but the first {view.rows} rows of {data.path} are {other} "
            f"({'message lists' if other == 'conversational' else 'text'}); set data.format: {other} (or auto)"
        )
    want = f"format {data.format} ({', '.join(FORMAT_FIELDS[data.format])})" if data.format != "auto" else "any format"
    suggestion = suggest_columns(view.columns)
    if suggestion:
        mapping = "{" + ", ".join(f"{ours}: {theirs}" for ours, theirs in suggestion.items()) + "}"
        fix = f"set data.columns: {mapping}"
    else:
        fix = (
            "map your columns with data.columns, e.g. {prompt: <col>, chosen: <col>, rejected: <col>} "
            "(formats: prompt/chosen/rejected, chosen/rejected, prompt/completion/label, prompt/completions)"
        )
    return f"the first {view.rows} rows of {data.path} lack the fields of {want} (columns found: {found}); {fix}"


# What to change when every row was rejected for one reason (pipeline/data/outcomes.py names the reasons).
NO_ROWS_HINTS = {
    "missing_field": "the rows' fields match no format: map your columns with data.columns (or set data.format)",
    "wrong_type": "the fields hold the wrong types for the format: check data.format and data.columns",
    "too_long": "every pair is longer than the limits: raise tokenize.max_length / tokenize.max_prompt_length",
    "malformed_json": "no row is valid JSON: check data.path",
    "identical_responses": "chosen and rejected are the same in every row: check data.columns",
    "no_pair": "no row gives a pair: check data.pairing and data.min_score_gap",
}


def explain_no_rows(rows_in: int, reasons: Counter) -> str:
    """The error of a tokenize stage that made no rows at all: its counts by reason and what to change."""
    top = reasons.most_common(1)[0][0] if reasons else ""
    hint = NO_ROWS_HINTS.get(top, "every row was rejected: check data.format, data.columns and the tokenize limits")
    return f"{rows_in} rows in, 0 out (dropped: {dict(reasons.most_common())}); {hint}"
