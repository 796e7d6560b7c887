"""FSDP2 for the train stage: a policy sharded over the workers, loaded without any rank holding it whole.

`build_on_meta` builds the model with its parameters on the meta device (no memory), `shard` applies
`fully_shard` to each decoder layer and then to the root, `materialize` gives the shards real storage,
and `load_safetensors` lets every rank read only its own slices of the checkpoint's safetensors files
(torch.distributed.checkpoint's Hugging Face reader). On a GPU the mixed-precision policy all-gathers
bf16 parameters, computes in bf16 and reduces gradients in fp32 into the fp32 shards the optimizer
updates (the master weights); on CPU everything stays fp32, which is how the tests compare FSDP with DDP
within 1e-5.

Checkpoints are sharded too (`save_checkpoint` / `load_checkpoint`: each rank writes and reads its
own shards, with torch.distributed.checkpoint); the final Hugging Face export (`pipeline.training.export`)
is written by every rank from `model_state`, the shards as they are.

Everything here is torch only (no Ray): the Ray Train worker calls it inside its process group, and
the tests call it in processes of their own over gloo.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import cast

import torch
from torch.distributed.checkpoint.filesystem import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save
from torch.distributed.checkpoint.storage import StorageReader
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from pipeline.model.pretrained import decoder_layers
from pipeline.training.lora import base_key


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(model, FSDPModule)


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Create modules with their parameters on the meta device (no storage) and their buffers as usual.

    Buffers such as rotary frequencies are computed in the constructors and are not in checkpoints,
    so they must stay real; parameters are filled later, shard by shard.
    """
    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    # patched for the block's duration; pyright holds the replacement to the method's exact signature
    torch.nn.Module.register_parameter = on_meta  # pyright: ignore[reportAttributeAccessIssue]
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def build_on_meta(
    path: str, *, dtype: torch.dtype, trust_remote_code: bool = False, attn_implementation: str | None = None
) -> torch.nn.Module:
    """The causal LM of `path`'s config.json with its parameters on the meta device (see parameters_on_meta),
    and `path`'s generation config where it has one, as from_pretrained would give (the export saves it,
    and samplers read their stop tokens from it)."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig  # slow: imported where a model is built

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code, **extra)
    try:
        model.generation_config = GenerationConfig.from_pretrained(path)
    except OSError:  # none saved: from_config's, derived from config.json, is what from_pretrained gives too
        pass
    return model


def mixed_precision(device: torch.device) -> MixedPrecisionPolicy:
    """bf16 parameters and compute with fp32 gradient reduction on GPU; fp32 throughout on CPU."""
    if device.type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard(model: torch.nn.Module, *, device: torch.device, cpu_offload: bool = False) -> torch.nn.Module:
    """`fully_shard` each decoder layer, then the root (embeddings, final norm, output layer)."""
    options: dict = {"mp_policy": mixed_precision(device)}
    if cpu_offload:  # pinned host memory needs a GPU
        options["offload_policy"] = CPUOffloadPolicy(pin_memory=device.type == "cuda")
    for layer in decoder_layers(model):
        fully_shard(layer, **options)
    fully_shard(model, **options)
    return model


def materialize(model: torch.nn.Module, *, device: torch.device, cpu_offload: bool = False) -> None:
    """Give meta parameters real (uninitialised) storage: sharded ones on `device` (the host with CPU
    offload), keeping every buffer's value."""
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    model.to_empty(device="cpu" if cpu_offload else device)
    for name, value in buffers.items():
        model.get_buffer(name).copy_(value)


def hf_names(keys) -> dict[str, str]:
    """Each state-dict key but the adapters' -> the key of the same tensor in the base model's checkpoint files."""
    return {key: base_key(key) for key in keys if "lora_" not in key}


def _storage(tensor: torch.Tensor) -> int:
    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return local.untyped_storage().data_ptr()


def load_safetensors(model: torch.nn.Module, path: str) -> None:
    """Fill `model`'s (sharded) weights from the Hugging Face safetensors files in directory `path`;
    each rank reads only its own slices. Adapter weights (absent from the files) are left alone."""
    from safetensors import safe_open

    files = glob.glob(os.path.join(path, "*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors files; train.strategy: fsdp loads safetensors checkpoints")
    in_files = set()
    for name in files:
        with safe_open(name, framework="pt") as f:
            in_files.update(f.keys())
    state = cast("dict[str, torch.Tensor]", get_model_state_dict(model))  # a model's state holds tensors only
    names = hf_names(state)
    wanted = {file_key: state[key] for key, file_key in names.items() if file_key in in_files}
    loaded = {_storage(tensor) for tensor in wanted.values()}
    missing = [
        key for key, file_key in names.items() if file_key not in in_files and _storage(state[key]) not in loaded
    ]  # a tied weight is there once
    if missing:
        raise KeyError(f"{path}: the checkpoint lacks {', '.join(missing[:3])}")
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader  # looked up here, as before

    dcp_load(wanted, storage_reader=HuggingFaceStorageReader(path))  # in place, into the shards


def _state_options(model: torch.nn.Module) -> StateDictOptions:
    # A frozen base (LoRA) never changes: checkpoints keep only what trains, and resuming reloads the base.
    frozen = any(not p.requires_grad for p in model.parameters())
    return StateDictOptions(ignore_frozen_params=frozen)


def save_checkpoint(directory: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Write this rank's shards of the trained weights and the optimizer state into `directory`.

    Every rank writes files of its own name (rank 0 also the metadata), so the ranks' directories
    merged into one are the whole checkpoint: what Ray Train does with the directories each reports.
    """
    model_state, optim_state = get_state_dict(model, optimizer, options=_state_options(model))
    dcp_save({"model": model_state, "optim": optim_state}, storage_writer=FileSystemWriter(directory))


def load_checkpoint(
    directory: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, reader: StorageReader | None = None
) -> None:
    """Read the trained weights and the optimizer state of `save_checkpoint` back, each rank its shards.

    `reader` reads `directory` where a plain local one cannot (pipeline.runtime.checkpoints: object storage,
    read in place, each rank only the byte ranges of its own shards)."""
    options = _state_options(model)
    model_state, optim_state = get_state_dict(model, optimizer, options=options)
    state = {"model": model_state, "optim": optim_state}
    dcp_load(state, storage_reader=reader or FileSystemReader(directory))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=options)


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict as each rank holds it: FSDP's shards (DTensors, nothing gathered), or a plain
    model's own tensors."""
    # a model's state holds tensors only (get_model_state_dict's type covers optimizer state too)
    return cast("dict[str, torch.Tensor]", get_model_state_dict(model)) if is_sharded(model) else model.state_dict()
