"""Random streams keyed by prompt content, and sampling one token from a given uniform.

Every engine derives its seeds here, so a prompt's samples depend on (seed, prompt content, occurrence
of that prompt in the call, sample index) and on nothing else in the call.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch


def stream_seed(seed: int, *keys: int) -> int:
    """A well-mixed 63-bit seed for the random stream named by (seed, *keys); keys are ints >= 0."""
    state = np.random.SeedSequence([seed, *keys]).generate_state(1, dtype=np.uint64)[0]
    return int(state) & (2**63 - 1)


def prompt_stream_keys(prompts: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """(content hash, occurrence) per prompt: the key of its random streams.

    Keying by content rather than by position means a prompt's samples do not depend on the other
    prompts in the call, on its position, or on how a data set was split into calls or shards.
    The occurrence count (0 for the first copy of a prompt in a call, 1 for the next, ...) keeps
    repeated prompts from receiving identical samples.
    """
    seen: dict[int, int] = {}
    keys = []
    for p in prompts:
        digest = hashlib.blake2b(np.asarray(p, dtype=np.int64).tobytes(), digest_size=8).digest()
        content = int.from_bytes(digest, "little")
        keys.append((content, seen.get(content, 0)))
        seen[content] = seen.get(content, 0) + 1
    return keys


def sample_from_uniforms(
    logits: torch.Tensor, uniforms: torch.Tensor, *, temperature: float, top_p: float
) -> torch.Tensor:
    """Draw one token per row by inverting the CDF of the processed distribution at a given uniform.

    logits: (B, V) raw model logits; uniforms: (B,) in [0, 1). Returns (B,) long token ids.
    The distribution is softmax(logits / temperature), cut to the smallest set of most likely tokens
    whose mass reaches top_p (the most likely token always stays), renormalised. One uniform per
    token per row is all the randomness needed, so each row can own its random stream cheaply.
    """
    # float64 keeps the cumulative sum over a large vocabulary exact enough; MPS has no float64.
    dtype = torch.float32 if logits.device.type == "mps" else torch.float64
    probs = torch.softmax(logits.to(dtype) / temperature, dim=-1)  # (B, V)
    if top_p < 1.0:
        # Stable sort: ties at the nucleus edge are broken by token id, the same way every call.
        sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    cdf = probs.cumsum(dim=-1)  # (B, V)
    total = cdf[:, -1:]
    target = torch.minimum(uniforms.to(dtype).unsqueeze(-1) * total, torch.nextafter(total, torch.zeros_like(total)))
    # right=True picks the first token whose cdf exceeds the target: never a zero-probability token.
    tokens = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    return tokens.clamp_(max=logits.shape[-1] - 1)
