"""Each loss's declaration agrees with what its function does, and train.loss is checked in one place."""

from __future__ import annotations

import dataclasses
from dataclasses import replace

import pytest
import torch
from torch.testing import assert_close

from pipeline.config import TrainConfig
from pipeline.training.losses import (
    HYPERPARAMETERS,
    LOSSES,
    KtoLogps,
    LossOutput,
    LossSpec,
    PairLogps,
    RewardMean,
    compute_loss,
    is_unpaired,
    loss_hyperparameters,
    loss_weights,
    needs_reference,
    reads_rejected,
    register,
)

PAIRED = sorted(name for name, spec in LOSSES.items() if not spec.unpaired)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


BATCH = PairLogps(
    policy_chosen_logps=t(-1.0, -3.0, -10.0, -4.0),
    policy_rejected_logps=t(-2.0, -1.0, -11.0, -6.0),
    ref_chosen_logps=t(-1.5, -2.0, -10.0, -5.0),
    ref_rejected_logps=t(-1.5, -2.0, -10.5, -5.0),
    chosen_lengths=torch.tensor([2, 3, 5, 4]),
    rejected_lengths=torch.tensor([4, 1, 6, 3]),
)
KTO_BATCH = KtoLogps(
    policy_logps=t(-1.0, -2.0),
    ref_logps=t(-1.5, -1.0),
    labels=torch.tensor([True, False]),
    kl_policy_logps=t(-2.0, -2.0),
    kl_ref_logps=t(-2.2, -2.4),
)
FIELDS = ("losses", "chosen_rewards", "rejected_rewards")


def outputs_equal(a: LossOutput, b: LossOutput, fields=FIELDS) -> bool:
    return all(torch.allclose(getattr(a, f), getattr(b, f), equal_nan=False) for f in fields)


@pytest.mark.parametrize("name", [n for n in PAIRED if LOSSES[n].reference_free])
def test_a_reference_free_loss_gives_the_same_output_whatever_the_reference(name):
    fn = LOSSES[name].function
    no_ref = fn(replace(BATCH, ref_chosen_logps=None, ref_rejected_logps=None), beta=2.0)
    assert torch.isfinite(no_ref.losses).all()
    nan = torch.full((4,), float("nan"), dtype=torch.float64)
    for ref_chosen, ref_rejected in ((nan, nan), (t(5.0, -7.0, 0.0, 1.0), t(-9.0, 3.0, -1.0, 0.5))):
        other = fn(replace(BATCH, ref_chosen_logps=ref_chosen, ref_rejected_logps=ref_rejected), beta=2.0)
        assert outputs_equal(no_ref, other), name


@pytest.mark.parametrize("name", [n for n in PAIRED if not LOSSES[n].reference_free])
def test_a_loss_declared_to_need_the_reference_reads_it(name):
    fn = LOSSES[name].function
    shifted = replace(BATCH, ref_chosen_logps=BATCH.ref_chosen_logps + 0.7)
    assert not torch.allclose(fn(BATCH, beta=0.5).losses, fn(shifted, beta=0.5).losses), name


@pytest.mark.parametrize("name", [n for n in PAIRED if not LOSSES[n].reads_rejected])
def test_a_loss_that_does_not_read_the_rejected_response_ignores_it(name):
    """What the trainer feeds such a loss instead of a forward pass (zeros, length 1) changes nothing it trains on."""
    fn = LOSSES[name].function
    skipped = replace(BATCH, policy_rejected_logps=torch.zeros(4, dtype=torch.float64), rejected_lengths=torch.ones(4))
    policy = BATCH.policy_chosen_logps.clone().requires_grad_()
    grads = []
    for batch in (BATCH, skipped):
        out = fn(replace(batch, policy_chosen_logps=policy), beta=0.5)
        grads.append(torch.autograd.grad(out.losses.sum(), policy)[0])
        assert_close(out.losses, fn(BATCH, beta=0.5).losses)
        assert_close(out.chosen_rewards, fn(BATCH, beta=0.5).chosen_rewards)
    assert_close(grads[0], grads[1])


@pytest.mark.parametrize("name", [n for n in PAIRED if LOSSES[n].reads_rejected])
def test_a_loss_declared_to_read_the_rejected_response_reads_it(name):
    fn = LOSSES[name].function
    moved = replace(BATCH, policy_rejected_logps=BATCH.policy_rejected_logps - 0.9)
    assert not torch.allclose(fn(BATCH, beta=0.5).losses, fn(moved, beta=0.5).losses), name


