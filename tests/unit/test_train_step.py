"""The train step without Ray: accumulation equals the large batch; metrics by name; the learning-rate schedule.
(train.compile, which compiles for minutes on two cores, is tests/stage/test_compiled_step.py.)"""

import itertools

import pytest
import torch

from pipeline.config import TrainConfig
from pipeline.model.pretrained import load_model
from pipeline.training.metrics import StepMetrics
from pipeline.training.objectives import PairObjective, objective_for
from pipeline.training.step import train_step
from pipeline.training.step_plan import accumulation, lr_factor
from tests.helpers.micro_batches import kto_rows, pair_rows, split

CPU = torch.device("cpu")


def micro_batch_loss(model, batch: dict, *, train: TrainConfig) -> tuple[torch.Tensor, StepMetrics]:
    """The loss of `batch` taken as a whole step, and its metrics."""
    objective = PairObjective(train, pad_id=1, device=CPU, with_reference=True)
    shared, _ = objective.begin_step(model, [batch], world=1)
    return objective.micro_batch_loss(model, batch, shared, index=0)


def grads_after(model, batches: list[dict], *, train: TrainConfig) -> list[torch.Tensor]:
    """The gradient of one step over `batches`, accumulated micro-batch by micro-batch."""
    model.zero_grad()
    objective = PairObjective(train, pad_id=1, device=CPU, with_reference=True)
    shared, _ = objective.begin_step(model, batches, world=1)
    for i, batch in enumerate(batches):
        loss, _ = objective.micro_batch_loss(model, batch, shared, index=i)
        loss.backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("loss", ["dpo", "sft", "ipo", {"dpo": 1.0, "sft": 0.1}])
def test_gradient_accumulation_matches_the_large_batch(tiny_model_dir, loss):
    model = load_model(str(tiny_model_dir))
    train = TrainConfig(loss=loss, beta=0.1)
    big = pair_rows(8)
    whole = grads_after(model, [big], train=train)
    accumulated = grads_after(model, split(big, 2), train=train)
    for a, b in zip(whole, accumulated):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_accumulation_steps_and_bad_layouts():
    assert accumulation(TrainConfig(batch_size=32, micro_batch_size=8, num_workers=2)) == 2
    with pytest.raises(ValueError, match="batch_size"):
        accumulation(TrainConfig(batch_size=30, micro_batch_size=8, num_workers=1))


def test_learning_rate_warms_up_then_decays():
    factors = [lr_factor(s, total=10, warmup=2, schedule="cosine") for s in range(10)]
    assert factors[:2] == [0.5, 1.0]
    assert all(a >= b for a, b in itertools.pairwise(factors[1:]))
    assert lr_factor(9, total=10, warmup=0, schedule="linear") == pytest.approx(0.1)
    assert lr_factor(5, total=10, warmup=0, schedule="constant") == 1.0
    with pytest.raises(ValueError, match="lr_schedule"):
        lr_factor(0, total=1, warmup=0, schedule="step")


def test_chunked_log_probs_give_the_same_gradient(tiny_model_dir):
    model = load_model(str(tiny_model_dir))
    batch = pair_rows(4)
    plain = grads_after(model, [batch], train=TrainConfig(loss="dpo"))
    chunked = grads_after(model, [batch], train=TrainConfig(loss="dpo", chunked_logps=True, logps_chunk_size=7))
    for a, b in zip(plain, chunked):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("loss", ["dpo", "sft"])
