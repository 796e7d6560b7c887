"""Reading data files into records: JSON Lines, JSON arrays, Parquet, Arrow, and directories of them.

  * JSON Lines: `.jsonl`, `.ndjson`, `.json` (one object per line), each optionally gzipped (`.gz`).
    A `.json` file whose first non-blank byte is "[" is read as one JSON array instead ("<file>#<index>").
  * Parquet: a `.parquet` (or `.pq`) file.
  * Arrow: an `.arrow` file, IPC stream or file format.
  * A directory of any of the above, read in name order (names starting with "." or "_" and README/LICENSE
    files are skipped; anything else unknown is an error, so nothing is skipped by accident).

Every function here yields `pipeline.data.records.Record`s; a file that cannot be read raises `InputError`.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterable, Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from pipeline.data.records import (
    ARROW_BATCH_ROWS,
    INVALID_UTF8,
    MALFORMED_JSON,
    InputError,
    Record,
    check_schema,
    guard_batches,
    join_display,
    reject_constant,
    rows_from_batches,
    to_raw_json,
)

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
GZIP_SUFFIXES = tuple(s + ".gz" for s in JSONL_SUFFIXES)
PARQUET_SUFFIXES = (".parquet", ".pq")
ARROW_SUFFIXES = (".arrow",)
KNOWN_SUFFIXES = JSONL_SUFFIXES + GZIP_SUFFIXES + PARQUET_SUFFIXES + ARROW_SUFFIXES

_BOM = b"\xef\xbb\xbf"


def list_directory(filesystem: pafs.FileSystem, inner: str, display: str) -> list[pafs.FileInfo]:
    """The directory's entries (not recursive), sorted by name."""
    try:
        entries = filesystem.get_file_info(pafs.FileSelector(inner, recursive=False))
    except OSError as exc:
        raise InputError(f"{display}: cannot list directory: {exc}") from exc
    return sorted(entries, key=lambda e: e.base_name)


def read_directory(filesystem: pafs.FileSystem, entries: list[pafs.FileInfo], display: str) -> Iterator[Record]:
    """The records of every data file among `entries` (a directory's listing), in name order."""
    return chain(read_file(filesystem, path, where) for path, where in data_files(entries, display))


def data_files(entries: list[pafs.FileInfo], display: str) -> list[tuple[str, str]]:
    """(path, display) of every data file among `entries` (a directory's listing), in name order; the rest is
    skipped (hidden files, README, LICENSE) or refused (subdirectories, unknown suffixes)."""
    files = []
    for entry in entries:
        name = entry.base_name
        if name.startswith((".", "_")) or name.upper().startswith(("README", "LICENSE")):
            continue
        where = join_display(display, name)
        if entry.type == pafs.FileType.Directory:
            raise InputError(f"{where}: subdirectories are not read; point at one directory of files")
        if not name.lower().endswith(KNOWN_SUFFIXES):
            raise InputError(f"{where}: unknown file type (expected one of {', '.join(KNOWN_SUFFIXES)})")
        files.append((entry.path, where))
    if not files:
        raise InputError(f"{display}: directory holds no data files")
    return files


def chain(iterators) -> Iterator[Record]:
    """The records of each iterator in turn; each is opened only when the previous one is done."""
    for iterator in iterators:
        yield from iterator


def read_file(filesystem: pafs.FileSystem, inner: str, display: str) -> Iterator[Record]:
    """The records of one data file, by its suffix."""
    lower = inner.lower()
    if lower.endswith(GZIP_SUFFIXES):
        return _read_json_file(filesystem, inner, display, gzipped=True, allow_array=lower.endswith(".json.gz"))
    if lower.endswith(JSONL_SUFFIXES):
        return _read_json_file(filesystem, inner, display, gzipped=False, allow_array=lower.endswith(".json"))
    if lower.endswith(PARQUET_SUFFIXES):
        return _read_parquet(filesystem, inner, display)
    if lower.endswith(ARROW_SUFFIXES):
        return read_arrow(filesystem, inner, display)
    raise InputError(f"{display}: unknown file type (expected one of {', '.join(KNOWN_SUFFIXES)}, or a directory)")


# ---------------------------------------------------------------------------------------------- JSON


