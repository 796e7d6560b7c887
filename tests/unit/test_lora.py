"""LoRA through PEFT, one worker without Ray: at learning rate 0 the DPO loss is log 2 (the adapters
start as the identity); with a learning rate it learns; the base weights never move; the merged
export gives the log-probs of base plus adapter, and so does the adapter alone loaded onto its base."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pipeline.config import LoraConfig, TrainConfig
from pipeline.model.logps.dispatch import batch_sequence_logps
from pipeline.model.pretrained import load_model, load_tokenizer
from pipeline.training.export import ADAPTER_DIR, export_pretrained
from pipeline.training.objectives import objective_for
from pipeline.training.policy import load_policy, make_optimizer
from pipeline.training.step import train_step
from tests.helpers.distributed_runs import CPU, step_batches
from tests.helpers.micro_batches import pair_rows

LORA = LoraConfig(r=4, alpha=8.0, target_modules="all-linear")


def logps(model, rows: dict) -> torch.Tensor:
    """Log-probs of every chosen and rejected response of `rows` under `model`: (2N,)."""
    prompts = list(rows["prompt_ids"])
    with torch.no_grad():
        out, _, _ = batch_sequence_logps(
            model, prompts + prompts, list(rows["chosen_ids"]) + list(rows["rejected_ids"]), pad_id=1, device=CPU
        )
    return out


@pytest.fixture(scope="module")
def rows(tiny_llama_dir):
    """Eight pairs, repeated for six steps, with reference log-probs from the base model itself."""
    base = pair_rows(8, seed=2)
    ref = logps(load_model(tiny_llama_dir).eval(), base).tolist()
    base["ref_chosen_logps"], base["ref_rejected_logps"] = ref[:8], ref[8:]
    return {k: list(v) * 6 for k, v in base.items()}


def train(model_dir: str, rows: dict, *, learning_rate: float, steps: int):
    config = TrainConfig(
        loss="dpo", beta=0.1, learning_rate=learning_rate, batch_size=8, micro_batch_size=4, lora=LORA, seed=0
    )
    model = load_policy(model_dir, config, device=CPU)
    optimizer = make_optimizer(model, config, device=CPU)
    objective = objective_for(config, pad_id=1, device=CPU, with_reference=True)
    losses = [
        train_step(
            model,
            optimizer,
            step_batches(rows, config, step, rank=0, world=1),
            objective=objective,
            lr=learning_rate,
            max_grad_norm=1.0,
        ).loss_metrics
        for step in range(steps)
    ]
    return model.eval(), losses


def test_at_learning_rate_zero_the_loss_is_log_2(tiny_llama_dir, rows):
    _, metrics = train(tiny_llama_dir, rows, learning_rate=0.0, steps=2)
    for m in metrics:
        assert m["loss"] == pytest.approx(math.log(2), abs=1e-6)
        assert m["rewards/margins"] == pytest.approx(0.0, abs=1e-6)


@pytest.fixture(scope="module")
def trained(tiny_llama_dir, rows):
    return train(tiny_llama_dir, rows, learning_rate=1e-2, steps=6)


def test_it_learns_and_the_base_weights_stay(trained, tiny_llama_dir):
    model, metrics = trained
    assert metrics[-1]["loss"] < math.log(2) - 0.1 and metrics[-1]["rewards/accuracies"] > 0.5
    base = load_model(tiny_llama_dir).state_dict()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    for name, value in model.state_dict().items():
        if "lora_" not in name:
            torch.testing.assert_close(
                value, base[name.removeprefix("base_model.model.").replace(".base_layer.", ".")], atol=0, rtol=0
            )


def test_merged_export_and_adapter_give_the_trained_log_probs(trained, tiny_llama_dir, rows, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, _ = trained
    export_pretrained(model, load_tokenizer(tiny_llama_dir), str(tmp_path), rank=0)
    want = logps(model, rows)
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    torch.testing.assert_close(logps(merged, rows), want, atol=1e-5, rtol=0)
    adapter_dir = tmp_path / ADAPTER_DIR
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == tiny_llama_dir
    on_base = PeftModel.from_pretrained(load_model(tiny_llama_dir), str(adapter_dir)).eval()
    torch.testing.assert_close(logps(on_base, rows), want, atol=1e-5, rtol=0)
    assert logps(load_model(tiny_llama_dir).eval(), rows).sub(want).abs().max() > 1e-3  # the adapter matters


def test_without_merge_the_export_is_the_adapter_that_transformers_loads(trained, tiny_llama_dir, rows, tmp_path):
    from transformers import AutoModelForCausalLM

    model, _ = trained
    export_pretrained(model, load_tokenizer(tiny_llama_dir), str(tmp_path), rank=0, merge=False)
    assert not list(tmp_path.glob("model*.safetensors")) and (tmp_path / "adapter_model.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(
        str(tmp_path)
    ).eval()  # base from the adapter's config, then the adapter
    torch.testing.assert_close(logps(loaded, rows), logps(model, rows), atol=1e-5, rtol=0)