def test_an_unpaired_loss_takes_only_unpaired_rows_and_a_paired_one_only_pairs():
    for name, spec in LOSSES.items():
        wrong, right = (BATCH, KTO_BATCH) if spec.unpaired else (KTO_BATCH, BATCH)
        with pytest.raises(ValueError, match=f"takes a {type(right).__name__}"):
            compute_loss(name, wrong, beta=0.1)
        assert torch.isfinite(compute_loss(name, right, beta=0.1).loss)


def test_declared_hyperparameters_are_train_keys_and_the_signature():
    assert set(HYPERPARAMETERS) <= {f.name for f in dataclasses.fields(TrainConfig)}
    assert LOSSES["dpo"].hyperparameters == {"beta", "label_smoothing", "f_divergence_type", "f_alpha_divergence_coef"}
    assert LOSSES["kto"].hyperparameters == {"beta", "desirable_weight", "undesirable_weight"}
    train = TrainConfig(loss="simpo", beta=2.0, gamma=0.3)
    assert_close(
        compute_loss("simpo", BATCH, **loss_hyperparameters(train)).terms[0][2].losses,
        LOSSES["simpo"].function(BATCH, beta=2.0, gamma=0.3).losses,
    )
    with pytest.raises(TypeError, match="beta"):
        compute_loss("dpo", BATCH, beta=0.1, temperature=1.0)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_declared_by_path_loads_a_function_that_takes_what_it_declares(name):
    spec = LOSSES[name]
    assert isinstance(spec.fn, str), "our losses are named by path, so asking what a choice needs imports no torch"
    fn = spec.function  # checks the signature against the declaration
    assert callable(fn) and fn.__module__ == spec.fn.partition(":")[0]


def test_a_declaration_that_differs_from_its_function_is_refused_when_it_loads():
    where = "pipeline.training.losses.reference_free:simpo_loss"
    with pytest.raises(ValueError, match=r"declared to take beta, but its function takes beta, gamma"):
        _ = LossSpec("simpo_drift", where, ("beta",)).function
    with pytest.raises(ValueError, match=r"declare state= exactly"):
        _ = LossSpec("simpo_state", where, ("beta", "gamma"), state=RewardMean).function
    with pytest.raises(ValueError, match=r"cannot load its function"):
        _ = LossSpec("missing", "pipeline.training.losses.reference_free:no_such_loss", ("beta",)).function
    with pytest.raises(ValueError, match=r"declare the train\.\* keys it reads with takes"):
        LossSpec("untold", where)


def test_what_callers_ask_of_a_loss_choice():
    assert needs_reference("dpo") and needs_reference({"simpo": 1.0, "dpo": 0.5}) and needs_reference("kto")
    assert not needs_reference("simpo") and not needs_reference({"sft": 1.0, "orpo": 0.1})
    assert is_unpaired("kto") and is_unpaired({"kto": 1.0}) and not is_unpaired({"dpo": 1.0, "sft": 0.1})
    assert not reads_rejected("sft") and not reads_rejected({"sft": 2.0})
    assert reads_rejected({"dpo": 1.0, "sft": 0.1}) and reads_rejected("unlikelihood")


def test_train_loss_is_checked_once_naming_the_known_losses():
    assert loss_weights({"dpo": 1, "sft": 0.1}) == {"dpo": 1.0, "sft": 0.1}
    for ask in (needs_reference, is_unpaired, reads_rejected, loss_weights):
        with pytest.raises(ValueError, match=r"unknown loss 'dpoo'; known losses: .*dpo"):
            ask("dpoo")
    with pytest.raises(ValueError, match="cannot be mixed"):
        loss_weights({"kto": 1.0, "sft": 0.1})
    with pytest.raises(ValueError, match="empty"):
        loss_weights({})


def test_register_adds_a_declared_loss_once():
    def margin_loss(batch: PairLogps, *, beta: float, gamma: float = 0.0) -> LossOutput:
        chosen, rejected = beta * batch.policy_chosen_logps, beta * batch.policy_rejected_logps
        return LossOutput.of(torch.nn.functional.softplus(rejected - chosen + gamma), chosen, rejected)

    try:
        register(LossSpec("margin_test", margin_loss, reference_free=True))
        assert not needs_reference({"margin_test": 1.0, "simpo": 1.0})
        with pytest.raises(ValueError, match="registered already"):
            register(LossSpec("margin_test", margin_loss))
    finally:
        LOSSES.pop("margin_test", None)
    with pytest.raises(ValueError, match=r"no train\.\* key sets"):
        LossSpec("bad", lambda batch, *, beta, temperature=1.0: None)
