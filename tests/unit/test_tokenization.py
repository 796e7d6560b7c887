"""process_records: every format to token ids, every bad row to exactly one reason, nothing lost or altered."""

from __future__ import annotations

import json
from collections import Counter

import pyarrow as pa
import pytest

from pipeline.data.encode import process_records
from pipeline.data.outcomes import OUTCOME_SCHEMA, REASONS
from pipeline.data.records import to_raw_json
from pipeline.data.scored import make_pairs
from pipeline.data.sources import read_records
from pipeline.demo.tiny_model import EOS, train_tokenizer

# "cab" is frequent, so BPE learns "ca" + "b" -> "cab": a prompt ending in "ca" and a response starting with
# "b" tokenize differently apart than together (byte-level pre-tokenization keeps " cab" one word).
CORPUS = ["abab ab abba cab dab cab cab " * 20, "Q: what is the answer? A: the quick brown fox " * 20] * 20

# Each turn ends with the EOS text, so the template itself closes the assistant's turn.
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}" + EOS + "\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
LIMITS = dict(max_prompt_length=64, max_length=128)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CORPUS, vocab_size=300)


@pytest.fixture(scope="module")
def bos_tok(tok):
    """The same vocabulary, plus a BOS that the tokenizer adds by default, like Llama's."""
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS, pad_token="<|pad|>")
    tokenizer.add_special_tokens({"bos_token": "<s>"})
    bos = tokenizer.bos_token_id
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)]
    )
    assert tokenizer("a").input_ids[0] == bos
    return tokenizer


def batch(*rows, read_errors=None) -> pa.Table:
    """A batch shaped like read_records' output: rows are JSON values, or raw strings when given as str."""
    raws = [r if isinstance(r, str) else to_raw_json(r) for r in rows]
    return pa.table(
        {
            "source": [f"t.jsonl:{i + 1}" for i in range(len(rows))],
            "raw": raws,
            "read_error": read_errors or [None] * len(rows),
        }
    )


def run(tok, *rows, **kwargs) -> list[dict]:
    out = process_records(batch(*rows), tok, **{**LIMITS, **kwargs})
    assert out.schema.equals(OUTCOME_SCHEMA)
    return out.to_pylist()


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def decode(tok, token_ids) -> str:
    return tok.decode(token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


# ---------------------------------------------------------------------------------------------- formats


def test_standard_pair(tok):
    (row,) = run(tok, {"prompt": "Q: what is", "chosen": " the answer", "rejected": " a fox"})
    eos = tok.eos_token_id
    assert row["reason"] is None and row["raw"] is None and row["label"] is None
    assert len(row["id"]) == 16 and int(row["id"], 16) >= 0
    assert row["source"] == "t.jsonl:1"
    assert row["prompt_ids"] + row["chosen_ids"] == ids(tok, "Q: what is the answer") + [eos]
    assert row["prompt_ids"] + row["rejected_ids"] == ids(tok, "Q: what is a fox") + [eos]
    assert row["prompt_ids"] == ids(tok, "Q: what is")
    assert not (row["prompt_truncated"] or row["response_truncated"] or row["boundary_mismatch"])


def test_conversational_with_chat_template_from_config(tok):
    prompt = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    row = {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": "hello"}],
        "rejected": [{"role": "assistant", "content": "go away"}],
    }
    (out,) = run(tok, row, chat_template=TEMPLATE)
    assert out["reason"] is None
    assert decode(tok, out["prompt_ids"]) == f"<|system|>\nbe brief{EOS}\n<|user|>\nhi{EOS}\n<|assistant|>\n"
    # The template closes the turn with EOS (then a newline): no second EOS is added.
    assert decode(tok, out["chosen_ids"]) == f"hello{EOS}\n"
    assert decode(tok, out["rejected_ids"]) == f"go away{EOS}\n"
    assert out["chosen_ids"].count(tok.eos_token_id) == 1


def test_conversational_without_any_template_is_a_config_error(tok):
    row = {
        "prompt": [{"role": "user", "content": "hi"}],
        "chosen": [{"role": "assistant", "content": "a"}],
        "rejected": [{"role": "assistant", "content": "b"}],
    }
    with pytest.raises(ValueError, match="chat_template"):
        run(tok, row)


def test_implicit_prompt_hh_strings(tok):
    shared = "\n\nHuman: what is the answer?\n\nAssistant: the answer is\n\nHuman: and?\n\nAssistant:"
    (row,) = run(tok, {"chosen": shared + " the fox", "rejected": shared + " the quick"})
    assert row["reason"] is None
    assert decode(tok, row["prompt_ids"]) == shared
    assert decode(tok, row["chosen_ids"]) == " the fox" + EOS
    assert decode(tok, row["rejected_ids"]) == " the quick" + EOS


def test_implicit_prompt_same_content_same_id_as_standard(tok):
    shared = "\n\nHuman: hi\n\nAssistant:"
    implicit, standard = run(
        tok,
        {"chosen": shared + " yes", "rejected": shared + " no"},
        {"prompt": shared, "chosen": " yes", "rejected": " no"},
    )
    assert implicit["id"] == standard["id"]
    assert implicit["prompt_ids"] == standard["prompt_ids"]


def test_implicit_prompt_message_lists(tok):
    head = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "answer?"},
    ]
    row = {
        "chosen": head + [{"role": "assistant", "content": "the fox"}],
        "rejected": head + [{"role": "assistant", "content": "no"}],
    }
    (out,) = run(tok, row, chat_template=TEMPLATE)
    assert out["reason"] is None
    assert decode(tok, out["prompt_ids"]).endswith(f"<|user|>\nanswer?{EOS}\n<|assistant|>\n")
    assert decode(tok, out["chosen_ids"]) == f"the fox{EOS}\n"


