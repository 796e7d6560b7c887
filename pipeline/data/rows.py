"""One raw row to its examples: JSON parsing, column mapping, format detection, and each format's fields.

Formats (detected per row with format="auto", from the keys present after column mapping; a key whose value
is null counts as absent):

    scored           {"prompt": str | messages, "completions": [{"text": ..., "score": number}, ...]}
                     (see `pipeline.data.scored`)
    unpaired (KTO)   {"prompt": str | messages, "completion": str | messages, "label": bool}
    standard         {"prompt": str, "chosen": str, "rejected": str}
    conversational   {"prompt": messages, "chosen": messages, "rejected": messages}
    implicit_prompt  {"chosen": str | messages, "rejected": str | messages}, no prompt: for strings the
                     prompt is the shared prefix up to and including the last "\\n\\nAssistant:" marker
                     (Anthropic HH); for message lists it is the shared leading messages before the last
                     assistant turn.
Auto detection, first match wins: "completions" -> scored; "chosen"/"rejected" with "prompt" -> standard,
or conversational when any of the three is a list; "chosen"/"rejected" without "prompt" -> implicit_prompt;
"completion" or "label" -> unpaired; none of these -> "missing_field". Other keys are ignored.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from pipeline.data.chat import ChatRenderer, checked_messages
from pipeline.data.examples import checked_example, same_shape
from pipeline.data.outcomes import Example, Reject, common_prefix_length
from pipeline.data.scored import scored_examples

FORMATS = ("auto", "standard", "conversational", "implicit_prompt", "unpaired", "scored")
COLUMN_NAMES = frozenset({"prompt", "chosen", "rejected", "completion", "label", "completions"})
HH_ASSISTANT_MARKER = "\n\nAssistant:"


def parse_row(raw) -> dict:
    """The row a record's raw JSON text holds; `Reject` when it is not JSON or not an object."""
    if not isinstance(raw, str):
        raise Reject("malformed_json")
    try:
        row = json.loads(raw)
    except ValueError:
        raise Reject("malformed_json") from None
    if not isinstance(row, dict):
        raise Reject("wrong_type")
    return row


def map_columns(row: dict, columns: Mapping[str, str]) -> dict:
    """The row under our names: `columns` maps ours to the user's ({"chosen": "preferred"})."""
    if not columns:
        return row
    theirs = set(columns.values())
    # A user column that is not mapped but happens to carry one of our mapped names is not ours: drop it.
    mapped = {k: v for k, v in row.items() if k not in theirs and k not in columns}
    for ours, their_name in columns.items():
        if their_name in row:
            mapped[ours] = row[their_name]
    return mapped


def detect_format(row: dict) -> str:
    present = {k for k, v in row.items() if v is not None}
    if "completions" in present:
        return "scored"
    # Pairs before unpaired: a paired dataset may well carry a metadata column called "label".
    if "chosen" in present or "rejected" in present:
        if "prompt" not in present:
            return "implicit_prompt"
        if any(isinstance(row.get(k), list) for k in ("prompt", "chosen", "rejected")):
            return "conversational"
        return "standard"
    if "completion" in present or "label" in present:
        return "unpaired"
    raise Reject("missing_field")


def row_examples(
    row: dict, kind: str, renderer: ChatRenderer, *, pairing: str, min_score_gap: float
) -> list[Example | Reject]:
    """The row's outcomes as format `kind`: examples, and for scored rows also `Reject`s of single pairs.

    Raises `Reject` when the whole row is rejected.
    """
    if kind in ("standard", "conversational"):
        prompt, chosen, rejected = _fields(row, "prompt", "chosen", "rejected")
        want = list if kind == "conversational" else str
        if not all(isinstance(v, want) for v in (prompt, chosen, rejected)):
            raise Reject("wrong_type")
        return [checked_example(renderer, prompt, [chosen, rejected])]
    if kind == "implicit_prompt":
        prompt, chosen, rejected = split_implicit(*_fields(row, "chosen", "rejected"))
        return [checked_example(renderer, prompt, [chosen, rejected])]
    if kind == "unpaired":
        prompt, completion, label = _fields(row, "prompt", "completion", "label")
        if not isinstance(label, bool):
            raise Reject("wrong_type")
        return [checked_example(renderer, prompt, [completion], label)]
    if kind == "scored":
        return scored_examples(row, renderer, pairing=pairing, min_score_gap=min_score_gap)
    raise AssertionError(kind)


def _fields(row: dict, *keys: str) -> list:
    values = [row.get(key) for key in keys]
    if any(value is None for value in values):
        raise Reject("missing_field")
    return values


def split_implicit(chosen, rejected) -> tuple:
    """Split HH-style texts (or message lists) into (prompt, chosen_response, rejected_response)."""
    same_shape(chosen, [rejected])
    if isinstance(chosen, str):
        shared = common_prefix_length(chosen, rejected)
        marker_at = chosen.rfind(HH_ASSISTANT_MARKER, 0, shared)
        if marker_at < 0:
            raise Reject("no_shared_prompt")
        cut = marker_at + len(HH_ASSISTANT_MARKER)
        return chosen[:cut], chosen[cut:], rejected[cut:]
    chosen_messages, rejected_messages = checked_messages(chosen), checked_messages(rejected)
    shared = common_prefix_length(chosen_messages, rejected_messages)
    # The response starts at the last assistant turn that the shared prefix can still reach.
    starts = [i for i, m in enumerate(chosen_messages) if m["role"] == "assistant" and 0 < i <= shared]
    if not starts:
        raise Reject("no_shared_prompt")
    cut = starts[-1]
    return chosen_messages[:cut], chosen_messages[cut:], rejected_messages[cut:]
