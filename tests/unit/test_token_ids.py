"""tokenize's ids come from the tokenizer's backend directly: they must be exactly the tokenizer's own call's,
whatever state the tokenizer was loaded in."""

from __future__ import annotations

import pytest

from pipeline.data.token_ids import token_ids
from pipeline.model.pretrained import load_tokenizer

TEXTS = [
    "A plain question? And a plain answer.",
    "",
    "   leading and trailing spaces   ",
    "emoji 🙂🙃, right-to-left שלום, combining e\u0301 and ideographs 漢字",
    "an end of text inside the text <|endoftext|> and after it",
    "tabs\tand\nnew lines\n\n",
    " word" * 400,
]


def own_call(model_dir, setup) -> list[list[int]]:
    tokenizer = load_tokenizer(str(model_dir))
    setup(tokenizer)
    return tokenizer(TEXTS, add_special_tokens=False, truncation=False)["input_ids"]


def fast_path(model_dir, setup) -> list[list[int]]:
    tokenizer = load_tokenizer(str(model_dir))
    setup(tokenizer)
    return token_ids(tokenizer, TEXTS)


def truncating(tokenizer) -> None:
    tokenizer.backend_tokenizer.enable_truncation(max_length=8)  # as a tokenizer.json that switches it on


def splitting(tokenizer) -> None:
    tokenizer.split_special_tokens = True


def as_saved(tokenizer) -> None:
    pass


@pytest.mark.parametrize("setup", [as_saved, truncating, splitting])
def test_the_ids_are_the_tokenizers_own(tiny_model_dir, setup):
    ids = fast_path(tiny_model_dir, setup)
    assert ids == own_call(tiny_model_dir, setup)
    assert len(ids[-1]) > 8  # never truncated


def test_special_tokens_in_the_text_follow_the_tokenizers_setting(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    whole, split = fast_path(tiny_model_dir, as_saved)[4], fast_path(tiny_model_dir, splitting)[4]
    assert (tokenizer.eos_token_id in whole) != (tokenizer.eos_token_id in split), (tokenizer.eos_token, whole, split)


def test_no_texts_no_ids(tiny_model_dir):
    assert token_ids(load_tokenizer(str(tiny_model_dir)), []) == []
