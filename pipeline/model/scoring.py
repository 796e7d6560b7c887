"""Sequence log-probs of a frozen model over Arrow tables of tokenized rows (torch; no Ray).

The score stage runs the reference model through `SequenceScorer` (its options from a config:
`pipeline.model.scorer_options`) and writes the columns as ref_*;
evaluate runs each trained policy through it for held-out accuracy. The log-probs come from
`pipeline.model.logps.dispatch.batch_sequence_logps`, the very function the trainer calls on the policy.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import torch

from pipeline.model.logps.dispatch import batch_sequence_stats
from pipeline.model.pretrained import compile_decoder_layers, load_model, load_tokenizer, pick_device


def _score_two(
    model,
    prompts: list,
    first: list,
    second: list,
    *,
    pad_id: int,
    micro_batch: int,
    device: str,
    packing: bool = False,
    chunk_size: int | None = None,
    prefix_logps: bool = False,
) -> tuple[np.ndarray, ...]:
    """Log-probs (float64 sums) of prompt + first[i] and prompt + second[i] under `model`, each (n,); with
    `prefix_logps` also the sums over each response's first min(len(first[i]), len(second[i])) tokens, from
    the same forward pass (4 arrays in all: first, second, first's prefix, second's prefix).

    Rows are scored in micro-batches of similar length (sorted by length, then put back in order) so
    little compute goes to padding; `packing` removes the padding altogether and `chunk_size` makes
    output-layer logits only at response positions (see `batch_sequence_stats`).
    """
    n = len(prompts)
    sums = np.zeros((4 if prefix_logps else 2, n), dtype=np.float64)
    total = np.array([len(p) + max(len(a), len(b)) for p, a, b in zip(prompts, first, second)])
    order = np.argsort(total, kind="stable")
    with torch.inference_mode():
        for start in range(0, n, micro_batch):
            idx = order[start : start + micro_batch]
            batch_prompts = [prompts[i] for i in idx]
            shared = [min(len(first[i]), len(second[i])) for i in idx] if prefix_logps else None
            stats = batch_sequence_stats(
                model,
                batch_prompts + batch_prompts,
                [first[i] for i in idx] + [second[i] for i in idx],
                pad_id=pad_id,
                device=device,
                packing=packing,
                chunk_size=chunk_size,
                prefix_lengths=None if shared is None else shared + shared,
            )
            logps = stats.logps.double().cpu().numpy()
            sums[0, idx], sums[1, idx] = logps[: len(idx)], logps[len(idx) :]
            if stats.prefix_logps is not None:
                prefix = stats.prefix_logps.double().cpu().numpy()
                sums[2, idx], sums[3, idx] = prefix[: len(idx)], prefix[len(idx) :]
    return tuple(sums)


def score_pairs(
    model,
    table: pa.Table,
    *,
    pad_id: int,
    micro_batch: int,
    device: str,
    packing: bool = False,
    chunk_size: int | None = None,
    prefix: str = "",
    prefix_logps: bool = False,
) -> pa.Table:
    """Add {prefix}chosen_logps and {prefix}rejected_logps (float64 sums over response tokens) to `table`;
    with `prefix_logps` also {prefix}chosen_prefix_logps and {prefix}rejected_prefix_logps, the sums over
    each response's first min(len_w, len_l) tokens (LD-DPO reads them; `pipeline.data.schemas.SCORED_PREFIX`).

    `table` holds prompt_ids, chosen_ids and rejected_ids. Pure over an Arrow table: no Ray.
    """
    sums = _score_two(
        model,
        table["prompt_ids"].to_pylist(),
        table["chosen_ids"].to_pylist(),
        table["rejected_ids"].to_pylist(),
        pad_id=pad_id,
        micro_batch=micro_batch,
        device=device,
        packing=packing,
        chunk_size=chunk_size,
        prefix_logps=prefix_logps,
    )
    names = ["chosen_logps", "rejected_logps", "chosen_prefix_logps", "rejected_prefix_logps"]
    for name, values in zip(names, sums):
        table = table.append_column(f"{prefix}{name}", pa.array(values))
    return table


def score_unpaired(
    model,
    table: pa.Table,
    *,
    pad_id: int,
    micro_batch: int,
    device: str,
    packing: bool = False,
    chunk_size: int | None = None,
    prefix: str = "",
) -> pa.Table:
    """For KTO rows that carry kl_completion_ids (see pipeline.data.kto_pairs): add {prefix}chosen_logps (the
    completion), {prefix}rejected_logps (0: there is no rejected response) and {prefix}kl_logps (the
    mismatched completion after this row's prompt). Both completions of a row share one forward pass.
    Pure: no Ray.
    """
    completion_logps, kl_logps = _score_two(
        model,
        table["prompt_ids"].to_pylist(),
        table["chosen_ids"].to_pylist(),
        table["kl_completion_ids"].to_pylist(),
        pad_id=pad_id,
        micro_batch=micro_batch,
        device=device,
        packing=packing,
        chunk_size=chunk_size,
    )
    return (
        table.append_column(f"{prefix}chosen_logps", pa.array(completion_logps))
        .append_column(f"{prefix}rejected_logps", pa.array(np.zeros(table.num_rows)))
        .append_column(f"{prefix}kl_logps", pa.array(kl_logps))
    )


class SequenceScorer:
    """Scores batches of rows under one model, loaded once (a Ray Data callable class, or an actor's body).

    Paired rows get {prefix}chosen_logps and {prefix}rejected_logps (and with `prefix_logps` the two
    prefix sums LD-DPO reads); KTO rows (with kl_completion_ids) get {prefix}kl_logps too. The score stage
    sets prefix="ref_" for the reference model.
    """

    def __init__(
        self,
        model_path: str,
        *,
        dtype: str,
        use_gpu: bool,
        micro_batch: int,
        trust_remote_code: bool,
        attn_implementation: str | None = None,
        packing: bool = False,
        chunk_size: int | None = None,
        compile: bool = False,
        prefix: str = "",
        spread: bool = False,
        prefix_logps: bool = False,
    ):
        self.device = pick_device(use_gpu)
        self.model = load_model(
            model_path,
            dtype=getattr(torch, dtype),
            device=self.device,
            trust_remote_code=trust_remote_code,
            attn_implementation=attn_implementation,
            spread=spread,
        ).eval()
        if compile:
            compile_decoder_layers(self.model)
        self.pad_id = load_tokenizer(model_path, trust_remote_code=trust_remote_code).pad_token_id
        self.options: dict[str, Any] = dict(
            micro_batch=micro_batch, packing=packing, chunk_size=chunk_size, prefix=prefix
        )
        self.prefix_logps = prefix_logps

    def __call__(self, batch: pa.Table) -> pa.Table:
        if "kl_completion_ids" in batch.column_names:
            return score_unpaired(self.model, batch, pad_id=self.pad_id, device=self.device, **self.options)
        return score_pairs(
            self.model, batch, pad_id=self.pad_id, device=self.device, prefix_logps=self.prefix_logps, **self.options
        )
