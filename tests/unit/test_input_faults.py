"""Inputs and steps that must not abort a run blindly, without Ray: JSON nested past Python's limit is a
counted `malformed_json` row, a max_length beyond the model's context is a config error, a non-finite
training step leaves the weights alone, and a failure reads as one line."""

from __future__ import annotations

import json
import math

import pyarrow as pa
import pytest
import torch

from pipeline.config import ConfigError, TrainConfig, load_config
from pipeline.data.encode import process_records
from pipeline.data.records import RECORD_SCHEMA
from pipeline.data.sources import read_records
from pipeline.model.pretrained import load_model, load_tokenizer
from pipeline.stages.base import one_line
from pipeline.stages.tokenize import check_context
from pipeline.training.objectives import objective_for
from pipeline.training.step import train_step
from pipeline.training.step_plan import checkpoint_every
from tests.helpers.micro_batches import pair_rows

CPU = torch.device("cpu")


def test_json_nested_past_the_recursion_limit_is_a_malformed_row_not_a_crash(tmp_path, tiny_model_dir):
    path = tmp_path / "deep.jsonl"
    good = json.dumps({"prompt": "review 1:", "chosen": " good", "rejected": " bad"})
    deep_prompt = '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + ', "chosen": " a", "rejected": " b"}'
    deep_object = (
        '{"prompt": "p", "chosen": " a", "rejected": " b", "meta": ' + '{"a": ' * 50_000 + "1" + "}" * 50_000 + "}"
    )
    path.write_text("\n".join([good, deep_prompt, deep_object, good.replace("1:", "2:")]) + "\n")
    records = read_records(str(path))
    assert records["read_error"].to_pylist() == [None, "malformed_json", "malformed_json", None]
    # The raw text is kept for the rejected.jsonl, whatever its depth.
    assert records["raw"][1].as_py() == deep_prompt
    outcomes = process_records(records, load_tokenizer(str(tiny_model_dir)), max_prompt_length=16, max_length=32)
    assert outcomes["reason"].to_pylist() == [None, "malformed_json", "malformed_json", None]
    # The worker's own parse refuses such a row the same way, were one to reach it unmarked.
    unmarked = pa.table({"source": ["x:1"], "raw": [deep_prompt], "read_error": [None]}, schema=RECORD_SCHEMA)
    reasons = process_records(unmarked, load_tokenizer(str(tiny_model_dir)), max_prompt_length=16, max_length=32)[
        "reason"
    ]
    assert reasons.to_pylist() == ["malformed_json"]


def test_max_length_beyond_the_models_context_is_a_config_error(tiny_model_dir):
    fits = load_config(None, [f"model.path={tiny_model_dir}", "tokenize.max_length=128"])
    check_context(fits)  # the tiny model has 128 positions
    beyond = load_config(None, [f"model.path={tiny_model_dir}", "tokenize.max_length=512"])
    with pytest.raises(
        ConfigError,
        match=r"tokenize.max_length \(512\) is beyond the context of the model at .* "
        r"\(128 positions, its config's n_positions\); set tokenize.max_length to at most 128",
    ):
        check_context(beyond)


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_a_step_with_a_non_finite_loss_leaves_weights_and_optimizer_alone(tiny_model_dir, bad):
    model = load_model(str(tiny_model_dir))
    train = TrainConfig(loss="dpo", beta=0.1, learning_rate=1e-3)
    objective = objective_for(train, pad_id=1, device=CPU, with_reference=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    good = pair_rows(4)
    first = train_step(model, optimizer, [good], objective=objective, lr=1e-3, max_grad_norm=1.0)
    assert first.updated and first.local_loss_finite
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    moments = {k: v["exp_avg"].clone() for k, v in optimizer.state.items()}
    corrupt = {**good, "ref_chosen_logps": [float(bad)] + good["ref_chosen_logps"][1:]}
    result = train_step(model, optimizer, [corrupt], objective=objective, lr=1e-3, max_grad_norm=1.0)
    assert not result.updated and not result.local_loss_finite
    assert not math.isfinite(result.loss_metrics["loss"]) or not math.isfinite(result.grad_norm)
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    for k, v in optimizer.state.items():
        assert torch.equal(v["exp_avg"], moments[k])
    assert all(p.grad is None for p in model.parameters())  # nothing carried into the next step
    assert train_step(model, optimizer, [good], objective=objective, lr=1e-3, max_grad_norm=1.0).updated


def test_checkpoints_come_about_every_tenth_of_the_run_by_default():
    assert checkpoint_every(TrainConfig(), 100) == 10
    assert checkpoint_every(TrainConfig(), 7) == 1
    assert checkpoint_every(TrainConfig(checkpoint_steps=0), 100) == 0
    assert checkpoint_every(TrainConfig(checkpoint_steps=25), 100) == 25
    config = load_config(None, ["train.checkpoint_steps=5", "train.max_failures=1", "train.nonfinite=skip"])
    assert (config.train.checkpoint_steps, config.train.max_failures, config.train.nonfinite) == (5, 1, "skip")
    assert load_config(None, ["ray.max_retries=1"]).ray.max_retries == 1


def test_a_failure_reads_as_one_line():
    assert one_line(ValueError("train.beta: expected a number")) == "train.beta: expected a number"
    assert one_line(KeyError("id")) == "KeyError: 'id'"
    multi = RuntimeError("score/train: 3 rows\nwritten for 4")
    assert one_line(multi) == "score/train: 3 rows written for 4"
    assert len(one_line(RuntimeError("x" * 5000))) == 600
