"""The demo's VADER judge: verdicts by compound score, alone and in the both-orders protocol."""

import numpy as np
import pytest

from pipeline.config import EvaluateConfig
from pipeline.demo.sentiment_judge import VaderJudge, vader_judge
from pipeline.evaluation.judges import Judge, judge_both_orders


def test_vader_judge_picks_the_clearly_positive_text_in_either_position():
    judge: Judge = VaderJudge()
    prompts = ["This new drama was", "This new drama was"]
    good, bad = " wonderful, with a superb cast.", " awful, with a terrible cast."
    assert judge.judge(prompts, [good, bad], [bad, good]) == ["A", "B"]


def test_vader_judge_calls_near_equal_texts_a_tie():
    judge = VaderJudge(tie_margin=0.05)
    assert judge.judge(["The film"], [" was about a man."], [" was about a dog."]) == ["tie"]


def test_vader_judge_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="prompts, first and second differ in length: 1, 2, 1"):
        VaderJudge().judge(["p"], [" a", " b"], [" c"])


def test_both_orders_with_vader_credits_the_positive_policy():
    prompts = ["This film was"] * 3
    policy = [" superb and moving.", " wonderful.", " a film."]
    baseline = [" dreadful.", " awful and dull.", " a picture."]
    result = judge_both_orders(VaderJudge(), prompts, policy, baseline)
    np.testing.assert_array_equal(result.scores, [1.0, 1.0, 0.5])


def test_the_entry_point_builds_the_default_judge():
    assert vader_judge(EvaluateConfig()) == VaderJudge()
