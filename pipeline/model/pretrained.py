"""Model and tokenizer loading and saving, regional compilation, and the device a worker runs on.

Loading takes a Hugging Face hub id or a local directory (the tests and the demo build theirs offline
with pipeline.demo.tiny_model). transformers and torch are imported where a model or tokenizer is loaded:
the CLI imports this module at start-up, where transformers costs seconds and torch ~180 MB of the
driver's memory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def save_pretrained(model, tokenizer, directory: str | Path) -> None:
    """Write a Hugging Face checkpoint: safetensors weights, config, tokenizer files."""
    model.save_pretrained(str(directory), safe_serialization=True)
    tokenizer.save_pretrained(str(directory))


def read_model_config(path: str) -> dict:
    """A model's config.json as a dict, from a directory or the hub (the file alone: no weights)."""
    local = Path(path) / "config.json"
    if local.is_file():
        return json.loads(local.read_text())
    if Path(path).is_dir() or Path(path).is_absolute() or "://" in path:
        raise FileNotFoundError(f"{path}: no config.json there")
    from huggingface_hub import hf_hub_download  # only for hub ids; a directory needs no hub client

    return json.loads(Path(hf_hub_download(path, "config.json")).read_text())


def local_checkpoint(path: str) -> str:
    """A directory holding `path`'s files: `path` itself, or the hub's local copy of its config and
    safetensors (downloaded once per node into the hub cache)."""
    if Path(path).is_dir():
        return path
    from huggingface_hub import snapshot_download  # only for hub ids

    return snapshot_download(path, allow_patterns=["*.json", "*.safetensors"])


def load_tokenizer(path: str, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer  # slow: see the module docstring

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer at {path!r} has no EOS token; responses must end with one")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "n_ctx", "seq_length", "max_sequence_length")


def context_length(path: str, *, trust_remote_code: bool = False) -> tuple[int, str] | None:
    """The longest sequence the model at `path` was built for, and the config field that says so; None
    where its config names none (the model then decides for itself)."""
    from transformers import AutoConfig  # slow: see the module docstring

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in CONTEXT_FIELDS:
        value = getattr(text, name, None)
        if isinstance(value, int) and value > 0:
            return value, name
    return None


def load_model(
    path: str,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    spread: bool = False,
):
    """Load a causal LM from a hub id or a directory, in `dtype` (None: float32), on `device`.

    spread: place the layers over every GPU this process sees (accelerate's device_map="auto"), for a
    model larger than one GPU; inputs then go to the first (`device="cuda"`), and accelerate's hooks
    move activations from GPU to GPU. Needs accelerate (installed with the peft extra).
    """
    import torch
    from transformers import AutoModelForCausalLM  # slow: see the module docstring

    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if spread:
        extra["device_map"] = "auto"
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32 if dtype is None else dtype, trust_remote_code=trust_remote_code, **extra
    )
    # transformers wraps .to with functools.wraps, which pyright does not bind as a method (self unfilled)
    return model if spread else model.to(device)  # pyright: ignore[reportArgumentType]


def decoder_layers(model) -> torch.nn.ModuleList:
    """The model's list of decoder blocks (`layers` in Llama-style models, `h` in GPT-2), under any wrapper."""
    base = model.get_decoder()
    layers = next((getattr(base, name) for name in ("layers", "h") if hasattr(base, name)), None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no decoder layer list (layers or h)")
    return layers


def compile_decoder_layers(model) -> None:
    """`torch.compile` each decoder block in place (regional compilation).

    The blocks share code, so one compilation serves them all and start-up stays short; the model's own
    forward, its hooks (the chunked log-probs' hook on the decoder) and DDP wrapping are untouched. Fusing
    the element-wise work between matrix products (norms, rotary embeddings, activations, autocast casts)
    made the 1.1B train step 1.5x faster on an H100 (benchmarks/README.md).
    """
    for layer in decoder_layers(model):
        layer.compile()


def pick_device(use_gpu: bool) -> str:
    import torch

    if use_gpu and not torch.cuda.is_available():
        raise RuntimeError("use_gpu is true but torch sees no CUDA device on this worker")
    return "cuda" if use_gpu else "cpu"
