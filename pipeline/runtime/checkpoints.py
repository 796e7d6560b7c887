"""Training checkpoints, the same layout whatever the strategy:

    state/              torch.distributed.checkpoint shards of what trains (all weights, or LoRA's
                        adapters) and of the optimizer state; each rank writes files of its own name
                        (rank 0 also the metadata), so the ranks' directories merged are the whole state
    trainer_state.json  the step, the metrics history and the losses' running states (rank 0)
    hf/                 in the last checkpoint only: the trained policy as a Hugging Face directory

Every rank writes its part into a local directory and reports it to Ray Train, which merges them in
the run's storage; a resumed worker reads its own shards back from the merged directory. No pickle:
DCP's tensor files and JSON.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipeline.training.export import export_pretrained
from pipeline.training.sharding import load_checkpoint, save_checkpoint

STATE_DIR = "state"
STATE_FILE = "trainer_state.json"
HF_DIR = "hf"


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


def write_export(directory: str | Path, model: torch.nn.Module, tokenizer, *, rank: int, merge: bool = True) -> None:
    """The trained policy as `directory/hf` (see pipeline.training.export); every rank must call it."""
    export_pretrained(model, tokenizer, str(Path(directory) / HF_DIR), rank=rank, merge=merge)


def read_checkpoint(
    directory: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[int, list[dict]]:
    """Restore `model` and `optimizer` from a merged checkpoint directory; return (step, history)."""
    directory = Path(directory)
    load_checkpoint(str(directory / STATE_DIR), model, optimizer)
    return read_history(directory)


def read_history(directory: str | Path) -> tuple[int, list[dict]]:
    """(step, metrics history) of a checkpoint directory."""
    meta = json.loads((Path(directory) / STATE_FILE).read_text())
    return meta["step"], meta["history"]


def read_objective_state(directory: str | Path) -> dict[str, dict]:
    """The losses' running states a checkpoint directory holds ({} for losses that keep none)."""
    return json.loads((Path(directory) / STATE_FILE).read_text()).get("objective", {})
