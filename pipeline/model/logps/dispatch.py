"""The one function that turns a model and token ids into sequence log-probs.

The score stage (reference model) and the train stage (policy) both call `batch_sequence_logps`, so at step 0,
when policy == reference, every implicit reward is zero and the DPO loss is log 2. Any disagreement in
tokenization, masking or shifting between stages shows up there.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from pipeline.model.logps.chunked import chunked_sequence_logps
from pipeline.model.logps.packed import pack_sequences, packed_sequence_logps
from pipeline.model.logps.padded import collate_sequences, sequence_logps


def sequence_logps_fn(*, chunked: bool, chunk_size: int) -> Callable:
    """`sequence_logps`, or its chunked twin (response positions only, lm_head chunk by chunk) when `chunked`.

    Both have the signature (model, input_ids, attention_mask, response_mask) -> (logps, counts).
    """
    if not chunked:
        return sequence_logps
    return functools.partial(chunked_sequence_logps, chunk_size=chunk_size)


PACK_MULTIPLE = 128  # packed rows are padded to a multiple of this: few distinct shapes for compiled kernels


def batch_sequence_logps(
    model, prompts, responses, *, pad_id: int, device, packing: bool = False, chunk_size: int | None = None
):
    """Response log-prob sums and token counts of N prompt + response sequences, and the number of real
    (non-pad) tokens, counted on the CPU (no device sync): ((N,), (N,), int).

    Padded or packed (`pipeline.model.logps.packed`), with full logits or chunked ones (`chunk_size`): the train
    stage (policy) and the score stage (reference) both come here, and every combination gives the same
    numbers within float error (tests/unit/test_packing.py, tests/unit/test_chunked_logps.py).
    """
    if packing:
        packed = pack_sequences(prompts, responses, pad_id=pad_id, multiple_of=PACK_MULTIPLE)
        logps, counts = packed_sequence_logps(model, packed.to(device), chunk_size=chunk_size)
        return logps, counts, packed.num_tokens
    ids, attention, response = collate_sequences(prompts, responses, pad_id=pad_id)
    seq_logps = sequence_logps_fn(chunked=chunk_size is not None, chunk_size=chunk_size or 0)
    logps, counts = seq_logps(model, ids.to(device), attention.to(device), response.to(device))
    return logps, counts, int(attention.sum())
