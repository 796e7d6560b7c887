"""From raw preference records to token ids: one pure function over an Arrow batch.

`process_records` takes the table `pipeline.data.sources.read_records` makes (or a Ray Data batch of it) and
returns one row per produced example or per rejection, with `OUTCOME_SCHEMA`. It holds no state, does no
I/O and uses no randomness, so the same batch and tokenizer always give the same table.

Formats (detected per row with format="auto", from the keys present after column mapping; a key whose value
is null counts as absent):

    scored           {"prompt": str | messages, "completions": [{"text": str | messages, "score": number}, ...]}
                     The text may also be under "response" or "content", the score under "overall_score"
                     (UltraFeedback's raw rows). Pairs are made by `pairing` (see `make_pairs`).
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
`messages` is a list of {"role": "system"|"user"|"assistant"|"tool", "content": str}; other keys are dropped.

Message lists are rendered with the chat template: the prompt with add_generation_prompt=True, each response
as the text the full conversation (prompt + response messages) adds after the prompt's rendering. The
template is `chat_template` when given (as with `apply_chat_template(chat_template=...)`, the explicit one
wins), else the tokenizer's own; a conversational row with neither is a configuration error (ValueError).

Token ids (all with add_special_tokens=False; BOS and EOS are placed by the rules below):
  * prompt_ids + response_ids == the ids of the whole text prompt + response. When the tokenizer merges
    across the boundary, the prompt is cut where the whole text's ids first differ from the prompt's ids
    (the same cut for chosen and rejected, so both share `prompt_ids`) and `boundary_mismatch` is set.
  * BOS is prepended to the prompt only when the tokenizer has one, adds it by default, and the text does
    not already start with it (chat templates often write it themselves): never doubled.
  * EOS ends each response exactly once: appended unless the response's last non-whitespace token is
    already EOS (templates that close a turn with it).
  * Truncation: the prompt keeps its END, max_prompt_length tokens (a leading BOS is kept); then each
    response is cut to max_length - len(prompt_ids). A truncated response loses its EOS, as in TRL: the
    model is not taught to stop where the text was cut.

Rejection reasons (exact strings, see `REASONS`). Rows with `read_error` set are passed through with that
reason. For a scored row, each candidate pair is an outcome: a row can give several examples, and a pair
that fails a check is rejected on its own; a scored row with no candidate pair at all is one "no_pair".
Every other row gives exactly one outcome, so rows_in == good + rejected.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

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
    "no_shared_prompt",  # implicit_prompt: chosen and rejected share no prompt (no marker / no leading turns)
    "template_mismatch",  # the full conversation's rendering does not start with the prompt's rendering
    "template_error",  # the chat template raised on this row (e.g. roles that do not alternate)
    "identical_after_truncation",  # chosen and rejected became the same tokens once cut to max_length
)

FORMATS = ("auto", "standard", "conversational", "implicit_prompt", "unpaired", "scored")
PAIRINGS = ("best_vs_worst", "best_vs_rest", "all_pairs")
ROLES = frozenset({"system", "user", "assistant", "tool"})
COLUMN_NAMES = frozenset({"prompt", "chosen", "rejected", "completion", "label", "completions"})
HH_ASSISTANT_MARKER = "\n\nAssistant:"
SCORED_TEXT_KEYS = ("text", "response", "content")
SCORED_SCORE_KEYS = ("score", "overall_score")

_NO_COLUMNS: Mapping[str, str] = MappingProxyType({})


class _Reject(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class _Candidate:
    """One example before tokenization: texts rendered, ids still to come."""

    source: str
    raw: str
    prompt: str
    responses: list[str]  # [chosen, rejected] or [completion]
    label: bool | None


def process_records(
    table: pa.Table,
    tokenizer,
    *,
    format: str = "auto",
    columns: Mapping[str, str] = _NO_COLUMNS,
    chat_template: str | None = None,
    max_prompt_length: int,
    max_length: int,
    pairing: str = "best_vs_worst",
    min_score_gap: float = 0.0,
) -> pa.Table:
    """Turn raw records (columns source, raw, read_error) into examples and rejections (`OUTCOME_SCHEMA`).

    Rows come out in input order (a scored row's pairs in pairing order). Raises ValueError for a bad
    configuration: unknown format/pairing/column name, non-positive lengths, a tokenizer without EOS, or a
    conversational row with no chat template anywhere.
    """
    _check_config(format, columns, max_prompt_length, max_length, pairing, min_score_gap)
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError("the tokenizer has no EOS token; every response must end with one")
    renderer = _Renderer(tokenizer, chat_template)
    sources = table.column("source").to_pylist()
    raws = table.column("raw").to_pylist()
    read_errors = (
        table.column("read_error").to_pylist() if "read_error" in table.column_names else [None] * len(sources)
    )

    # Pass 1: parse, check and render every row; tokenization waits so that it runs as one batch call.
    slots: list[_Candidate | tuple[str, str, str]] = []
    for source, raw, read_error in zip(sources, raws, read_errors):
        if read_error is not None:
            slots.append((source, raw, read_error))
            continue
        try:
            row = _mapped_row(_parse(raw), columns)
            kind = format if format != "auto" else _detect(row)
            outcomes = _examples(row, kind, renderer, pairing, min_score_gap)
        except _Reject as reject:
            slots.append((source, raw, reject.reason))
            continue
        for outcome in outcomes:
            if isinstance(outcome, _Reject):
                slots.append((source, raw, outcome.reason))
            else:
                prompt, responses, label = outcome
                slots.append(_Candidate(source, raw, prompt, responses, label))

    # Pass 2: tokenize every prompt and every prompt+response text of the batch at once.
    candidates = [s for s in slots if isinstance(s, _Candidate)]
    texts = []
    for c in candidates:
        texts.append(c.prompt)
        texts.extend(c.prompt + r for r in c.responses)
    # truncation=False overrides any truncation a loaded tokenizer.json switched on: we cut, by our rules.
    encoded = iter(tokenizer(texts, add_special_tokens=False, truncation=False)["input_ids"] if texts else [])
    rules = _TokenRules(tokenizer, max_prompt_length, max_length)

    out = {name: [] for name in OUTCOME_SCHEMA.names}
    for slot in slots:
        if isinstance(slot, _Candidate):
            prompt_ids = next(encoded)
            full_ids = [next(encoded) for _ in slot.responses]
            try:
                ids, flags = rules.split(prompt_ids, full_ids)
            except _Reject as reject:
                _append_rejection(out, slot.source, slot.raw, reject.reason)
                continue
            prompt, responses = ids
            out["id"].append(example_id(slot.prompt, slot.responses, slot.label))
            out["source"].append(slot.source)
            out["prompt_ids"].append(prompt)
            out["chosen_ids"].append(responses[0])
            out["rejected_ids"].append(responses[1] if len(responses) > 1 else [])
            out["label"].append(slot.label)
            out["prompt_truncated"].append(flags[0])
            out["response_truncated"].append(flags[1])
            out["boundary_mismatch"].append(flags[2])
            out["reason"].append(None)
            out["raw"].append(None)
        else:
            _append_rejection(out, *slot)
    return pa.Table.from_pydict(out, schema=OUTCOME_SCHEMA)


def example_id(prompt: str, responses: Sequence[str], label: bool | None) -> str:
    """First 16 hex chars of sha256 over the canonical JSON of the example's rendered texts.

    Content-derived: reruns give the same ids and duplicate examples share one, whatever file or format
    they came from. A swapped pair (chosen and rejected exchanged) is a different example.
    """
    if len(responses) == 2:
        content = {"prompt": prompt, "chosen": responses[0], "rejected": responses[1]}
    else:
        content = {"prompt": prompt, "completion": responses[0], "label": label}
    canonical = json.dumps(content, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def _append_rejection(out: dict, source: str, raw: str, reason: str) -> None:
    for name, value in (
        ("id", None),
        ("source", source),
        ("prompt_ids", []),
        ("chosen_ids", []),
        ("rejected_ids", []),
        ("label", None),
        ("prompt_truncated", False),
        ("response_truncated", False),
        ("boundary_mismatch", False),
        ("reason", reason),
        ("raw", raw),
    ):
        out[name].append(value)


def _check_config(format, columns, max_prompt_length, max_length, pairing, min_score_gap) -> None:
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
    unknown = sorted(set(columns) - COLUMN_NAMES)
    if unknown:
        raise ValueError(f"columns: unknown names {unknown}; the keys are ours, from {sorted(COLUMN_NAMES)}")
    if not all(isinstance(v, str) for v in columns.values()):
        raise ValueError("columns: each value must be the name of a column in the data (a string)")
    if max_prompt_length < 1 or max_length < 1:
        raise ValueError(f"max_prompt_length and max_length must be positive, got {max_prompt_length}, {max_length}")
    if not (isinstance(min_score_gap, (int, float)) and math.isfinite(min_score_gap) and min_score_gap >= 0):
        raise ValueError(f"min_score_gap must be a finite number >= 0, got {min_score_gap!r}")


# ---------------------------------------------------------------------------------------------- rows


def _parse(raw) -> dict:
    if not isinstance(raw, str):
        raise _Reject("malformed_json")
    try:
        row = json.loads(raw)
    except ValueError:
        raise _Reject("malformed_json") from None
    if not isinstance(row, dict):
        raise _Reject("wrong_type")
    return row


def _mapped_row(row: dict, columns: Mapping[str, str]) -> dict:
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


def _detect(row: dict) -> str:
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
    raise _Reject("missing_field")


def _get(row: dict, key: str):
    value = row.get(key)
    if value is None:
        raise _Reject("missing_field")
    return value


def _examples(row: dict, kind: str, renderer: "_Renderer", pairing: str, min_score_gap: float) -> list:
    """The row's outcomes: (prompt_text, response_texts, label) tuples and `_Reject`s (scored rows only).

    Raises `_Reject` when the whole row is rejected.
    """
    if kind in ("standard", "conversational"):
        prompt, chosen, rejected = _get(row, "prompt"), _get(row, "chosen"), _get(row, "rejected")
        want = list if kind == "conversational" else str
        if not all(isinstance(v, want) for v in (prompt, chosen, rejected)):
            raise _Reject("wrong_type")
        return [_render_checked(renderer, prompt, [chosen, rejected], None)]
    if kind == "implicit_prompt":
        prompt, chosen, rejected = _split_implicit(_get(row, "chosen"), _get(row, "rejected"))
        return [_render_checked(renderer, prompt, [chosen, rejected], None)]
    if kind == "unpaired":
        prompt, completion, label = _get(row, "prompt"), _get(row, "completion"), _get(row, "label")
        if not isinstance(label, bool):
            raise _Reject("wrong_type")
        _same_shape(prompt, [completion])
        return [_render_checked(renderer, prompt, [completion], label)]
    if kind == "scored":
        return _scored(row, renderer, pairing, min_score_gap)
    raise AssertionError(kind)


def _same_shape(prompt, responses) -> None:
    """Texts of one example are all strings or all message lists."""
    want = list if isinstance(prompt, list) else str
    if not all(isinstance(v, want) for v in [prompt, *responses]):
        raise _Reject("wrong_type")


def _render_checked(renderer: "_Renderer | None", prompt, responses: list, label: bool | None):
    """Check the example's fields, then render it to (prompt_text, response_texts, label).

    Checks run in a fixed order, so a row with several faults always gets the same reason: types,
    invalid_utf8, nul_byte, unknown_role, empty_prompt, empty_response, identical_responses.
    With renderer None the fields are only checked.
    """
    _same_shape(prompt, responses)
    if isinstance(prompt, list):
        prompt = _messages(prompt)
        responses = [_messages(r) for r in responses]
        strings = [s for m in [prompt, *responses] for msg in m for s in (msg["role"], msg["content"])]
    else:
        strings = [prompt, *responses]
    _check_strings(strings)
    if isinstance(prompt, list):
        if any(msg["role"] not in ROLES for m in [prompt, *responses] for msg in m):
            raise _Reject("unknown_role")
        if _blank_messages(prompt):
            raise _Reject("empty_prompt")
        if any(_blank_messages(r) for r in responses):
            raise _Reject("empty_response")
    else:
        if not prompt.strip():
            raise _Reject("empty_prompt")
        if any(not r.strip() for r in responses):
            raise _Reject("empty_response")
    if len(responses) == 2 and responses[0] == responses[1]:
        raise _Reject("identical_responses")
    if renderer is None:  # checking only
        return None
    if isinstance(prompt, list):
        prompt_text, response_texts = renderer.render(prompt, responses)
        if len(response_texts) == 2 and response_texts[0] == response_texts[1]:
            raise _Reject("identical_responses")  # different messages, same text once rendered
        return prompt_text, response_texts, label
    return prompt, responses, label


def _check_strings(strings: list[str]) -> None:
    for s in strings:
        try:
            s.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: not Unicode text, cannot be written or tokenized
            raise _Reject("invalid_utf8") from None
    if any("\x00" in s for s in strings):
        raise _Reject("nul_byte")


def _messages(value: list) -> list[dict]:
    messages = []
    for message in value:
        if not isinstance(message, dict):
            raise _Reject("wrong_type")
        role, content = message.get("role"), message.get("content")
        if role is None or content is None:
            raise _Reject("missing_field")
        if not isinstance(role, str) or not isinstance(content, str):
            raise _Reject("wrong_type")
        messages.append({"role": role, "content": content})
    return messages


def _blank_messages(messages: list[dict]) -> bool:
    return all(not m["content"].strip() for m in messages)


def _split_implicit(chosen, rejected):
    """Split HH-style texts (or message lists) into (prompt, chosen_response, rejected_response)."""
    _same_shape(chosen, [rejected])
    if isinstance(chosen, str):
        shared = 0
        for a, b in zip(chosen, rejected):
            if a != b:
                break
            shared += 1
        marker_at = chosen.rfind(HH_ASSISTANT_MARKER, 0, shared)
        if marker_at < 0:
            raise _Reject("no_shared_prompt")
        cut = marker_at + len(HH_ASSISTANT_MARKER)
        return chosen[:cut], chosen[cut:], rejected[cut:]
    chosen_messages, rejected_messages = _messages(chosen), _messages(rejected)
    shared = 0
    for a, b in zip(chosen_messages, rejected_messages):
        if a != b:
            break
        shared += 1
    # The response starts at the last assistant turn that the shared prefix can still reach.
    starts = [i for i, m in enumerate(chosen_messages) if m["role"] == "assistant" and 0 < i <= shared]
    if not starts:
        raise _Reject("no_shared_prompt")
    cut = starts[-1]
    return chosen_messages[:cut], chosen_messages[cut:], rejected_messages[cut:]


def _scored(row: dict, renderer: "_Renderer", pairing: str, min_score_gap: float) -> list:
    prompt, completions = _get(row, "prompt"), _get(row, "completions")
    if not isinstance(completions, list) or not isinstance(prompt, (str, list)):
        raise _Reject("wrong_type")
    texts, scores = [], []
    for item in completions:
        if not isinstance(item, dict):
            raise _Reject("wrong_type")
        text = next((item[k] for k in SCORED_TEXT_KEYS if item.get(k) is not None), None)
        score = next((item[k] for k in SCORED_SCORE_KEYS if item.get(k) is not None), None)
        if text is None or score is None:
            raise _Reject("missing_field")
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            raise _Reject("wrong_type")
        if isinstance(prompt, list) and isinstance(text, str):
            text = [{"role": "assistant", "content": text}]
        texts.append(text)
        scores.append(score)
    _same_shape(prompt, texts)
    pairs = make_pairs(scores, pairing=pairing, min_score_gap=min_score_gap)
    if not pairs:
        raise _Reject("no_pair")
    # The prompt is shared by every pair: check it once, so a bad prompt is one rejection, not one per pair.
    _render_checked(None, prompt, [], None)
    outcomes = []
    for better, worse in pairs:
        try:
            outcomes.append(_render_checked(renderer, prompt, [texts[better], texts[worse]], None))
        except _Reject as reject:
            outcomes.append(reject)
    return outcomes


def make_pairs(scores: Sequence[float], *, pairing: str, min_score_gap: float = 0.0) -> list[tuple[int, int]]:
    """(better, worse) index pairs from per-completion scores. Ties never pair; gaps below min_score_gap don't.

    best_vs_worst: the highest score against the lowest (first index wins ties), at most one pair.
    best_vs_rest: the highest against each other completion with a lower score.
    all_pairs: every two completions with different scores, higher first, in index order.
    """

    def ok(better: int, worse: int) -> bool:
        gap = scores[better] - scores[worse]
        return gap > 0 and gap >= min_score_gap

    n = len(scores)
    if n < 2:
        return []
    best = min(range(n), key=lambda i: (-scores[i], i))
    if pairing == "best_vs_worst":
        worst = min(range(n), key=lambda i: (scores[i], i))
        return [(best, worst)] if ok(best, worst) else []
    if pairing == "best_vs_rest":
        return [(best, j) for j in range(n) if j != best and ok(best, j)]
    if pairing == "all_pairs":
        pairs = []
        for i in range(n):
            for j in range(i + 1, n):
                hi, lo = (i, j) if scores[i] > scores[j] else (j, i)
                if ok(hi, lo):
                    pairs.append((hi, lo))
        return pairs
    raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")


# ---------------------------------------------------------------------------------------------- rendering


class _Renderer:
    """Renders message lists with a chat template; resolves the template only when a row needs one."""

    def __init__(self, tokenizer, chat_template: str | None):
        self.tokenizer = tokenizer
        self.template = chat_template or getattr(tokenizer, "chat_template", None)

    def _apply(self, messages: list[dict], add_generation_prompt: bool) -> str:
        if not self.template:
            raise ValueError(
                "conversational rows need a chat template: the tokenizer has none, so set chat_template in the config"
            )
        try:
            text = self.tokenizer.apply_chat_template(
                messages, chat_template=self.template, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as exc:  # jinja raises its own types, and templates raise on purpose (raise_exception)
            raise _Reject("template_error") from exc
        if not isinstance(text, str):
            raise ValueError("apply_chat_template(tokenize=False) did not return text; check the tokenizer")
        return text

    def render(self, prompt: list[dict], responses: list[list[dict]]) -> tuple[str, list[str]]:
        prompt_text = self._apply(prompt, add_generation_prompt=True)
        response_texts = []
        for response in responses:
            full = self._apply(prompt + response, add_generation_prompt=False)
            if not full.startswith(prompt_text):
                raise _Reject("template_mismatch")
            response_texts.append(full[len(prompt_text):])
        return prompt_text, response_texts


# ---------------------------------------------------------------------------------------------- token ids


class _TokenRules:
    """BOS, boundary, EOS and truncation rules for one tokenizer and one pair of length limits."""

    def __init__(self, tokenizer, max_prompt_length: int, max_length: int):
        self.eos_id = tokenizer.eos_token_id
        self.bos_id = tokenizer.bos_token_id if getattr(tokenizer, "bos_token", None) else None
        self.add_bos = self.bos_id is not None and _adds_bos_by_default(tokenizer, self.bos_id)
        self.max_prompt_length = max_prompt_length
        self.max_length = max_length
        self.tokenizer = tokenizer
        self._blank: dict[int, bool] = {}

    def _is_blank(self, token_id: int) -> bool:
        if token_id not in self._blank:
            self._blank[token_id] = not self.tokenizer.decode([token_id]).strip()
        return self._blank[token_id]

    def _ends_with_eos(self, ids: list[int]) -> bool:
        for token_id in reversed(ids):
            if token_id == self.eos_id:
                return True
            if not self._is_blank(token_id):
                return False
        return False

    def split(self, prompt_ids: list[int], full_ids: list[list[int]]):
        """((prompt, responses), (prompt_truncated, response_truncated, boundary_mismatch)) or `_Reject`."""
        if self.add_bos and prompt_ids[:1] != [self.bos_id]:
            prompt_ids = [self.bos_id, *prompt_ids]
            full_ids = [[self.bos_id, *f] for f in full_ids]
        # Cut where every whole text still agrees with the prompt's ids, so chosen and rejected share a prompt.
        cut = len(prompt_ids)
        for full in full_ids:
            shared = 0
            for a, b in zip(prompt_ids, full):
                if a != b:
                    break
                shared += 1
            cut = min(cut, shared)
        boundary_mismatch = cut < len(prompt_ids)
        prompt = full_ids[0][:cut]
        if not prompt:
            raise _Reject("empty_prompt")
        responses = [f[cut:] for f in full_ids]
        responses = [r if self._ends_with_eos(r) else [*r, self.eos_id] for r in responses]

        prompt_truncated = len(prompt) > self.max_prompt_length
        if prompt_truncated:
            keep_bos = self.bos_id is not None and prompt[0] == self.bos_id and self.max_prompt_length > 1
            if keep_bos:
                prompt = [self.bos_id, *prompt[len(prompt) - (self.max_prompt_length - 1):]]
            else:
                prompt = prompt[len(prompt) - self.max_prompt_length:]
        room = self.max_length - len(prompt)
        if room < 1:
            raise _Reject("too_long")
        response_truncated = any(len(r) > room for r in responses)
        responses = [r[:room] for r in responses]
        if response_truncated and len(responses) == 2 and responses[0] == responses[1]:
            raise _Reject("identical_after_truncation")
        return (prompt, responses), (prompt_truncated, response_truncated, boundary_mismatch)


def _adds_bos_by_default(tokenizer, bos_id: int) -> bool:
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return with_special[:1] == [bos_id] and without[:1] != [bos_id]
