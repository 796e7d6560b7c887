"""What every engine takes and returns: the sampling knobs, one completion, and the Engine protocol."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class SamplingParams:
    """How to decode: the knobs vLLM and transformers share, and nothing else."""

    n: int = 1  # completions per prompt
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0  # nucleus mass kept; 1 keeps the whole vocabulary
    max_tokens: int = 64  # new tokens per completion, EOS included
    seed: int = 0  # fixes the samples; see the engines for the scope of the guarantee

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class Completion:
    """One sampled continuation of one prompt."""

    text: str  # decoded token_ids, special tokens (EOS) skipped
    token_ids: list[int]  # generated ids only, prompt excluded; ends with EOS when finish_reason == "stop"
    token_logps: list[float]  # raw-model log-prob of each entry of token_ids (temperature 1, no top-p)
    finish_reason: str  # "stop" (emitted EOS) or "length" (reached max_tokens)


@runtime_checkable
class Engine(Protocol):
    name: str

    def generate(self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams) -> list[list[Completion]]:
        """One list of `params.n` completions per prompt, in prompt order."""
        ...

    def close(self) -> None:
        """Free the model and its device memory; the engine is unusable afterwards."""
        ...
