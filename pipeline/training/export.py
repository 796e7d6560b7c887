"""The trained policy as a plain Hugging Face directory, written by every rank, never gathered on one.

`export_pretrained` writes what `save_pretrained` writes (config, generation config, tokenizer, safetensors
split into files of at most MAX_SHARD_SIZE with their index, tied weights once) so transformers and vLLM
load it like any model, but shares the writing out: file i is written by rank i mod world. The tensors go
through in one order on every rank; a sharded (FSDP) tensor is gathered whole for that moment only, kept by
the rank whose file holds it and dropped by the others, so a rank holds at most one file's tensors (plus
the one in hand), never the model. Under LoRA the directory holds the merged weights (each merged as it
passes) and `adapter/` the adapter alone (PEFT's format, which names the base model it goes onto); with
`merge=False` the directory is the adapter alone, which transformers loads onto its base when peft is
installed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from pipeline.training.lora import ADAPTER, base_key, lora_modules
from pipeline.training.sharding import model_state

MAX_SHARD_SIZE = "5GB"
ADAPTER_DIR = "adapter"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"


@dataclass
class ExportStats:
    """What one rank did: the files it wrote and the most tensor bytes it held at once (the check that no
    rank ever holds the whole model)."""

    files: list[str] = field(default_factory=list)
    peak_bytes: int = 0


def export_pretrained(
    model: Any,
    tokenizer,
    directory: str,
    *,
    rank: int,
    world: int = 1,
    merge: bool = True,
    max_shard_size: int | str = MAX_SHARD_SIZE,
) -> ExportStats:
    """Write `model` (unwrapped from DDP; sharded or whole, with or without adapters) to `directory`, this
    rank's share of it. Every rank must call it, in the same order: gathering a sharded tensor is a collective.
    The directory is whole once every rank's share is in it (Ray Train merges the ranks' directories)."""
    os.makedirs(directory, exist_ok=True)
    adapted = bool(lora_modules(model))
    if adapted:
        adapter_dir = os.path.join(directory, ADAPTER_DIR) if merge else directory
        save_adapter(model, adapter_dir, rank=rank)
        if not merge:
            return ExportStats(files=[ADAPTER_DIR] if rank == 0 else [])
    base = model.get_base_model() if adapted else model
    state = model_state(model)
    layout, total_size = plan_files(base, state, max_shard_size=max_shard_size)
    stats = write_files(model, state, layout, directory, rank=rank, world=world)
    if rank == 0:
        write_config(base, directory)
        tokenizer.save_pretrained(directory)
        if len(layout) > 1:  # as save_pretrained indexes a model split into several files
            weight_map = {name: file for file, names in layout.items() for name in names}
            metadata = {"total_parameters": base.num_parameters(), "total_size": total_size}
            with open(os.path.join(directory, INDEX), "w", encoding="utf-8") as f:
                f.write(json.dumps({"metadata": metadata, "weight_map": weight_map}, indent=2, sort_keys=True) + "\n")
    return stats


def plan_files(base: Any, state: dict, *, max_shard_size: int | str) -> tuple[dict[str, list[str]], int]:
    """({file name: export keys}, total bytes) as `save_pretrained` splits them: tied weights once, files of at
    most `max_shard_size`, from shapes alone (nothing is gathered)."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    meta = {}
    for key, value in state.items():
        if "lora_" in key:
            continue
        meta[base_key(key)] = torch.empty(value.shape, dtype=value.dtype, device="meta")
    meta = remove_tied_weights_from_state_dict(meta, base)  # meta tensors: ties found by the modules' parameters
    split = split_torch_state_dict_into_shards(
        meta, filename_pattern=WEIGHTS.replace(".safetensors", "{suffix}.safetensors"), max_shard_size=max_shard_size
    )
    return {file: list(names) for file, names in split.filename_to_tensors.items()}, split.metadata["total_size"]


