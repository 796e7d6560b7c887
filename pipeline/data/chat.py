"""Message lists and their rendering with a chat template.

A message is {"role": "system"|"user"|"assistant"|"tool", "content": ...}; "content" is a string or a list of
text parts ([{"type": "text", "text": str}, ...]). An assistant message may carry "tool_calls"
([{"type": "function", "function": {"name": str, "arguments": ...}}, ...]) and then needs no content; "name"
and "tool_call_id" (strings) are kept where given. Other keys are dropped.

Tool calls and part lists are rendered only where the chat template renders them: many templates read
"content" as a string and never look at "tool_calls", and would silently drop them or print a Python list.
Each template is probed once (`ChatRenderer`); a row that needs what it lacks is rejected as
"unsupported_tool_calls" or "unsupported_content_parts". A part that is not text (an image, audio) is
rejected as "non_text_content" whatever the template: this pipeline trains a text model on token ids alone.

The prompt renders with add_generation_prompt=True, each response as the text the full conversation
(prompt + response messages) adds after the prompt's rendering. The template is `chat_template` when given
(as with `apply_chat_template(chat_template=...)`, the explicit one wins), else the tokenizer's own; a
conversational row with neither is a configuration error (ValueError).
"""

from __future__ import annotations

from pipeline.data.outcomes import Reject

ROLES = frozenset({"system", "user", "assistant", "tool"})

Messages = list[dict]

_KEPT_STRING_KEYS = ("name", "tool_call_id")
# A word no template writes on its own: if it comes out of a probe, the template rendered what held it.
_PROBE_WORD = "zqxprobe"


def checked_messages(value: list) -> Messages:
    """The messages of `value` with only the keys above kept; `Reject` when one is not a valid message."""
    return [_checked_message(message) for message in value]


def _checked_message(message) -> dict:
    if not isinstance(message, dict):
        raise Reject("wrong_type")
    role, content, tool_calls = message.get("role"), message.get("content"), message.get("tool_calls")
    if role is None or (content is None and tool_calls is None):
        raise Reject("missing_field")
    if not isinstance(role, str):
        raise Reject("wrong_type")
    checked: dict[str, object] = {"role": role}
    if content is not None:
        checked["content"] = content if isinstance(content, str) else _checked_parts(content)
    if tool_calls is not None:
        checked["tool_calls"] = _checked_tool_calls(tool_calls)
    for key in _KEPT_STRING_KEYS:
        if message.get(key) is not None:
            if not isinstance(message[key], str):
                raise Reject("wrong_type")
            checked[key] = message[key]
    return checked


def _checked_parts(parts) -> list[dict]:
    if not isinstance(parts, list) or not all(isinstance(part, dict) for part in parts):
        raise Reject("wrong_type")
    checked = []
    for part in parts:
        kind, text = part.get("type"), part.get("text")
        if kind != "text":
            raise Reject("non_text_content" if isinstance(kind, str) else "wrong_type")
        if text is None:
            raise Reject("missing_field")
        if not isinstance(text, str):
            raise Reject("wrong_type")
        checked.append({"type": "text", "text": text})
    return checked


def _checked_tool_calls(tool_calls) -> list[dict]:
    if not isinstance(tool_calls, list) or not all(isinstance(call, dict) for call in tool_calls):
        raise Reject("wrong_type")
    for call in tool_calls:
        function = call.get("function")
        if function is None or (isinstance(function, dict) and function.get("name") is None):
            raise Reject("missing_field")
        if not isinstance(function, dict) or not isinstance(function["name"], str):
            raise Reject("wrong_type")
    return tool_calls


def message_strings(messages: Messages) -> list[str]:
    """Every string the messages hold, nested ones included, for the checks every text gets (UTF-8, NUL)."""
    strings: list[str] = []
    stack: list = [messages]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            strings.append(value)
        elif isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return strings


def check_roles(messages: Messages) -> None:
    if any(message["role"] not in ROLES for message in messages):
        raise Reject("unknown_role")


def is_blank(messages: Messages) -> bool:
    """Whether the messages hold no text and no tool call at all (an empty list included)."""
    return not any(message.get("tool_calls") or _text(message).strip() for message in messages)


def _text(message: dict) -> str:
    content = message.get("content", "")
    return content if isinstance(content, str) else "".join(part["text"] for part in content)


class ChatRenderer:
    """Renders message lists with a chat template; resolves the template only when a row needs one."""

    def __init__(self, tokenizer, chat_template: str | None):
        self.tokenizer = tokenizer
        self.template = chat_template or getattr(tokenizer, "chat_template", None)
        self._renders: dict[str, bool] = {}  # what the template was probed for: "tool_calls", "content_parts"

    def render(self, prompt: Messages, responses: list[Messages]) -> tuple[str, list[str]]:
        """(prompt text, response texts): each response is what its conversation adds after the prompt."""
        self._check_supported([*prompt, *(m for response in responses for m in response)])
        prompt_text = self._apply(prompt, add_generation_prompt=True)
        response_texts = []
        for response in responses:
            full = self._apply(prompt + response, add_generation_prompt=False)
            if not full.startswith(prompt_text):
                raise Reject("template_mismatch")
            response_texts.append(full[len(prompt_text) :])
        return prompt_text, response_texts

    def _check_supported(self, messages: Messages) -> None:
        if any("tool_calls" in m for m in messages) and not self._probe("tool_calls"):
            raise Reject("unsupported_tool_calls")
        if any(isinstance(m.get("content"), list) for m in messages) and not self._probe("content_parts"):
            raise Reject("unsupported_content_parts")

    def _probe(self, feature: str) -> bool:
        """Whether the template renders `feature` ("tool_calls", "content_parts"): the probe word must come out."""
        if feature not in self._renders:
            if feature == "tool_calls":
                call = {"type": "function", "function": {"name": _PROBE_WORD, "arguments": {}}}
                messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [call]}]
            else:
                messages = [{"role": "user", "content": [{"type": "text", "text": _PROBE_WORD}]}]
            try:
                text = self._apply(messages, add_generation_prompt=False)
            except Reject:
                text = ""
            # A template that prints the list or dict it was given is not rendering it.
            printed = "{'" in text or (feature == "content_parts" and '{"type"' in text)
            self._renders[feature] = _PROBE_WORD in text and not printed
        return self._renders[feature]

    def _apply(self, messages: Messages, add_generation_prompt: bool) -> str:
        if not self.template:
            raise ValueError(
                "conversational rows need a chat template: the tokenizer has none, so set chat_template in the config"
            )
        try:
            text = self.tokenizer.apply_chat_template(
                messages, chat_template=self.template, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as exc:  # jinja raises its own types, and templates raise on purpose (raise_exception)
            raise Reject("template_error") from exc
        if not isinstance(text, str):
            raise ValueError("apply_chat_template(tokenize=False) did not return text; check the tokenizer")
        return text
