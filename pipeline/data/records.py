"""The raw-record table every reader makes, and the conversions it needs: parsed values and Arrow rows to JSON.

A record table has one row per input row and three string columns (`RECORD_SCHEMA`):

    source      where the row came from: "<file>:<line>" (1-based) for JSON Lines,
                "<file>#<row>" (0-based) for Parquet, Arrow and JSON-array files, "hf://datasets/<name>:<split>#<row>"
                for a hub dataset
    raw         the row serialised as JSON (ensure_ascii=False); for a line that could not be parsed, the
                line's own text (invalid UTF-8 bytes shown as backslash escapes)
    read_error  null, or why the row could not be read: "malformed_json" or "invalid_utf8"

Column types (Parquet, Arrow, hub): a column must have a JSON form: null, bool, integers, floats, strings,
and lists, structs or dictionary encodings of those. Any other type (binary, timestamps, dates, decimals,
maps, unions, ...) makes the input unreadable (`InputError` naming the column): a binary "prompt" column may
be text in any encoding or not text at all, and guessing would corrupt rows silently. Cast it to string
first. A struct where a string is expected is readable and is rejected per row ("wrong_type") later.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator

import pyarrow as pa

RECORD_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string(), nullable=False),
        pa.field("raw", pa.string(), nullable=False),
        pa.field("read_error", pa.string()),
    ]
)

MALFORMED_JSON = "malformed_json"
INVALID_UTF8 = "invalid_utf8"
ARROW_BATCH_ROWS = 4096

# One record before it goes into the table: (source, raw, read_error).
Record = tuple[str, str, "str | None"]

_SURROGATE = re.compile("[\ud800-\udfff]")


class InputError(ValueError):
    """The input cannot be read at all (as opposed to a row that is rejected). The message names the file."""


def record_table(display: str, records: Iterable[Record]) -> pa.Table:
    """The records as a `RECORD_SCHEMA` table; an input with no rows at all is an `InputError`."""
    sources: list[str] = []
    raws: list[str] = []
    errors: list[str | None] = []
    for source, raw, error in records:
        sources.append(source)
        raws.append(raw)
        errors.append(error)
    if not sources:
        raise InputError(f"{display}: no rows (the input is empty)")
    return pa.table({"source": sources, "raw": raws, "read_error": errors}, schema=RECORD_SCHEMA)


def join_display(display: str, name: str) -> str:
    return display.rstrip("/") + "/" + name


def to_raw_json(value) -> str:
    """Serialise a parsed row as JSON text that is valid UTF-8.

    ensure_ascii=False keeps text readable; a lone surrogate (from a "\\ud800" escape in the input) cannot be
    encoded as UTF-8, so it is written back as its escape, which round-trips to the same Python string.
    """
    text = json.dumps(value, ensure_ascii=False)
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def reject_constant(name: str):
    """`json.loads(parse_constant=...)`: NaN and Infinity are not JSON."""
    raise ValueError(f"{name} is not JSON")


# ---------------------------------------------------------------------------------------------- Arrow rows


def _json_compatible(t: pa.DataType) -> bool:
    if pa.types.is_null(t) or pa.types.is_boolean(t) or pa.types.is_integer(t) or pa.types.is_floating(t):
        return True
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return True
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return _json_compatible(t.value_type)
    if pa.types.is_list_view(t) or pa.types.is_large_list_view(t):
        return _json_compatible(t.value_type)
    if pa.types.is_struct(t):
        return all(_json_compatible(t.field(i).type) for i in range(t.num_fields))
    if pa.types.is_dictionary(t):
        return _json_compatible(t.value_type)
    return False


def check_schema(schema: pa.Schema, display: str) -> None:
    """Raise `InputError` naming every column that has no JSON form."""
    bad = [f"{f.name!r} ({f.type})" for f in schema if not _json_compatible(f.type)]
    if bad:
        raise InputError(
            f"{display}: column(s) {', '.join(bad)} have no JSON form; cast them to string (or drop them) first"
        )


def rows_from_batches(batches: Iterable[pa.RecordBatch], display: str, *, start: int = 0) -> Iterator[Record]:
    """One record per Arrow row, sourced "<display>#<row>" (rows numbered from `start`); a row with invalid UTF-8
    is an "invalid_utf8" record."""
    index = start
    for batch in batches:
        try:
            rows = batch.to_pylist()
        except UnicodeDecodeError:
            rows = None  # some string in this batch is not UTF-8: find which rows, one at a time
        for i in range(batch.num_rows):
            source = f"{display}#{index}"
            index += 1
            if rows is not None:
                row = rows[i]
            else:
                try:
                    row = batch.slice(i, 1).to_pylist()[0]
                except UnicodeDecodeError:
                    yield source, _undecodable_row(batch.slice(i, 1)), INVALID_UTF8
                    continue
            yield source, to_raw_json(row), None


def _undecodable_row(row: pa.RecordBatch) -> str:
    """The row as JSON, with invalid UTF-8 in top-level string columns shown as backslash escapes."""
    out = {}
    for name, column in zip(row.schema.names, row.columns):
        try:
            out[name] = column.to_pylist()[0]
        except UnicodeDecodeError:
            try:
                value = column.cast(pa.large_binary()).to_pylist()[0]
                # a null has no decode: the AttributeError is caught below
                out[name] = value.decode("utf-8", errors="backslashreplace")  # pyright: ignore[reportOptionalMemberAccess]
            except (pa.ArrowException, AttributeError):
                out[name] = "<undecodable>"
    return to_raw_json(out)


def guard_batches(batches: Iterable[pa.RecordBatch], display: str) -> Iterator[pa.RecordBatch]:
    """The batches, with a read failure midway turned into an `InputError` naming the input."""
    try:
        yield from batches
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"{display}: unreadable: {exc}") from exc