def test_implicit_prompt_strings_split_before_the_first_differing_word(tok):
    """TRL's own example: no prompt column, two texts sharing a prefix; the prompt is that prefix's words."""
    implicit, explicit = run(
        tok,
        {"chosen": "The sky is blue.", "rejected": "The sky is green."},
        {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
    )
    assert implicit["reason"] is None
    assert decode(tok, implicit["prompt_ids"]) == "The sky is"
    assert decode(tok, implicit["chosen_ids"]) == " blue." + EOS
    assert decode(tok, implicit["rejected_ids"]) == " green." + EOS
    assert implicit["id"] == explicit["id"]


def test_implicit_prompt_strings_never_cut_inside_a_word(tok):
    (row,) = run(tok, {"chosen": "Q: what is the cab", "rejected": "Q: what is the dab"})
    assert decode(tok, row["prompt_ids"]) == "Q: what is the"
    (row,) = run(tok, {"chosen": "the fox\n\nran", "rejected": "the fox\n\nsat"})
    assert decode(tok, row["prompt_ids"]) == "the fox"  # the spaces before the word go with the responses
    assert decode(tok, row["chosen_ids"]) == "\n\nran" + EOS
    # No space at all in the shared text: cut where the texts part (the token rules keep ids whole).
    (row,) = run(tok, {"chosen": "what?the fox", "rejected": "what?a fox"})
    assert decode(tok, row["prompt_ids"]) == "what?"
    assert decode(tok, row["prompt_ids"] + row["chosen_ids"]) == "what?the fox" + EOS


def test_implicit_prompt_prefers_the_hh_marker_to_the_last_shared_word(tok):
    shared = "\n\nHuman: what is the answer?\n\nAssistant:"
    (row,) = run(tok, {"chosen": shared + " the answer is yes", "rejected": shared + " the answer is no"})
    assert decode(tok, row["prompt_ids"]) == shared
    assert decode(tok, row["chosen_ids"]) == " the answer is yes" + EOS


def test_implicit_prompt_conversational_rows_from_the_trl_docs(tok):
    implicit = {
        "chosen": [
            {"role": "user", "content": "What color is the sky?"},
            {"role": "assistant", "content": "It is blue."},
        ],
        "rejected": [
            {"role": "user", "content": "What color is the sky?"},
            {"role": "assistant", "content": "It is green."},
        ],
    }
    explicit = {
        "prompt": [{"role": "user", "content": "What color is the sky?"}],
        "chosen": [{"role": "assistant", "content": "It is blue."}],
        "rejected": [{"role": "assistant", "content": "It is green."}],
    }
    a, b = run(tok, implicit, explicit, chat_template=TEMPLATE)
    assert a["reason"] is None and a["id"] == b["id"] and a["prompt_ids"] == b["prompt_ids"]
    assert decode(tok, a["chosen_ids"]) == f"It is blue.{EOS}\n"


# A row shaped as on the HuggingFaceH4/ultrafeedback_binarized card: a text prompt, and chosen/rejected as whole
# conversations that repeat it as their first user turn.
ULTRAFEEDBACK_BINARIZED = {
    "prompt": "Which animal is fast?",
    "prompt_id": "5f1c0e2a",
    "chosen": [
        {"content": "Which animal is fast?", "role": "user"},
        {"content": "The cheetah is the fastest land animal.", "role": "assistant"},
    ],
    "rejected": [{"content": "Which animal is fast?", "role": "user"}, {"content": "The snail.", "role": "assistant"}],
    "messages": [
        {"content": "Which animal is fast?", "role": "user"},
        {"content": "The cheetah is the fastest land animal.", "role": "assistant"},
    ],
    "score_chosen": 8.0,
    "score_rejected": 3.0,
}


def test_ultrafeedback_binarized_rows_take_the_prompt_from_the_conversations(tok):
    (row,) = run(tok, ULTRAFEEDBACK_BINARIZED, chat_template=TEMPLATE)
    assert row["reason"] is None
    assert decode(tok, row["prompt_ids"]) == f"<|user|>\nWhich animal is fast?{EOS}\n<|assistant|>\n"
    assert decode(tok, row["chosen_ids"]) == f"The cheetah is the fastest land animal.{EOS}\n"
    assert decode(tok, row["rejected_ids"]) == f"The snail.{EOS}\n"
    (named,) = run(tok, ULTRAFEEDBACK_BINARIZED, chat_template=TEMPLATE, format="conversational")
    assert named["id"] == row["id"]


def test_text_prompt_with_assistant_only_message_lists(tok):
    row = {
        "prompt": "Which animal is fast?",
        "chosen": [{"role": "assistant", "content": "The cheetah."}],
        "rejected": [{"role": "assistant", "content": "The snail."}],
    }
    (out,) = run(tok, row, chat_template=TEMPLATE)
    assert decode(tok, out["prompt_ids"]) == f"<|user|>\nWhich animal is fast?{EOS}\n<|assistant|>\n"
    # Lists that share no turn and do not start with the assistant's: nothing says where the prompt ends.
    row = {
        "prompt": "p",
        "chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
        "rejected": [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}],
    }
    assert run(tok, row, chat_template=TEMPLATE)[0]["reason"] == "no_shared_prompt"


