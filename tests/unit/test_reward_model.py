"""The reward-model labeller's model: a tiny `...ForSequenceClassification` with one output, built from a
config. A completion's reward is the model's output on the text it reads (its own chat template or the plain
text), the same in a padded batch as alone, and the best and worst completions by it become the pair."""

from __future__ import annotations

import pytest
import torch

from pipeline.data.scored import make_pairs
from pipeline.model.reward_model import RewardModel
from tests.helpers.rounds import make_tiny_reward_model_dir

PROMPTS = ["the movie", "a truly delightful film with a lovely", "an awful"]
COMPLETIONS = [" was great and the acting was wonderful", " cast", " film that I hated and the plot was boring too"]


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def reward_model_dir(request, tmp_path_factory):
    return make_tiny_reward_model_dir(tmp_path_factory.mktemp(f"rm_{request.param}"), arch=request.param)


@pytest.fixture(scope="module")
def templated_dir(tmp_path_factory):
    return make_tiny_reward_model_dir(tmp_path_factory.mktemp("rm_chat"), chat_template=True)


def alone(path, ids: list[int]) -> float:
    """The model's output on one unpadded sequence, computed here without the class under test."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    with torch.inference_mode():
        return float(model(input_ids=torch.tensor([ids])).logits[0, 0])


def test_a_batched_reward_is_the_models_output_on_the_text_alone(reward_model_dir):
    rm = RewardModel(str(reward_model_dir), batch_size=3)
    scores = rm.score(PROMPTS, COMPLETIONS)
    assert scores.shape == (3,) and scores.dtype.name == "float64"
    for prompt, completion, score in zip(PROMPTS, COMPLETIONS, scores):
        ids = rm.tokenizer(prompt + completion)["input_ids"]  # no chat template: the plain text
        assert score == pytest.approx(alone(reward_model_dir, ids), abs=1e-5)
    # Padding never changes a score: scored one at a time, in another order, the same numbers.
    one_by_one = RewardModel(str(reward_model_dir), batch_size=1).score(PROMPTS[::-1], COMPLETIONS[::-1])[::-1]
    torch.testing.assert_close(torch.tensor(scores), torch.tensor(one_by_one.copy()), rtol=0, atol=1e-5)


def test_the_best_and_the_worst_completion_by_reward_become_the_pair(reward_model_dir):
    rm = RewardModel(str(reward_model_dir))
    scores = rm.score(["the movie"] * 3, COMPLETIONS).tolist()
    best, worst = max(range(3), key=scores.__getitem__), min(range(3), key=scores.__getitem__)
    assert make_pairs(scores, pairing="best_vs_worst") == [(best, worst)]


def test_the_reward_model_reads_the_conversation_through_its_own_chat_template(templated_dir):
    rm = RewardModel(str(templated_dir))
    messages = [{"role": "user", "content": "the movie"}]
    text, templated = rm.render(messages, "was great")
    assert templated and text == "user: the movie\nassistant: was great\n"
    assert rm.render("the movie", "was great")[0] == text  # a text prompt is a user turn where there is a template
    (score,) = rm.score([messages], ["was great"])
    ids = rm.tokenizer(text, add_special_tokens=False)["input_ids"]  # the template writes what it needs
    assert score == pytest.approx(alone(templated_dir, ids), abs=1e-5)


def test_a_conversation_needs_a_chat_template(reward_model_dir):
    rm = RewardModel(str(reward_model_dir))
    with pytest.raises(ValueError, match=r"label\.chat_template"):
        rm.score([[{"role": "user", "content": "hi"}]], ["hello"])
    assert RewardModel(str(reward_model_dir), chat_template="{{ messages[-1]['content'] }}").score(
        [[{"role": "user", "content": "hi"}]], ["hello"]
    ).shape == (1,)


def test_a_text_longer_than_max_length_keeps_its_end_and_is_counted(reward_model_dir):
    rm = RewardModel(str(reward_model_dir), max_length=8)
    ids, cut = rm.encode(["the movie was"] * 2, [" great", " great and the acting was wonderful and the plot was"])
    full = rm.tokenizer("the movie was great and the acting was wonderful and the plot was")["input_ids"]
    assert cut.tolist() == [False, True]
    assert ids[1] == full[-8:]


def test_a_model_with_more_than_one_output_is_refused(tmp_path):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from pipeline.model.pretrained import save_pretrained

    rm_dir = make_tiny_reward_model_dir(tmp_path / "one")
    two = GPT2ForSequenceClassification(GPT2Config(n_layer=1, n_embd=32, n_head=1, vocab_size=300, num_labels=2))
    save_pretrained(two, RewardModel(str(rm_dir)).tokenizer, tmp_path / "two")
    with pytest.raises(ValueError, match=r"label\.model: .* 2 outputs"):
        RewardModel(str(tmp_path / "two"))
