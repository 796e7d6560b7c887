"""An input as pieces that are read independently: planned on the driver (no rows), read where the work runs.

`plan_pieces` lists what an input holds (files, row groups, saved-dataset shards, a hub split) and refuses,
as `InputError` naming the file, what cannot be read at all: a missing path, an unknown suffix, a Parquet
footer or Arrow schema that does not open, a column with no JSON form. It opens footers and schemas, never
rows. `read_piece` then yields the piece's records (`pipeline.data.records.Record`) and `piece_tables` the
same as Arrow tables with two more columns, for a reader that runs on many workers:

    ordinal       int64: the row's place in the whole input, (file index << 40) + row number in its file;
                  ordering by it is reading the input in order (files by name, rows in file order)
    last_in_file  bool: the row is its file's last; with the ordinals, lets a reader of the pieces' outcomes
                  check that every row of every file came back (`pipeline.data.accounting`)
    eval_split    bool: the row comes from `data.eval_split` (the piece's `eval_split`)

A JSON Lines, JSON, Arrow or saved-dataset shard file is one piece (read as a stream); a Parquet file is one
piece per run of row groups of about `PIECE_ROWS` rows; a hub dataset's split is one piece, loaded by
`datasets` where the piece is read.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from pipeline.data.hf_datasets import is_saved_dataset, read_hub, saved_shards
from pipeline.data.readers import (
    ARROW_SUFFIXES,
    KNOWN_SUFFIXES,
    PARQUET_SUFFIXES,
    data_files,
    list_directory,
    open_parquet,
    read_arrow,
    read_file,
    read_parquet_rows,
)
from pipeline.data.records import RECORD_SCHEMA, InputError, Record

PIECE_ROWS = 100_000  # Parquet row groups are read in runs of about this many rows
ROW_BITS = 40  # a file's rows are numbered below 2**40 in its ordinals
HUB_SIZE_BYTES = 1 << 30  # a hub split's size is not known before it is loaded: taken as 1 GiB for planning

_HUB_PREFIX = "hf://datasets/"
_BARE_HUB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")

PIECE_SCHEMA = pa.schema(
    [
        *RECORD_SCHEMA,
        pa.field("ordinal", pa.int64()),
        pa.field("last_in_file", pa.bool_()),
        pa.field("eval_split", pa.bool_()),
    ]
)


@dataclass(frozen=True)
class Piece:
    """One independently read part of an input.

    `path` is inside `filesystem` (for a hub dataset: its name, with `hub_split` and no filesystem);
    `display` is how the rows' sources name the file. `row_groups` (Parquet) limits the piece to those row
    groups, whose first row is the file's row `first_row`; `last` says whether the file's last row is here.
    """

    filesystem: Any  # pyarrow.fs.FileSystem (picklable: pieces travel to the workers); None for the hub
    path: str
    display: str
    file_index: int
    size_bytes: int = 0
    row_groups: tuple[int, ...] | None = None
    first_row: int = 0
    last: bool = True
    hub_split: str | None = None
    hub_bare: bool = False  # named by a bare "<owner>/<name>": errors say it was read as a hub dataset
    eval_split: bool = False  # its rows are the held-out split's (data.eval_split)


def hub_dataset(path: str) -> str | None:
    """The hub dataset `path` names, or None when it names none.

    "hf://datasets/<owner>/<name>" names <owner>/<name>. A bare "<owner>/<name>" names itself when it is
    no local path and does not end in a data-file suffix: "data/train.jsonl" stays a (missing) file.
    The one rule for reading, fingerprinting (`pipeline.data.sources.input_fingerprint`) and the CLI's
    check that the input exists before Ray starts.
    """
    if path.startswith(_HUB_PREFIX):
        return path[len(_HUB_PREFIX) :].strip("/") or None
    if _BARE_HUB_NAME.match(path) and not path.lower().endswith(KNOWN_SUFFIXES) and not os.path.exists(path):
        return path
    return None


def plan_pieces(
    path: str, *, split: str | None = None, filesystem: pafs.FileSystem | None = None, first_index: int = 0
) -> list[Piece]:
    """The pieces of `path`, in reading order, their files numbered from `first_index`.

    `path` is what `pipeline.data.sources.read_records` takes: a local path or URI, a hub dataset, or a path
    in `filesystem`. Raises `InputError` for an input that cannot be read at all (see the module docstring).
    """
    if filesystem is not None:
        return _plan_path(filesystem, path, path, split, first_index)
    name = hub_dataset(path)
    if path.startswith("hf://"):
        if name is None:
            raise InputError(f"{path}: hub paths look like hf://datasets/<owner>/<name>")
        return [_hub_piece(name, split, first_index)]
    if "://" in path:
        try:
            filesystem, inner = pafs.FileSystem.from_uri(path)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError, ValueError) as exc:
            raise InputError(f"{path}: cannot open this URI with pyarrow: {exc}") from exc
        return _plan_path(filesystem, inner, path, split, first_index)
    if name is not None:
        return [_hub_piece(name, split, first_index, bare=True)]
    return _plan_path(pafs.LocalFileSystem(), os.path.abspath(path), path, split, first_index)


def _hub_piece(name: str, split: str | None, index: int, *, bare: bool = False) -> Piece:
    return Piece(None, name, f"hf://datasets/{name}", index, HUB_SIZE_BYTES, hub_split=split or "train", hub_bare=bare)


def _plan_path(filesystem: pafs.FileSystem, inner: str, display: str, split: str | None, first: int) -> list[Piece]:
    try:
        info = filesystem.get_file_info(inner)
    except OSError as exc:
        raise InputError(f"{display}: cannot stat: {exc}") from exc
    if info.type == pafs.FileType.NotFound:
        raise InputError(f"{display}: no such file or directory")
    if info.type != pafs.FileType.Directory:
        if split is not None:
            raise InputError(f"{display}: no split {split!r}: only hub datasets and DatasetDict folders have splits")
        return _file_pieces(filesystem, inner, display, first, info.size or 0)
    entries = list_directory(filesystem, inner, display)
    if is_saved_dataset(entries):
        files = saved_shards(filesystem, inner, display, entries, split=split)
    elif split is not None:
        raise InputError(f"{display}: no split {split!r}: only hub datasets and DatasetDict folders have splits")
    else:
        files = data_files(entries, display)
    sizes = {e.path: e.size or 0 for e in entries}
    pieces: list[Piece] = []
    for number, (path, where) in enumerate(files):
        size = sizes.get(path)
        if size is None:  # a saved DatasetDict's split: its shards are one folder down
            size = filesystem.get_file_info(path).size or 0
        pieces += _file_pieces(filesystem, path, where, first + number, size)
    return pieces


def _file_pieces(filesystem: pafs.FileSystem, inner: str, display: str, index: int, size: int) -> list[Piece]:
    """One file's pieces: its row-group runs for Parquet, the whole file otherwise (its schema checked)."""
    lower = inner.lower()
    if lower.endswith(PARQUET_SUFFIXES):
        metadata = open_parquet(filesystem, inner, display).metadata
        runs, run, rows, first = [], [], 0, 0
        for group in range(metadata.num_row_groups):
            run.append(group)
            rows += metadata.row_group(group).num_rows
            if rows >= PIECE_ROWS or group == metadata.num_row_groups - 1:
                runs.append((tuple(run), first))
                run, first, rows = [], first + rows, 0
        share = size // max(1, len(runs))
        return [
            Piece(filesystem, inner, display, index, share, groups, start, last=i == len(runs) - 1)
            for i, (groups, start) in enumerate(runs)
        ] or [Piece(filesystem, inner, display, index, size, (), 0)]
    if lower.endswith(ARROW_SUFFIXES):
        read_arrow(filesystem, inner, display)  # opens the stream and checks its schema: no rows read
    elif not lower.endswith(KNOWN_SUFFIXES):
        read_file(filesystem, inner, display)  # raises InputError naming the suffixes it knows
    return [Piece(filesystem, inner, display, index, size)]


