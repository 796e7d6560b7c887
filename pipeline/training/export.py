"""The trained policy as a plain Hugging Face directory, whatever the strategy that trained it.

`export_pretrained` gathers the weights to rank 0 (from FSDP's shards, or a whole model as is) and
writes config, tokenizer and safetensors (split into files of at most MAX_SHARD_SIZE, with their
index, as transformers does for big models), so transformers and vLLM load it like any model. Under
LoRA the directory holds the merged weights, and `adapter/` the adapter alone (PEFT's format, which
names the base model it goes onto); with `merge=False` the directory is the adapter alone, which
transformers loads onto its base when peft is installed.
"""

from __future__ import annotations

import os

import torch

from pipeline.training.lora import ADAPTER, lora_modules, split_export
from pipeline.training.sharding import full_state_dict

MAX_SHARD_SIZE = "5GB"
ADAPTER_DIR = "adapter"


def export_pretrained(model: torch.nn.Module, tokenizer, directory: str, *, rank: int, merge: bool = True) -> None:
    """Write `model` (unwrapped from DDP; sharded or whole, with or without adapters) to `directory` on
    rank 0. Every rank must call it: gathering sharded weights is a collective."""
    state = full_state_dict(model, rank=rank)
    if rank != 0:
        return
    os.makedirs(directory, exist_ok=True)
    if lora_modules(model):
        merged, adapter = split_export(model, state)
        adapter_dir = os.path.join(directory, ADAPTER_DIR) if merge else directory
        save_adapter(model, adapter, adapter_dir)
        if merge:
            model.get_base_model().save_pretrained(directory, state_dict=merged, max_shard_size=MAX_SHARD_SIZE)
    else:
        model.save_pretrained(directory, state_dict=state, max_shard_size=MAX_SHARD_SIZE)
    tokenizer.save_pretrained(directory)


def save_adapter(model: torch.nn.Module, adapter: dict[str, torch.Tensor], directory: str) -> None:
    """adapter_config.json and adapter_model.safetensors, as `PeftModel.save_pretrained` writes them."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    model.peft_config[ADAPTER].save_pretrained(directory)
    save_file(
        {k: v.contiguous() for k, v in adapter.items()},
        os.path.join(directory, "adapter_model.safetensors"),
        metadata={"format": "pt"},
    )
