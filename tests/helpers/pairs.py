"""Test helpers: B preference pairs as one padded (or packed) batch of 2B sequences.

The pipeline itself works on sequences (`pipeline.model.logps.dispatch.batch_sequence_logps`); these pair views let
tests compare chosen and rejected log-probs across the padded, chunked and packed paths.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pipeline.model.logps.chunked import chunked_sequence_logps
from pipeline.model.logps.packed import PackedBatch, pack_sequences
from pipeline.model.logps.padded import collate_sequences, sequence_logps


@dataclass(frozen=True)
class PairBatch:
    """Chosen and rejected sequences of B pairs stacked into one padded batch of 2B rows.

    Rows [0, B) are prompt + chosen, rows [B, 2B) are prompt + rejected. Right padding.
    """

    input_ids: torch.Tensor  # (2B, T) long
    attention_mask: torch.Tensor  # (2B, T) long
    response_mask: torch.Tensor  # (2B, T) bool: True where the token belongs to the response

    @property
    def num_pairs(self) -> int:
        return self.input_ids.shape[0] // 2

    def to(self, device: str | torch.device) -> PairBatch:
        return PairBatch(
            *(t.to(device, non_blocking=True) for t in (self.input_ids, self.attention_mask, self.response_mask))
        )


def collate_pairs(
    prompt_ids: Sequence[Sequence[int]],
    chosen_ids: Sequence[Sequence[int]],
    rejected_ids: Sequence[Sequence[int]],
    *,
    pad_id: int,
) -> PairBatch:
    """Stack B pairs into one right-padded batch (see PairBatch)."""
    prompts = list(prompt_ids)
    return PairBatch(*collate_sequences(prompts + prompts, list(chosen_ids) + list(rejected_ids), pad_id=pad_id))


def pair_logps(model, batch: PairBatch):
    """Sequence log-probs of chosen and rejected responses: (chosen (B,), rejected (B,), chosen_len, rejected_len)."""
    logps, counts = sequence_logps(model, batch.input_ids, batch.attention_mask, batch.response_mask)
    b = batch.num_pairs
    return logps[:b], logps[b:], counts[:b], counts[b:]


def chunked_pair_logps(model, batch: PairBatch, *, chunk_size: int = 1024, use_checkpoint: bool = True):
    """`pair_logps` through `chunked_sequence_logps`: (chosen, rejected, chosen_len, rejected_len)."""
    logps, counts = chunked_sequence_logps(
        model,
        batch.input_ids,
        batch.attention_mask,
        batch.response_mask,
        chunk_size=chunk_size,
        use_checkpoint=use_checkpoint,
    )
    b = batch.num_pairs
    return logps[:b], logps[b:], counts[:b], counts[b:]


def pack_pairs(prompt_ids, chosen_ids, rejected_ids, *, pad_id: int, multiple_of: int = 1) -> PackedBatch:
    """B pairs as 2B packed sequences: 0..B-1 prompt + chosen, B..2B-1 prompt + rejected (as collate_pairs)."""
    prompts = list(prompt_ids)
    return pack_sequences(
        prompts + prompts, list(chosen_ids) + list(rejected_ids), pad_id=pad_id, multiple_of=multiple_of
    )
