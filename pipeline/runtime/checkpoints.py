"""Training checkpoints with no pickle: Hugging Face weights plus optimizer state in safetensors.

A checkpoint directory is a loadable Hugging Face model (model.safetensors, config.json, tokenizer
files) with two extra files: optimizer.safetensors (AdamW moments) and trainer_state.json (step, the
metrics history, the optimizer's hyper-parameters).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"


def save_training_state(directory: str | Path, optimizer: torch.optim.Optimizer, *, step: int, history: list[dict]) -> None:
    """Write the optimizer's state beside the model in `directory`: tensors to safetensors, the rest to JSON."""
    directory = Path(directory)
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, slots in state["state"].items():
        for name, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{name}"] = value
    save_file(tensors, str(directory / OPTIMIZER_FILE))
    (directory / STATE_FILE).write_text(json.dumps({
        "step": step,
        "history": history,
        "param_groups": state["param_groups"],
        "scalars": scalars,
    }))


def load_training_state(directory: str | Path, optimizer: torch.optim.Optimizer) -> tuple[int, list[dict]]:
    """Restore the optimizer in place; return (step, metrics history) saved with it."""
    directory = Path(directory)
    meta = json.loads((directory / STATE_FILE).read_text())
    device = next(p.device for group in optimizer.param_groups for p in group["params"])
    slots: dict[int, dict] = {}
    for key, value in load_file(str(directory / OPTIMIZER_FILE)).items():
        index, name = key.split(".", 1)
        # AdamW keeps `step` on the CPU unless it is capturable/fused; moments live with the params.
        slots.setdefault(int(index), {})[name] = value if name == "step" else value.to(device)
    for key, value in meta["scalars"].items():
        index, name = key.split(".", 1)
        slots.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": slots, "param_groups": meta["param_groups"]})
    return meta["step"], meta["history"]
