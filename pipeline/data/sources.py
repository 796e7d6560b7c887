"""Reading preference data from any common source into one table of raw records (`RECORD_SCHEMA`).

Nothing is interpreted here: which keys a row has and whether they make a preference example is decided by
`pipeline.data.encode.process_records`. What is decided here is whether the input can be read at all; when
it cannot (missing, unknown format, empty, not the format its name says, a column with no JSON form) it
raises `InputError` naming the file, before any Ray work starts.

Sources: a data file or a directory of them (`pipeline.data.readers`), a `datasets` `save_to_disk` folder or a
hub dataset (`pipeline.data.hf_datasets`): "hf://datasets/<owner>/<name>", or a bare "<owner>/<name>" that
is not a local path. Paths may be local or any URI `pyarrow.fs.FileSystem.from_uri` knows (file://, s3://,
gs://, ...), or a path inside an explicit `filesystem`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.fs as pafs

from pipeline.config import ConfigError, DataConfig
from pipeline.data.hf_datasets import DEFAULT_SPLIT, is_saved_dataset, read_hub, read_saved
from pipeline.data.readers import KNOWN_SUFFIXES, list_directory, read_directory, read_file
from pipeline.data.records import RECORD_SCHEMA, InputError, Record, record_table

__all__ = [
    "RECORD_SCHEMA",
    "InputError",
    "first_records",
    "hub_dataset",
    "input_fingerprint",
    "read_inputs",
    "read_records",
]

_HUB_PREFIX = "hf://datasets/"
_BARE_HUB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def hub_dataset(path: str) -> str | None:
    """The hub dataset `path` names, or None when it names none.

    "hf://datasets/<owner>/<name>" names <owner>/<name>. A bare "<owner>/<name>" names itself when it is
    no local path and does not end in a data-file suffix: "data/train.jsonl" stays a (missing) file.
    The one rule for reading (`read_records`), fingerprinting (`input_fingerprint`) and the CLI's check
    that the input exists before Ray starts.
    """
    if path.startswith(_HUB_PREFIX):
        return path[len(_HUB_PREFIX) :].strip("/") or None
    if _BARE_HUB_NAME.match(path) and not path.lower().endswith(KNOWN_SUFFIXES) and not os.path.exists(path):
        return path
    return None


def read_records(path: str, *, filesystem: pafs.FileSystem | None = None, split: str | None = None) -> pa.Table:
    """Read every row of `path` into a table with `RECORD_SCHEMA` (source, raw, read_error).

    Rows keep their order: files sorted by name, rows in file order. Every input row yields exactly one
    output row; a row that cannot be parsed is kept with `read_error` set. A blank line in a JSON Lines
    file is a row too, and a malformed one ("malformed_json"): blank lines are counted, never dropped.
    NaN/Infinity literals are not JSON and make a line "malformed_json".

    `split` picks one split of a hub dataset or a save_to_disk DatasetDict folder (None: "train"); an input
    that does not hold it refuses it. Raises `InputError` for an input that cannot be read at all.
    """
    if filesystem is not None:
        return record_table(path, _read_path(filesystem, path, path, split))
    name = hub_dataset(path)
    if path.startswith("hf://"):
        if name is None:
            raise InputError(f"{path}: hub paths look like hf://datasets/<owner>/<name>")
        return record_table(path, read_hub(name, split))
    if "://" in path:
        try:
            filesystem, inner = pafs.FileSystem.from_uri(path)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError, ValueError) as exc:
            raise InputError(f"{path}: cannot open this URI with pyarrow: {exc}") from exc
        return record_table(path, _read_path(filesystem, inner, path, split))
    if name is not None:  # "owner/name" with no such local path; "dir/file.jsonl" stays a missing file
        return record_table(path, read_hub(name, split, bare=True))
    return record_table(path, _read_path(pafs.LocalFileSystem(), os.path.abspath(path), path, split))


def _read_path(filesystem: pafs.FileSystem, inner: str, display: str, split: str | None) -> Iterator[Record]:
    try:
        info = filesystem.get_file_info(inner)
    except OSError as exc:
        raise InputError(f"{display}: cannot stat: {exc}") from exc
    if info.type == pafs.FileType.NotFound:
        raise InputError(f"{display}: no such file or directory")
    entries = list_directory(filesystem, inner, display) if info.type == pafs.FileType.Directory else None
    if entries is not None and is_saved_dataset(entries):
        return read_saved(filesystem, inner, display, entries, split=split)
    if split is not None:
        raise InputError(f"{display}: no split {split!r}: only hub datasets and DatasetDict folders have splits")
    if entries is None:
        return read_file(filesystem, inner, display)
    return read_directory(filesystem, entries, display)


def first_records(path: str, *, split: str | None = None, limit: int) -> list[Record] | None:
    """The first `limit` records of a local or URI input, read as `read_records` reads them; None for a hub
    dataset (only the network could tell). Raises `InputError` for an input that cannot be read at all."""
    if hub_dataset(path) is not None or path.startswith("hf://"):
        return None
    if "://" in path:
        try:
            filesystem, inner = pafs.FileSystem.from_uri(path)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError, ValueError) as exc:
            raise InputError(f"{path}: cannot open this URI with pyarrow: {exc}") from exc
    else:
        filesystem, inner = pafs.LocalFileSystem(), os.path.abspath(path)
    records = list(itertools.islice(_read_path(filesystem, inner, path, split), limit))
    if not records:
        raise InputError(f"{path}: no rows (the input is empty)")
    return records


def read_inputs(data: DataConfig) -> tuple[pa.Table, frozenset[str] | None]:
    """The records `data` names, and which of them are its eval split (their sources; None: no eval split).

    With `data.eval_split`, that split's records follow the training split's in one table.
    """
    records = read_records(data.path, split=data.split)
    if data.eval_split is None:
        return records, None
    if data.eval_split == (data.split or DEFAULT_SPLIT):
        raise ConfigError(f"data.eval_split: {data.eval_split!r} is the split trained on; name another one")
    eval_records = read_records(data.path, split=data.eval_split)
    return pa.concat_tables([records, eval_records]), frozenset(eval_records["source"].to_pylist())


def input_fingerprint(path: str) -> str:
    """Hash of the input files' names, sizes and modification times: a changed input reruns the stage.

    A hub dataset (`hub_dataset`) is hashed by its name, with no network access; so is a missing local
    path, which is not refused here: reading it raises `InputError` (and `dpo` checks it before Ray starts).
    """
    name = hub_dataset(path)
    if name is not None:
        return hashlib.sha256(name.encode()).hexdigest()[:16]
    if "://" in path:
        fs, root = pafs.FileSystem.from_uri(path)
    elif os.path.exists(path):
        fs, root = pafs.LocalFileSystem(), os.path.abspath(path)
    else:
        return hashlib.sha256(path.encode()).hexdigest()[:16]
    info = fs.get_file_info(root)
    infos = [info] if info.type == pafs.FileType.File else fs.get_file_info(pafs.FileSelector(root, recursive=True))
    blob = json.dumps(sorted([i.path, i.size, str(i.mtime)] for i in infos if i.type == pafs.FileType.File))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
