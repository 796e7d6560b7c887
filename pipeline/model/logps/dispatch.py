"""The one function that turns a model and token ids into sequence log-probs.

The score stage (reference model) and the train stage (policy) both call `batch_sequence_logps`, so at step 0,
when policy == reference, every implicit reward is zero and the DPO loss is log 2. Any disagreement in
tokenization, masking or shifting between stages shows up there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pipeline.model.logps.chunked import chunked_response_grid
from pipeline.model.logps.packed import pack_sequences, packed_token_stats
from pipeline.model.logps.padded import collate_sequences, response_grid

PACK_MULTIPLE = 128  # packed rows are padded to a multiple of this: few distinct shapes for compiled kernels


@dataclass(frozen=True)
class SequenceStats:
    """What `batch_sequence_stats` returns for N prompt + response sequences.

    logps (N,) float32: response log-prob sums. counts (N,) long: response tokens. tokens: real (non-pad)
    tokens run, counted on the CPU. prefix_logps (N,): the sum over each response's first
    prefix_lengths[i] tokens, when asked. sq_logps (N,): the sum over response tokens of
    log sum_v pi(v)^2, without gradient, when asked.
    """

    logps: torch.Tensor
    counts: torch.Tensor
    tokens: int
    prefix_logps: torch.Tensor | None = None
    sq_logps: torch.Tensor | None = None


def _grid_sums(per_token, log_sq, mask, prefix_lengths) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Prefix and squared-probability sums over a right-padded (N, T-1) grid whose response tokens are `mask`."""
    prefix = None
    if prefix_lengths is not None:
        within = mask.long().cumsum(-1)  # 1 at a response's first token, 2 at its second, ...
        prefix = (per_token * (mask & (within <= prefix_lengths.to(mask.device)[:, None]))).sum(-1)
    return prefix, None if log_sq is None else (log_sq * mask).sum(-1)


def _segment_sums(per_token, log_sq, segments, counts, prefix_lengths) -> tuple[torch.Tensor | None, ...]:
    """The same over a packed row's response tokens (M,), each tagged with its sequence (M,), in order."""
    n = len(counts)
    prefix = None
    if prefix_lengths is not None:
        starts = counts.cumsum(0) - counts  # where each sequence's response tokens begin among the M
        within = torch.arange(len(segments), device=segments.device) - starts[segments]
        keep = within < prefix_lengths.to(segments.device)[segments]
        prefix = per_token.new_zeros(n).index_add(0, segments[keep], per_token[keep])
    sq = None if log_sq is None else log_sq.new_zeros(n).index_add(0, segments, log_sq)
    return prefix, sq


def batch_sequence_stats(
    model,
    prompts,
    responses,
    *,
    pad_id: int,
    device,
    packing: bool = False,
    chunk_size: int | None = None,
    prefix_lengths: Sequence[int] | None = None,
    sq_probs: bool = False,
) -> SequenceStats:
    """Response log-prob sums and counts of N prompt + response sequences, with the extras a loss may ask
    for (`SequenceStats`), from one forward pass.

    Padded or packed (`pipeline.model.logps.packed`), with full logits or chunked ones (`chunk_size`): the train
    stage (policy) and the score stage (reference) both come here, and every combination gives the same
    numbers within float error (tests/unit/test_packing.py, tests/unit/test_chunked_logps.py).
    """
    lengths = None if prefix_lengths is None else torch.as_tensor(list(prefix_lengths), dtype=torch.long)
    if packing:
        packed = pack_sequences(prompts, responses, pad_id=pad_id, multiple_of=PACK_MULTIPLE).to(device)
        per_token, log_sq, segments = packed_token_stats(model, packed, chunk_size=chunk_size, sq_probs=sq_probs)
        n = packed.num_sequences
        logps = per_token.new_zeros(n).index_add(0, segments, per_token)
        counts = torch.bincount(segments, minlength=n)[:n]
        prefix, sq = _segment_sums(per_token, log_sq, segments, counts, lengths)
        return SequenceStats(logps, counts, packed.num_tokens, prefix, sq)
    ids, attention, response = collate_sequences(prompts, responses, pad_id=pad_id)
    ids, attention, response = ids.to(device), attention.to(device), response.to(device)
    if chunk_size is None:
        per_token, log_sq = response_grid(model, ids, attention, response, sq_probs=sq_probs)
    else:
        per_token, log_sq = chunked_response_grid(
            model, ids, attention, response, chunk_size=chunk_size, sq_probs=sq_probs
        )
    mask = response[:, 1:]
    prefix, sq = _grid_sums(per_token, log_sq, mask, lengths)
    return SequenceStats((per_token * mask).sum(-1), mask.sum(-1), int(attention.sum()), prefix, sq)


def batch_sequence_logps(
    model, prompts, responses, *, pad_id: int, device, packing: bool = False, chunk_size: int | None = None
):
    """Response log-prob sums and token counts of N prompt + response sequences, and the number of real
    (non-pad) tokens, counted on the CPU (no device sync): ((N,), (N,), int). See `batch_sequence_stats`."""
    stats = batch_sequence_stats(
        model, prompts, responses, pad_id=pad_id, device=device, packing=packing, chunk_size=chunk_size
    )
    return stats.logps, stats.counts, stats.tokens
