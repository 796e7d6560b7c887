"""Folders laid out as the `datasets` package's `save_to_disk` writes them, made with pyarrow alone."""

from __future__ import annotations

import json
from pathlib import Path


def write_save_to_disk(directory: Path, shards: list) -> None:
    """Mimic `Dataset.save_to_disk` (split "train"): Arrow IPC stream shards, state.json listing them."""
    import pyarrow.ipc as ipc

    directory.mkdir()
    names = [f"data-{i:05d}-of-{len(shards):05d}.arrow" for i in range(len(shards))]
    for name, table in zip(names, shards):
        with ipc.new_stream(str(directory / name), table.schema) as writer:
            writer.write_table(table)
    state = {"_data_files": [{"filename": n} for n in names], "_fingerprint": "0", "_split": "train"}
    (directory / "state.json").write_text(json.dumps(state))
    (directory / "dataset_info.json").write_text(json.dumps({"features": {}}))


def write_dataset_dict(directory: Path, splits: dict[str, list[dict]]) -> Path:
    """Mimic `DatasetDict.save_to_disk`: dataset_dict.json beside one saved dataset per split."""
    import pyarrow as pa

    directory.mkdir()
    (directory / "dataset_dict.json").write_text(json.dumps({"splits": list(splits)}))
    for name, rows in splits.items():
        write_save_to_disk(directory / name, [pa.Table.from_pylist(rows)])
        state = json.loads((directory / name / "state.json").read_text())
        (directory / name / "state.json").write_text(json.dumps({**state, "_split": name}))
    return directory
