"""Log-prob primitives over a right-padded batch: collate, per-token log-probs, per-sequence sums.

`pipeline.model.logps.dispatch.batch_sequence_logps` dispatches between these and their chunked and packed
twins (chunked_logps.py, packed_logps.py), which compute the same numbers with less memory or padding.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


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


def token_log_sq_probs(logits: torch.Tensor) -> torch.Tensor:
    """log sum_v pi(v | tokens_<t)^2 at every position that predicts a token, without gradient, in float32.

    logits: (N, T, V) -> (N, T - 1), aligned with `token_logps`. It is logsumexp(2 z) - 2 logsumexp(z):
    the log of the probability that two draws from the position's distribution agree (WPO's alignment
    term, `pipeline.training.losses.modifiers.wpo_weights`).
    """
    with torch.no_grad():
        z = logits[:, :-1].float()
        return torch.logsumexp(2.0 * z, dim=-1) - 2.0 * torch.logsumexp(z, dim=-1)


def response_grid(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    sq_probs: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-position log-probs (N, T-1) float32, and with `sq_probs` `token_log_sq_probs` (N, T-1), else None.

    Entry t - 1 belongs to token t; only the entries where response_mask[:, 1:] is set are response tokens.
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # (N, T, V)
    return token_logps(logits, input_ids), token_log_sq_probs(logits) if sq_probs else None


def sequence_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor):
    """Sum of response-token log-probs per row, and the number of response tokens.

    Prompt tokens are masked out; the first response token is scored from the last prompt position
    (the shift by one). Returns (logps (N,) float32, counts (N,) long).
    """
    per_token, _ = response_grid(model, input_ids, attention_mask, response_mask)  # (N, T-1)
    mask = response_mask[:, 1:]
    logps = (per_token * mask).sum(-1)
    return logps, mask.sum(-1)
