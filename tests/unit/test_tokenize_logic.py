"""The tokenize stage's whole-set logic, without Ray: duplicates, order, the held-out split."""

import pyarrow as pa
import pytest

from pipeline.data.audit import check_strict
from pipeline.data.outcomes import OUTCOME_SCHEMA
from pipeline.data.split import finish_outcomes, held_out_rows, is_eval


def outcomes(rows: list[dict]) -> pa.Table:
    base = {
        "source": "f:1",
        "prompt_ids": [1],
        "chosen_ids": [2],
        "rejected_ids": [3],
        "label": None,
        "prompt_truncated": False,
        "response_truncated": False,
        "boundary_mismatch": False,
        "reason": None,
        "raw": None,
    }
    return pa.Table.from_pylist([{**base, **r} for r in rows], schema=OUTCOME_SCHEMA)


def test_later_copies_of_a_pair_are_rejected_as_duplicates():
    good, rejected = finish_outcomes(
        outcomes(
            [
                {"id": "b", "source": "f:1"},
                {"id": "a", "source": "f:2"},
                {"id": "b", "source": "f:3"},
                {"id": None, "source": "f:4", "reason": "empty_prompt", "raw": "{}"},
            ]
        )
    )
    assert good["id"].to_pylist() == ["a", "b"]  # sorted by content id: stable and well mixed
    assert good["source"].to_pylist() == ["f:2", "f:1"]  # the first copy is kept
    assert sorted(zip(rejected["source"].to_pylist(), rejected["reason"].to_pylist())) == [
        ("f:3", "duplicate_pair"),
        ("f:4", "empty_prompt"),
    ]


def test_split_is_stable_when_rows_are_added():
    prompts = [[i, i + 1, i * 7 % 13] for i in range(400)]
    first = is_eval(pa.array(prompts), 0.2)
    grown = is_eval(pa.array(prompts + [[9000 + i] for i in range(300)]), 0.2)
    assert (grown[:400] == first).all()
    assert 0.1 < first.mean() < 0.3


def test_pairs_of_one_prompt_stay_on_one_side():
    split = is_eval(pa.array([[5, 6, 7]] * 10 + [[8, 9]] * 10), 0.5)
    assert len(set(split[:10])) == 1 and len(set(split[10:])) == 1


def test_a_named_eval_split_holds_out_its_own_rows_and_pairs_also_in_training():
    good, rejected = finish_outcomes(
        outcomes(
            [
                {"id": "a", "source": "dd/train#0"},
                {"id": "b", "source": "dd/train#1"},
                {"id": "c", "source": "dd/test#0"},
                {"id": "a", "source": "dd/test#1"},  # "a" is in both splits
                {"id": None, "source": "dd/test#2", "reason": "empty_prompt", "raw": "{}"},
            ]
        )
    )
    held_out = held_out_rows(
        good, rejected, eval_sources=frozenset({"dd/test#0", "dd/test#1", "dd/test#2"}), fraction=0.5
    )
    assert dict(zip(good["id"].to_pylist(), held_out.tolist())) == {"a": True, "b": False, "c": True}
    # Without a named split, the prompt hash decides, as is_eval does.
    no_split = held_out_rows(good, rejected, eval_sources=None, fraction=0.5)
    assert (no_split == is_eval(good["prompt_ids"], 0.5)).all()


def test_strict_makes_chosen_reasons_fatal():
    from collections import Counter

    check_strict(False, Counter({"empty_prompt": 2}))
    check_strict(["too_long"], Counter({"empty_prompt": 2}))
    with pytest.raises(ValueError, match="empty_prompt: 2"):
        check_strict(True, Counter({"empty_prompt": 2}))
    with pytest.raises(ValueError, match="too_long: 1"):
        check_strict(["too_long"], Counter({"too_long": 1, "empty_prompt": 2}))


class CountingTokenizer:
    """A real tokenizer that records every text it is asked to tokenize (a spy: it answers as the tokenizer does)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.seen: list[str] = []

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def __call__(self, texts, **kwargs):
        self.seen.extend(texts)
        return self.tokenizer(texts, **kwargs)


def test_a_batch_tokenizes_each_distinct_text_once():
    """A scored row's prompt and completions recur across its pairs: each text is tokenized once, and the
    pairs' ids come out as if each had been tokenized alone."""
    import json

    from pipeline.data.encode import process_records
    from pipeline.data.records import RECORD_SCHEMA
    from pipeline.demo.tiny_model import train_tokenizer
    from tests.helpers.tiny import CORPUS

    row = {
        "prompt": "Q: ",
        "completions": [{"text": "hi", "score": 3}, {"text": "ok", "score": 2}, {"text": "no", "score": 1}],
    }
    pair = {"prompt": "Q: ", "chosen": "hi", "rejected": "no"}  # the same texts again, in another row
    table = pa.table(
        {"source": ["f:1", "f:2"], "raw": [json.dumps(row), json.dumps(pair)], "read_error": [None, None]},
        schema=RECORD_SCHEMA,
    )
    tokenizer = CountingTokenizer(train_tokenizer(CORPUS * 20, vocab_size=300))
    out = process_records(table, tokenizer, pairing="all_pairs", max_prompt_length=64, max_length=128)
    assert sorted(tokenizer.seen) == sorted(["Q: ", "Q: hi", "Q: ok", "Q: no"])
    alone = {text: tokenizer.tokenizer(text, add_special_tokens=False)["input_ids"] for text in tokenizer.seen}
    eos = [tokenizer.eos_token_id]
    response = lambda text: alone["Q: " + text][len(alone["Q: "]) :] + eos
    assert out["reason"].to_pylist() == [None] * 4
    assert out["prompt_ids"].to_pylist() == [alone["Q: "]] * 4
    assert out["chosen_ids"].to_pylist() == [response(t) for t in ("hi", "hi", "ok", "hi")]
    assert out["rejected_ids"].to_pylist() == [response(t) for t in ("ok", "no", "no", "no")]
