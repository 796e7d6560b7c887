"""Padding-free batches: every sequence of a micro-batch laid end to end in one row.

A padded batch of chosen + rejected sequences spends compute on pad tokens (with lengths +-25% around
their mean, about a sixth of it). Packed, the 2B sequences become one row of their total length, and
`position_ids` restart at 0 at each sequence start. Given `position_ids` and no attention mask,
transformers' mask code finds the sequence boundaries from the restarts and keeps sequences apart:
a block-diagonal causal mask for SDPA, a block mask for flex attention (which skips the blocks between
sequences), cu_seqlens for flash-attention. The same log-prob arithmetic then runs on the one row: the
last token of a sequence "predicts" the first token of the next, but that target is a prompt token,
outside the response mask, so it never counts.

`packed_sequence_logps` returns what `pipeline.model.logps.padded.sequence_logps` returns for the padded batch
(tests/unit/test_packing.py checks values and gradients on a tiny Llama and a tiny GPT-2 in float32 on CPU).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.model.logps.chunked import chunked_token_stats, response_hidden_states
from pipeline.model.logps.padded import token_log_sq_probs, token_logps

__all__ = ["PackedBatch", "pack_sequences", "packed_sequence_logps", "packed_token_stats"]


@dataclass(frozen=True)
class PackedBatch:
    """N prompt + response sequences end to end in one row of T tokens (plus optional tail padding)."""

    input_ids: torch.Tensor  # (1, T) long
    position_ids: torch.Tensor  # (1, T) long: 0, 1, ... within each sequence
    response_mask: torch.Tensor  # (1, T) bool: True where the token belongs to a response
    segments: torch.Tensor  # (1, T) long: the sequence each token belongs to; N for tail padding
    num_sequences: int

    def to(self, device: str | torch.device) -> PackedBatch:
        moved = (
            t.to(device, non_blocking=True)
            for t in (self.input_ids, self.position_ids, self.response_mask, self.segments)
        )
        return PackedBatch(*moved, num_sequences=self.num_sequences)

    @property
    def num_tokens(self) -> int:
        """Tokens of real sequences (tail padding excluded)."""
        return int((self.segments < self.num_sequences).sum())


def pack_sequences(
    prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], *, pad_id: int, multiple_of: int = 1
) -> PackedBatch:
    """Pack N prompt + response sequences into one row, in order.

    `multiple_of` > 1 pads the row's length up to a multiple of it (a short tail "sequence" of pad tokens
    with its own positions and segment N, outside every response), so a compiled model sees few distinct
    shapes. Every prompt must be non-empty: the first token of a sequence is never a target.
    """
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(response_ids)} responses")
    if multiple_of < 1:
        raise ValueError(f"multiple_of must be positive, got {multiple_of}")
    lengths = [len(p) + len(r) for p, r in zip(prompt_ids, response_ids)]
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("packing needs a non-empty prompt in every sequence (its first token is never a target)")
    total = sum(lengths)
    width = -(-total // multiple_of) * multiple_of
    input_ids = np.full(width, pad_id, dtype=np.int64)
    position_ids = np.zeros(width, dtype=np.int64)
    response = np.zeros(width, dtype=bool)
    segments = np.full(width, len(lengths), dtype=np.int64)
    start = 0
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        end = start + len(p) + len(r)
        input_ids[start : start + len(p)] = p
        input_ids[start + len(p) : end] = r
        position_ids[start:end] = np.arange(end - start)
        response[start + len(p) : end] = True
        segments[start:end] = i
        start = end
    position_ids[total:] = np.arange(width - total)  # the tail restarts too: it attends only to itself
    as_row = lambda a: torch.from_numpy(a)[None]
    return PackedBatch(
        as_row(input_ids), as_row(position_ids), as_row(response), as_row(segments), num_sequences=len(lengths)
    )


def packed_token_stats(
    model, batch: PackedBatch, *, chunk_size: int | None = None, sq_probs: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Per response token of the packed row: log-probs (M,) float32, with `sq_probs` log sum_v p(v)^2 (M,)
    without gradient (else None), and the sequence each token belongs to (M,) long, in row order.

    With `chunk_size`, logits are made only at response positions, chunk by chunk
    (`pipeline.model.logps.chunked`); otherwise from the full (1, T, V) logits.
    """
    mask = batch.response_mask[:, 1:]
    target_segments = batch.segments[:, 1:][mask]  # (M,): the sequence of each response-token target
    if chunk_size is None:
        logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits
        per_token = token_logps(logits, batch.input_ids)[mask]
        log_sq = token_log_sq_probs(logits)[mask] if sq_probs else None
    else:
        hidden, targets = response_hidden_states(
            model, batch.input_ids, None, batch.response_mask, position_ids=batch.position_ids
        )
        per_token, log_sq = chunked_token_stats(model, hidden, targets, chunk_size=chunk_size, sq_probs=sq_probs)
    return per_token, log_sq, target_segments


def packed_sequence_logps(model, batch: PackedBatch, *, chunk_size: int | None = None):
    """Sum of response-token log-probs per packed sequence and the response token counts: ((N,), (N,)).

    With `chunk_size`, logits are made only at response positions, chunk by chunk
    (`pipeline.model.logps.chunked`); otherwise from the full (1, T, V) logits.
    """
    per_token, _, target_segments = packed_token_stats(model, batch, chunk_size=chunk_size)
    n = batch.num_sequences
    logps = per_token.new_zeros(n).index_add(0, target_segments, per_token)
    counts = torch.bincount(target_segments, minlength=n)[:n]
    return logps, counts
