"""train.loss as a TRL user writes it, and the loss keys checked before anything runs: each refusal is a
ConfigError naming the key to change."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import yaml
from torch.testing import assert_close

from pipeline.config import ConfigError, TrainConfig, load_config
from pipeline.training.losses import (
    ALIASES,
    LOSSES,
    PairLogps,
    check_loss_config,
    choice_of,
    compute_loss,
    loss_weights,
)

# Every loss_type of TRL 1.16's DPOConfig (trl/trainer/dpo_config.py, its help text).
TRL_LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


BATCH = PairLogps(
    policy_chosen_logps=t(-4.0, -7.0),
    policy_rejected_logps=t(-6.0, -4.0),
    ref_chosen_logps=t(-5.0, -5.0),
    ref_rejected_logps=t(-5.0, -5.0),
    chosen_lengths=t(2, 4),
    rejected_lengths=t(4, 2),
)


def test_every_trl_loss_type_is_accepted_under_trls_name():
    for name in TRL_LOSS_TYPES:
        (ours,) = loss_weights(name)
        assert LOSSES[ours].trl, name
        check_loss_config(TrainConfig(loss=name, label_smoothing=0.1 if name == "exo_pair" else 0.0))
    assert ALIASES == {"sigmoid": "dpo"}
    assert_close(compute_loss("sigmoid", BATCH, beta=0.1).loss, compute_loss("dpo", BATCH, beta=0.1).loss)


def test_a_list_of_names_is_weighted_by_loss_weights_as_in_trl():
    """TRL's MPO-style mix: loss_type [sigmoid, bco_pair, sft], loss_weights [0.8, 0.2, 1.0]."""
    train = TrainConfig(loss=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0])
    assert choice_of(train) == {"dpo": 0.8, "bco_pair": 0.2, "sft": 1.0}
    assert loss_weights(["dpo", "sft"]) == {"dpo": 1.0, "sft": 1.0}  # no weights: 1.0 each, as TRL
    mixed = compute_loss(train.loss, BATCH, weights=train.loss_weights, beta=0.5)
    parts = [compute_loss(name, BATCH, beta=0.5).loss for name in ("dpo", "bco_pair", "sft")]
    assert_close(mixed.loss, 0.8 * parts[0] + 0.2 * parts[1] + 1.0 * parts[2])


def test_a_list_loss_loads_from_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"train": {"loss": ["sigmoid", "sft"], "loss_weights": [1.0, 0.1]}}))
    train = load_config(path).train
    assert train.loss == ["sigmoid", "sft"] and train.loss_weights == [1.0, 0.1]
    assert load_config(None, ["train.loss={dpo: 1.0, sft: 0.1}"]).train.loss == {"dpo": 1.0, "sft": 0.1}


@pytest.mark.parametrize(
    ("train", "message"),
    [
        (TrainConfig(loss=["dpo", "sft"], loss_weights=[1.0]), r"train\.loss_weights: 1 weights for 2 losses"),
        (TrainConfig(loss={"dpo": 1.0}, loss_weights=[1.0]), r"train\.loss_weights: .*a mapping"),
        (TrainConfig(loss=["sigmoid", "dpo"]), r"train\.loss: 'dpo' is named twice"),
        (TrainConfig(loss="dpoo"), r"train\.loss: unknown loss 'dpoo'; known losses: .*sigmoid"),
        (TrainConfig(loss="exo_pair"), r"train\.label_smoothing: 0\.0; exo_pair needs 0 < label_smoothing < 1"),
        (TrainConfig(loss="robust", label_smoothing=0.5), r"train\.label_smoothing: 0\.5; robust needs"),
        (TrainConfig(loss="dpo", label_smoothing=0.6), r"train\.label_smoothing: 0\.6; dpo needs .*<= 0\.5"),
        (TrainConfig(loss="ipo", beta=0.0), r"train\.beta: 0\.0; ipo needs 0 < beta"),
        (TrainConfig(loss="discopop", discopop_tau=0.0), r"train\.discopop_tau: 0\.0"),
        (TrainConfig(loss="dpop", dpop_lambda=-1.0), r"train\.dpop_lambda: -1\.0"),
        (TrainConfig(loss="dpo", ld_alpha=1.5), r"train\.ld_alpha: 1\.5; LD-DPO needs 0 <= ld_alpha <= 1"),
        (TrainConfig(loss="dpo", f_divergence_type="kl"), r"train\.f_divergence_type: 'kl' is not one of"),
        (
            TrainConfig(loss=["dpo", "nca_pair"], f_divergence_type="js_divergence"),
            r"train\.f_divergence_type: nca_pair has no f-divergence form",
        ),
        (TrainConfig(loss="aot", use_weighting=True), r"train\.use_weighting: aot sorts the step's pairs"),
        (TrainConfig(loss="kto", ld_alpha=0.5), r"train\.ld_alpha: changes paired losses; kto trains on unpaired"),
        (TrainConfig(loss=["kto", "dpo"]), r"train\.loss: kto trains on unpaired rows"),
    ],
)
def test_check_loss_config_refuses_naming_the_key(train, message):
    with pytest.raises(ConfigError, match=message):
        check_loss_config(train)


def test_reference_free_losses_may_share_an_f_divergence_choice():
    """TRL accepts sft beside sigmoid under any f-divergence: sft reads no log-ratio."""
    check_loss_config(TrainConfig(loss=["sigmoid", "sft"], f_divergence_type="forward_kl"))


def test_a_key_no_chosen_loss_reads_is_warned_about(caplog):
    with caplog.at_level(logging.WARNING):
        check_loss_config(TrainConfig(loss="dpo", gamma=1.0, discopop_tau=0.1))
    assert "gamma=1.0, discopop_tau=0.1 set, but no loss of dpo reads them" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        check_loss_config(TrainConfig(loss=["dpo", "simpo"], gamma=1.0))
    assert not caplog.text


def test_compute_loss_applies_the_same_checks():
    with pytest.raises(ConfigError, match=r"train\.label_smoothing"):
        compute_loss("robust", BATCH, beta=0.1, label_smoothing=0.5)
    with pytest.raises(ConfigError, match=r"train\.use_weighting"):
        compute_loss("aot", BATCH, beta=0.1, use_weighting=True)


def test_exo_pair_takes_its_epsilon_from_label_smoothing():
    out = compute_loss("exo_pair", BATCH, beta=0.5, label_smoothing=1e-3)
    m = 1.0  # pair 0: h = 2, beta = 1/2
    expected = (1 / (1 + math.exp(-m))) * (-math.log1p(math.exp(-m)) - math.log(1 - 1e-3)) + (1 / (1 + math.exp(m))) * (
        -math.log1p(math.exp(m)) - math.log(1e-3)
    )
    assert out.terms[0][2].losses[0].item() == pytest.approx(expected)
