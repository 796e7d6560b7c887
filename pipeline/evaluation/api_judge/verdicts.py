"""Reading a verdict out of a judge's reply: a JSON field or the answer labels' log-probs, the regex as fallback.

`verdict: json` asks the server for structured output (`response_format` with a JSON schema: OpenAI, and
`vllm serve` by guided decoding), so the verdict is a field of an object the server has already checked.
`verdict: logprobs` asks for the log-probabilities of the reply's tokens and reads the verdict where the
reply writes its label after "Preferred:": the label with the highest probability among A, B and Tie there.
`verdict: text` reads the reply with `parse_verdict`'s regex alone.

Whenever the structured reading finds nothing (a server that ignores `response_format`, one that returns no
log-probs, a reply cut short), the regex reads the text instead; `ReadVerdict.source` says which way the
verdict came, so the judge can count how often the fallback was needed. Neither way ever raises.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from pipeline.evaluation.api_judge.templates import LABELS, parse_verdict
from pipeline.evaluation.judges import Verdict

VERDICT_MODES = ("json", "logprobs", "text")

# The object a `verdict: json` reply must be: a sentence first (asking for a reason before the verdict
# tends to steady it, as in the text prompts), then the choice. Strict mode needs every property required
# and no others.
VERDICT_SCHEMA = {
    "type": "object",
    "properties": {
        "comparison": {"type": "string", "description": "one sentence comparing the two"},
        "preferred": {"type": "string", "enum": ["A", "B", "tie"]},
    },
    "required": ["comparison", "preferred"],
    "additionalProperties": False,
}

TOP_LOGPROBS = 5  # alternatives asked per position: the three labels and room for their spellings

_MARKUP = re.compile(r"[*_`#>~\"'()\[\]]")


@dataclass(frozen=True)
class ReadVerdict:
    """A verdict and how it was read: "json", "logprobs", "regex" (the text, by `parse_verdict`)."""

    verdict: Verdict
    source: str


def read_verdict(text: str | None, label_logprobs: dict[str, float] | None, mode: str) -> ReadVerdict:
    """The verdict of one reply under `mode`, falling back to the regex on its text."""
    if mode == "json":
        verdict = json_verdict(text)
        if verdict is not None:
            return ReadVerdict(verdict, "json")
    if mode == "logprobs" and label_logprobs:
        best = max(label_logprobs, key=label_logprobs.__getitem__)
        return ReadVerdict(best, "logprobs")  # type: ignore[arg-type]  # keys are Verdicts
    return ReadVerdict(parse_verdict(text), "regex")


def json_verdict(text: str | None) -> Verdict | None:
    """The `preferred` field of a reply holding a JSON object of VERDICT_SCHEMA's shape; None otherwise."""
    if not isinstance(text, str):
        return None
    try:
        reply = json.loads(text)
    except ValueError:
        # A model that wraps its object in a code fence or a sentence: the outermost braces.
        try:
            reply = json.loads(text[text.find("{") : text.rfind("}") + 1])
        except ValueError:
            return None
    choice = reply.get("preferred") if isinstance(reply, dict) else None
    return LABELS.get(choice.strip().lower()) if isinstance(choice, str) else None


def label_logprobs(tokens: Sequence[tuple[str, Sequence[tuple[str, float]]]]) -> dict[str, float] | None:
    """Log-probabilities of the labels A, B and Tie where the reply writes its verdict; None if it never does.

    tokens: the reply's tokens in order, each as (token text, [(alternative token, logprob), ...]), the
    alternatives being the server's top log-probs at that position. The verdict position is the last one
    whose own token is a label and whose preceding text, markup stripped, ends in "preferred:"; or, in a
    reply that is nothing but a label, that label's token. Spellings of one label (" A", "A") add up; labels outside the
    server's top alternatives are left out.
    """
    position, before = None, ""
    for i, (token, _) in enumerate(tokens):
        if _label(token) is not None and _MARKUP.sub("", before).strip().lower().endswith("preferred:"):
            position = i
        before += token
    if position is None and _label(before) is not None:  # the whole reply is one label
        position = next((i for i, (token, _) in enumerate(tokens) if _label(token) is not None), None)
    if position is None:
        return None
    probs: dict[str, float] = {}
    for alternative, logprob in tokens[position][1]:
        label = _label(alternative)
        if label is not None:
            probs[label] = probs.get(label, 0.0) + math.exp(logprob)
    return {label: math.log(p) for label, p in probs.items() if p > 0} or None


def _label(token: str) -> Verdict | None:
    return LABELS.get(_MARKUP.sub("", token).strip().lower())