@pytest.mark.parametrize("chunked", [False, True])
def test_packed_step_gives_the_same_loss_and_gradient(tiny_model_dir, loss, chunked):
    """train.packing changes the layout, not the numbers: same loss, metrics, tokens and gradient."""
    model = load_model(str(tiny_model_dir))
    batch = pair_rows(4, seed=3)
    padded = TrainConfig(loss=loss, chunked_logps=chunked, logps_chunk_size=5)
    packed = TrainConfig(loss=loss, chunked_logps=chunked, logps_chunk_size=5, packing=True)
    results = []
    for train in (padded, packed):
        model.zero_grad()
        loss_value, metrics = micro_batch_loss(model, batch, train=train)
        loss_value.backward()
        results.append((loss_value.detach(), metrics.sums, [p.grad.clone() for p in model.parameters()]))
    (l0, s0, g0), (l1, s1, g1) = results
    torch.testing.assert_close(l1, l0, atol=1e-5, rtol=0)
    torch.testing.assert_close(s1, s0, atol=1e-4, rtol=0)  # the token count among them
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)


@pytest.mark.parametrize("loss", ["dpo", {"dpo": 1.0, "sft": 0.1}, "sft", "kto"])
def test_step_metrics_of_two_micro_batches_equal_those_of_one_batch(tiny_model_dir, loss):
    model = load_model(str(tiny_model_dir))
    train = TrainConfig(loss=loss, beta=0.1)
    objective = objective_for(train, pad_id=1, device=CPU, with_reference=True)
    batch = kto_rows(6, seed=2) if loss == "kto" else pair_rows(6)
    results = []
    for batches in ([batch], split(batch, 3)):
        shared, metrics = objective.begin_step(model, batches, world=1)
        for i, micro in enumerate(batches):
            metrics += objective.micro_batch_loss(model, micro, shared, index=i)[1]
        results.append((metrics, objective.loss_metrics(metrics.totals(), shared)))
    (whole, whole_row), (parts, parts_row) = results
    torch.testing.assert_close(parts.sums, whole.sums, atol=1e-4, rtol=0)
    assert parts.totals()["rows"] == 6 and parts.totals()["tokens"] > 0
    assert parts_row.keys() == whole_row.keys()
    for key, value in whole_row.items():
        assert parts_row[key] == (None if value is None else pytest.approx(value, abs=1e-4)), key


def test_step_metrics_are_read_by_name():
    metrics = StepMetrics.of(CPU, rows=2, loss=torch.tensor([0.5, 1.5]), tokens=7) + StepMetrics.of(
        CPU, rows=1, tokens=3
    )
    totals = metrics.totals()
    assert (totals["rows"], totals["loss"], totals["tokens"], totals["correct"]) == (3.0, 2.0, 10.0, 0.0)
    with pytest.raises(KeyError, match="kl"):
        StepMetrics.of(CPU, kl=1.0)


def test_train_step_accumulates_to_the_large_batch_and_clips_only_when_asked(tiny_model_dir):
    train = TrainConfig(loss="dpo", beta=0.1)
    batch = pair_rows(4, seed=7)

    def step(batches, *, max_grad_norm: float):
        model = load_model(str(tiny_model_dir))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        objective = objective_for(train, pad_id=1, device=CPU, with_reference=True)
        result = train_step(model, optimizer, batches, objective=objective, lr=0.5, max_grad_norm=max_grad_norm)
        assert optimizer.param_groups[0]["lr"] == 0.5
        return result, [p.detach().clone() for p in model.parameters()]

    (one, one_params), (two, two_params) = step([batch], max_grad_norm=0), step(split(batch, 2), max_grad_norm=0)
    assert two.grad_norm == pytest.approx(one.grad_norm, rel=1e-4) and two.tokens == one.tokens
    assert two.loss_metrics["loss"] == pytest.approx(one.loss_metrics["loss"], abs=1e-6)
    for a, b in zip(one_params, two_params):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-4)

    # max_grad_norm <= 0 is no clipping at all; a positive one scales the update down to that norm.
    start = [p.detach().clone() for p in load_model(str(tiny_model_dir)).parameters()]
    clipped, clipped_params = step([batch], max_grad_norm=one.grad_norm / 4)
    assert clipped.grad_norm == pytest.approx(one.grad_norm, rel=1e-5)  # the norm before clipping
    for s, full, small in zip(start, one_params, clipped_params):
        torch.testing.assert_close(small - s, (full - s) / 4, atol=1e-6, rtol=1e-3)
