"""The train step without Ray: accumulation equals the large batch; the learning-rate schedule."""

import pytest
import torch

from pipeline.config import TrainConfig
from pipeline.model.loading import load_model
from pipeline.stages.train import accumulation, lr_factor, micro_batch_loss

pytestmark = pytest.mark.unit


def batch_of(n: int, offset: int = 0) -> dict:
    g = torch.Generator().manual_seed(offset)
    rand = lambda k: torch.randint(3, 250, (k,), generator=g).tolist()  # noqa: E731
    return {
        "prompt_ids": [rand(3 + i % 3) for i in range(n)],
        "chosen_ids": [rand(2 + i % 4) for i in range(n)],
        "rejected_ids": [rand(1 + i % 5) for i in range(n)],
        "ref_chosen_logps": [-30.0 + i for i in range(n)],
        "ref_rejected_logps": [-28.0 - i for i in range(n)],
    }


def grads_after(model, batches: list[dict], *, train: TrainConfig, pairs_per_step: int) -> list[torch.Tensor]:
    model.zero_grad()
    for batch in batches:
        loss, _, _ = micro_batch_loss(model, batch, train=train, pad_id=1, device=torch.device("cpu"),
                                      with_reference=True, scale=1.0 / pairs_per_step)
        loss.backward()
    return [p.grad.clone() for p in model.parameters()]


def split(batch: dict, size: int) -> list[dict]:
    n = len(batch["prompt_ids"])
    return [{k: v[i : i + size] for k, v in batch.items()} for i in range(0, n, size)]


@pytest.mark.parametrize("loss", ["dpo", "sft", "ipo"])
def test_gradient_accumulation_matches_the_large_batch(tiny_model_dir, loss):
    model = load_model(str(tiny_model_dir))
    train = TrainConfig(loss=loss, beta=0.1)
    big = batch_of(8)
    whole = grads_after(model, [big], train=train, pairs_per_step=8)
    accumulated = grads_after(model, split(big, 2), train=train, pairs_per_step=8)
    for a, b in zip(whole, accumulated):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_accumulation_steps_and_bad_layouts():
    assert accumulation(TrainConfig(batch_size=32, micro_batch_size=8, num_workers=2)) == 2
    with pytest.raises(ValueError, match="batch_size"):
        accumulation(TrainConfig(batch_size=30, micro_batch_size=8, num_workers=1))


def test_learning_rate_warms_up_then_decays():
    factors = [lr_factor(s, total=10, warmup=2, schedule="cosine") for s in range(10)]
    assert factors[:2] == [0.5, 1.0]
    assert all(a >= b for a, b in zip(factors[1:], factors[2:]))
    assert lr_factor(9, total=10, warmup=0, schedule="linear") == pytest.approx(0.1)
    assert lr_factor(5, total=10, warmup=0, schedule="constant") == 1.0
    with pytest.raises(ValueError, match="lr_schedule"):
        lr_factor(0, total=1, warmup=0, schedule="step")


def test_chunked_log_probs_give_the_same_gradient(tiny_model_dir):
    model = load_model(str(tiny_model_dir))
    batch = batch_of(4)
    plain = grads_after(model, [batch], train=TrainConfig(loss="dpo"), pairs_per_step=4)
    chunked = grads_after(model, [batch], train=TrainConfig(loss="dpo", chunked_logps=True, logps_chunk_size=7), pairs_per_step=4)
    for a, b in zip(plain, chunked):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("loss", ["dpo", "sft"])
@pytest.mark.parametrize("chunked", [False, True])
def test_packed_step_gives_the_same_loss_and_gradient(tiny_model_dir, loss, chunked):
    """train.packing changes the layout, not the numbers: same loss, metrics, tokens and gradient."""
    model = load_model(str(tiny_model_dir))
    batch = batch_of(4, offset=3)
    padded = TrainConfig(loss=loss, chunked_logps=chunked, logps_chunk_size=5)
    packed = TrainConfig(loss=loss, chunked_logps=chunked, logps_chunk_size=5, packing=True)
    results = []
    for train in (padded, packed):
        model.zero_grad()
        loss_value, sums, tokens = micro_batch_loss(model, batch, train=train, pad_id=1, device=torch.device("cpu"),
                                                    with_reference=True, scale=0.25)
        loss_value.backward()
        results.append((loss_value.detach(), sums, tokens, [p.grad.clone() for p in model.parameters()]))
    (l0, s0, t0, g0), (l1, s1, t1, g1) = results
    torch.testing.assert_close(l1, l0, atol=1e-5, rtol=0)
    torch.testing.assert_close(s1, s0, atol=1e-4, rtol=0)
    assert t1 == t0
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)


def test_compiled_blocks_give_the_same_loss_and_gradient(tiny_model_dir):
    """train.compile (each decoder block through torch.compile; inductor's C++ kernels on CPU) changes
    the kernels, not the numbers, with the GPU-fast layout: packed rows and chunked log-probs."""
    from pipeline.model.loading import compile_decoder_layers

    train = TrainConfig(loss="dpo", chunked_logps=True, logps_chunk_size=5, packing=True)
    batch = batch_of(4, offset=5)
    results = []
    for compiled in (False, True):
        model = load_model(str(tiny_model_dir))
        if compiled:
            compile_decoder_layers(model)
            assert all(block._compiled_call_impl is not None for block in model.get_decoder().h)  # GPT-2 blocks
        loss_value, sums, _ = micro_batch_loss(model, batch, train=train, pad_id=1, device=torch.device("cpu"),
                                               with_reference=True, scale=0.25)
        loss_value.backward()
        results.append((loss_value.detach(), sums, [p.grad.clone() for p in model.parameters()]))
    (l0, s0, g0), (l1, s1, g1) = results
    torch.testing.assert_close(l1, l0, atol=1e-5, rtol=0)
    torch.testing.assert_close(s1, s0, atol=1e-4, rtol=0)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
