"""Rewards and judges by name, found through the entry points the installed package declares."""

import dataclasses

import numpy as np
import pytest

from pipeline.config import EvaluateConfig, load_config
from pipeline.evaluation.api_judge import ApiJudge
from pipeline.evaluation.plugins import JUDGE_GROUP, REWARD_GROUP, make_judge, make_reward, registered


def test_the_demo_registers_its_reward_and_judge():
    assert "vader" in registered(REWARD_GROUP)
    assert "vader" in registered(JUDGE_GROUP)


def test_a_registered_reward_by_name():
    reward = make_reward("vader")
    scores = reward(["This film was wonderful.", "This film was awful."])
    assert scores.dtype == np.float64 and scores.shape == (2,)
    assert scores[0] > 0 > scores[1]


def test_no_reward_is_none():
    assert make_reward(None) is None


def test_a_registered_judge_by_name():
    judge = make_judge(EvaluateConfig(judge="vader"))
    assert judge.name == "vader"
    assert judge.judge(["This film was"], [" wonderful."], [" awful."]) == ["A"]


def test_unknown_names_list_the_known_ones():
    with pytest.raises(ValueError, match=r"evaluate\.reward: unknown reward 'sparkle' \(known: .*vader.*null"):
        make_reward("sparkle")
    with pytest.raises(ValueError, match=r"evaluate\.judge: unknown judge 'oracle' \(known: api, .*vader"):
        make_judge(EvaluateConfig(judge="oracle"))


def test_the_api_judge_is_built_in():
    config = dataclasses.replace(
        EvaluateConfig(), judge="api", judge_api={"base_url": "http://127.0.0.1:9/v1", "model": "m", "task": "dialogue"}
    )
    judge = make_judge(config)
    assert isinstance(judge, ApiJudge)
    assert judge.name == "api:m" and judge.config.task == "dialogue"
    assert "api" not in registered(JUDGE_GROUP)  # evaluation's own, not an entry point


def test_api_judge_section_is_checked_by_its_owner():
    config = load_config(None, ["evaluate.judge=api", "evaluate.judge_api={base_url: 'http://127.0.0.1:9', model: m}"])
    assert make_judge(config.evaluate).name == "api:m"
    bad = load_config(None, ["evaluate.judge=api", "evaluate.judge_api={base_url: x, modle: m}"])
    with pytest.raises(ValueError, match=r"evaluate\.judge_api\.modle: unknown key"):
        make_judge(bad.evaluate)


def test_evaluate_refuses_what_it_cannot_honour_before_any_stage_runs():
    """The planner runs each stage's check before the first stage: a typo in the judge must not wait for
    tokenize, score and train to finish before it is reported."""
    from pipeline.config import ConfigError, load_config
    from pipeline.stages import EVALUATE
    from pipeline.stages.base import check, failed_stage

    refused = {
        "evaluate.judge=oracle": r"evaluate\.judge: unknown judge 'oracle'",
        "evaluate.reward=sparkle": r"evaluate\.reward: unknown reward 'sparkle'",
        "evaluate.judge=api": r"evaluate\.judge_api: base_url, model not set",  # an API judge with no settings
        "evaluate.max_actors=0": r"evaluate\.max_actors must be at least 1",
    }
    for override, message in refused.items():
        with pytest.raises(ValueError, match=message) as err:
            check(EVALUATE, load_config(None, [override]))
        assert failed_stage(err.value) == "evaluate" and isinstance(err.value, ConfigError)  # exit 2, no traceback
    check(EVALUATE, load_config(None, ["evaluate.judge=vader", "evaluate.reward=vader"]))  # the demo's: fine
