"""The prompt set of on-policy rounds: every row kept or refused with a counted reason, rendered as tokenize
renders prompts, put in one seeded order that does not depend on the file's order, and cut into rounds."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from pipeline.data.prompt_set import kept_in_order, prompt_outcomes, round_positions
from tests.helpers.rounds import CHAT_TEMPLATE, SENTENCES


@pytest.fixture(scope="module")
def tokenizer():
    from pipeline.demo.tiny_model import train_tokenizer

    return train_tokenizer(SENTENCES * 20, vocab_size=300)


def records(rows: list) -> pa.Table:
    raws = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    return pa.table({"source": [f"p.jsonl:{i + 1}" for i in range(len(rows))], "raw": raws})


def outcomes(tokenizer, rows, **options):
    options = {"columns": {}, "chat_template": None, "max_prompt_length": 12, **options}
    return prompt_outcomes(records(rows), tokenizer, **options).to_pylist()


def test_text_and_message_prompts_render_as_tokenize_renders_them(tokenizer):
    messages = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "the movie"}]
    conversation = [*messages, {"role": "assistant", "content": "was great"}]
    text, chat, whole = outcomes(
        tokenizer,
        [{"prompt": "the movie was"}, {"prompt": messages}, {"messages": conversation}],
        chat_template=CHAT_TEMPLATE,
        max_prompt_length=40,
    )
    assert text["prompt_text"] == "the movie was"
    assert text["prompt_ids"] == tokenizer("the movie was", add_special_tokens=False)["input_ids"]
    assert chat["prompt_text"] == "system: be kind\nuser: the movie\nassistant:"
    # A whole conversation: the prompt is what precedes the assistant's last reply, rendered the same way.
    assert whole["prompt_text"] == chat["prompt_text"]
    assert json.loads(whole["prompt_json"]) == messages
    assert all(row["reason"] is None for row in (text, chat, whole))


def test_bad_rows_are_refused_with_their_reason_and_kept_raw(tokenizer):
    rows = [
        {"prompt": "   "},
        {"text": "no prompt here"},
        "{not json",
        {"prompt": 3},
        {"prompt": " ".join(["wonderful"] * 30)},
        {"messages": [{"role": "assistant", "content": "only a reply"}]},
        {"prompt": "a lovely cast"},
    ]
    got = outcomes(tokenizer, rows)
    assert [r["reason"] for r in got] == [
        "empty_prompt",
        "missing_field",
        "malformed_json",
        "wrong_type",
        "prompt_too_long",
        "empty_prompt",
        None,
    ]
    assert got[2]["raw"] == "{not json" and got[-1]["raw"] is None


def test_the_prompt_column_can_be_mapped(tokenizer):
    (row,) = outcomes(tokenizer, [{"question": "the plot was"}], columns={"prompt": "question"})
    assert row["prompt_text"] == "the plot was"


def test_duplicates_are_counted_and_the_order_is_the_same_whatever_the_file_order(tokenizer):
    prompts = [f"the movie {w}" for w in ("was", "is", "felt", "seemed", "got")]
    rows = [{"prompt": p} for p in [*prompts, prompts[1], prompts[3]]]
    table = prompt_outcomes(records(rows), tokenizer, columns={}, chat_template=None, max_prompt_length=12)
    kept, reasons = kept_in_order(table, seed=0)
    assert list(reasons) == [None] * 5 + ["duplicate_prompt", "duplicate_prompt"]
    assert kept["position"].to_pylist() == list(range(5))
    assert sorted(kept["prompt_text"].to_pylist()) == sorted(prompts)

    shuffled = prompt_outcomes(records(rows[::-1]), tokenizer, columns={}, chat_template=None, max_prompt_length=12)
    again, _ = kept_in_order(shuffled, seed=0)
    assert again["prompt_text"].to_pylist() == kept["prompt_text"].to_pylist()
    other, _ = kept_in_order(table, seed=1)
    assert other["prompt_text"].to_pylist() != kept["prompt_text"].to_pylist()  # the seed orders the set


def test_rounds_take_fresh_prompts_until_the_pool_runs_out_then_wrap_around():
    firsts = [round_positions(10, round_index=t, per_round=3) for t in (1, 2, 3)]
    assert np.concatenate(firsts).tolist() == list(range(9))  # disjoint, consecutive
    assert round_positions(10, round_index=4, per_round=3).tolist() == [9, 0, 1]
    assert round_positions(4, round_index=1, per_round=10).tolist() == [0, 1, 2, 3]  # no prompt twice in a round
    with pytest.raises(ValueError, match="empty"):
        round_positions(0, round_index=1, per_round=3)