# TRL's tool-calling example conversation (dataset formats doc), split into a prompt and two responses.
TOOL_PROMPT = [{"role": "user", "content": "Turn on the living room lights."}]
TOOL_CALL = [
    {
        "role": "assistant",
        "tool_calls": [
            {
                "type": "function",
                "function": {"name": "control_light", "arguments": {"room": "living room", "state": "on"}},
            }
        ],
    }
]
TOOL_ROW = {
    "prompt": TOOL_PROMPT,
    "chosen": TOOL_CALL,
    "rejected": [{"role": "assistant", "content": "I cannot reach the lights."}],
}
# Renders tool calls, and content given as a list of text parts, besides plain string content.
RICH_TEMPLATE = TEMPLATE.replace(
    "{{ m['content'] }}",
    "{% if m['tool_calls'] is defined %}{% for c in m['tool_calls'] %}<call>{{ c['function']['name'] }} "
    "{{ c['function']['arguments'] | tojson }}</call>{% endfor %}"
    "{% elif m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for p in m['content'] %}{{ p['text'] }}{% endfor %}{% endif %}",
)


def test_tool_calls_render_where_the_template_renders_them(tok):
    (row,) = run(tok, TOOL_ROW, chat_template=RICH_TEMPLATE)
    assert row["reason"] is None
    call = '<call>control_light {"room": "living room", "state": "on"}</call>'
    assert decode(tok, row["chosen_ids"]) == call + EOS + "\n"
    # The whole exchange as a prompt: the call, the tool's answer, then the assistant's turn to write.
    done = {
        "prompt": TOOL_PROMPT
        + TOOL_CALL
        + [{"role": "tool", "name": "control_light", "content": "The lights in the living room are now on."}],
        "chosen": [{"role": "assistant", "content": "Done!"}],
        "rejected": [{"role": "assistant", "content": "Which room?"}],
    }
    (row,) = run(tok, done, chat_template=RICH_TEMPLATE, max_prompt_length=256, max_length=512)
    assert row["reason"] is None and not row["prompt_truncated"]
    assert "<call>control_light" in decode(tok, row["prompt_ids"])


def test_tool_calls_a_template_ignores_are_rejected_not_dropped(tok):
    (row,) = run(tok, TOOL_ROW, chat_template=TEMPLATE)
    assert row["reason"] == "unsupported_tool_calls"


