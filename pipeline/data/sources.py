"""Reading preference data from any common source into one table of raw records.

`read_records` turns a path into a `pyarrow.Table` with one row per input row and three string columns:

    source      where the row came from: "<file>:<line>" (1-based) for JSON Lines,
                "<file>#<row>" (0-based) for Parquet, Arrow and JSON-array files, "hf://datasets/<name>:<split>#<row>"
                for a hub dataset
    raw         the row serialised as JSON (ensure_ascii=False); for a line that could not be parsed, the
                line's own text (invalid UTF-8 bytes shown as backslash escapes)
    read_error  null, or why the row could not be read: "malformed_json" or "invalid_utf8"

Nothing is interpreted here: which keys a row has and whether they make a preference example is decided by
`pipeline.data.encode.process_records`. What this module does decide is whether the input can be read at
all; when it cannot (missing, unknown format, empty, not the format its name says, a column with no JSON
form) it raises `InputError` naming the file, before any Ray work starts.

Sources:
  * JSON Lines: `.jsonl`, `.ndjson`, `.json` (one object per line), each optionally gzipped (`.gz`).
    A `.json` file whose first non-blank byte is "[" is read as one JSON array instead ("<file>#<index>").
  * Parquet: a `.parquet` file, or a directory of them.
  * A `datasets` `save_to_disk` directory: `state.json` / `dataset_info.json` beside `data-*.arrow` files
    in Arrow IPC stream format (read with pyarrow; the `datasets` package is not needed).
  * A directory of any of the above files, read in name order (names starting with "." or "_" and
    README/LICENSE files are skipped; anything else unknown is an error, so nothing is skipped by accident).
  * A hub dataset: "hf://datasets/<owner>/<name>", or a bare "<owner>/<name>" that is not a local path.
    Loaded with `datasets.load_dataset(name, split=split)`, imported only then.
Paths may be local or any URI `pyarrow.fs.FileSystem.from_uri` knows (file://, s3://, gs://, ...), or a
path inside an explicit `filesystem`.

Column types (Parquet, Arrow, hub): a column must have a JSON form: null, bool, integers, floats, strings,
and lists, structs or dictionary encodings of those. Any other type (binary, timestamps, dates, decimals,
maps, unions, ...) makes the file unreadable (`InputError` naming the column): a binary "prompt" column may
be text in any encoding or not text at all, and guessing would corrupt rows silently. Cast it to string
first. A struct where a string is expected is readable and is rejected per row ("wrong_type") later.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.fs as pafs

RECORD_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string(), nullable=False),
        pa.field("raw", pa.string(), nullable=False),
        pa.field("read_error", pa.string()),
    ]
)

MALFORMED_JSON = "malformed_json"
INVALID_UTF8 = "invalid_utf8"

_JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
_GZIP_SUFFIXES = tuple(s + ".gz" for s in _JSONL_SUFFIXES)
_PARQUET_SUFFIXES = (".parquet", ".pq")
_ARROW_SUFFIXES = (".arrow",)
_KNOWN_SUFFIXES = _JSONL_SUFFIXES + _GZIP_SUFFIXES + _PARQUET_SUFFIXES + _ARROW_SUFFIXES
_BARE_HUB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_SURROGATE = re.compile("[\ud800-\udfff]")
_BOM = b"\xef\xbb\xbf"
_ARROW_BATCH_ROWS = 4096


def is_hub_name(path: str) -> bool:
    """True for `owner/name`, which is read as a hub dataset when no such local path exists."""
    return bool(_BARE_HUB_NAME.match(path))


class InputError(ValueError):
    """The input cannot be read at all (as opposed to a row that is rejected). The message names the file."""


def read_records(path: str, *, filesystem: pafs.FileSystem | None = None, split: str = "train") -> pa.Table:
    """Read every row of `path` into a table with `RECORD_SCHEMA` (source, raw, read_error).

    Rows keep their order: files sorted by name, rows in file order. Every input row yields exactly one
    output row; a row that cannot be parsed is kept with `read_error` set. A blank line in a JSON Lines
    file is a row too, and a malformed one ("malformed_json"): blank lines are counted, never dropped.
    NaN/Infinity literals are not JSON and make a line "malformed_json".

    `split` is used only for hub datasets. Raises `InputError` for an input that cannot be read at all.
    """
    if filesystem is None:
        if path.startswith("hf://"):
            prefix = "hf://datasets/"
            if not path.startswith(prefix) or len(path) == len(prefix):
                raise InputError(f"{path}: hub paths look like hf://datasets/<owner>/<name>")
            return _finish(path, _read_hub(path[len(prefix):].strip("/"), split))
        if "://" in path:
            try:
                filesystem, inner = pafs.FileSystem.from_uri(path)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError, ValueError) as exc:
                raise InputError(f"{path}: cannot open this URI with pyarrow: {exc}") from exc
        else:
            inner = os.path.abspath(path)
            filesystem = pafs.LocalFileSystem()
            # "owner/name" with no such local path is a hub dataset; "dir/file.jsonl" stays a missing file.
            bare_hub_name = _BARE_HUB_NAME.match(path) and not path.lower().endswith(_KNOWN_SUFFIXES)
            if bare_hub_name and not os.path.exists(inner):
                return _finish(path, _read_hub(path, split, bare=True))
    else:
        inner = path

    info = _file_info(filesystem, inner, path)
    if info.type == pafs.FileType.NotFound:
        raise InputError(f"{path}: no such file or directory")
    if info.type == pafs.FileType.Directory:
        rows = _read_directory(filesystem, inner, path)
    else:
        rows = _read_file(filesystem, inner, path)
    return _finish(path, rows)


def _finish(display: str, rows: Iterator[tuple[str, str, str | None]]) -> pa.Table:
    sources: list[str] = []
    raws: list[str] = []
    errors: list[str | None] = []
    for source, raw, error in rows:
        sources.append(source)
        raws.append(raw)
        errors.append(error)
    if not sources:
        raise InputError(f"{display}: no rows (the input is empty)")
    return pa.table({"source": sources, "raw": raws, "read_error": errors}, schema=RECORD_SCHEMA)


def _file_info(filesystem: pafs.FileSystem, inner: str, display: str) -> pafs.FileInfo:
    try:
        return filesystem.get_file_info(inner)
    except OSError as exc:
        raise InputError(f"{display}: cannot stat: {exc}") from exc


def _join(display: str, name: str) -> str:
    return display.rstrip("/") + "/" + name


def _read_directory(filesystem: pafs.FileSystem, inner: str, display: str) -> Iterator[tuple[str, str, str | None]]:
    try:
        entries = filesystem.get_file_info(pafs.FileSelector(inner, recursive=False))
    except OSError as exc:
        raise InputError(f"{display}: cannot list directory: {exc}") from exc
    entries = sorted(entries, key=lambda e: e.base_name)
    names = {e.base_name for e in entries}

    if "dataset_dict.json" in names:
        splits = sorted(e.base_name for e in entries if e.type == pafs.FileType.Directory)
        raise InputError(f"{display}: a DatasetDict directory with splits {splits}; point at one split's directory")

    arrow_shards = [e for e in entries if e.base_name.startswith("data-") and e.base_name.endswith(".arrow")]
    if ("state.json" in names or "dataset_info.json" in names) and arrow_shards:
        return _read_save_to_disk(filesystem, inner, display, arrow_shards, "state.json" in names)

    files = []
    for entry in entries:
        name = entry.base_name
        if name.startswith((".", "_")) or name.upper().startswith(("README", "LICENSE")):
            continue
        if entry.type == pafs.FileType.Directory:
            raise InputError(f"{_join(display, name)}: subdirectories are not read; point at one directory of files")
        if not name.lower().endswith(_KNOWN_SUFFIXES):
            expected = ", ".join(_KNOWN_SUFFIXES)
            raise InputError(f"{_join(display, name)}: unknown file type (expected one of {expected})")
        files.append(entry)
    if not files:
        raise InputError(f"{display}: directory holds no data files")
    return _chain(_read_file(filesystem, e.path, _join(display, e.base_name)) for e in files)


def _chain(iterators) -> Iterator[tuple[str, str, str | None]]:
    for iterator in iterators:
        yield from iterator


def _read_save_to_disk(filesystem, inner, display, shards, has_state) -> Iterator[tuple[str, str, str | None]]:
    order = [e.base_name for e in shards]
    if has_state:
        # state.json lists the shards in the dataset's order; trust it over name order when present.
        try:
            with filesystem.open_input_stream(inner.rstrip("/") + "/state.json", compression=None) as f:
                state = json.loads(f.read().decode("utf-8"))
            listed = [d["filename"] for d in state.get("_data_files", [])]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InputError(f"{_join(display, 'state.json')}: unreadable: {exc}") from exc
        if listed:
            missing = [n for n in listed if n not in order]
            if missing:
                raise InputError(f"{display}: state.json lists shards that are not there: {missing}")
            order = listed
    return _chain(
        _read_arrow(filesystem, inner.rstrip("/") + "/" + name, _join(display, name)) for name in order
    )


def _read_file(filesystem: pafs.FileSystem, inner: str, display: str) -> Iterator[tuple[str, str, str | None]]:
    lower = inner.lower()
    if lower.endswith(_GZIP_SUFFIXES):
        return _read_json_file(filesystem, inner, display, gzipped=True, allow_array=lower.endswith(".json.gz"))
    if lower.endswith(_JSONL_SUFFIXES):
        return _read_json_file(filesystem, inner, display, gzipped=False, allow_array=lower.endswith(".json"))
    if lower.endswith(_PARQUET_SUFFIXES):
        return _read_parquet(filesystem, inner, display)
    if lower.endswith(_ARROW_SUFFIXES):
        return _read_arrow(filesystem, inner, display)
    raise InputError(f"{display}: unknown file type (expected one of {', '.join(_KNOWN_SUFFIXES)}, or a directory)")


# ---------------------------------------------------------------------------------------------- JSON


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def to_raw_json(value) -> str:
    """Serialise a parsed row as JSON text that is valid UTF-8.

    ensure_ascii=False keeps text readable; a lone surrogate (from a "\\ud800" escape in the input) cannot be
    encoded as UTF-8, so it is written back as its escape, which round-trips to the same Python string.
    """
    text = json.dumps(value, ensure_ascii=False)
    return _SURROGATE.sub(lambda m: "\\u%04x" % ord(m.group()), text)


def _read_json_file(filesystem, inner, display, *, gzipped: bool, allow_array: bool):
    try:
        # compression=None: pyarrow would otherwise guess from the extension; we decompress ourselves.
        with filesystem.open_input_stream(inner, compression=None) as f:
            data = f.read()
        if gzipped:
            data = gzip.decompress(data)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise InputError(f"{display}: cannot read: {exc}") from exc
    if data.startswith(_BOM):
        data = data[len(_BOM):]
    if allow_array and data.lstrip()[:1] == b"[":
        return _read_json_array(data, display)
    return _read_json_lines(data, display)


def _read_json_lines(data: bytes, display: str) -> Iterator[tuple[str, str, str | None]]:
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the newline that ends the last line starts no new line
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
            value = json.loads(text, parse_constant=_reject_constant)
        except ValueError:
            yield source, text, MALFORMED_JSON
            continue
        yield source, to_raw_json(value), None


def _read_json_array(data: bytes, display: str) -> Iterator[tuple[str, str, str | None]]:
    # One document: a fault anywhere leaves no row boundaries to count by, so it is a file-level error.
    try:
        values = json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"{display}: starts with '[' but is not a valid JSON array: {exc}") from exc
    if not isinstance(values, list):
        raise InputError(f"{display}: expected a JSON array of rows")
    for index, value in enumerate(values):
        yield f"{display}#{index}", to_raw_json(value), None


# ---------------------------------------------------------------------------------------------- Arrow


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


def _check_schema(schema: pa.Schema, display: str) -> None:
    bad = [f"{f.name!r} ({f.type})" for f in schema if not _json_compatible(f.type)]
    if bad:
        raise InputError(
            f"{display}: column(s) {', '.join(bad)} have no JSON form; cast them to string (or drop them) first"
        )


def _rows_from_batches(batches, display: str) -> Iterator[tuple[str, str, str | None]]:
    index = 0
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
                out[name] = value.decode("utf-8", errors="backslashreplace")
            except (pa.ArrowException, AttributeError):
                out[name] = "<undecodable>"
    return to_raw_json(out)


def _read_parquet(filesystem, inner, display) -> Iterator[tuple[str, str, str | None]]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(filesystem.open_input_file(inner))
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"{display}: not a readable Parquet file: {exc}") from exc
    _check_schema(parquet.schema_arrow, display)
    return _rows_from_batches(_guard(parquet.iter_batches(batch_size=_ARROW_BATCH_ROWS), display), display)


def _read_arrow(filesystem, inner, display) -> Iterator[tuple[str, str, str | None]]:
    import pyarrow.ipc as ipc

    # `datasets` writes the IPC stream format; a lone .arrow file may be the file format instead.
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
    _check_schema(schema, display)
    return _rows_from_batches(_guard(batches, display), display)


def _guard(batches, display):
    try:
        yield from batches
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"{display}: unreadable: {exc}") from exc


# ---------------------------------------------------------------------------------------------- hub


def _read_hub(name: str, split: str, *, bare: bool = False) -> Iterator[tuple[str, str, str | None]]:
    display = f"hf://datasets/{name}:{split}"
    if bare:
        display += f" (no local path {name!r}, so read as a hub dataset)"
    try:
        import datasets
    except ImportError as exc:
        hint = "reading hub datasets needs the `datasets` package: pip install datasets"
        raise InputError(f"{display}: {hint}") from exc
    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as exc:  # the hub client raises many types; all mean "cannot read this input"
        raise InputError(f"{display}: could not load from the hub: {exc}") from exc
    arrow = dataset.with_format("arrow")
    _check_schema(arrow.data.schema, display)
    batches = (t for t in arrow.iter(batch_size=_ARROW_BATCH_ROWS))
    source = f"hf://datasets/{name}:{split}"
    return _rows_from_batches((b for t in batches for b in t.to_batches()), source)

