"""The names of a training checkpoint's parts and the readers of its trainer_state.json (no torch).

The layout itself, and the tensors' writers and readers, are `pipeline.runtime.checkpoints`; the driver
needs only these names and the JSON, so it never imports torch for them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.fs as pafs

STATE_DIR = "state"
STATE_FILE = "trainer_state.json"
HF_DIR = "hf"


def read_trainer_state(directory: str | Path, *, filesystem: pafs.FileSystem | None = None) -> dict:
    """The checkpoint's trainer_state.json, read locally or, with `filesystem`, where it lies."""
    if filesystem is None:
        return json.loads((Path(directory) / STATE_FILE).read_text())
    with filesystem.open_input_stream(f"{str(directory).rstrip('/')}/{STATE_FILE}") as f:
        return json.loads(f.read())


def read_history(directory: str | Path, *, filesystem: pafs.FileSystem | None = None) -> tuple[int, list[dict]]:
    """(step, metrics history) of a checkpoint directory."""
    meta = read_trainer_state(directory, filesystem=filesystem)
    return meta["step"], meta["history"]


def read_objective_state(directory: str | Path, *, filesystem: pafs.FileSystem | None = None) -> dict[str, dict]:
    """The losses' running states a checkpoint directory holds ({} for losses that keep none)."""
    return read_trainer_state(directory, filesystem=filesystem).get("objective", {})