def test_text_parts_render_like_string_content(tok):
    parts = {
        "prompt": [{"role": "user", "content": [{"type": "text", "text": "What color is the sky?"}]}],
        "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "It is blue."}]}],
        "rejected": [{"role": "assistant", "content": "It is green."}],
    }
    strings = {
        "prompt": [{"role": "user", "content": "What color is the sky?"}],
        "chosen": [{"role": "assistant", "content": "It is blue."}],
        "rejected": [{"role": "assistant", "content": "It is green."}],
    }
    a, b = run(tok, parts, strings, chat_template=RICH_TEMPLATE)
    assert a["reason"] is None and a["id"] == b["id"]
    # A template that reads content as a string would print the list: rejected, naming the cause.
    assert run(tok, parts, chat_template=TEMPLATE)[0]["reason"] == "unsupported_content_parts"


def test_image_parts_are_rejected_as_non_text(tok):
    image = {
        "prompt": [
            {
                "role": "user",
                "content": [
                    {"type": "image", "url": "https://example.com/sky.png"},
                    {"type": "text", "text": "What color is the sky?"},
                ],
            }
        ],
        "chosen": [{"role": "assistant", "content": "It is blue."}],
        "rejected": [{"role": "assistant", "content": "It is green."}],
    }
    assert run(tok, image, chat_template=RICH_TEMPLATE)[0]["reason"] == "non_text_content"


def test_unpaired_kto_rows(tok):
    good, bad = run(
        tok,
        {"prompt": "Q: ", "completion": "the answer", "label": True},
        {"prompt": "Q: ", "completion": "a fox", "label": False},
    )
    assert (good["label"], bad["label"]) == (True, False)
    assert good["rejected_ids"] == [] and bad["rejected_ids"] == []
    assert decode(tok, good["prompt_ids"] + good["chosen_ids"]) == "Q: the answer" + EOS
    assert good["id"] != bad["id"]


SCORED = {
    "prompt": "Q: ",
    "completions": [
        {"text": "mid", "score": 5},
        {"response": "best", "score": 9.5},
        {"content": "worst", "score": 1},
        {"text": "also mid", "score": 5},
    ],
}


def pair_texts(tok, rows):
    return [
        (decode(tok, r["chosen_ids"]).removesuffix(EOS), decode(tok, r["rejected_ids"]).removesuffix(EOS)) for r in rows
    ]


def test_scored_best_vs_worst(tok):
    rows = run(tok, SCORED)
    assert pair_texts(tok, rows) == [("best", "worst")]
    assert rows[0]["source"] == "t.jsonl:1"


def test_scored_best_vs_rest_and_all_pairs(tok):
    rows = run(tok, SCORED, pairing="best_vs_rest")
    assert pair_texts(tok, rows) == [("best", "mid"), ("best", "worst"), ("best", "also mid")]
    rows = run(tok, SCORED, pairing="all_pairs")
    # The two "mid" completions tie (score 5): that pair is skipped.
    assert pair_texts(tok, rows) == [
        ("best", "mid"),
        ("mid", "worst"),
        ("best", "worst"),
        ("best", "also mid"),
        ("also mid", "worst"),
    ]
    assert len({r["id"] for r in rows}) == len(rows)


def test_scored_min_score_gap_and_no_pair(tok):
    rows = run(tok, SCORED, pairing="all_pairs", min_score_gap=4.0)
    assert pair_texts(tok, rows) == [
        ("best", "mid"),
        ("mid", "worst"),
        ("best", "worst"),
        ("best", "also mid"),
        ("also mid", "worst"),
    ]
    rows = run(tok, SCORED, pairing="all_pairs", min_score_gap=4.5)
    assert pair_texts(tok, rows) == [("best", "mid"), ("best", "worst"), ("best", "also mid")]
    ties = {"prompt": "Q: ", "completions": [{"text": "a", "score": 3}, {"text": "b", "score": 3}]}
    (row,) = run(tok, ties)
    assert row["reason"] == "no_pair" and row["raw"] == to_raw_json(ties)
    (row,) = run(tok, SCORED, min_score_gap=100)
    assert row["reason"] == "no_pair"


def test_scored_pair_failing_a_check_is_rejected_alone(tok):
    row = {
        "prompt": "Q: ",
        "completions": [{"text": "good", "score": 3}, {"text": " ", "score": 2}, {"text": "bad", "score": 1}],
    }
    rows = run(tok, row, pairing="best_vs_rest")
    assert [r["reason"] for r in rows] == ["empty_response", None]


