"""Packed (padding-free) batches give the padded batch's log-probs, in value and in parameter gradients.

Tolerance: 1e-5 absolute on per-sequence sums and every parameter's gradient, float32 on CPU with SDPA
(transformers turns the restarting position_ids into a block-diagonal causal mask). If sequences leaked
into each other through attention or positions, the sums would differ by whole nats.
"""

from __future__ import annotations

import pytest
import torch

from pipeline.model.logps.packed import pack_sequences, packed_sequence_logps
from pipeline.model.logps.padded import sequence_logps
from tests.helpers.logp_models import ATOL, MODELS, grads
from tests.helpers.pairs import collate_pairs, pack_pairs


def ragged_pairs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(3, 300, (n,), generator=g).tolist()

    return [ids(5), ids(1), ids(9)], [ids(7), ids(1), ids(3)], [ids(2), ids(6), ids(11)]


@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("chunk_size,multiple_of", [(None, 1), (None, 16), (4, 1), (5, 16)])
def test_packed_matches_padded(arch, chunk_size, multiple_of):
    model = MODELS[arch]().train()
    prompts, chosen, rejected = ragged_pairs()
    padded = collate_pairs(prompts, chosen, rejected, pad_id=0)
    packed = pack_pairs(prompts, chosen, rejected, pad_id=0, multiple_of=multiple_of)
    ref_logps, ref_counts, ref_grads = grads(
        model, lambda: sequence_logps(model, padded.input_ids, padded.attention_mask, padded.response_mask)
    )
    logps, counts, new_grads = grads(model, lambda: packed_sequence_logps(model, packed, chunk_size=chunk_size))
    torch.testing.assert_close(logps, ref_logps, atol=ATOL, rtol=0)
    assert counts.tolist() == ref_counts.tolist()
    for name, grad in ref_grads.items():
        torch.testing.assert_close(new_grads[name], grad, atol=ATOL, rtol=0, msg=f"{arch}: gradient of {name}")


def test_layout():
    packed = pack_sequences([[5, 6], [7]], [[8], [9, 10]], pad_id=0, multiple_of=4)
    assert packed.input_ids.tolist() == [[5, 6, 8, 7, 9, 10, 0, 0]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 0, 1]]
    assert packed.response_mask.tolist() == [[False, False, True, False, True, True, False, False]]
    assert packed.segments.tolist() == [[0, 0, 0, 1, 1, 1, 2, 2]]
    assert packed.num_sequences == 2 and packed.num_tokens == 6


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="non-empty prompt"):
        pack_sequences([[], [1]], [[2], [3]], pad_id=0)
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        pack_sequences([[1], [2]], [[3]], pad_id=0)


@pytest.mark.parametrize("packing,chunk_size", [(True, None), (False, 4), (True, 5)])
def test_score_stage_switches_give_the_plain_reference_logps(packing, chunk_size):
    """score.packing and score.chunked_logps change how the reference pass runs, not what it writes."""
    import pyarrow as pa

    from pipeline.model.scoring import score_pairs, score_unpaired

    model = MODELS["llama"]().eval()
    prompts, chosen, rejected = ragged_pairs(seed=3)
    ids = pa.list_(pa.int32())
    table = pa.table(
        {
            "prompt_ids": pa.array(prompts, ids),
            "chosen_ids": pa.array(chosen, ids),
            "rejected_ids": pa.array(rejected, ids),
        }
    )
    plain = score_pairs(model, table, pad_id=0, micro_batch=2, device="cpu")
    fast = score_pairs(model, table, pad_id=0, micro_batch=2, device="cpu", packing=packing, chunk_size=chunk_size)
    for column in ("chosen_logps", "rejected_logps"):
        assert fast[column].to_pylist() == pytest.approx(plain[column].to_pylist(), abs=ATOL)
    unpaired = table.append_column("kl_completion_ids", table["rejected_ids"])
    fast_kto = score_unpaired(
        model, unpaired, pad_id=0, micro_batch=2, device="cpu", packing=packing, chunk_size=chunk_size
    )
    assert fast_kto["kl_logps"].to_pylist() == pytest.approx(plain["rejected_logps"].to_pylist(), abs=ATOL)
