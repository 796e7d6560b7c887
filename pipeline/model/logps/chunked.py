"""Sequence log-probs without the [N, T, V] logits: the same numbers as `pipeline.model.logps.padded.sequence_logps`.

With reference log-probs precomputed, a DPO step is supervised training on chosen + rejected, and at a
32k vocabulary the output layer dominates its memory: `sequence_logps` builds logits for every position
(prompt and padding included), then a float32 copy for the logsumexp, and autograd keeps them for backward.
Here the backbone runs once, the final hidden states are gathered at response positions only (so prompt
and padding cost no output-layer work at all), and logits are made chunk by chunk through the model's own
output layer, with the logsumexp in float32 per chunk. While gradients are on, each chunk runs under
`torch.utils.checkpoint`, so backward recomputes one chunk's logits at a time instead of keeping them all.

The hidden states are captured with a forward hook on the decoder while the model is called as a whole
(with `logits_to_keep=1`, so its own head works on one position). Calling the model itself, rather than
its backbone, keeps DistributedDataParallel's forward bookkeeping intact when `model` is DDP-wrapped.

Equality with `sequence_logps`: in float32 on CPU the log-probs agree within 1e-5 (absolute) and so do the
parameter gradients; tests/unit/test_chunked_logps.py checks both on a tiny GPT-2 and a tiny Llama. Under
bf16 autocast both paths round the logits to bf16 the same way, so they agree to bf16 noise.
"""

from __future__ import annotations

import inspect

import torch
from torch.utils.checkpoint import checkpoint

__all__ = [
    "chunked_response_grid",
    "chunked_sequence_logps",
    "chunked_token_logps",
    "chunked_token_stats",
    "response_hidden_states",
]


def _unwrap(model):
    """The Hugging Face model inside DDP / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


def _decoder(bare):
    """The module whose output feeds the output layer: `model.model` (Llama), `model.transformer` (GPT-2)."""
    decoder = bare.get_decoder() if hasattr(bare, "get_decoder") else None
    if decoder is None or decoder is bare:
        decoder = getattr(bare, "base_model", None)
    if decoder is None or decoder is bare:
        raise ValueError(f"{type(bare).__name__}: cannot find the decoder under the output layer")
    return decoder


def _last_hidden(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple):
        return output[0]
    return output.last_hidden_state


def response_hidden_states(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    response_mask: torch.Tensor,
    *,
    position_ids: torch.Tensor | None = None,
):
    """Final hidden states at the positions that predict response tokens, packed without padding.

    Returns (hidden (M, H), targets (M,) long), M = response tokens in the batch, in row-major order of
    `response_mask[:, 1:]`: entry k is the hidden state at position t - 1 of some row, whose next token
    targets[k] = input_ids[row, t] is a response token. Same shift and mask as `sequence_logps`.
    `position_ids` (with no attention mask) is how a packed row is passed (`pipeline.model.logps.packed`).
    """
    bare = _unwrap(model)
    decoder = _decoder(bare)
    captured: list[torch.Tensor] = []
    handle = decoder.register_forward_hook(lambda module, args, output: captured.append(_last_hidden(output)))
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    if position_ids is not None:
        inputs["position_ids"] = position_ids
    try:
        # PEFT's wrapper passes keyword arguments through to the model it wraps: ask that one.
        inner = bare.get_base_model() if hasattr(bare, "get_base_model") else bare
        if "logits_to_keep" in inspect.signature(inner.forward).parameters:
            # Through the (possibly DDP-wrapped) model: its head makes logits for one position only.
            model(**inputs, logits_to_keep=1)
        elif model is bare:
            decoder(**inputs)
        else:
            raise ValueError(f"{type(bare).__name__} has no logits_to_keep: pass the unwrapped model")
    finally:
        handle.remove()
    hidden = captured[-1]  # (N, T, H)
    mask = response_mask[:, 1:].bool()  # (N, T-1): token t is a response token
    return hidden[:, :-1][mask], input_ids[:, 1:][mask]


def _logit_transform(bare):
    """Post-head logit changes some architectures make (Cohere's scale, Gemma-2's soft cap), else None."""
    config = bare.config
    scale = getattr(config, "logit_scale", None)
    cap = getattr(config, "final_logit_softcapping", None)
    if scale is None and cap is None:
        return None

    def transform(logits):
        if scale is not None:
            logits = logits * scale
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    return transform


def _chunk_token_logps(head, transform, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) for one chunk: (C, H), (C,) -> (C,) float32. Logits live only inside this call."""
    logits = head(hidden)  # (C, V), autocast dtype
    if transform is not None:
        logits = transform(logits)
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1).float()
    return picked - torch.logsumexp(logits.float(), dim=-1)


