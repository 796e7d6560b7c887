"""LoRA through PEFT: adapters on a frozen policy, and the export as adapter plus merged weights.

Each adapted linear W (out, in) gains (alpha / r) B A, A (r, in) and B (out, r) (Hu et al. 2021, eq. 3).
B starts at zero, so at step 0 the policy is the reference and the DPO loss is log 2. A starts from
the same seeded draw (PEFT's default distribution, U(-1/sqrt(in), 1/sqrt(in))) under ddp and fsdp,
which is what lets the two strategies be compared number for number.

The reference log-probs still come from the score stage: the adapters never need the base model
switched back on during training. peft is an optional extra (`pip install 'raydpo[peft]'`), imported
where adapters are made.
"""

from __future__ import annotations

import math
from typing import cast

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from pipeline.config import LoraConfig

ADAPTER = "default"  # PEFT's name for the one adapter we train


def base_key(key: str) -> str:
    """A PEFT model's state-dict key -> the same tensor's key in the base model's checkpoint files
    (PEFT's wrapper adds a prefix and, on an adapted linear, `base_layer`)."""
    return key.removeprefix("base_model.model.").replace(".base_layer.", ".")


def add_adapters(model: torch.nn.Module, lora: LoraConfig, *, base_path: str) -> torch.nn.Module:
    """Wrap `model` in PEFT with `lora`'s adapters (fp32, whatever the base's dtype); the base is frozen."""
    try:
        from peft import LoraConfig as PeftLoraConfig  # optional: see the module docstring
        from peft import get_peft_model
    except ImportError as err:
        raise ImportError("train.lora needs peft: pip install 'raydpo[peft]'") from err

    config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,  # pyright: ignore[reportArgumentType]  # peft annotates int; it divides a float as well
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config, autocast_adapter_dtype=True)
    peft_model.peft_config[ADAPTER].base_model_name_or_path = base_path  # what the adapter alone loads onto
    return peft_model


def lora_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """{prefix: module} of every adapted layer, prefix being its name in the state dict."""
    return {
        name: module
        for name, module in model.named_modules()
        if hasattr(module, "lora_A") and ADAPTER in getattr(module, "lora_A", {})
    }


def init_adapters(model: torch.nn.Module, *, seed: int) -> None:
    """A from U(-1/sqrt(in), 1/sqrt(in)) drawn in name order from `seed`, B = 0, on every rank alike;
    sharded or whole, each rank keeps its part."""
    generator = torch.Generator().manual_seed(seed)
    values = {}
    for prefix, module in sorted(lora_modules(model).items()):
        r, fan_in = _adapter_weight(module, "lora_A").shape
        bound = 1.0 / math.sqrt(fan_in)
        values[f"{prefix}.lora_A.{ADAPTER}.weight"] = torch.empty(r, fan_in).uniform_(
            -bound, bound, generator=generator
        )
        values[f"{prefix}.lora_B.{ADAPTER}.weight"] = torch.zeros(_adapter_weight(module, "lora_B").shape)
    set_model_state_dict(model, values, options=StateDictOptions(full_state_dict=True, strict=False))


def _adapter_weight(layer: torch.nn.Module, which: str) -> torch.Tensor:
    """`layer.<which>[ADAPTER].weight` of a PEFT LoRA layer, `which` being lora_A or lora_B: PEFT keeps each
    adapter's Linear in a ModuleDict, which nn.Module's attribute type (Tensor | Module) does not say."""
    return cast(torch.nn.Linear, cast(torch.nn.ModuleDict, getattr(layer, which))[ADAPTER]).weight


def split_export(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """From the PEFT model's full state dict: (merged weights under the base model's names, the
    adapter's own tensors under the names PEFT saves them with)."""
    from peft import get_peft_model_state_dict

    merged = {base_key(key): value for key, value in state.items() if "lora_" not in key}  # read, never written
    for prefix, module in lora_modules(model).items():
        a, b = state[f"{prefix}.lora_A.{ADAPTER}.weight"], state[f"{prefix}.lora_B.{ADAPTER}.weight"]
        delta = (b.double() @ a.double()) * cast("dict[str, float]", module.scaling)[ADAPTER]  # PEFT's plain dict
        if getattr(module, "fan_in_fan_out", False):  # GPT-2's Conv1D keeps its weight as (in, out)
            delta = delta.T
        name = base_key(prefix) + ".weight"
        merged[name] = (merged[name].double() + delta).to(merged[name].dtype)
    return merged, get_peft_model_state_dict(model, state_dict=state, adapter_name=ADAPTER)
