"""Reading preference data from any common source: the whole input as one table of raw records, or its
pieces (`pipeline.data.pieces`) for readers on many workers.

Nothing is interpreted here: which keys a row has and whether they make a preference example is decided by
`pipeline.data.encode.process_records`. What is decided here is whether the input can be read at all; when
it cannot (missing, unknown format, empty, not the format its name says, a column with no JSON form) it
raises `InputError` naming the file: planning the pieces, before any Ray work starts, for everything a
listing, a footer or a schema shows; while reading, for what only the rows show (a gzip stream cut short, a
JSON array that does not parse).

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
from dataclasses import replace
from itertools import chain

import pyarrow as pa
import pyarrow.fs as pafs

from pipeline.config import ConfigError, DataConfig
from pipeline.data.hf_datasets import DEFAULT_SPLIT
from pipeline.data.pieces import Piece, hub_dataset, plan_pieces, read_piece
from pipeline.data.records import RECORD_SCHEMA, InputError, Record, record_table

__all__ = [
    "RECORD_SCHEMA",
    "InputError",
    "first_records",
    "hub_dataset",
    "input_fingerprint",
    "plan_inputs",
    "read_records",
]


def read_records(path: str, *, filesystem: pafs.FileSystem | None = None, split: str | None = None) -> pa.Table:
    """Read every row of `path` into a table with `RECORD_SCHEMA` (source, raw, read_error), in one process.

    Rows keep their order: files sorted by name, rows in file order. Every input row yields exactly one
    output row; a row that cannot be parsed is kept with `read_error` set. A blank line in a JSON Lines
    file is a row too, and a malformed one ("malformed_json"): blank lines are counted, never dropped.
    NaN/Infinity literals are not JSON and make a line "malformed_json".

    `split` picks one split of a hub dataset or a save_to_disk DatasetDict folder (None: "train"); an input
    that does not hold it refuses it. Raises `InputError` for an input that cannot be read at all.
    """
    pieces = plan_pieces(path, split=split, filesystem=filesystem)
    return record_table(path, chain.from_iterable(read_piece(piece) for piece in pieces))


def first_records(path: str, *, split: str | None = None, limit: int) -> list[Record] | None:
    """The first `limit` records of a local or URI input, read as `read_records` reads them; None for a hub
    dataset (only the network could tell). Raises `InputError` for an input that cannot be read at all."""
    if hub_dataset(path) is not None or path.startswith("hf://"):
        return None
    pieces = plan_pieces(path, split=split)
    records = list(itertools.islice(chain.from_iterable(read_piece(piece) for piece in pieces), limit))
    if not records:
        raise InputError(f"{path}: no rows (the input is empty)")
    return records


def plan_inputs(data: DataConfig) -> tuple[list[Piece], list[Piece]]:
    """The pieces `data` names: (those of the split trained on, those of `data.eval_split`, [] without one).

    The eval split's files are numbered after the training split's, so its rows' ordinals follow theirs.
    """
    pieces = plan_pieces(data.path, split=data.split)
    if data.eval_split is None:
        return pieces, []
    if data.eval_split == (data.split or DEFAULT_SPLIT):
        raise ConfigError(f"data.eval_split: {data.eval_split!r} is the split trained on; name another one")
    first = max((p.file_index for p in pieces), default=-1) + 1
    held_out = plan_pieces(data.path, split=data.eval_split, first_index=first)
    return pieces, [replace(p, eval_split=True) for p in held_out]


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
