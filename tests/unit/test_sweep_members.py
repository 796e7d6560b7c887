"""`dpo sweep` over whole members (`--set "train=[{...}, ...]"`), as the loss table's sweep runs: each
mapping one member, named by its settings, and one score stage for all of them."""

from __future__ import annotations

import pytest

from pipeline.cli.sweep import members, shared_stages_config
from pipeline.config import ConfigError
from pipeline.stages import SCORE


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(f"run_dir: {tmp_path / 'run'}\ntrain: {{loss: simpo, beta: 2.0}}\n")
    return str(path)


def test_members_listed_whole_each_take_their_own_train_keys(config):
    base, sweep = members(config, ["train=[{loss: dpo}, {loss: sigmoid, ld_alpha: 0.5}, {loss: ipo, beta: 0.5}]"])
    assert [m.name for m in sweep] == ["loss-dpo", "loss-sigmoid_ldalpha-0.5", "loss-ipo_beta-0.5"]
    trains = [m.config.train for m in sweep]
    assert [(t.loss, t.beta, t.ld_alpha) for t in trains] == [
        ("dpo", 2.0, None),
        ("sigmoid", 2.0, 0.5),
        ("ipo", 0.5, None),
    ]
    assert sweep[1].config.run_dir == f"{base.run_dir}/sweep/loss-sigmoid_ldalpha-0.5"


def test_one_score_stage_serves_every_member_prefix_log_probs_included(config):
    """The base's simpo needs no score stage; the shared stages take the member that reads prefix
    log-probs, so its score stage also serves the members that do not read them."""
    base, sweep = members(config, ["train=[{loss: simpo}, {loss: dpo}, {loss: dpo, ld_alpha: 0.5}]"])
    shared = shared_stages_config(base, sweep)
    assert SCORE.enabled(shared) and shared.train.ld_alpha == 0.5
    _, plain = members(config, ["train=[{loss: simpo}, {loss: dpo}]"])
    assert shared_stages_config(base, plain).train.loss == "dpo"


def test_a_member_that_is_not_a_mapping_is_refused(config):
    with pytest.raises(ConfigError, match="train: a sweep over whole members lists mappings"):
        members(config, ["train=[dpo, {loss: ipo}]"])
    with pytest.raises(ConfigError, match=r"train\.bta: unknown key"):
        members(config, ["train=[{bta: 0.1}]"])