def _read_json_file(filesystem, inner, display, *, gzipped: bool, allow_array: bool) -> Iterator[Record]:
    """A JSON Lines file streamed in chunks (never whole in memory), or a JSON array file read whole."""
    chunks = _chunks(filesystem, inner, display, gzipped=gzipped)
    head = next(chunks, b"")  # enough of the start to see the BOM and the first non-blank byte
    if head.startswith(_BOM):
        head = head[len(_BOM) :]
    if allow_array and head.lstrip()[:1] == b"[":
        return _read_json_array(head + b"".join(chunks), display)
    return _read_json_lines(_lines(head, chunks), display)


CHUNK_BYTES = 8 << 20


def _chunks(filesystem, inner, display, *, gzipped: bool) -> Iterator[bytes]:
    """The file's bytes in chunks, decompressed; a read that fails midway is an `InputError` naming the file."""
    try:
        # compression=None: pyarrow would otherwise guess from the extension; we decompress ourselves.
        with filesystem.open_input_stream(inner, compression=None) as raw:
            stream = gzip.GzipFile(fileobj=raw) if gzipped else raw
            while chunk := stream.read(CHUNK_BYTES):
                yield chunk
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise InputError(f"{display}: cannot read: {exc}") from exc


def _lines(head: bytes, chunks: Iterator[bytes]) -> Iterator[bytes]:
    """The lines of `head` followed by `chunks`, split at b"\\n" (a last line without one is a line too)."""
    rest = head
    while True:
        *whole, rest = rest.split(b"\n")
        yield from whole
        chunk = next(chunks, None)
        if chunk is None:
            break
        rest += chunk
    if rest:
        yield rest


def _read_json_lines(lines: Iterable[bytes], display: str) -> Iterator[Record]:
    for number, line in enumerate(lines, start=1):
        source = f"{display}:{number}"
        if line.endswith(b"\r"):
            line = line[:-1]
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            yield source, line.decode("utf-8", errors="backslashreplace"), INVALID_UTF8
            continue
        try:
            # A line nested deeper than Python's recursion limit (RecursionError) is no row of ours either.
            raw = to_raw_json(json.loads(text, parse_constant=reject_constant))
        except (ValueError, RecursionError):
            yield source, text, MALFORMED_JSON
            continue
        yield source, raw, None


def _read_json_array(data: bytes, display: str) -> Iterator[Record]:
    # One document: a fault anywhere leaves no row boundaries to count by, so it is a file-level error.
    try:
        values = json.loads(data.decode("utf-8"), parse_constant=reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InputError(f"{display}: starts with '[' but is not a valid JSON array: {exc}") from exc
    if not isinstance(values, list):
        raise InputError(f"{display}: expected a JSON array of rows")
    for index, value in enumerate(values):
        yield f"{display}#{index}", to_raw_json(value), None


# ---------------------------------------------------------------------------------------------- Arrow


def _read_parquet(filesystem, inner, display) -> Iterator[Record]:
    return read_parquet_rows(filesystem, inner, display)


def read_parquet_rows(
    filesystem: pafs.FileSystem, inner: str, display: str, *, row_groups: list[int] | None = None, first_row: int = 0
) -> Iterator[Record]:
    """The records of a Parquet file, or of its `row_groups` only (then `first_row` is the file's row number of
    their first row, which names the sources)."""
    parquet = open_parquet(filesystem, inner, display)
    batches = parquet.iter_batches(batch_size=ARROW_BATCH_ROWS, row_groups=row_groups)
    return rows_from_batches(guard_batches(batches, display), display, start=first_row)


def open_parquet(filesystem: pafs.FileSystem, inner: str, display: str) -> pq.ParquetFile:
    """The Parquet file, its columns checked (`check_schema`); `InputError` if it is not one."""
    try:
        parquet = pq.ParquetFile(filesystem.open_input_file(inner))
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"{display}: not a readable Parquet file: {exc}") from exc
    check_schema(parquet.schema_arrow, display)
    return parquet


def read_arrow(filesystem: pafs.FileSystem, inner: str, display: str) -> Iterator[Record]:
    """The records of one Arrow IPC file, stream format (as `datasets` writes it) or file format."""
    try:
        reader = ipc.open_stream(filesystem.open_input_file(inner))
        schema = reader.schema
        batches = iter(reader)
    except (OSError, pa.ArrowException):
        try:
            file_reader = ipc.open_file(filesystem.open_input_file(inner))
        except (OSError, pa.ArrowException) as exc:
            raise InputError(f"{display}: not a readable Arrow IPC stream or file: {exc}") from exc
        schema = file_reader.schema
        batches = (file_reader.get_batch(i) for i in range(file_reader.num_record_batches))
    check_schema(schema, display)
    return rows_from_batches(guard_batches(batches, display), display)