def test_make_pairs_by_hand():
    assert make_pairs([1, 3, 2], pairing="best_vs_worst") == [(1, 0)]
    assert make_pairs([1, 3, 2], pairing="best_vs_rest") == [(1, 0), (1, 2)]
    assert make_pairs([1, 3, 2], pairing="all_pairs") == [(1, 0), (2, 0), (1, 2)]
    assert make_pairs([2, 2], pairing="all_pairs") == []
    assert make_pairs([7], pairing="best_vs_worst") == []
    assert make_pairs([3, 3, 1, 1], pairing="best_vs_worst") == [(0, 2)]  # first index wins ties
    assert make_pairs([1, 3, 2], pairing="best_vs_rest", min_score_gap=2) == [(1, 0)]


def test_column_mapping(tok):
    (row,) = run(
        tok,
        {"question": "Q: ", "preferred": "yes", "dispreferred": "no", "chosen": "ignored"},
        columns={"prompt": "question", "chosen": "preferred", "rejected": "dispreferred"},
    )
    assert pair_texts(tok, [row]) == [("yes", "no")]
    # Swapping works because every mapped name is read from the original row.
    (row,) = run(
        tok, {"prompt": "Q: ", "chosen": "yes", "rejected": "no"}, columns={"chosen": "rejected", "rejected": "chosen"}
    )
    assert pair_texts(tok, [row]) == [("no", "yes")]
    (row,) = run(tok, {"question": "Q: ", "chosen": "a", "rejected": "b"}, columns={"prompt": "missing_col"})
    assert row["reason"] == "no_shared_prompt"  # no prompt at all: read as implicit, and "a", "b" share nothing


def test_pair_with_a_label_column_is_still_a_pair(tok):
    (row,) = run(tok, {"prompt": "Q: ", "chosen": "a", "rejected": "b", "label": "math"})
    assert row["reason"] is None and row["label"] is None and row["rejected_ids"]


def test_named_format_overrides_detection(tok):
    (row,) = run(tok, {"prompt": "Q: ", "chosen": "a", "rejected": "b", "label": True}, format="unpaired")
    assert row["reason"] == "missing_field"  # no completion
    (row,) = run(
        tok, {"prompt": "Q: ", "chosen": "a", "rejected": "b"}, format="conversational", chat_template=TEMPLATE
    )
    assert row["reason"] == "wrong_type"


# ---------------------------------------------------------------------------------------------- rejections

MSG = [{"role": "user", "content": "hi"}]
ASSISTANT_A = [{"role": "assistant", "content": "a"}]
ASSISTANT_B = [{"role": "assistant", "content": "b"}]

