"""The model card, train/final/README.md: what the hub reads (base model, datasets), the data, the loss and
its settings, the last metrics, and the evaluation once it ran; and a card rewritten by the evaluate stage
leaves the train stage finished (cards are in no manifest)."""

from __future__ import annotations

from pipeline.config import load_config
from pipeline.evaluation.model_card import model_card, with_evaluation
from pipeline.runtime.storage import RunDir
from pipeline.stages.base import Stage, execute, is_current

SUMMARY = {
    "judge": "api",
    "judge_name": "api:gpt-4o-mini",
    "reward": None,
    "num_prompts": 32,
    "rows": [
        {
            "model": "policy",
            "temperature": 1.0,
            "kl_mean": 3.25,
            "reward_mean": None,
            "win_rate": 0.6,
            "win_rate_ci_low": 0.5,
            "win_rate_ci_high": 0.7,
        },
        {"model": "reference", "temperature": 1.0, "kl_mean": 0.0, "reward_mean": None, "win_rate": None},
    ],
    "implicit_reward_accuracy": {"kind": "pairs", "pairs": 40, "accuracy": 0.675, "margin_mean": 0.31},
    "skipped": [{"what": "task reward", "why": "evaluate.reward is not set", "enable": "set evaluate.reward"}],
}


def card(**settings) -> str:
    config = load_config(
        None,
        [
            "run_dir=/runs/helpful",
            "model.path=my-org/sft-7b",
            "data.path=hf://datasets/my-org/prefs",
            "train.loss=dpo",
            "train.beta=0.05",
            *(f"{k}={v}" for k, v in settings.items()),
        ],
    )
    return model_card(
        config,
        loss_keys={"beta": 0.05, "label_smoothing": 0.0},
        data_counts={"rows_train": 900, "rows_eval": 40, "dropped": {"too_long": 3}},
        steps=28,
        final_metrics={"step": 28, "loss": 0.51, "rewards/accuracies": 0.8, "rewards/margins": 0.9},
    )


def test_the_card_names_base_model_data_loss_settings_and_metrics():
    text = card()
    assert text.startswith("---\nlibrary_name: transformers\n")
    assert "base_model: my-org/sft-7b" in text and "datasets: [my-org/prefs]" in text
    assert "# helpful: dpo on prefs" in text
    assert "trained on 900 rows; 40 held out by prompt (0.05)" in text and "too_long 3" in text
    assert "| beta | 0.05 |" in text and "| label_smoothing | 0.0 |" in text and "| steps | 28 |" in text
    assert "loss 0.51, rewards/accuracies 0.8, rewards/margins 0.9" in text
    assert "Not evaluated yet" in text


def test_a_mix_of_losses_is_named_with_its_weights_in_either_form():
    """train.loss as a mapping, or as TRL's list with train.loss_weights: the card names each loss and weight."""
    assert "# helpful: 1·dpo + 0.1·sft on prefs" in card(**{"train.loss": "{dpo: 1.0, sft: 0.1}"})
    mixed = card(**{"train.loss": "[sigmoid, bco_pair]", "train.loss_weights": "[0.8, 0.2]"})
    assert "# helpful: 0.8·dpo + 0.2·bco_pair on prefs" in mixed


def test_the_evaluation_is_added_in_place_of_the_placeholder():
    text = with_evaluation(card(), SUMMARY)
    assert "Not evaluated yet" not in text and text.count("## Evaluation") == 1
    assert "Judge: api:gpt-4o-mini; reward: none; 32 held-out prompts" in text
    assert "| policy | 1 | 3.25 | – | 0.600 [0.500, 0.700] |" in text
    assert "Held-out implicit-reward accuracy: 0.675 on 40 pairs (mean margin 0.31)." in text
    assert "Not judged: task reward (evaluate.reward is not set)." in text
    assert with_evaluation(text, SUMMARY) == text  # rewriting it again changes nothing


def test_a_rewritten_card_leaves_its_stage_finished(tmp_path):
    def body(run):
        run.writer.write_text("final/model.bin", "weights")
        run.writer.write_text("final/README.md", "card v1")
        return {"rows_out": 1}

    stage = Stage(name="train", sections=("train.beta",), body=body, input_hash=lambda c: "in")
    config = load_config(None, [f"run_dir={tmp_path / 'run'}"])
    manifest = execute(stage, config)
    assert list(manifest["files"]) == ["final/model.bin"]  # the card is in no manifest
    run = RunDir(config.run_dir)
    run.write_text("train/final/README.md", "card v2, with the evaluation")
    assert is_current(stage, config, run, "in")
