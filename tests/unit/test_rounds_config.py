"""The rounds config: each round's stages run with pi_{t-1} as the policy and the reference the user asked
for; what `dpo iterate` cannot run is refused before Ray starts, naming the key; the demo's rounds reuse the
ordinary demo's stage; the per-round table and the trackers' values come from the summary rows."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_config
from pipeline.demo.prepare import DEMO
from pipeline.evaluation.rounds_summary import rounds_table, tracker_values
from pipeline.rounds.layout import evaluate_config, policy, reference, round_config
from pipeline.rounds.refusals import check_rounds
from pipeline.stages import SCORE, TOKENIZE, TRAIN
from pipeline.stages.generate import GENERATE
from pipeline.stages.label import LABEL

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def rounds(*overrides: str):
    base = ["run_dir=/runs/r", "data.path=/data/prompts.jsonl", "model.path=/models/sft", "rounds.count=3"]
    return load_config(None, [*base, *overrides])


def test_round_t_samples_and_trains_from_the_previous_rounds_policy():
    config = rounds()
    first, third = round_config(config, 1), round_config(config, 3)
    assert first.model.path == "/models/sft" and third.model.path == "/runs/r/rounds/2/train/final"
    assert third.run_dir == "/runs/r/rounds/3"
    assert third.data.path == "/runs/r/rounds/3/label/scored" and third.data.format == "scored"
    assert third.data.eval_fraction == 0.0  # held-out prompts are kept out before sampling, not after
    assert policy(config, 0) == "/models/sft" and policy(config, 3) == "/runs/r/rounds/3/train/final"
    # Every round's evaluation runs with the run's own model section: pi_0 is its reference for KL.
    assert evaluate_config(config, 2).model == config.model


def test_the_reference_is_pi_0_or_the_previous_policy_and_the_score_stage_sees_the_difference():
    initial, previous = rounds("rounds.reference=initial"), rounds("rounds.reference=previous")
    assert [reference(initial, t) for t in (1, 2, 3)] == ["/models/sft"] * 3
    assert [reference(previous, t) for t in (1, 2, 3)] == [
        "/models/sft",
        "/runs/r/rounds/1/train/final",
        "/runs/r/rounds/2/train/final",
    ]
    assert round_config(previous, 3).model.reference == "/runs/r/rounds/2/train/final"
    # Round 1 is the same either way; from round 2 on, changing the reference reruns score (and what follows).
    assert SCORE.config_hash(round_config(initial, 1)) == SCORE.config_hash(round_config(previous, 1))
    assert SCORE.config_hash(round_config(initial, 2)) != SCORE.config_hash(round_config(previous, 2))
    # ... but not generate, label or tokenize of a round: they do not read the reference.
    assert TOKENIZE.config_hash(round_config(initial, 2)) == TOKENIZE.config_hash(round_config(previous, 2))
    assert TRAIN.config_hash(round_config(initial, 2)) != TRAIN.config_hash(round_config(previous, 2))


def test_more_rounds_leave_the_finished_rounds_stages_as_they_were():
    two, five = round_config(rounds("rounds.count=2"), 2), round_config(rounds("rounds.count=5"), 2)
    for stage in (GENERATE, LABEL, TOKENIZE, SCORE, TRAIN):
        assert stage.config_hash(two) == stage.config_hash(five), stage.name


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["rounds.count=0"], "rounds.count"),
        (["data.path="], "data.path"),
        (["generate.max_tokens=600"], "generate.max_tokens"),
        (["train.loss=kto"], "train.loss"),
        (["label.kind=reward"], "label.reward"),
        (["label.kind=reward", "label.reward=nosuchreward"], "label.reward"),
        (["label.kind=reward_model"], "label.model"),
        (["label.kind=judge", "label.judge=local"], "label.model"),
        (["label.kind=judge", "label.judge=nosuchjudge"], "label.judge"),
        (["label.kind=judge", "label.judge=api", "label.judge_api={model: m}"], "label.judge_api"),
        (["label.kind=reward", "label.reward=vader", "evaluate.reward=nosuchreward"], "evaluate.reward"),
    ],
)
def test_check_rounds_names_the_key_to_change(overrides, key):
    with pytest.raises(ConfigError, match=rf"^{key}[.:\[ ]"):
        check_rounds(rounds(*overrides))


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("rounds.reference=latest", "rounds.reference"),
        ("rounds.samples_per_prompt=1", "rounds.samples_per_prompt"),
        ("label.kind=votes", "label.kind"),
        ("generate.engine=tgi", "generate.engine"),
        ("generate.gpus_per_actor=1.5", "generate.gpus_per_actor"),
        ("rounds.cout=2", "rounds.cout"),
    ],
)
def test_a_bad_rounds_value_fails_on_loading_naming_its_key(override, key):
    with pytest.raises(ConfigError, match=rf"^{key}:"):
        rounds(override)


def test_a_runnable_rounds_config_passes_the_check():
    check_rounds(rounds("label.kind=reward", "label.reward=vader"))


def test_the_demos_rounds_reuse_the_ordinary_demos_stage():
    demo, demo_rounds = load_config(CONFIGS / "demo.yaml"), load_config(CONFIGS / "demo_rounds.yaml")
    assert demo_rounds.run_dir == demo.run_dir
    assert DEMO.config_hash(demo_rounds) == DEMO.config_hash(demo)  # make demo-rounds does not redo the SFT model
    assert demo_rounds.model.path == demo.model.path
    check_rounds(demo_rounds)


def test_the_per_round_table_and_the_trackers_values():
    rows = [
        {"round": 0, "temperature": 1.0, "reward_mean": 0.1, "reward_ci_low": 0.0, "reward_ci_high": 0.2},
        {
            "round": 1,
            "temperature": 1.0,
            "reward_mean": 0.5,
            "reward_ci_low": 0.4,
            "reward_ci_high": 0.6,
            "kl_mean": 3.25,
            "win_rate_vs_initial": 0.75,
            "win_rate_vs_initial_ci_low": 0.6,
            "win_rate_vs_initial_ci_high": 0.9,
            "win_rate_vs_previous": 0.75,
            "win_rate_vs_previous_ci_low": 0.6,
            "win_rate_vs_previous_ci_high": 0.9,
        },
    ]
    rows[0]["kl_mean"] = 0.0
    table = rounds_table(rows).splitlines()
    assert table[2] == "| 0 | 1 | 0.100 [0.000, 0.200] | 0.00 | \u2013 | \u2013 |"
    assert table[3] == "| 1 | 1 | 0.500 [0.400, 0.600] | 3.25 | 0.750 [0.600, 0.900] | 0.750 [0.600, 0.900] |"
    values = tracker_values(rows)
    assert values[1]["rounds/win_rate_vs_initial/T1"] == 0.75 and "rounds/win_rate_vs_initial/T1" not in values[0]


def test_the_docs_config_block_loads_and_passes_the_check(tmp_path):
    docs = Path(__file__).resolve().parents[2] / "docs" / "rounds.md"
    (block,) = re.findall(r"```yaml\n(.*?)```", docs.read_text(), re.S)
    path = tmp_path / "rounds.yaml"
    path.write_text(block)
    check_rounds(load_config(path))
