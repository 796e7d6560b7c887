"""Reading data that Hugging Face `datasets` made: `save_to_disk` folders and hub datasets.

  * A `save_to_disk` folder of one dataset: `state.json` / `dataset_info.json` beside `data-*.arrow` files in
    Arrow IPC stream format, read with pyarrow (the `datasets` package is not needed).
  * A `save_to_disk` folder of a DatasetDict: `dataset_dict.json` beside one such folder per split.
  * A hub dataset, loaded with `datasets.load_dataset(name, split=split)`; `datasets` is imported only then.

A split that is not there is an `InputError` naming it and the splits that are.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import cast

import pyarrow as pa
import pyarrow.fs as pafs

from pipeline.data.readers import chain, list_directory, read_arrow
from pipeline.data.records import ARROW_BATCH_ROWS, InputError, Record, check_schema, join_display, rows_from_batches

DEFAULT_SPLIT = "train"


def is_saved_dataset(entries: list[pafs.FileInfo]) -> bool:
    """Whether a directory's listing is a `save_to_disk` folder (one dataset, or a DatasetDict of splits)."""
    names = {e.base_name for e in entries}
    if "dataset_dict.json" in names:
        return True
    has_shards = any(_is_shard(e) for e in entries)
    return has_shards and ("state.json" in names or "dataset_info.json" in names)


def _is_shard(entry: pafs.FileInfo) -> bool:
    return entry.base_name.startswith("data-") and entry.base_name.endswith(".arrow")


def read_saved(
    filesystem: pafs.FileSystem, inner: str, display: str, entries: list[pafs.FileInfo], *, split: str | None
) -> Iterator[Record]:
    """The records of a `save_to_disk` folder, shard by shard in the dataset's order.

    For a DatasetDict, those of `split` (None: "train"); one saved dataset is read whole, and a `split` other
    than the one its state.json names is refused.
    """
    shards = saved_shards(filesystem, inner, display, entries, split=split)
    return chain(read_arrow(filesystem, path, where) for path, where in shards)


def saved_shards(
    filesystem: pafs.FileSystem, inner: str, display: str, entries: list[pafs.FileInfo], *, split: str | None
) -> list[tuple[str, str]]:
    """(path, display) of the Arrow shards of a `save_to_disk` folder (of `split`, for a DatasetDict), in the
    dataset's order; `InputError` for a split it does not hold."""
    names = {e.base_name for e in entries}
    if "dataset_dict.json" in names:
        return _saved_split(filesystem, inner, display, entries, split or DEFAULT_SPLIT)
    order = [e.base_name for e in entries if _is_shard(e)]
    saved_split, listed = _read_state(filesystem, inner, display) if "state.json" in names else (None, [])
    if split is not None and saved_split != split:
        raise InputError(f"{display}: one saved dataset (split {saved_split!r}), so no split {split!r} to choose")
    if listed:  # state.json lists the shards in the dataset's order: trust it over name order
        missing = [n for n in listed if n not in order]
        if missing:
            raise InputError(f"{display}: state.json lists shards that are not there: {missing}")
        order = listed
    return [(inner.rstrip("/") + "/" + name, join_display(display, name)) for name in order]


def _saved_split(
    filesystem: pafs.FileSystem, inner: str, display: str, entries: list[pafs.FileInfo], split: str
) -> list[tuple[str, str]]:
    splits = sorted(e.base_name for e in entries if e.type == pafs.FileType.Directory)
    if split not in splits:
        raise InputError(f"{display}: a DatasetDict with no split {split!r}; its splits are {splits}")
    split_inner, split_display = inner.rstrip("/") + "/" + split, join_display(display, split)
    split_entries = list_directory(filesystem, split_inner, split_display)
    if not is_saved_dataset(split_entries) or any(e.base_name == "dataset_dict.json" for e in split_entries):
        raise InputError(f"{split_display}: not a saved dataset (data-*.arrow beside state.json)")
    return saved_shards(filesystem, split_inner, split_display, split_entries, split=None)


def _read_state(filesystem: pafs.FileSystem, inner: str, display: str) -> tuple[str | None, list[str]]:
    """(the split state.json names, the shards it lists in the dataset's order)."""
    try:
        with filesystem.open_input_stream(inner.rstrip("/") + "/state.json", compression=None) as f:
            state = json.loads(f.read().decode("utf-8"))
        return state.get("_split"), [d["filename"] for d in state.get("_data_files", [])]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InputError(f"{join_display(display, 'state.json')}: unreadable: {exc}") from exc


def read_hub(name: str, split: str | None, *, bare: bool = False) -> Iterator[Record]:
    """The records of one split (None: "train") of a hub dataset, sourced "hf://datasets/<name>:<split>#<row>"."""
    split = split or DEFAULT_SPLIT
    source = f"hf://datasets/{name}:{split}"
    display = source + (f" (no local path {name!r}, so read as a hub dataset)" if bare else "")
    try:
        import datasets  # optional (the `hub` extra), and slow to import: only hub inputs need it
    except ImportError as exc:
        hint = "reading hub datasets needs the `datasets` package: pip install 'raydpo[hub]' (or datasets)"
        raise InputError(f"{display}: {hint}") from exc
    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as exc:  # the hub client raises many types; all mean "cannot read this input"
        raise InputError(f"{display}: {_why_not_loaded(datasets, name, split, exc)}") from exc
    arrow = dataset.with_format("arrow")
    check_schema(arrow.data.schema, display)
    tables = cast("Iterator[pa.Table]", arrow.iter(batch_size=ARROW_BATCH_ROWS))  # arrow format: one Table a batch
    return rows_from_batches((batch for table in tables for batch in table.to_batches()), source)


def _why_not_loaded(datasets, name: str, split: str, exc: Exception) -> str:
    """A split the dataset does not have is named with the ones it has; anything else is the hub's own message."""
    try:
        splits = list(datasets.get_dataset_split_names(name))
    except Exception:  # no better answer than the first failure
        return f"could not load from the hub: {exc}"
    if split.split("[")[0] not in splits:  # "train[:10%]" slices the train split
        return f"no split {split!r}; its splits are {splits}"
    return f"could not load from the hub: {exc}"
