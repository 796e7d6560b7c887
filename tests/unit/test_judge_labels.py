"""The judge labeller: each prompt's completions ranked by comparisons in both orders, so that a judge's
position bias gives ties, not a ranking; ties, disagreements and unparsed verdicts counted; best and worst
then paired by the `scored` rules. And the local judge: the API judge's prompt to a chat model, its reply read
by the API judge's parser."""

from __future__ import annotations

import pytest

from pipeline.data.scored import make_pairs
from pipeline.evaluation.generative_judge import GenerativeJudge
from pipeline.evaluation.ranking import rank_by_judge
from tests.helpers.rounds import CHAT_TEMPLATE, SENTENCES


class Scripted:
    """A judge from a rule: `prefer(prompt, first, second)` gives its verdict; every call is recorded."""

    name = "scripted"

    def __init__(self, prefer):
        self.prefer, self.calls = prefer, []

    def judge(self, prompts, first, second):
        self.calls += list(zip(prompts, first, second))
        return [self.prefer(p, a, b) for p, a, b in zip(prompts, first, second)]


def by_length(prompt, first, second):
    """Prefers the longer answer, in either position; equal lengths tie."""
    return "A" if len(first) > len(second) else "B" if len(second) > len(first) else "tie"


def test_a_consistent_judge_ranks_the_completions_and_best_pairs_with_worst():
    texts = ["ok", "a long answer", "mid one", "longest answer of all"]
    judge = Scripted(by_length)
    (scores,), counts = rank_by_judge(judge, ["q"], [texts])
    # Copeland scores: wins over the 3 others, divided by 3.
    assert scores == pytest.approx([0.0, 2 / 3, 1 / 3, 1.0])
    assert make_pairs(scores, pairing="best_vs_worst") == [(3, 0)]
    # Every one of the 6 pairs asked in both orders: 12 verdicts.
    assert len(judge.calls) == 12
    assert {(a, b) for _, a, b in judge.calls} == {(a, b) for a in texts for b in texts if a != b}
    assert (counts.comparisons, counts.decided, counts.ties, counts.unparsed) == (6, 6, 0, 0)


def test_a_judge_that_always_prefers_the_first_answer_ranks_nothing():
    texts = ["one answer", "another", "a third"]
    (scores,), counts = rank_by_judge(Scripted(lambda p, a, b: "A"), ["q"], [texts])
    assert scores == [0.5, 0.5, 0.5]
    assert make_pairs(scores, pairing="best_vs_worst") == []  # tokenize counts such a prompt as no_pair
    assert (counts.decided, counts.ties) == (0, 3)


def test_unparsed_verdicts_are_counted_and_score_as_ties():
    texts = ["good", "bad answer", "ugly"]

    def unreadable_on_ugly(prompt, first, second):
        return "unparsed" if "ugly" in (first, second) else by_length(prompt, first, second)

    (scores,), counts = rank_by_judge(Scripted(unreadable_on_ugly), ["q"], [texts])
    assert counts.unparsed == 2 and counts.decided == 1 and counts.comparisons == 3
    # "bad answer" beat "good"; each scored 0.5 against "ugly", whose comparisons could not be read.
    assert scores == pytest.approx([0.25, 0.75, 0.5])


def test_identical_completions_tie_without_asking_and_prompts_do_not_mix():
    judge = Scripted(by_length)
    scores, counts = rank_by_judge(judge, ["p1", "p2"], [["same", "same", "longer one"], ["x", "yy"]])
    assert counts.identical == 1 and counts.comparisons == 3
    assert all(first != second for _, first, second in judge.calls)
    assert {p for p, _, _ in judge.calls} == {"p1", "p2"}
    assert scores[0] == pytest.approx([0.25, 0.25, 1.0]) and scores[1] == pytest.approx([0.0, 1.0])


@pytest.fixture(scope="module")
def tokenizer():
    from pipeline.demo.tiny_model import train_tokenizer

    return train_tokenizer(SENTENCES * 20, vocab_size=300)


def test_the_local_judge_asks_the_api_judges_prompt_and_reads_its_reply(tokenizer):
    asked = []

    def generate(prompt_ids):
        asked.extend(prompt_ids)
        return ["B is clearer.\nPreferred: B", "no idea", "Preferred: Tie"]

    judge = GenerativeJudge(tokenizer, generate, task="generic", chat_template=CHAT_TEMPLATE)
    verdicts = judge.judge(["p"] * 3, ["first answer", "x", "y"], ["second answer", "z", "w"])
    assert verdicts == ["B", "unparsed", "tie"] and judge.unparsed == 1
    shown = tokenizer.decode(asked[0])
    assert shown.startswith("user: You are comparing two responses") and shown.endswith("assistant:")
    assert "<response A>\nfirst answer\n</response A>" in shown and "Preferred: A" in shown


def test_the_local_judge_keeps_the_end_of_a_prompt_too_long_for_its_model(tokenizer):
    asked = []
    judge = GenerativeJudge(tokenizer, lambda ids: asked.extend(ids) or ["Preferred: A"], max_prompt_tokens=30)
    judge.judge(["p"], ["a"], ["b"])
    full = GenerativeJudge(tokenizer, lambda ids: ["Preferred: A"]).render("p", "a", "b")
    assert len(asked[0]) == 30 and asked[0] == full[-30:]
