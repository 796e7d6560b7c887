"""Train workers receive the frozen config the driver loaded and checked, not a dict rebuilt from it."""

from __future__ import annotations

import pickle

import pytest

from pipeline.config import ConfigError, LoraConfig, TrainConfig, load_config
from pipeline.runtime.tracking import tracking_run


def test_what_a_worker_receives_is_the_drivers_train_section():
    from pipeline.stages.train_worker import LOOP_KEY, TrainLoopConfig

    config = load_config(None, ["train.lora={r: 4, alpha: 8}", "train.loss=[sigmoid, sft]"])
    loop = TrainLoopConfig(
        train=config.train,
        model_path="m",
        trust_remote_code=False,
        attn_implementation=None,
        total_steps=3,
        with_reference=True,
        run_dir="runs/x",
        attempt="a",
        tracking=tracking_run(config.train, "runs/x", "a"),
        params={"train.beta": "0.1"},
    )
    received = pickle.loads(pickle.dumps({LOOP_KEY: loop}))[LOOP_KEY]  # what Ray does on the way
    assert received == loop and isinstance(received.train.lora, LoraConfig)
    with pytest.raises(AttributeError):
        received.train = TrainConfig()  # frozen: a worker cannot change what it trains on


def test_a_train_section_with_a_lora_mapping_instead_of_a_lora_config_is_refused():
    """Only the YAML loader builds sections from mappings; a TrainConfig given a dict is a slip, not patched."""
    with pytest.raises(ConfigError, match=r"train\.lora: expected a LoraConfig"):
        TrainConfig(lora={"r": 4})  # type: ignore[arg-type]
