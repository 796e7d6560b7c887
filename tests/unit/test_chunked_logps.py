"""Chunked log-probs equal the shared `sequence_logps`, in value and in parameter gradients.

Tolerance: 1e-5 absolute (rtol 0) on the per-row log-prob sums and on every parameter's gradient, in
float32 on CPU. The two paths differ only in how the output-layer matmul and the logsumexp are blocked,
so what is left is float32 rounding.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch

from pipeline.model.logps.chunked import chunked_sequence_logps
from pipeline.model.logps.padded import sequence_logps
from tests.helpers.logp_models import ATOL, MODELS, grads, tiny_llama
from tests.helpers.pairs import chunked_pair_logps, collate_pairs, pair_logps


def ragged_batch(seed: int = 0):
    """Three pairs of unequal lengths, one with a one-token response, right padded with pad id 0."""
    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(3, 300, (n,), generator=g).tolist()

    prompts = [ids(5), ids(1), ids(9)]
    chosen = [ids(7), ids(1), ids(3)]
    rejected = [ids(2), ids(6), ids(11)]
    return collate_pairs(prompts, chosen, rejected, pad_id=0)


@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("chunk_size,use_checkpoint", [(1024, True), (4, True), (3, False)])
def test_values_and_gradients_match_sequence_logps(arch, chunk_size, use_checkpoint):
    model = MODELS[arch]().train()
    batch = ragged_batch()
    args = (batch.input_ids, batch.attention_mask, batch.response_mask)
    ref_logps, ref_counts, ref_grads = grads(model, lambda: sequence_logps(model, *args))
    logps, counts, new_grads = grads(
        model, lambda: chunked_sequence_logps(model, *args, chunk_size=chunk_size, use_checkpoint=use_checkpoint)
    )
    torch.testing.assert_close(logps, ref_logps, atol=ATOL, rtol=0)
    assert counts.tolist() == ref_counts.tolist()
    assert new_grads.keys() == ref_grads.keys()
    for name, grad in ref_grads.items():
        torch.testing.assert_close(new_grads[name], grad, atol=ATOL, rtol=0, msg=f"{arch}: gradient of {name}")


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_pair_logps_match_under_inference_mode(arch):
    model = MODELS[arch]().eval()
    batch = ragged_batch(seed=1)
    with torch.inference_mode():
        expected = pair_logps(model, batch)
        got = chunked_pair_logps(model, batch, chunk_size=5)
    torch.testing.assert_close(got[0], expected[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(got[1], expected[1], atol=ATOL, rtol=0)
    assert got[2].tolist() == expected[2].tolist() and got[3].tolist() == expected[3].tolist()


def test_empty_response_scores_zero():
    model = tiny_llama().eval()
    batch = collate_pairs([[5, 6, 7]], [[]], [[8, 9]], pad_id=0)
    with torch.no_grad():
        chosen, rejected, chosen_len, rejected_len = chunked_pair_logps(model, batch)
        expected = pair_logps(model, batch)
    assert chosen.item() == 0.0 and chosen_len.item() == 0 and rejected_len.item() == 2
    torch.testing.assert_close(rejected, expected[1], atol=ATOL, rtol=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_through_ddp_wrapper_matches():
    """The trainer passes a DDP-wrapped model: the chunked path must go through DDP's forward and match."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        plain = tiny_llama().train()
        wrapped = DistributedDataParallel(tiny_llama().train())
        batch = ragged_batch(seed=2)
        args = (batch.input_ids, batch.attention_mask, batch.response_mask)
        ref_logps, _, ref_grads = grads(plain, lambda: sequence_logps(plain, *args))
        logps, _, new_grads = grads(wrapped.module, lambda: chunked_sequence_logps(wrapped, *args, chunk_size=4))
        torch.testing.assert_close(logps, ref_logps, atol=ATOL, rtol=0)
        for name, grad in ref_grads.items():
            torch.testing.assert_close(new_grads[name], grad, atol=ATOL, rtol=0, msg=f"gradient of {name}")
    finally:
        dist.destroy_process_group()
