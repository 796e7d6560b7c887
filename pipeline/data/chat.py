"""Message lists and their rendering with a chat template.

A message list is [{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...]; other keys are dropped.
The prompt renders with add_generation_prompt=True, each response as the text the full conversation
(prompt + response messages) adds after the prompt's rendering. The template is `chat_template` when given
(as with `apply_chat_template(chat_template=...)`, the explicit one wins), else the tokenizer's own; a
conversational row with neither is a configuration error (ValueError).
"""

from __future__ import annotations

from pipeline.data.outcomes import Reject

ROLES = frozenset({"system", "user", "assistant", "tool"})

Messages = list[dict]


def checked_messages(value: list) -> Messages:
    """The messages of `value` with only role and content kept; `Reject` when one is not a message."""
    messages = []
    for message in value:
        if not isinstance(message, dict):
            raise Reject("wrong_type")
        role, content = message.get("role"), message.get("content")
        if role is None or content is None:
            raise Reject("missing_field")
        if not isinstance(role, str) or not isinstance(content, str):
            raise Reject("wrong_type")
        messages.append({"role": role, "content": content})
    return messages


def message_strings(messages: Messages) -> list[str]:
    """Every string the messages hold, for the checks every text gets (UTF-8, NUL bytes)."""
    return [s for message in messages for s in (message["role"], message["content"])]


def check_roles(messages: Messages) -> None:
    if any(message["role"] not in ROLES for message in messages):
        raise Reject("unknown_role")


def is_blank(messages: Messages) -> bool:
    """Whether the messages hold no text at all (an empty list included)."""
    return all(not message["content"].strip() for message in messages)


class ChatRenderer:
    """Renders message lists with a chat template; resolves the template only when a row needs one."""

    def __init__(self, tokenizer, chat_template: str | None):
        self.tokenizer = tokenizer
        self.template = chat_template or getattr(tokenizer, "chat_template", None)

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

    def render(self, prompt: Messages, responses: list[Messages]) -> tuple[str, list[str]]:
        """(prompt text, response texts): each response is what its conversation adds after the prompt."""
        prompt_text = self._apply(prompt, add_generation_prompt=True)
        response_texts = []
        for response in responses:
            full = self._apply(prompt + response, add_generation_prompt=False)
            if not full.startswith(prompt_text):
                raise Reject("template_mismatch")
            response_texts.append(full[len(prompt_text):])
        return prompt_text, response_texts
