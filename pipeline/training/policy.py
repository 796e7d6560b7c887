"""The policy as the train step gets it: loaded, with LoRA's adapters when asked, sharded under fsdp.

One function for both strategies, so the Ray Train worker, the benchmark and the tests build the same
model. ddp loads the whole model on every worker (the worker then wraps it in DDP); fsdp builds it on
the meta device and gives each rank only its shards (`pipeline.training.sharding`). Under LoRA on a GPU
the frozen base is loaded in bf16 (it never takes an optimizer step, so it needs no fp32 master copy)
and the adapters train in fp32; on CPU everything is fp32.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import torch

from pipeline.config import TrainConfig
from pipeline.model.logps.dispatch import SequenceStats, batch_sequence_stats
from pipeline.model.pretrained import compile_decoder_layers, load_model, local_checkpoint
from pipeline.training.lora import add_adapters, init_adapters
from pipeline.training.sharding import build_on_meta, load_safetensors, materialize, shard


def load_policy(
    model_path: str,
    train: TrainConfig,
    *,
    device: torch.device,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    resuming: bool = False,
) -> torch.nn.Module:
    """The trainable policy of `train` (strategy, LoRA, gradient checkpointing, compile) on `device`.

    resuming: the weights that train come from a checkpoint next, so under fsdp without LoRA the
    base weights are not read from `model_path` first (a frozen LoRA base always is).
    """
    options: dict[str, Any] = dict(
        dtype=base_dtype(train, device), trust_remote_code=trust_remote_code, attn_implementation=attn_implementation
    )
    sharded = train.strategy == "fsdp"
    model = build_on_meta(model_path, **options) if sharded else load_model(model_path, device=device, **options)
    model = prepare_policy(model, train, device=device, base_path=model_path)
    if sharded and (train.lora or not resuming):
        load_safetensors(model, local_checkpoint(model_path))
    if train.lora:
        init_adapters(model, seed=train.seed)  # the same draw under ddp and fsdp
    return model


def base_dtype(train: TrainConfig, device: torch.device) -> torch.dtype:
    """fp32 master weights, except a frozen LoRA base on GPU: bf16."""
    return torch.bfloat16 if train.lora and device.type == "cuda" else torch.float32


def prepare_policy(
    model: torch.nn.Module, train: TrainConfig, *, device: torch.device, base_path: str
) -> torch.nn.Module:
    """Dropout off, LoRA's adapters, gradient checkpointing, compile, and under fsdp the shards (given
    storage, not yet values) of `model`, which is whole on `device` (ddp) or on the meta device (fsdp)."""
    disable_dropout(model)  # before the adapters: LoRA's own dropout is train.lora.dropout
    if train.lora:
        model = add_adapters(model, train.lora, base_path=base_path)
    if train.gradient_checkpointing:
        # transformers' (or PEFT's) method, which nn.Module's typing sees as a Tensor | Module attribute
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # pyright: ignore[reportCallIssue]
    if train.compile:
        compile_decoder_layers(model)
    model.train()
    if train.strategy == "fsdp":
        shard(model, device=device, cpu_offload=train.cpu_offload)
        materialize(model, device=device, cpu_offload=train.cpu_offload)
    return model


def make_optimizer(model: torch.nn.Module, train: TrainConfig, *, device: torch.device) -> torch.optim.AdamW:
    """AdamW over what trains (all weights, or LoRA's adapters); fused on GPU for whole tensors, the
    foreach implementation for FSDP's sharded ones."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    fused = device.type == "cuda" and train.strategy == "ddp"
    return torch.optim.AdamW(trainable, lr=train.learning_rate, weight_decay=train.weight_decay, fused=fused)


def disable_dropout(model: torch.nn.Module) -> None:
    """Set every dropout probability to 0.

    DPO compares log-probs of the policy against fixed reference numbers computed without dropout;
    dropout in the policy would bias that comparison and make resumed runs diverge.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def policy_sequence_stats(
    model,
    prompts,
    responses,
    *,
    train: TrainConfig,
    pad_id: int,
    device: torch.device,
    prefix_lengths: Sequence[int] | None = None,
    sq_probs: bool = False,
) -> SequenceStats:
    """`batch_sequence_stats` under bf16 autocast on GPU, packed and chunked as `train` says: the response
    log-prob sums, counts and real tokens, with each response's prefix sum (`prefix_lengths`) and its
    squared-probability sum (`sq_probs`) when a loss asks for them."""
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    with autocast:
        return batch_sequence_stats(
            model,
            prompts,
            responses,
            pad_id=pad_id,
            device=device,
            packing=train.packing,
            chunk_size=train.logps_chunk_size if train.chunked_logps else None,
            prefix_lengths=prefix_lengths,
            sq_probs=sq_probs,
        )


def policy_sequence_logps(model, prompts, responses, *, train: TrainConfig, pad_id: int, device: torch.device):
    """`policy_sequence_stats` as (response log-prob sums (N,), response token counts (N,), real tokens)."""
    stats = policy_sequence_stats(model, prompts, responses, train=train, pad_id=pad_id, device=device)
    return stats.logps, stats.counts, stats.tokens
