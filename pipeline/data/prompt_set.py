"""A prompt set for on-policy rounds: raw records -> rendered, tokenized prompts, every row accounted for.

A row gives its prompt under "prompt" (a string, or a message list rendered with the chat template as
tokenize renders a conversational prompt) or under "messages" (a conversation: its prompt is every turn
before the trailing assistant turns, which are dropped). `data.columns` maps "prompt" to another column.

Rejections are counted by reason, never dropped silently: the tokenize reasons for a bad row
(malformed_json, wrong_type, missing_field, empty_prompt, template_error, ...), plus
  prompt_too_long    more tokens than tokenize.max_prompt_length, the budget a round's pairs are cut to
  duplicate_prompt   the same rendered text as an earlier row (the first copy is kept)

The kept prompts are put in one order by a seeded content hash, so the order does not depend on the file's
row order or on which prompts sit beside them: the first `eval_prompts` are held out for the evaluation
across rounds, the rest form the pool that rounds take their prompts from (`round_positions`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import cast

import numpy as np
import pyarrow as pa

from pipeline.data.chat import ChatRenderer, checked_messages, is_blank
from pipeline.data.examples import check_strings
from pipeline.data.outcomes import Reject
from pipeline.data.rows import map_columns, parse_row
from pipeline.data.token_rules import TokenRules

PROMPT_REASONS = ("prompt_too_long", "duplicate_prompt")

# One row per input record: the prompt as given (JSON), as rendered, its token ids; or the reason it was refused.
PROMPT_OUTCOMES = pa.schema(
    [
        ("source", pa.string()),
        ("prompt_json", pa.string()),  # the prompt as the row gave it: a JSON string or message list
        ("prompt_text", pa.string()),  # rendered: what the model continues
        ("prompt_ids", pa.list_(pa.int32())),  # BOS where the tokenizer adds one, as tokenize places it
        ("reason", pa.string()),  # null for a kept prompt
        ("raw", pa.string()),  # the input row, for rejected rows only
    ]
)


def prompt_of(row: dict):
    """The prompt of a parsed row: a string, or a checked message list. Raises `Reject`."""
    if row.get("prompt") is not None:
        prompt = row["prompt"]
    elif row.get("messages") is not None:
        messages = row["messages"]
        if not isinstance(messages, list):
            raise Reject("wrong_type")
        end = len(messages)
        while end and isinstance(messages[end - 1], dict) and messages[end - 1].get("role") == "assistant":
            end -= 1  # a whole conversation: the prompt is what comes before the assistant's last reply
        prompt = messages[:end]
    else:
        raise Reject("missing_field")
    if isinstance(prompt, str):
        check_strings([prompt])
        if not prompt.strip():
            raise Reject("empty_prompt")
        return prompt
    if not isinstance(prompt, list):
        raise Reject("wrong_type")
    prompt = checked_messages(prompt)
    if is_blank(prompt):
        raise Reject("empty_prompt")
    return prompt


def prompt_outcomes(
    records: pa.Table,
    tokenizer,
    *,
    columns: Mapping[str, str],
    chat_template: str | None,
    max_prompt_length: int,
) -> pa.Table:
    """Each record (source, raw, read_error) -> one `PROMPT_OUTCOMES` row: its prompt rendered and tokenized
    (add_special_tokens=False, then BOS where tokenize would place one), or the reason it is refused."""
    renderer = ChatRenderer(tokenizer, chat_template)
    rules = TokenRules(tokenizer, max_prompt_length=max_prompt_length, max_length=max_prompt_length + 1)
    out: dict[str, list] = {name: [] for name in PROMPT_OUTCOMES.names}
    has_errors = "read_error" in records.column_names
    errors = records["read_error"].to_pylist() if has_errors else [None] * records.num_rows
    for source, raw, error in zip(records["source"].to_pylist(), records["raw"].to_pylist(), errors):
        try:
            if error is not None:
                raise Reject(error)
            prompt = prompt_of(map_columns(parse_row(raw), columns))
            text = prompt if isinstance(prompt, str) else renderer.render(prompt, [])[0]
            ids = tokenizer(text, add_special_tokens=False, truncation=False)["input_ids"]
            if rules.add_bos and ids[:1] != [rules.bos_id]:
                ids = [rules.bos_id, *ids]
            if len(ids) > max_prompt_length:
                raise Reject("prompt_too_long")
            row = {"prompt_json": json.dumps(prompt, ensure_ascii=False), "prompt_text": text, "prompt_ids": ids}
            row.update(reason=None, raw=None)
        except Reject as reject:
            row = {"prompt_json": None, "prompt_text": None, "prompt_ids": [], "reason": reject.reason, "raw": raw}
        out["source"].append(source)
        for name, value in row.items():
            out[name].append(value)
    return pa.Table.from_pydict(out, schema=PROMPT_OUTCOMES)


def order_key(seed: int, text: str) -> str:
    """A prompt's place in the seeded order: a hex digest of (seed, rendered text), compared as a string."""
    return hashlib.sha256(f"{seed}\x00{text}".encode()).hexdigest()


def kept_in_order(outcomes: pa.Table, *, seed: int) -> tuple[pa.Table, np.ndarray]:
    """(the kept prompts in the seeded order with id and position columns, a reason per outcome row).

    Later copies of a rendered text already kept are rejected as duplicate_prompt: the returned reasons are
    the outcomes' own with those added (None for a kept row).
    """
    reasons = np.array(outcomes["reason"].to_pylist(), dtype=object)
    texts = cast("list[str]", outcomes["prompt_text"].to_pylist())
    seen: set[str] = set()
    for i, text in enumerate(texts):
        if reasons[i] is not None:
            continue
        if text in seen:
            reasons[i] = "duplicate_prompt"
        seen.add(text)
    keep = np.array([r is None for r in reasons], dtype=bool)
    kept = outcomes.filter(pa.array(keep)).select(["prompt_json", "prompt_text", "prompt_ids"])
    keys = [order_key(seed, t) for t in cast("list[str]", kept["prompt_text"].to_pylist())]
    order = np.argsort(np.array(keys, dtype=object), kind="stable")
    kept = kept.take(pa.array(order, pa.int64()))
    ids = [hashlib.sha256(t.encode()).hexdigest()[:16] for t in cast("list[str]", kept["prompt_text"].to_pylist())]
    kept = kept.add_column(0, "id", pa.array(ids, pa.string()))
    kept = kept.add_column(1, "position", pa.array(np.arange(kept.num_rows), pa.int64()))
    return kept, reasons


def round_positions(pool_size: int, *, round_index: int, per_round: int) -> np.ndarray:
    """Positions in the pool of round `round_index`'s (1-based) prompts: the next `per_round` after the
    previous rounds', wrapping around to the start when the pool runs out. Shape (min(per_round, pool),)."""
    if pool_size < 1:
        raise ValueError("the prompt pool is empty: every prompt was held out or rejected")
    if round_index < 1:
        raise ValueError(f"rounds count from 1, got {round_index}")
    start = (round_index - 1) * per_round
    return (start + np.arange(min(per_round, pool_size))) % pool_size
