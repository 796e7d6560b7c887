"""The checks every example's fields pass, in a fixed order, before it is rendered to text.

The order is fixed so that a row with several faults always gets the same reason: types (with
non_text_content), invalid_utf8, nul_byte, unknown_role, empty_prompt, empty_response, identical_responses;
then, while rendering, what the chat template cannot render (unsupported_tool_calls, unsupported_content_parts).
"""

from __future__ import annotations

from pipeline.data.chat import ChatRenderer, check_roles, checked_messages, is_blank, message_strings
from pipeline.data.outcomes import Example, Reject, is_identical_pair


def same_shape(prompt, responses: list) -> None:
    """Texts of one example are all strings or all message lists."""
    want = list if isinstance(prompt, list) else str
    if not all(isinstance(v, want) for v in [prompt, *responses]):
        raise Reject("wrong_type")


def check_fields(prompt, responses: list) -> tuple:
    """Check an example's fields; returns (prompt, responses), message lists normalised. Raises `Reject`."""
    same_shape(prompt, responses)
    if isinstance(prompt, list):
        prompt = checked_messages(prompt)
        responses = [checked_messages(r) for r in responses]
        check_strings([s for m in [prompt, *responses] for s in message_strings(m)])
        for messages in [prompt, *responses]:
            check_roles(messages)
        if is_blank(prompt):
            raise Reject("empty_prompt")
        if any(is_blank(r) for r in responses):
            raise Reject("empty_response")
    else:
        check_strings([prompt, *responses])
        if not prompt.strip():
            raise Reject("empty_prompt")
        if any(not r.strip() for r in responses):
            raise Reject("empty_response")
    if is_identical_pair(responses):
        raise Reject("identical_responses")
    return prompt, responses


def checked_example(renderer: ChatRenderer, prompt, responses: list, label: bool | None = None) -> Example:
    """Check the example's fields (`check_fields`), then render it to text."""
    prompt, responses = check_fields(prompt, responses)
    if not isinstance(prompt, list):
        return Example(prompt, responses, label)
    prompt_text, response_texts = renderer.render(prompt, responses)
    if is_identical_pair(response_texts):
        raise Reject("identical_responses")  # different messages, same text once rendered
    return Example(prompt_text, response_texts, label)


def check_strings(strings: list[str]) -> None:
    for s in strings:
        try:
            s.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: not Unicode text, cannot be written or tokenized
            raise Reject("invalid_utf8") from None
    if any("\x00" in s for s in strings):
        raise Reject("nul_byte")