REJECTED_ROWS = [
    ("malformed_json", "{not json"),
    ("invalid_utf8", '{"prompt": "a\\ud800", "chosen": "x", "rejected": "y"}'),
    ("invalid_utf8", {"prompt": MSG, "chosen": [{"role": "assistant", "content": "\udcff"}], "rejected": ASSISTANT_B}),
    ("wrong_type", [1, 2]),
    ("wrong_type", "null"),
    ("wrong_type", {"prompt": 5, "chosen": "a", "rejected": "b"}),
    ("wrong_type", {"prompt": "p", "chosen": {"text": "a"}, "rejected": "b"}),
    ("wrong_type", {"prompt": "p", "chosen": MSG, "rejected": "b"}),
    ("wrong_type", {"prompt": MSG, "chosen": ["a"], "rejected": ASSISTANT_B}),
    ("wrong_type", {"prompt": "p", "completion": "c", "label": "yes"}),
    ("wrong_type", {"prompt": "p", "completions": [{"text": "a", "score": "high"}, {"text": "b", "score": 1}]}),
    ("wrong_type", {"prompt": "p", "completions": [{"text": "a", "score": float("nan")}, {"text": "b", "score": 1}]}),
    ("wrong_type", {"prompt": "p", "completions": "a"}),
    ("missing_field", {"prompt": "p", "chosen": "c"}),
    ("missing_field", {"prompt": "p", "completion": "c"}),
    ("missing_field", {"something": "else"}),
    ("missing_field", {"prompt": MSG, "chosen": [{"role": "assistant"}], "rejected": ASSISTANT_B}),
    ("missing_field", {"prompt": "p", "completions": [{"text": "a"}, {"text": "b", "score": 1}]}),
    ("empty_prompt", {"prompt": " \n\t", "chosen": "a", "rejected": "b"}),
    ("empty_prompt", {"prompt": [], "chosen": ASSISTANT_A, "rejected": ASSISTANT_B}),
    ("empty_prompt", {"prompt": "", "completions": [{"text": "a", "score": 2}, {"text": "b", "score": 1}]}),
    ("empty_response", {"prompt": "p", "chosen": "a", "rejected": "  "}),
    ("empty_response", {"prompt": "p", "completion": "", "label": True}),
    ("empty_response", {"prompt": MSG, "chosen": [], "rejected": ASSISTANT_B}),
    ("identical_responses", {"prompt": "p", "chosen": "same", "rejected": "same"}),
    ("identical_responses", {"chosen": "\n\nHuman: x\n\nAssistant: y", "rejected": "\n\nHuman: x\n\nAssistant: y"}),
    ("nul_byte", {"prompt": "p\x00", "chosen": "a", "rejected": "b"}),
    ("nul_byte", {"prompt": MSG, "chosen": [{"role": "assistant", "content": "a\x00"}], "rejected": ASSISTANT_B}),
    (
        "unknown_role",
        {"prompt": [{"role": "narrator", "content": "x"}], "chosen": ASSISTANT_A, "rejected": ASSISTANT_B},
    ),
    ("no_pair", {"prompt": "p", "completions": [{"text": "only", "score": 1}]}),
    ("unsupported_tool_calls", TOOL_ROW),
    (
        "unsupported_content_parts",
        {
            "prompt": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            "chosen": ASSISTANT_A,
            "rejected": ASSISTANT_B,
        },
    ),
    (
        "non_text_content",
        {
            "prompt": [{"role": "user", "content": [{"type": "image", "url": "x.png"}]}],
            "chosen": ASSISTANT_A,
            "rejected": ASSISTANT_B,
        },
    ),
    (
        "wrong_type",
        {"prompt": MSG, "chosen": [{"role": "assistant", "tool_calls": "control_light"}], "rejected": ASSISTANT_B},
    ),
    (
        "missing_field",
        {
            "prompt": MSG,
            "chosen": [{"role": "assistant", "tool_calls": [{"type": "function"}]}],
            "rejected": ASSISTANT_B,
        },
    ),
    (
        "wrong_type",
        {"prompt": MSG, "chosen": [{"role": "assistant", "content": {"text": "a"}}], "rejected": ASSISTANT_B},
    ),
    ("no_shared_prompt", {"chosen": "Yes.", "rejected": "No."}),
    ("no_shared_prompt", {"chosen": " yes", "rejected": " no"}),  # only a space in common
    ("no_shared_prompt", {"chosen": ASSISTANT_A, "rejected": ASSISTANT_B}),
]


@pytest.mark.parametrize("reason,row", REJECTED_ROWS, ids=[f"{r}-{i}" for i, (r, _) in enumerate(REJECTED_ROWS)])
def test_each_rejection_reason(tok, reason, row):
    (out,) = run(tok, row, chat_template=TEMPLATE)
    assert out["reason"] == reason
    assert out["raw"] == (row if isinstance(row, str) else to_raw_json(row))
    assert out["id"] is None and out["prompt_ids"] == [] and out["chosen_ids"] == []
    assert reason in REASONS


def test_read_errors_pass_through(tok):
    out = process_records(batch("", "bad \\xff", read_errors=["malformed_json", "invalid_utf8"]), tok, **LIMITS)
    assert out.column("reason").to_pylist() == ["malformed_json", "invalid_utf8"]
    assert out.column("raw").to_pylist() == ["", "bad \\xff"]


def test_template_error_and_mismatch(tok):
    strict = (
        "{% for m in messages %}{% if loop.index0 > 0 and m['role'] == messages[loop.index0 - 1]['role'] %}"
        "{{ raise_exception('roles must alternate') }}{% endif %}" + TEMPLATE[len("{% for m in messages %}") :]
    )
    row = {"prompt": MSG + MSG, "chosen": ASSISTANT_A, "rejected": ASSISTANT_B}
    assert run(tok, row, chat_template=strict)[0]["reason"] == "template_error"
    # The generation prompt is not what an assistant turn starts with: the prompt is not a prefix of the whole.
    odd = TEMPLATE.replace("<|assistant|>\n{% endif %}", "<|bot|>\n{% endif %}")
    assert (
        run(tok, {"prompt": MSG, "chosen": ASSISTANT_A, "rejected": ASSISTANT_B}, chat_template=odd)[0]["reason"]
        == "template_mismatch"
    )


