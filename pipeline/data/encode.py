"""From raw preference records to token ids: one pure function over an Arrow batch.

`process_records` takes the table `pipeline.data.sources.read_records` makes (or a Ray Data batch of it) and
returns one row per produced example or per rejection, with `OUTCOME_SCHEMA`. It holds no state, does no
I/O and uses no randomness, so the same batch and tokenizer always give the same table.

The steps, each in its own module: parse a record and find its format and examples (`pipeline.data.rows`,
`pipeline.data.scored`), check and render each example to text (`pipeline.data.examples`,
`pipeline.data.chat`), tokenize the batch's texts in one call, then place BOS/EOS, find the prompt/response
boundary and truncate (`pipeline.data.token_rules`). Outcomes and reasons: `pipeline.data.outcomes`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import cast

import pyarrow as pa

from pipeline.data.chat import ChatRenderer
from pipeline.data.outcomes import Example, OutcomeColumns, Reject
from pipeline.data.rows import COLUMN_NAMES, FORMATS, detect_format, map_columns, parse_row, row_examples
from pipeline.data.scored import PAIRINGS
from pipeline.data.token_ids import token_ids
from pipeline.data.token_rules import TokenRules

_NO_COLUMNS: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True)
class _Candidate:
    """An example of one record, rendered to text; its token ids are still to come."""

    source: str
    raw: str
    example: Example


@dataclass(frozen=True)
class _Rejection:
    source: str
    raw: str
    reason: str


@dataclass(frozen=True)
class _RowOptions:
    format: str
    columns: Mapping[str, str]
    pairing: str
    min_score_gap: float


def process_records(
    table: pa.Table,
    tokenizer,
    *,
    format: str = "auto",
    columns: Mapping[str, str] = _NO_COLUMNS,
    chat_template: str | None = None,
    max_prompt_length: int,
    max_length: int,
    pairing: str = "best_vs_worst",
    min_score_gap: float = 0.0,
) -> pa.Table:
    """Turn raw records (columns source, raw, read_error) into examples and rejections (`OUTCOME_SCHEMA`).

    Rows come out in input order (a scored row's pairs in pairing order). Raises ValueError for a bad
    configuration: unknown format/pairing/column name, non-positive lengths, a tokenizer without EOS, or a
    conversational row with no chat template anywhere.
    """
    options = _RowOptions(format, columns, pairing, min_score_gap)
    _check_config(options, max_prompt_length, max_length)
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; every response must end with one")
    renderer = ChatRenderer(tokenizer, chat_template)
    # Every record is parsed, checked and rendered first, so that tokenizing is one batch call.
    slots = [slot for record in _records(table) for slot in _record_outcomes(record, renderer, options)]
    candidates = [slot for slot in slots if isinstance(slot, _Candidate)]
    encoded = _encode(tokenizer, [c.example for c in candidates])
    rules = TokenRules(tokenizer, max_prompt_length=max_prompt_length, max_length=max_length)
    out = OutcomeColumns()
    for slot in slots:
        if isinstance(slot, _Rejection):
            out.add_rejection(slot.source, slot.raw, slot.reason)
            continue
        prompt_ids, *full_ids = next(encoded)
        try:
            out.add_example(slot.source, slot.example, rules.apply(prompt_ids, full_ids))
        except Reject as reject:
            out.add_rejection(slot.source, slot.raw, reject.reason)
    return out.table()


def _records(table: pa.Table) -> Iterator[tuple[str, str, str | None]]:
    sources = cast("list[str]", table.column("source").to_pylist())
    raws = cast("list[str]", table.column("raw").to_pylist())
    has_errors = "read_error" in table.column_names
    read_errors = table.column("read_error").to_pylist() if has_errors else [None] * len(sources)
    return zip(sources, raws, read_errors)


def _record_outcomes(record: tuple[str, str, str | None], renderer: ChatRenderer, options: _RowOptions) -> list:
    """The record's `_Candidate`s and `_Rejection`s, in order."""
    source, raw, read_error = record
    if read_error is not None:
        return [_Rejection(source, raw, read_error)]
    try:
        row = map_columns(parse_row(raw), options.columns)
        kind = options.format if options.format != "auto" else detect_format(row)
        outcomes = row_examples(row, kind, renderer, pairing=options.pairing, min_score_gap=options.min_score_gap)
    except Reject as reject:
        return [_Rejection(source, raw, reject.reason)]
    return [
        _Rejection(source, raw, o.reason) if isinstance(o, Reject) else _Candidate(source, raw, o) for o in outcomes
    ]


def _encode(tokenizer, examples: list[Example]) -> Iterator[list[list[int]]]:
    """Per example, [prompt ids, then each whole text's (prompt + response) ids], all from one tokenizer call.

    Each distinct text is tokenized once (a scored row's prompt and completions recur across its pairs), so
    examples may share id lists: `TokenRules.apply` only reads them, never changes them in place.
    """
    per_example = [[e.prompt, *(e.prompt + r for r in e.responses)] for e in examples]
    texts = list(dict.fromkeys(text for group in per_example for text in group))
    ids = token_ids(tokenizer, texts)  # never truncated: we cut, by our rules
    by_text = dict(zip(texts, ids))
    for group in per_example:
        yield [by_text[text] for text in group]


def check_options(
    *,
    format: str,
    columns: Mapping[str, str],
    pairing: str,
    min_score_gap: float,
    max_prompt_length: int,
    max_length: int,
) -> None:
    """Refuse settings `process_records` cannot use, naming the config key; also run before any stage starts."""
    _check_config(_RowOptions(format, columns, pairing, min_score_gap), max_prompt_length, max_length)


def _check_config(options: _RowOptions, max_prompt_length: int, max_length: int) -> None:
    if options.format not in FORMATS:
        raise ValueError(f"data.format must be one of {', '.join(FORMATS)}, got {options.format!r}")
    if options.pairing not in PAIRINGS:
        raise ValueError(f"data.pairing must be one of {', '.join(PAIRINGS)}, got {options.pairing!r}")
    unknown = sorted(set(options.columns) - COLUMN_NAMES)
    if unknown:
        raise ValueError(f"data.columns: unknown names {unknown}; the keys are ours, from {sorted(COLUMN_NAMES)}")
    if not all(isinstance(v, str) for v in options.columns.values()):
        raise ValueError("data.columns: each value must be the name of a column in the data (a string)")
    if max_prompt_length < 1 or max_length < 1:
        raise ValueError(
            "tokenize.max_prompt_length and tokenize.max_length must be positive, "
            f"got {max_prompt_length}, {max_length}"
        )
    gap = options.min_score_gap
    if not (isinstance(gap, (int, float)) and math.isfinite(gap) and gap >= 0):
        raise ValueError(f"data.min_score_gap must be a finite number >= 0, got {gap!r}")