def split_ordinals(ordinals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(file index, row number in its file) of each ordinal."""
    return ordinals >> ROW_BITS, ordinals & ((1 << ROW_BITS) - 1)


def read_piece(piece: Piece) -> Iterator[Record]:
    """The records of one piece, in file order (see `pipeline.data.records`)."""
    if piece.filesystem is None:
        return read_hub(piece.path, piece.hub_split, bare=piece.hub_bare)
    if piece.row_groups is not None:
        return read_parquet_rows(
            piece.filesystem, piece.path, piece.display, row_groups=list(piece.row_groups), first_row=piece.first_row
        )
    return read_file(piece.filesystem, piece.path, piece.display)


def piece_tables(piece: Piece, *, rows: int = 4096) -> Iterator[pa.Table]:
    """The piece's records as `PIECE_SCHEMA` tables of at most `rows` rows (see the module docstring)."""
    base = (piece.file_index << ROW_BITS) + piece.first_row
    batch: list[Record] = []
    number = 0
    pending: pa.Table | None = None  # held back one table: only at the end is the file's last row known
    for record in read_piece(piece):
        batch.append(record)
        if len(batch) == rows:
            if pending is not None:
                yield pending
            pending, batch = _table(batch, base + number, last=False, eval_split=piece.eval_split), []
            number += rows
    if batch:
        if pending is not None:
            yield pending
        pending = _table(batch, base + number, last=piece.last, eval_split=piece.eval_split)
    elif pending is not None and piece.last:
        flags = pending["last_in_file"].to_pylist()
        flags[-1] = True
        pending = pending.set_column(pending.schema.get_field_index("last_in_file"), "last_in_file", pa.array(flags))
    if pending is not None:
        yield pending


def _table(records: list[Record], first_ordinal: int, *, last: bool, eval_split: bool) -> pa.Table:
    sources, raws, errors = zip(*records)
    n = len(records)
    return pa.table(
        {
            "source": sources,
            "raw": raws,
            "read_error": errors,
            "ordinal": pa.array(range(first_ordinal, first_ordinal + n), pa.int64()),
            "last_in_file": pa.array([False] * (n - 1) + [last], pa.bool_()),
            "eval_split": pa.array([eval_split] * n, pa.bool_()),
        },
        schema=PIECE_SCHEMA,
    )