def test_messages_that_render_the_same_are_identical(tok):
    trimming = TEMPLATE.replace("{{ m['content'] }}", "{{ m['content'] | trim }}")
    row = {"prompt": MSG, "chosen": [{"role": "assistant", "content": "a "}], "rejected": ASSISTANT_A}
    assert run(tok, row, chat_template=trimming)[0]["reason"] == "identical_responses"


def test_parquet_struct_where_a_string_is_needed_is_wrong_type_per_row(tok, tmp_path):
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(
        pa.table({"prompt": ["Q: ", "Q: "], "chosen": [{"text": "a"}, {"text": "b"}], "rejected": ["x", "y"]}), path
    )
    out = process_records(read_records(str(path)), tok, **LIMITS)
    assert out.column("reason").to_pylist() == ["wrong_type", "wrong_type"]
    assert out.column("source").to_pylist() == [f"{path}#0", f"{path}#1"]


def test_truncating_tokenizer_settings_are_ignored(tok):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    backend.enable_truncation(max_length=2)
    truncating = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS, pad_token="<|pad|>")
    row = {"prompt": "Q: what is", "chosen": " the answer", "rejected": " a fox"}
    assert run(truncating, row) == run(tok, row)


def test_too_long_and_identical_after_truncation(tok):
    (row,) = run(
        tok, {"prompt": "the quick brown fox " * 5, "chosen": "a", "rejected": "b"}, max_prompt_length=8, max_length=8
    )
    assert row["reason"] == "too_long"
    (row,) = run(
        tok,
        {"prompt": "Q: ", "chosen": "the quick brown fox yes", "rejected": "the quick brown fox no"},
        max_prompt_length=4,
        max_length=6,
    )
    assert row["reason"] == "identical_after_truncation"


# ---------------------------------------------------------------------------------------------- token rules


def test_boundary_merge_is_split_at_the_common_prefix(tok):
    assert ids(tok, "Q: ca") + ids(tok, "b") != ids(tok, "Q: cab")  # the tokenizer really merges here
    (row,) = run(tok, {"prompt": "Q: ca", "chosen": "b", "rejected": "t"})
    eos = tok.eos_token_id
    assert row["boundary_mismatch"] is True
    assert row["prompt_ids"] + row["chosen_ids"] == ids(tok, "Q: cab") + [eos]
    assert row["prompt_ids"] + row["rejected_ids"] == ids(tok, "Q: cat") + [eos]
    assert ids(tok, "Q: ca")[: len(row["prompt_ids"])] == row["prompt_ids"]
    assert len(row["prompt_ids"]) < len(ids(tok, "Q: ca"))


def test_eos_exactly_once(tok):
    eos = tok.eos_token_id
    plain, closed = run(
        tok,
        {"prompt": "Q: ", "chosen": "yes", "rejected": "no"},
        {"prompt": "Q: ", "chosen": "yes" + EOS, "rejected": "no" + EOS},
    )
    for row in (plain, closed):
        for response in (row["chosen_ids"], row["rejected_ids"]):
            assert response[-1] == eos and response.count(eos) == 1
    assert plain["chosen_ids"] == closed["chosen_ids"]


def test_prompt_truncated_from_its_end_and_response_cut_to_max_length(tok):
    prompt = "one two three four five six seven eight nine ten"
    (row,) = run(
        tok,
        {"prompt": prompt, "chosen": " the answer is the quick brown fox", "rejected": " no"},
        max_prompt_length=5,
        max_length=9,
    )
    full_prompt = ids(tok, prompt)
    assert row["prompt_truncated"] is True
    assert row["prompt_ids"] == full_prompt[-5:]
    assert row["response_truncated"] is True
    assert len(row["chosen_ids"]) == 4 and tok.eos_token_id not in row["chosen_ids"]  # the cut loses EOS
    assert row["rejected_ids"] == ids(tok, prompt + " no")[len(full_prompt) :] + [tok.eos_token_id]
    assert not row["boundary_mismatch"]


def test_text_round_trips_byte_for_byte(tok):
    prompt = "Emoji 👩🏽‍🚀 and RTL שלום مرحبا,\r\n"
    chosen = " e\u0301 (combining) vs é (precomposed)\r\nline2  "
    rejected = "\u202eRLO override\u202c 🇺🇳"
    (row,) = run(tok, {"prompt": prompt, "chosen": chosen, "rejected": rejected})
    assert decode(tok, row["prompt_ids"] + row["chosen_ids"]) == prompt + chosen + EOS
    assert decode(tok, row["prompt_ids"] + row["rejected_ids"]) == prompt + rejected + EOS


