"""The one function that turns a model and token ids into sequence log-probs.

The score stage (reference model) and the train stage (policy) both call `batch_sequence_logps`, so at step 0,
when policy == reference, every implicit reward is zero and the DPO loss is log 2. Any disagreement in
tokenization, masking or shifting between stages shows up there.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch


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

    def to(self, device: str | torch.device) -> "PairBatch":
        return PairBatch(*(t.to(device, non_blocking=True) for t in (self.input_ids, self.attention_mask, self.response_mask)))


def collate_sequences(
    prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], *, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, attention_mask, response_mask) for N prompt + response sequences, each (N, T)."""
    prompts = [np.asarray(p, dtype=np.int64) for p in prompt_ids]
    responses = [np.asarray(r, dtype=np.int64) for r in response_ids]
    width = max(len(p) + len(r) for p, r in zip(prompts, responses))
    n = len(responses)
    input_ids = np.full((n, width), pad_id, dtype=np.int64)
    attention = np.zeros((n, width), dtype=np.int64)
    response = np.zeros((n, width), dtype=bool)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        input_ids[i, : len(p)] = p
        input_ids[i, len(p) : len(p) + len(r)] = r
        attention[i, : len(p) + len(r)] = 1
        response[i, len(p) : len(p) + len(r)] = True
    return torch.from_numpy(input_ids), torch.from_numpy(attention), torch.from_numpy(response)


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


def token_logps(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log pi(token_t | tokens_<t) for t >= 1, in float32.

    logits: (N, T, V) from the model on input_ids (N, T). Returns (N, T - 1): entry t - 1 is the
    log-prob of input_ids[:, t]. Computed as gathered logit minus logsumexp, which never builds a
    float32 (N, T, V) log-softmax tensor beside the logits.
    """
    logits = logits[:, :-1]
    targets = input_ids[:, 1:]
    picked = torch.gather(logits, 2, targets.unsqueeze(-1)).squeeze(-1).float()
    return picked - torch.logsumexp(logits.float(), dim=-1)


def sequence_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor):
    """Sum of response-token log-probs per row, and the number of response tokens.

    Prompt tokens are masked out; the first response token is scored from the last prompt position
    (the shift by one). Returns (logps (N,) float32, counts (N,) long).
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # (N, T, V)
    per_token = token_logps(logits, input_ids)  # (N, T-1)
    mask = response_mask[:, 1:]
    logps = (per_token * mask).sum(-1)
    return logps, mask.sum(-1)


def pair_logps(model, batch: PairBatch):
    """Sequence log-probs of chosen and rejected responses: (chosen (B,), rejected (B,), chosen_len, rejected_len)."""
    logps, counts = sequence_logps(model, batch.input_ids, batch.attention_mask, batch.response_mask)
    b = batch.num_pairs
    return logps[:b], logps[b:], counts[:b], counts[b:]


def sequence_logps_fn(*, chunked: bool, chunk_size: int) -> Callable:
    """`sequence_logps`, or its chunked twin (response positions only, lm_head chunk by chunk) when `chunked`.

    Both have the signature (model, input_ids, attention_mask, response_mask) -> (logps, counts).
    """
    if not chunked:
        return sequence_logps
    from pipeline.model.chunked_logps import chunked_sequence_logps

    return functools.partial(chunked_sequence_logps, chunk_size=chunk_size)


PACK_MULTIPLE = 128  # packed rows are padded to a multiple of this: few distinct shapes for compiled kernels


def batch_sequence_logps(model, prompts, responses, *, pad_id: int, device, packing: bool = False, chunk_size: int | None = None):
    """Response log-prob sums and token counts of N prompt + response sequences, and the number of real
    (non-pad) tokens, counted on the CPU (no device sync): ((N,), (N,), int).

    Padded or packed (`pipeline.model.packed_logps`), with full logits or chunked ones (`chunk_size`): the train
    stage (policy) and the score stage (reference) both come here, and every combination gives the same
    numbers within float error (tests/test_packing.py, tests/test_chunked_logps.py).
    """
    if packing:
        from pipeline.model.packed_logps import pack_sequences, packed_sequence_logps

        packed = pack_sequences(prompts, responses, pad_id=pad_id, multiple_of=PACK_MULTIPLE)
        logps, counts = packed_sequence_logps(model, packed.to(device), chunk_size=chunk_size)
        return logps, counts, packed.num_tokens
    ids, attention, response = collate_sequences(prompts, responses, pad_id=pad_id)
    seq_logps = sequence_logps_fn(chunked=chunk_size is not None, chunk_size=chunk_size or 0)
    logps, counts = seq_logps(model, ids.to(device), attention.to(device), response.to(device))
    return logps, counts, int(attention.sum())
