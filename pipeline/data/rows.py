"""One raw row to its examples: JSON parsing, column mapping, format detection, and each format's fields.

Formats (detected per row with format="auto", from the keys present after column mapping; a key whose value
is null counts as absent):

    scored           {"prompt": str | messages, "completions": [{"text": ..., "score": number}, ...]}
                     (see `pipeline.data.scored`)
    unpaired (KTO)   {"prompt": str | messages, "completion": str | messages, "label": bool}
    standard         {"prompt": str, "chosen": str, "rejected": str}
    conversational   {"prompt": messages, "chosen": messages, "rejected": messages}, or a text prompt with
                     message-list responses that repeat it as their leading turns (UltraFeedback binarized:
                     the prompt is then those shared turns) or that hold only the assistant's turns
    implicit_prompt  {"chosen": str | messages, "rejected": str | messages}, no prompt: for strings the
                     prompt is the shared prefix, up to and including the last "\\n\\nAssistant:" marker in it
                     (Anthropic HH) when there is one, else up to the end of the last word before the texts
                     part (TRL's rule, on a word boundary); for message lists it is the shared leading
                     messages before the last assistant turn.
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
    except (ValueError, RecursionError):  # RecursionError: nested deeper than Python parses
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
        if kind == "conversational" and isinstance(prompt, str):
            prompt, chosen, rejected = _split_with_prompt_text(prompt, chosen, rejected)
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


def _split_with_prompt_text(prompt: str, chosen, rejected) -> tuple:
    """A text prompt beside message-list responses (UltraFeedback binarized): the lists carry the prompt.

    When they repeat it as their shared leading turns, those turns are the prompt (the text is then not
    needed); when they hold only the responses (they start with an assistant turn), the text is the user
    turn before them.
    """
    if not (isinstance(chosen, list) and isinstance(rejected, list)):
        raise Reject("wrong_type")
    try:
        return split_implicit(chosen, rejected)
    except Reject as reject:
        if reject.reason != "no_shared_prompt" or not _starts_with_assistant(chosen, rejected):
            raise
    return [{"role": "user", "content": prompt}], chosen, rejected


def _starts_with_assistant(*message_lists: list) -> bool:
    return all(messages and messages[0].get("role") == "assistant" for messages in message_lists)


def _fields(row: dict, *keys: str) -> list:
    values = [row.get(key) for key in keys]
    if any(value is None for value in values):
        raise Reject("missing_field")
    return values


def split_implicit(chosen, rejected) -> tuple:
    """Split full texts (or message lists) into (prompt, chosen_response, rejected_response)."""
    same_shape(chosen, [rejected])
    if isinstance(chosen, str):
        return _split_texts(chosen, rejected)
    chosen_messages, rejected_messages = checked_messages(chosen), checked_messages(rejected)
    shared = common_prefix_length(chosen_messages, rejected_messages)
    # The response starts at the last assistant turn that the shared prefix can still reach.
    starts = [i for i, m in enumerate(chosen_messages) if m["role"] == "assistant" and 0 < i <= shared]
    if not starts:
        raise Reject("no_shared_prompt")
    cut = starts[-1]
    return chosen_messages[:cut], chosen_messages[cut:], rejected_messages[cut:]


def _split_texts(chosen: str, rejected: str) -> tuple[str, str, str]:
    """The prompt is the shared prefix: up to the last HH assistant marker in it, else up to its last word."""
    shared = common_prefix_length(chosen, rejected)
    marker_at = chosen.rfind(HH_ASSISTANT_MARKER, 0, shared)
    cut = marker_at + len(HH_ASSISTANT_MARKER) if marker_at >= 0 else _word_boundary(chosen, shared)
    if not chosen[:cut].strip():
        raise Reject("no_shared_prompt")
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _word_boundary(text: str, shared: int) -> int:
    """Where `text[:shared]` stops before the word in which the texts part, and before the spaces ahead of it.

    "The sky is blue." / "The sky is green." part at "b"/"g": the prompt is "The sky is", each response starts
    with its space, as a tokenizer that puts a word's leading space in its token wants it. A shared prefix
    with no space at all is cut where the texts part; the token rules then move the cut to a token boundary.
    """
    cut = shared
    while cut > 0 and not text[cut - 1].isspace():
        cut -= 1
    if cut == 0:
        return shared
    while cut > 0 and text[cut - 1].isspace():
        cut -= 1
    return cut