def test_bos_added_once(bos_tok):
    bos = bos_tok.bos_token_id
    (row,) = run(bos_tok, {"prompt": "Q: what", "chosen": " is", "rejected": " the"})
    assert row["prompt_ids"][0] == bos and row["prompt_ids"].count(bos) == 1
    assert row["prompt_ids"][1:] == ids(bos_tok, "Q: what")
    # A template that writes BOS itself: not doubled.
    (row,) = run(
        bos_tok, {"prompt": MSG, "chosen": ASSISTANT_A, "rejected": ASSISTANT_B}, chat_template="<s>" + TEMPLATE
    )
    assert row["prompt_ids"][0] == bos and row["prompt_ids"].count(bos) == 1
    # Truncation keeps the end of the prompt but still starts it with BOS.
    (row,) = run(
        bos_tok,
        {"prompt": "the quick brown fox " * 4, "chosen": "a", "rejected": "b"},
        max_prompt_length=4,
        max_length=8,
    )
    assert row["prompt_truncated"] and row["prompt_ids"][0] == bos and len(row["prompt_ids"]) == 4
    assert row["prompt_ids"][1:] == ids(bos_tok, "the quick brown fox " * 4)[-3:]


def test_no_bos_for_tokenizers_without_one(tok):
    (row,) = run(tok, {"prompt": "Q: what", "chosen": " is", "rejected": " the"})
    assert row["prompt_ids"] == ids(tok, "Q: what")


# ---------------------------------------------------------------------------------------------- whole batches

MIXED = [
    {"prompt": "Q: ", "chosen": "yes", "rejected": "no"},
    {"prompt": "Q: ", "chosen": "yes", "rejected": "no"},  # a duplicate: same id; the stage drops it
    {"prompt": MSG, "chosen": ASSISTANT_A, "rejected": ASSISTANT_B},
    {"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "\n\nHuman: hi\n\nAssistant: b"},
    {"prompt": "Q: ", "completion": "yes", "label": True},
    {"prompt": "Q: ", "completions": [{"text": "a", "score": 2}, {"text": "b", "score": 1}]},
    {"prompt": "Q: ", "chosen": "same", "rejected": "same"},
    {"prompt": "", "chosen": "a", "rejected": "b"},
    {"prompt": "Q: ", "chosen": "a"},
    [1],
]


def test_mixed_file_every_row_accounted_for(tok, tmp_path):
    path = tmp_path / "mixed.jsonl"
    lines = [json.dumps(r, ensure_ascii=False).encode() for r in MIXED] + [b"", b"{oops", b'{"prompt": "\xff"}']
    path.write_bytes(b"\n".join(lines) + b"\n")
    records = read_records(str(path))
    out = process_records(records, tok, chat_template=TEMPLATE, **LIMITS)
    rows = out.to_pylist()
    good = [r for r in rows if r["reason"] is None]
    rejected = Counter(r["reason"] for r in rows if r["reason"] is not None)
    assert records.num_rows == len(lines) == len(good) + sum(rejected.values())
    assert rejected == {
        "identical_responses": 1,
        "empty_prompt": 1,
        "missing_field": 1,
        "wrong_type": 1,
        "malformed_json": 2,
        "invalid_utf8": 1,
    }
    assert [r["source"] for r in rows] == records.column("source").to_pylist()
    assert rows[0]["id"] == rows[1]["id"]
    assert all(r["raw"] is None for r in good) and all(r["raw"] is not None for r in rows if r["reason"])


def test_deterministic(tok):
    rows = MIXED + ["{oops"]
    first = process_records(batch(*rows), tok, chat_template=TEMPLATE, **LIMITS)
    second = process_records(batch(*rows), tok, chat_template=TEMPLATE, **LIMITS)
    assert first.equals(second)

    def to_bytes(table):
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        return sink.getvalue().to_pybytes()

    assert to_bytes(first) == to_bytes(second)


def test_empty_batch(tok):
    out = process_records(batch(), tok, **LIMITS)
    assert out.num_rows == 0 and out.schema.equals(OUTCOME_SCHEMA)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(format="csv"), "format"),
        (dict(pairing="random"), "pairing"),
        (dict(columns={"question": "q"}), "columns"),
        (dict(max_length=0), "max_length"),
        (dict(min_score_gap=-1), "min_score_gap"),
    ],
)
def test_config_errors(tok, kwargs, match):
    with pytest.raises(ValueError, match=match):
        process_records(batch({"prompt": "p", "chosen": "a", "rejected": "b"}), tok, **{**LIMITS, **kwargs})
