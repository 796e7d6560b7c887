"""The tokenize stage's whole-set logic, without Ray: routing to shards, duplicates, order, the held-out split,
the accounting of every input row."""

import pyarrow as pa
import pytest

from pipeline.data.accounting import missing_rows
from pipeline.data.audit import check_strict
from pipeline.data.checksums import checksum
from pipeline.data.outcomes import OUTCOME_SCHEMA
from pipeline.data.routing import ROUTED_EXTRA, id_shard
from pipeline.data.split import finish_shard, is_eval


def routed(rows: list[dict]) -> pa.Table:
    """Outcomes of one shard as `route_outcomes` hands them on: OUTCOME_SCHEMA plus the routing columns."""
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
    table = pa.Table.from_pylist([{**base, **r} for r in rows], schema=OUTCOME_SCHEMA)
    extra = {"ordinal": [], "first_of_record": [], "last_in_file": [], "held_out": [], "shard": []}
    for i, r in enumerate(rows):
        extra["ordinal"].append(r.get("ordinal", i))
        extra["first_of_record"].append(r.get("first_of_record", True))
        extra["last_in_file"].append(r.get("last_in_file", i == len(rows) - 1))
        extra["held_out"].append(r.get("held_out", False))
        extra["shard"].append(0)
    for name, values in extra.items():
        table = table.append_column(name, pa.array(values, ROUTED_EXTRA.field(name).type))
    return table


def test_later_copies_of_a_pair_are_rejected_as_duplicates():
    done = finish_shard(
        routed(
            [
                {"id": "b", "source": "f:1"},
                {"id": "a", "source": "f:2"},
                {"id": "b", "source": "f:3"},
                {"id": None, "source": "f:4", "reason": "empty_prompt", "raw": "{}"},
            ]
        )
    )
    assert done.train["id"].to_pylist() == ["a", "b"]  # sorted by content id: stable and well mixed
    assert done.train["source"].to_pylist() == ["f:2", "f:1"]  # the first copy is kept
    assert list(zip(done.rejected["source"].to_pylist(), done.rejected["reason"].to_pylist())) == [
        ("f:3", "duplicate_pair"),  # in input order
        ("f:4", "empty_prompt"),
    ]
    assert done.summary["reasons"] == {"duplicate_pair": 1, "empty_prompt": 1}
    assert done.summary["checksums"]["train"] == checksum(["a", "b"]) and done.summary["checksums"]["eval"]["rows"] == 0
    assert done.summary["records"] == {"0": [4, 0 + 1 + 2 + 3, 3]}  # 4 records, rows 0..3, the last one marked


def test_split_is_stable_when_rows_are_added():
    prompts = [[i, i + 1, i * 7 % 13] for i in range(400)]
    first = is_eval(pa.array(prompts), 0.2)
    grown = is_eval(pa.array(prompts + [[9000 + i] for i in range(300)]), 0.2)
    assert (grown[:400] == first).all()
    assert 0.1 < first.mean() < 0.3


def test_pairs_of_one_prompt_stay_on_one_side():
    split = is_eval(pa.array([[5, 6, 7]] * 10 + [[8, 9]] * 10), 0.5)
    assert len(set(split[:10])) == 1 and len(set(split[10:])) == 1


def test_a_pair_held_out_by_any_copy_is_held_out_and_kept_once():
    """A pair in both a training split and data.eval_split: the first copy is kept, and it goes to eval."""
    done = finish_shard(
        routed(
            [
                {"id": "a", "source": "dd/train#0"},
                {"id": "b", "source": "dd/train#1"},
                {"id": "c", "source": "dd/test#0", "held_out": True},
                {"id": "a", "source": "dd/test#1", "held_out": True},  # "a" is in both splits
                {"id": None, "source": "dd/test#2", "reason": "empty_prompt", "raw": "{}"},
            ]
        )
    )
    assert done.train["id"].to_pylist() == ["b"]
    assert done.eval["id"].to_pylist() == ["a", "c"] and done.eval["source"].to_pylist() == ["dd/train#0", "dd/test#0"]
    assert done.summary["reasons"] == {"duplicate_pair": 1, "empty_prompt": 1}


def test_routing_sends_every_copy_of_a_pair_to_one_shard_in_content_hash_order():
    ids = [f"{i * 0x0123456789ABCDEF % 2**64:016x}" for i in range(1, 200)]
    shards = id_shard(ids, 7)
    assert shards.min() >= 0 and shards.max() == 6
    in_order = sorted(ids)
    assert list(id_shard(in_order, 7)) == sorted(id_shard(in_order, 7))  # shard order is id order
    assert (id_shard(ids, 7) == id_shard(list(ids), 7)).all()


def test_the_accounting_finds_a_lost_and_a_repeated_batch():
    whole = {"0": [10, sum(range(10)), 9], "1": [3, 3, 2]}
    assert missing_rows(whole, {0: "a.jsonl", 1: "b.jsonl"}) == []
    lost = {"0": [8, sum(range(10)) - 3 - 4, 9]}
    assert missing_rows(lost, {0: "a.jsonl"}) == ["a.jsonl: 8 rows came back for 10 rows read"]
    repeated = {"0": [12, sum(range(10)) + 3 + 4, 9]}
    assert missing_rows(repeated, {0: "a.jsonl"}) == ["a.jsonl: 12 rows came back for 10 rows read"]
    tail = {"0": [7, sum(range(7)), -1]}
    assert missing_rows(tail, {0: "a.jsonl"}) == ["a.jsonl: its last row came back from no worker (7 rows did)"]


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
