"""What the API judge is asked, and how its verdict is read back out of the reply."""

from __future__ import annotations

import re

from pipeline.evaluation.judges import Verdict

TASKS = ("summarization", "dialogue", "generic")

# A choice as written (any case) to its Verdict: shared with the JSON and log-prob readings (verdicts.py).
LABELS: dict[str, Verdict] = {"a": "A", "b": "B", "tie": "tie"}

# Each template is one user message. The answers are labelled A and B; the last line of the reply carries
# the verdict, after a one-sentence comparison (asking for a reason first tends to steady the verdict).
_ANSWER_FORMAT = (
    "Start with one sentence comparing the two. Then finish with a line of its own that reads exactly "
    '"Preferred: A" or "Preferred: B", or "Preferred: Tie" if neither is better, with nothing after it.'
)

# `verdict: json` asks for the same two things as an object (pipeline/evaluation/api_judge/verdicts.py).
_JSON_FORMAT = (
    'Answer with a JSON object whose "comparison" is one sentence comparing the two and whose "preferred" is '
    '"A" or "B", or "tie" if neither is better.'
)

_BODIES: dict[str, str] = {
    "summarization": (
        "You are comparing two summaries of the same forum post.\n\n"
        "<post>\n{prompt}\n</post>\n\n"
        "<summary A>\n{first}\n</summary A>\n\n"
        "<summary B>\n{second}\n</summary B>\n\n"
        "The better summary is the one that carries the points of the post that matter most, and does not "
        "spend words on minor details or state anything the post does not support. Judge on that alone: "
        "neither the order of the summaries nor their length is a reason to prefer one.\n\n"
    ),
    "dialogue": (
        "You are comparing two replies an assistant could give to the same user message.\n\n"
        "<conversation>\n{prompt}\n</conversation>\n\n"
        "<reply A>\n{first}\n</reply A>\n\n"
        "<reply B>\n{second}\n</reply B>\n\n"
        "The better reply is the one that is more helpful to the user with what they asked: it addresses "
        "their actual request, is correct, and is of use to them. Judge on that alone: neither the order "
        "of the replies nor their length is a reason to prefer one.\n\n"
    ),
    "generic": (
        "You are comparing two responses to the same instruction.\n\n"
        "<instruction>\n{prompt}\n</instruction>\n\n"
        "<response A>\n{first}\n</response A>\n\n"
        "<response B>\n{second}\n</response B>\n\n"
        "The better response is the one that does what the instruction asks, more completely and more "
        "accurately. Judge on that alone: neither the order of the responses nor their length is a reason "
        "to prefer one.\n\n"
    ),
}

# The built-in prompts as the text and log-prob verdicts send them; `builtin_prompt` gives any verdict's.
PROMPT_TEMPLATES: dict[str, str] = {task: body + _ANSWER_FORMAT for task, body in _BODIES.items()}


def builtin_prompt(task: str, verdict: str) -> str:
    """The built-in prompt of `task`, asking for the answer in the form `verdict` reads (json, or text)."""
    return _BODIES[task] + (_JSON_FORMAT if verdict == "json" else _ANSWER_FORMAT)


_PLACEHOLDER = re.compile(r"\{(prompt|first|second)\}")

_MARKUP = re.compile(r"[*_`#>~]")
# A line that starts with "preferred" (a sentence such as "I would have preferred a shorter one" does not),
# an optional noun and separator, then the choice as a word of its own.
_NOUN = r"(?:summary|response|reply|answer|option|output)"
_VERDICT_LINE = re.compile(
    r"^(?:final\s+(?:answer|verdict)\s*[:\-]?\s*)?preferred(?:\s+" + _NOUN + r")?\s*(?:[:=\-\u2013\u2014]|\bis\b)?"
    r"\s*(?:" + _NOUN + r"\s+)?[\"'(\[]?\s*(a|b|tie)\b(.*)$",
    re.IGNORECASE,
)
_BARE_VERDICT = re.compile(r"^[\"'(\[]?\s*(a|b|tie)\s*[\"')\].!]?$", re.IGNORECASE)
_OTHER_CHOICE = re.compile(r"\b(?:a|b|tie)\b", re.IGNORECASE)


def render_prompt(template: str, prompt: str, first: str, second: str) -> str:
    """The template with its {prompt}, {first}, {second} filled in one pass: braces inside the texts are
    left alone, and the template needs no brace escaping."""
    values = {"prompt": prompt, "first": first, "second": second}
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def parse_verdict(text: str | None) -> Verdict:
    """The verdict in a judge's reply: "A", "B" or "tie"; "unparsed" when none can be read. Never raises.

    Reads the last line of the form "Preferred: X" (any case, markdown emphasis, "Preferred: Response B",
    "preferred - tie" all work). A line naming a second choice after the first ("Preferred: A or B") is
    ambiguous and skipped. A reply that is nothing but "A", "B" or "Tie" is read too.
    """
    if not isinstance(text, str):
        return "unparsed"
    lines = [_MARKUP.sub("", line).strip() for line in text.splitlines()]
    for line in reversed(lines):
        match = _VERDICT_LINE.match(line)
        if match is None:
            continue
        if _OTHER_CHOICE.search(match.group(2)):
            continue
        return LABELS.get(match.group(1).lower(), "unparsed")
    nonempty = [line for line in lines if line]
    if len(nonempty) == 1:
        match = _BARE_VERDICT.match(nonempty[0])
        if match:
            return LABELS.get(match.group(1).lower(), "unparsed")
    return "unparsed"
