"""A pairwise judge that is a chat model of our own: asked the API judge's prompt, its reply read the same way.

The label stage serves the model in a sampler actor (`label.judge: local`) and hands this judge a
`generate` function: rendered prompts' token ids in, one greedy reply per prompt out. Everything else is
the API judge's: the prompt of `label.judge_task` ("Preferred: A" / "B" / "Tie" on the last line) and its
parser (pipeline.evaluation.api_judge.templates.py). A reply that names no verdict is "unparsed": counted by
the caller, never read as a preference. A small model answers in the form asked only if it was trained to.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from pipeline.evaluation.api_judge.templates import PROMPT_TEMPLATES, parse_verdict, render_prompt
from pipeline.evaluation.judges import Verdict, check_pair_lengths

# Token ids of rendered prompts -> the model's reply to each, in order.
Generate = Callable[[list[list[int]]], list[str]]


class GenerativeJudge:
    """`Judge` over a local chat model. tokenizer: the judging model's; chat_template: its template where the
    tokenizer has none (None and none there: the judge prompt is sent as plain text)."""

    def __init__(
        self,
        tokenizer,
        generate: Generate,
        *,
        task: str = "generic",
        chat_template: str | None = None,
        max_prompt_tokens: int | None = None,
        name: str = "local",
    ):
        self.tokenizer, self.generate, self.name = tokenizer, generate, name
        self.max_prompt_tokens = max_prompt_tokens  # the model's context less its reply: longer prompts keep their end
        self.template = PROMPT_TEMPLATES[task]
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        self.unparsed = 0

    def render(self, prompt: str, first: str, second: str) -> list[int]:
        """The token ids of the judge prompt for one pair, as a user turn of the chat template where there is one."""
        text = render_prompt(self.template, prompt, first, second)
        if self.chat_template:
            messages = [{"role": "user", "content": text}]
            text = self.tokenizer.apply_chat_template(
                messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=True
            )
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = self.tokenizer(text)["input_ids"]
        # The end holds the second answer and the question asked: what a cut prompt must keep.
        return ids if self.max_prompt_tokens is None else ids[max(0, len(ids) - self.max_prompt_tokens) :]

    def judge(self, prompts: Sequence[str], first: Sequence[str], second: Sequence[str]) -> list[Verdict]:
        check_pair_lengths(prompts, first, second)
        replies = self.generate([self.render(p, a, b) for p, a, b in zip(prompts, first, second)])
        if len(replies) != len(prompts):
            raise ValueError(f"the judge model gave {len(replies)} replies for {len(prompts)} prompts")
        verdicts: list[Verdict] = [parse_verdict(reply) for reply in replies]
        self.unparsed += sum(v == "unparsed" for v in verdicts)
        return verdicts