def _chunk_log_sq_probs(head, transform, hidden: torch.Tensor) -> torch.Tensor:
    """log sum_v p(v)^2 for one chunk, without gradient: (C, H) -> (C,) float32."""
    with torch.no_grad():
        logits = head(hidden)
        if transform is not None:
            logits = transform(logits)
        z = logits.float()
        return torch.logsumexp(2.0 * z, dim=-1) - 2.0 * torch.logsumexp(z, dim=-1)


def chunked_response_grid(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    chunk_size: int = 1024,
    use_checkpoint: bool = True,
    sq_probs: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`pipeline.model.logps.padded.response_grid` without the (N, T, V) logits: (N, T-1) log-probs, zero
    outside the response, and with `sq_probs` log sum_v p(v)^2 on the same grid (no gradient), else None."""
    hidden, targets = response_hidden_states(model, input_ids, attention_mask, response_mask)  # (M, H), (M,)
    per_token, log_sq = chunked_token_stats(
        model, hidden, targets, chunk_size=chunk_size, use_checkpoint=use_checkpoint, sq_probs=sq_probs
    )  # (M,) each
    # Back onto the (N, T-1) grid, to be summed along it as sequence_logps sums: the same float32 addition
    # order, so the sums differ only by the per-token rounding.
    mask = response_mask[:, 1:].bool()
    grid = per_token.new_zeros(mask.shape).masked_scatter(mask, per_token)  # (N, T-1)
    sq_grid = None if log_sq is None else log_sq.new_zeros(mask.shape).masked_scatter(mask, log_sq)
    return grid, sq_grid


def chunked_sequence_logps(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    chunk_size: int = 1024,
    use_checkpoint: bool = True,
):
    """Drop-in for `pipeline.model.logps.padded.sequence_logps` that never builds the (N, T, V) logits.

    input_ids, attention_mask, response_mask: (N, T), right padded. Returns (logps (N,) float32, counts (N,)
    long). Logits exist for at most `chunk_size` response tokens at a time ((chunk_size, V) float32); with
    gradients on and `use_checkpoint`, backward recomputes each chunk instead of keeping its logits.
    `model` may be a Hugging Face causal LM or one wrapped in DDP / torch.compile.
    """
    grid, _ = chunked_response_grid(
        model, input_ids, attention_mask, response_mask, chunk_size=chunk_size, use_checkpoint=use_checkpoint
    )
    return grid.sum(-1), response_mask[:, 1:].bool().sum(-1)


def chunked_token_stats(
    model,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    *,
    chunk_size: int = 1024,
    use_checkpoint: bool = True,
    sq_probs: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(targets) (M,) float32 from final hidden states (M, H) through the model's output layer,
    `chunk_size` rows at a time, and with `sq_probs` log sum_v p(v)^2 (M,) without gradient, else None.
    With gradients on and `use_checkpoint`, backward recomputes each chunk's logits."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    bare = _unwrap(model)
    head = bare.get_output_embeddings()
    transform = _logit_transform(bare)
    recompute = use_checkpoint and torch.is_grad_enabled()
    pieces, squares = [], []
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        if recompute:
            pieces.append(checkpoint(_chunk_token_logps, head, transform, h, t, use_reentrant=False))
        else:
            pieces.append(_chunk_token_logps(head, transform, h, t))
        if sq_probs:  # a second pass through the head, without gradient: only WPO asks for it
            squares.append(_chunk_log_sq_probs(head, transform, h))
    empty = hidden.new_zeros(0, dtype=torch.float32)
    per_token = torch.cat(pieces) if pieces else empty
    return per_token, (torch.cat(squares) if squares else empty) if sq_probs else None


def chunked_token_logps(
    model, hidden: torch.Tensor, targets: torch.Tensor, *, chunk_size: int = 1024, use_checkpoint: bool = True
) -> torch.Tensor:
    """log p(targets) from final hidden states (M, H) through the model's output layer, `chunk_size` rows
    at a time: (M,) float32. With gradients on and `use_checkpoint`, backward recomputes each chunk."""
    return chunked_token_stats(model, hidden, targets, chunk_size=chunk_size, use_checkpoint=use_checkpoint)[0]
