"""Reading data that Hugging Face `datasets` made: `save_to_disk` folders and hub datasets.

  * A `save_to_disk` folder: `state.json` / `dataset_info.json` beside `data-*.arrow` files in Arrow IPC
    stream format, read with pyarrow (the `datasets` package is not needed).
  * A hub dataset, loaded with `datasets.load_dataset(name, split=split)`; `datasets` is imported only then.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pyarrow.fs as pafs

from pipeline.data.files import chain, read_arrow
from pipeline.data.records import ARROW_BATCH_ROWS, InputError, Record, check_schema, join_display, rows_from_batches


def is_saved_dataset(entries: list[pafs.FileInfo]) -> bool:
    """Whether a directory's listing is a `save_to_disk` folder (one dataset, or a DatasetDict of splits)."""
    names = {e.base_name for e in entries}
    if "dataset_dict.json" in names:
        return True
    has_shards = any(_is_shard(e) for e in entries)
    return has_shards and ("state.json" in names or "dataset_info.json" in names)


def _is_shard(entry: pafs.FileInfo) -> bool:
    return entry.base_name.startswith("data-") and entry.base_name.endswith(".arrow")


def read_saved(filesystem: pafs.FileSystem, inner: str, display: str, entries: list[pafs.FileInfo]) -> Iterator[Record]:
    """The records of a `save_to_disk` folder of one dataset, shard by shard in the dataset's order."""
    names = {e.base_name for e in entries}
    if "dataset_dict.json" in names:
        splits = sorted(e.base_name for e in entries if e.type == pafs.FileType.Directory)
        raise InputError(f"{display}: a DatasetDict directory with splits {splits}; point at one split's directory")
    order = [e.base_name for e in entries if _is_shard(e)]
    if "state.json" in names:
        order = _shards_in_state(filesystem, inner, display, order)
    return chain(read_arrow(filesystem, inner.rstrip("/") + "/" + name, join_display(display, name)) for name in order)


def _shards_in_state(filesystem: pafs.FileSystem, inner: str, display: str, present: list[str]) -> list[str]:
    """state.json lists the shards in the dataset's order; trust it over name order when it lists any."""
    try:
        with filesystem.open_input_stream(inner.rstrip("/") + "/state.json", compression=None) as f:
            state = json.loads(f.read().decode("utf-8"))
        listed = [d["filename"] for d in state.get("_data_files", [])]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InputError(f"{join_display(display, 'state.json')}: unreadable: {exc}") from exc
    if not listed:
        return present
    missing = [n for n in listed if n not in present]
    if missing:
        raise InputError(f"{display}: state.json lists shards that are not there: {missing}")
    return listed


def read_hub(name: str, split: str, *, bare: bool = False) -> Iterator[Record]:
    """The records of one split of a hub dataset, sourced "hf://datasets/<name>:<split>#<row>"."""
    source = f"hf://datasets/{name}:{split}"
    display = source + (f" (no local path {name!r}, so read as a hub dataset)" if bare else "")
    try:
        import datasets  # optional (the `hub` extra), and slow to import: only hub inputs need it
    except ImportError as exc:
        hint = "reading hub datasets needs the `datasets` package: pip install datasets"
        raise InputError(f"{display}: {hint}") from exc
    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as exc:  # the hub client raises many types; all mean "cannot read this input"
        raise InputError(f"{display}: could not load from the hub: {exc}") from exc
    arrow = dataset.with_format("arrow")
    check_schema(arrow.data.schema, display)
    tables = arrow.iter(batch_size=ARROW_BATCH_ROWS)
    return rows_from_batches((batch for table in tables for batch in table.to_batches()), source)