def write_files(
    model: Any, state: dict, layout: dict[str, list[str]], directory: str, *, rank: int, world: int
) -> ExportStats:
    """Every file of `layout` passes through every rank in order; rank i mod world keeps and writes file i."""
    from safetensors.torch import save_file
    from transformers.core_model_loading import revert_weight_conversion

    base = model.get_base_model() if lora_modules(model) else model
    sources = _sources(model, state)
    stats = ExportStats()
    for number, (file, names) in enumerate(layout.items()):
        mine = number % world == rank
        tensors = {}
        for name in names:
            tensor = _export_tensor(model, state, sources[name])  # a collective for a sharded tensor
            if mine:
                tensors[name] = tensor.contiguous()
                stats.peak_bytes = max(stats.peak_bytes, sum(t.numel() * t.element_size() for t in tensors.values()))
            del tensor
        if mine:
            save_file(revert_weight_conversion(base, tensors), os.path.join(directory, file), metadata={"format": "pt"})
            stats.files.append(file)
    return stats


@dataclass(frozen=True)
class _Source:
    """Where an export key comes from: a state-dict key, and for a merged LoRA linear its adapter."""

    key: str
    lora: tuple[str, str, float, bool] | None = None  # (lora_A key, lora_B key, scaling, fan_in_fan_out)


def _sources(model: Any, state: dict) -> dict[str, _Source]:
    sources = {base_key(key): _Source(key) for key in state if "lora_" not in key}
    for prefix, module in lora_modules(model).items():
        name = base_key(prefix) + ".weight"
        scaling: dict = getattr(module, "scaling")  # PEFT's alpha / r per adapter  # noqa: B009
        lora = (
            f"{prefix}.lora_A.{ADAPTER}.weight",
            f"{prefix}.lora_B.{ADAPTER}.weight",
            float(scaling[ADAPTER]),
            bool(getattr(module, "fan_in_fan_out", False)),  # GPT-2's Conv1D keeps its weight as (in, out)
        )
        sources[name] = _Source(sources[name].key, lora)
    return sources


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on the host: gathered from every rank if sharded (a collective), else as it is."""
    if isinstance(tensor, DTensor):
        if tensor.device.type == "cpu" and torch.distributed.get_backend() == "nccl":
            # CPU offload under NCCL: the shard goes to the GPU for the gather, which NCCL needs
            tensor = DTensor.from_local(
                tensor.to_local().cuda(),
                tensor.device_mesh,
                tensor.placements,
                shape=tensor.shape,
                stride=tensor.stride(),
            )
        return tensor.full_tensor().detach().cpu()
    return tensor.detach().cpu()


def _export_tensor(model: Any, state: dict, source: _Source) -> torch.Tensor:
    """One export tensor, whole: the state's tensor, merged with its adapter for an adapted linear."""
    value = _full(state[source.key])
    if source.lora is None:
        return value
    a_key, b_key, scaling, transposed = source.lora
    delta = (_full(state[b_key]).double() @ _full(state[a_key]).double()) * scaling
    return (value.double() + (delta.T if transposed else delta)).to(value.dtype)


def write_config(model: Any, directory: str) -> None:
    """config.json (and generation_config.json) as `save_pretrained` writes them."""
    model.config.dtype = str(next(model.parameters()).dtype).split(".")[1]
    model.config.architectures = [type(model).__name__.removeprefix("FSDP")]
    model.config.save_pretrained(directory)
    if model.can_generate():
        model.generation_config.save_pretrained(directory)


def save_adapter(model: Any, directory: str, *, rank: int) -> None:
    """adapter_config.json and adapter_model.safetensors, as `PeftModel.save_pretrained` writes them, by rank
    0; the adapters are small (rank r), so they are gathered whole. Every rank must call it."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    state = model_state(model)
    adapters = {key: _full(value) for key, value in state.items() if "lora_" in key}
    if rank != 0:
        return
    os.makedirs(directory, exist_ok=True)
    model.peft_config[ADAPTER].save_pretrained(directory)
    tensors = get_peft_model_state_dict(model, state_dict=adapters, adapter_name=ADAPTER)
    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        os.path.join(directory, "adapter_model.safetensors"),
        metadata={"format": "pt"},
    )
