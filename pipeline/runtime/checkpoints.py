"""Training checkpoints, the same layout whatever the strategy:

    state/              torch.distributed.checkpoint shards of what trains (all weights, or LoRA's
                        adapters) and of the optimizer state; each rank writes files of its own name
                        (rank 0 also the metadata), so the ranks' directories merged are the whole state
    trainer_state.json  the step, the metrics history and the losses' running states (rank 0)
    hf/                 in the last checkpoint only: the trained policy as a Hugging Face directory, each
                        rank writing its share of the safetensors files

Every rank writes its part into a local directory and reports it to Ray Train, which merges them in
the run's storage; a resumed worker reads its own shards back from the merged directory where it lies
(`read_checkpoint` on the storage's pyarrow filesystem: a local disk, s3://, gs://), fetching only the byte
ranges of its own shards and the metadata, never a copy of the whole checkpoint. No pickle of ours: DCP's
tensor files and JSON. The names of the parts and the JSON's readers are `pipeline.runtime.checkpoint_layout`
(no torch: the driver reads them).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow.fs as pafs
import torch
from torch.distributed.checkpoint.filesystem import FileSystemBase, FileSystemReader

from pipeline.runtime.checkpoint_layout import HF_DIR, STATE_DIR, STATE_FILE, read_history
from pipeline.training.export import export_pretrained
from pipeline.training.sharding import load_checkpoint, save_checkpoint


def write_checkpoint(
    directory: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    rank: int,
    step: int,
    history: list[dict],
    objective_state: dict[str, dict] | None = None,
) -> None:
    """This rank's part of a checkpoint of `model` (unwrapped from DDP) and `optimizer` after `step`, with
    the losses' running states (`objective_state`, the same on every rank). Every rank must call it:
    saving sharded state is a collective."""
    directory = Path(directory)
    save_checkpoint(str(directory / STATE_DIR), model, optimizer)
    if rank == 0:
        state = {"step": step, "history": history, "objective": objective_state or {}}
        (directory / STATE_FILE).write_text(json.dumps(state))


def write_export(
    directory: str | Path, model: torch.nn.Module, tokenizer, *, rank: int, world: int = 1, merge: bool = True
) -> None:
    """This rank's share of the trained policy as `directory/hf` (see pipeline.training.export); every rank must
    call it, and the ranks' directories merged are the whole export."""
    export_pretrained(model, tokenizer, str(Path(directory) / HF_DIR), rank=rank, world=world, merge=merge)


def read_checkpoint(
    directory: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    filesystem: pafs.FileSystem | None = None,
) -> tuple[int, list[dict]]:
    """Restore `model` and `optimizer` from a merged checkpoint directory; return (step, history).

    With `filesystem` (Ray Train's checkpoint.filesystem), `directory` is read in place on it: each rank
    reads the metadata and the byte ranges of its own shards, nothing else."""
    if filesystem is None:
        load_checkpoint(str(Path(directory) / STATE_DIR), model, optimizer)
    else:
        state = f"{str(directory).rstrip('/')}/{STATE_DIR}"
        load_checkpoint(state, model, optimizer, reader=ArrowCheckpointReader(filesystem, state))
    return read_history(directory, filesystem=filesystem)


class ArrowFileSystem(FileSystemBase):
    """torch.distributed.checkpoint's file system interface over a pyarrow filesystem, for reading: files open
    for random access, so a reader fetches the ranges it reads (ranged GETs on an object store)."""

    def __init__(self, filesystem: pafs.FileSystem):
        self.filesystem = filesystem

    @contextmanager
    def create_stream(self, path, mode: str) -> Iterator:
        if mode != "rb":
            raise ValueError(f"ArrowFileSystem reads checkpoints only (asked for mode {mode!r})")
        with self.filesystem.open_input_file(str(path)) as stream:
            yield stream

    def concat_path(self, path, suffix: str) -> str:
        return f"{str(path).rstrip('/')}/{suffix}"

    def init_path(self, path) -> str:
        return str(path)

    def exists(self, path) -> bool:
        return self.filesystem.get_file_info(str(path)).type != pafs.FileType.NotFound

    def rename(self, path, new_path) -> None:
        raise NotImplementedError("ArrowFileSystem reads checkpoints only")

    def mkdir(self, path) -> None:
        raise NotImplementedError("ArrowFileSystem reads checkpoints only")

    def rm_file(self, path) -> None:
        raise NotImplementedError("ArrowFileSystem reads checkpoints only")

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id) -> bool:
        return False


class ArrowCheckpointReader(FileSystemReader):
    """DCP's file reader on a pyarrow filesystem: the checkpoint read where it lies, each rank its own ranges."""

    def __init__(self, filesystem: pafs.FileSystem, path: str):
        super().__init__(path)
        self.fs = ArrowFileSystem(filesystem)
        self.path = self.fs.init_path(path)
