"""The demo task: generated reviews, prompts, SFT rows, VADER reward and pair labelling."""

import numpy as np
import pytest

from pipeline.demo import task as demo_task


@pytest.fixture(scope="module")
def reviews() -> list[str]:
    return demo_task.generate_reviews(300, seed=0)


def test_reviews_are_deterministic_per_seed_and_differ_across_seeds(reviews):
    assert demo_task.generate_reviews(300, seed=0) == reviews
    other = demo_task.generate_reviews(50, seed=1)
    assert other != reviews[:50]
    assert len(set(other) & set(reviews)) < 5  # different seeds give (almost) disjoint corpora


def test_reviews_are_short_single_line_ascii(reviews):
    assert len(reviews) == 300
    for text in reviews:
        assert text.isascii() and "\n" not in text and text == text.strip()
        assert 12 <= len(text.split()) <= 30, text
    assert len(set(reviews)) > 290


def test_compound_scores_spread_over_the_range_not_only_the_extremes(reviews):
    scores = demo_task.sentiment_reward(reviews)
    assert (scores < -0.5).mean() > 0.15
    assert (scores > 0.5).mean() > 0.15
    # A uniform spread puts half the reviews in (-0.5, 0.5); a bimodal one almost none.
    assert 0.35 < (np.abs(scores) < 0.5).mean() < 0.65
    assert (np.abs(scores) < 0.2).mean() > 0.1


def test_sentiment_words_come_from_vader_lexicon_with_the_right_sign():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    lexicon = SentimentIntensityAnalyzer().lexicon
    vocab = demo_task.sentiment_words()
    total = 0
    for by_sign in vocab.values():
        for sign, words in by_sign.items():
            assert words, "every part of speech has words of both signs"
            for word in words:
                assert word.isalpha() and len(word) >= 3
                assert sign * lexicon[word] >= 1.0, word
            total += len(words)
    assert total >= 200


@pytest.mark.parametrize("prefix_words", [2, 3, 4])
def test_prompts_are_neutral_prefixes_of_reviews(prefix_words):
    prompts = demo_task.review_prompts(60, seed=5, prefix_words=prefix_words)
    assert prompts == demo_task.review_prompts(60, seed=5, prefix_words=prefix_words)
    full = demo_task.generate_reviews(60, seed=5)
    for prompt, text in zip(prompts, full):
        assert len(prompt.split()) == prefix_words
        assert text.startswith(prompt + " ")
    assert np.all(demo_task.sentiment_reward(prompts) == 0.0)
    assert len(set(prompts)) > 20


def test_prompt_word_count_is_validated():
    with pytest.raises(ValueError, match=r"prefix_words must be in \[2, \d+\], got 1"):
        demo_task.review_prompts(3, seed=0, prefix_words=1)


def test_sft_rows_rebuild_the_review_and_have_a_different_rejected():
    rows = demo_task.sft_rows(60, seed=3)
    full = demo_task.generate_reviews(61, seed=3)
    assert len(rows) == 60
    for row, text in zip(rows, full):
        assert set(row) == {"prompt", "chosen", "rejected"}
        assert row["prompt"] + row["chosen"] == text
        assert row["chosen"].startswith(" ") and not row["prompt"].endswith(" ")
        assert row["rejected"].startswith(" ")
        assert row["chosen"] != row["rejected"]


def test_sentiment_reward_is_float64_in_range():
    scores = demo_task.sentiment_reward(["This film was wonderful.", "This film was awful.", "A film."])
    assert scores.dtype == np.float64 and scores.shape == (3,)
    assert scores[0] > 0.3 and scores[1] < -0.3 and scores[2] == 0.0
    assert demo_task.sentiment_reward([]).shape == (0,)


def test_label_pairs_prefers_the_higher_reward_by_at_least_min_gap():
    prompt = "This new drama was"
    completions = [
        " wonderful and moving.",
        " awful and dull.",
        " a film.",
        " wonderful and moving.",
        " not very good.",
    ]
    pairs = demo_task.label_pairs(prompt, completions, min_gap=0.2)
    assert pairs
    for pair in pairs:
        assert set(pair) == {"prompt", "chosen", "rejected"} and pair["prompt"] == prompt
        assert pair["chosen"] != pair["rejected"]
        chosen, rejected = demo_task.sentiment_reward([prompt + pair["chosen"], prompt + pair["rejected"]])
        assert chosen - rejected >= 0.2
    # The duplicated completion is paired once, never with itself.
    keys = [(p["chosen"], p["rejected"]) for p in pairs]
    assert len(keys) == len(set(keys))
    assert (" wonderful and moving.", " awful and dull.") in keys
    assert (" awful and dull.", " wonderful and moving.") not in keys


def test_label_pairs_with_equal_rewards_gives_no_pairs_and_rejects_zero_gap():
    assert demo_task.label_pairs("A film", [" about a man.", " about a dog."]) == []
    with pytest.raises(ValueError, match=r"min_gap must be > 0, got 0\.0"):
        demo_task.label_pairs("A film", [" x", " y"], min_gap=0.0)
