"""What tokenizing a record produces: an example (token ids) or a rejection (a reason), one table row each.

Rejection reasons are exact strings, listed in `REASONS`. Rows with `read_error` set are passed through
with that reason. For a scored row, each candidate pair is an outcome: a row can give several examples, and
a pair that fails a check is rejected on its own; a scored row with no candidate pair at all is one
"no_pair". Every other row gives exactly one outcome, so rows_in == good + rejected.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa

OUTCOME_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string()),  # 16 hex chars of sha256(canonical JSON of the example's texts); null if rejected
        pa.field("source", pa.string()),  # "<file>:<line>" or "<file>#<row>", from read_records
        pa.field("prompt_ids", pa.list_(pa.int32())),  # empty when rejected
        pa.field("chosen_ids", pa.list_(pa.int32())),  # response ids only; the completion for unpaired rows
        pa.field("rejected_ids", pa.list_(pa.int32())),  # empty for unpaired rows
        pa.field("label", pa.bool_()),  # null for pairs (and rejections); the KTO label for unpaired rows
        pa.field("prompt_truncated", pa.bool_()),  # never null
        pa.field("response_truncated", pa.bool_()),  # never null; true if either response was cut
        pa.field("boundary_mismatch", pa.bool_()),  # never null
        pa.field("reason", pa.string()),  # null when the row is good
        pa.field("raw", pa.string()),  # the input row, set for rejected rows only
    ]
)

REASONS = (
    "malformed_json",  # the line is not JSON (blank lines included)
    "invalid_utf8",  # bytes that are not UTF-8, or a lone surrogate escape ("\ud800") in a text
    "wrong_type",  # the row is not an object, or a field has the wrong type (a score that is not finite, too)
    "missing_field",  # a required field is absent or null
    "empty_prompt",  # the prompt is empty or whitespace only
    "empty_response",  # a response is empty or whitespace only
    "identical_responses",  # chosen == rejected (as given, or as rendered by the chat template)
    "too_long",  # no room is left for any response token after the prompt
    "nul_byte",  # a "\x00" in a text
    "unknown_role",  # a message role outside system/user/assistant/tool
    "no_pair",  # a scored row from which `pairing` makes no pair (fewer than two distinct scores, gaps too small)
    "no_shared_prompt",  # implicit_prompt: chosen and rejected share no text (no leading turns) before they part
    "template_mismatch",  # the full conversation's rendering does not start with the prompt's rendering
    "template_error",  # the chat template raised on this row (e.g. roles that do not alternate)
    "identical_after_truncation",  # chosen and rejected became the same tokens once cut to max_length
    "unsupported_tool_calls",  # a message carries tool_calls and the chat template does not render them
    "unsupported_content_parts",  # a message's content is a list of text parts and the template reads only strings
    "non_text_content",  # a content part that is not text (an image, audio): a text model cannot train on it
)


class Reject(Exception):
    """The row (or one scored pair) is rejected; `reason` is one of `REASONS`."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Example:
    """One example as text: the prompt and its responses rendered, ready to tokenize.

    `responses` is [chosen, rejected] for a pair, [completion] for an unpaired row (then `label` is set).
    """

    prompt: str
    responses: list[str]
    label: bool | None = None


@dataclass(frozen=True)
class TokenizedExample:
    """An example's token ids once the BOS, boundary, EOS and truncation rules ran."""

    prompt_ids: list[int]
    response_ids: list[list[int]]  # the same order as `Example.responses`
    prompt_truncated: bool
    response_truncated: bool
    boundary_mismatch: bool


def example_id(example: Example) -> str:
    """First 16 hex chars of sha256 over the canonical JSON of the example's rendered texts.

    Content-derived: reruns give the same ids and duplicate examples share one, whatever file or format
    they came from. A swapped pair (chosen and rejected exchanged) is a different example.
    """
    prompt, responses = example.prompt, example.responses
    if len(responses) == 2:
        content = {"prompt": prompt, "chosen": responses[0], "rejected": responses[1]}
    else:
        content = {"prompt": prompt, "completion": responses[0], "label": example.label}
    canonical = json.dumps(content, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


class OutcomeColumns:
    """Builds an `OUTCOME_SCHEMA` table one outcome at a time."""

    def __init__(self):
        self.columns: dict[str, list] = {name: [] for name in OUTCOME_SCHEMA.names}

    def add_example(self, source: str, example: Example, tokens: TokenizedExample) -> None:
        responses = tokens.response_ids
        self._add(
            id=example_id(example),
            source=source,
            prompt_ids=tokens.prompt_ids,
            chosen_ids=responses[0],
            rejected_ids=responses[1] if len(responses) > 1 else [],
            label=example.label,
            prompt_truncated=tokens.prompt_truncated,
            response_truncated=tokens.response_truncated,
            boundary_mismatch=tokens.boundary_mismatch,
            reason=None,
            raw=None,
        )

    def add_rejection(self, source: str, raw: str, reason: str) -> None:
        self._add(
            id=None,
            source=source,
            prompt_ids=[],
            chosen_ids=[],
            rejected_ids=[],
            label=None,
            prompt_truncated=False,
            response_truncated=False,
            boundary_mismatch=False,
            reason=reason,
            raw=raw,
        )

    def _add(self, **values) -> None:
        for name, value in values.items():
            self.columns[name].append(value)

    def table(self) -> pa.Table:
        return pa.Table.from_pydict(self.columns, schema=OUTCOME_SCHEMA)


def is_identical_pair(responses: Sequence) -> bool:
    """Whether `responses` are a pair whose two sides are the same (a pair that teaches nothing)."""
    return len(responses) == 2 and responses[0] == responses[1]


def common_prefix_length(a: Sequence, b: Sequence) -> int:
    """How many leading items `a` and `b` share (characters, token ids or messages)."""
    shared = 0
    for x, y in zip(a, b):
        if x != y:
            break
        shared += 1
    return shared
