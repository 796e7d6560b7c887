"""From an example's token ids to the ids a pair trains on: BOS, the prompt/response boundary, EOS, truncation.

All ids are made with add_special_tokens=False; BOS and EOS are placed by these rules:
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
"""

from __future__ import annotations

from pipeline.data.outcomes import Reject, TokenizedExample, common_prefix_length, is_identical_pair


class TokenRules:
    """The rules for one tokenizer and one pair of length limits."""

    def __init__(self, tokenizer, *, max_prompt_length: int, max_length: int):
        self.eos_id = tokenizer.eos_token_id
        self.bos_id = tokenizer.bos_token_id if getattr(tokenizer, "bos_token", None) else None
        self.add_bos = self.bos_id is not None and _adds_bos_by_default(tokenizer, self.bos_id)
        self.max_prompt_length = max_prompt_length
        self.max_length = max_length
        self.tokenizer = tokenizer
        self._blank: dict[int, bool] = {}

    def apply(self, prompt_ids: list[int], full_ids: list[list[int]]) -> TokenizedExample:
        """The example's ids from its prompt's ids and each whole text's (prompt + response) ids.

        Raises `Reject` (empty_prompt, too_long, identical_after_truncation).
        """
        if self.add_bos and self.bos_id is not None and prompt_ids[:1] != [self.bos_id]:
            prompt_ids = [self.bos_id, *prompt_ids]
            full_ids = [[self.bos_id, *f] for f in full_ids]
        # Cut where every whole text still agrees with the prompt's ids, so chosen and rejected share a prompt.
        cut = min(min(common_prefix_length(prompt_ids, full) for full in full_ids), len(prompt_ids))
        prompt = full_ids[0][:cut]
        if not prompt:
            raise Reject("empty_prompt")
        responses = [self._with_eos(full[cut:]) for full in full_ids]
        prompt, prompt_truncated = self._truncate_prompt(prompt)
        room = self.max_length - len(prompt)
        if room < 1:
            raise Reject("too_long")
        response_truncated = any(len(r) > room for r in responses)
        responses = [r[:room] for r in responses]
        if response_truncated and is_identical_pair(responses):
            raise Reject("identical_after_truncation")
        return TokenizedExample(
            prompt_ids=prompt,
            response_ids=responses,
            prompt_truncated=prompt_truncated,
            response_truncated=response_truncated,
            boundary_mismatch=cut < len(prompt_ids),
        )

    def _truncate_prompt(self, prompt: list[int]) -> tuple[list[int], bool]:
        """The prompt's last max_prompt_length ids (a leading BOS kept), and whether it was cut."""
        if len(prompt) <= self.max_prompt_length:
            return prompt, False
        if self.bos_id is not None and prompt[0] == self.bos_id and self.max_prompt_length > 1:
            return [self.bos_id, *prompt[len(prompt) - (self.max_prompt_length - 1) :]], True
        return prompt[len(prompt) - self.max_prompt_length :], True

    def _with_eos(self, response: list[int]) -> list[int]:
        return response if self._ends_with_eos(response) else [*response, self.eos_id]

    def _ends_with_eos(self, ids: list[int]) -> bool:
        for token_id in reversed(ids):
            if token_id == self.eos_id:
                return True
            if not self._is_blank(token_id):
                return False
        return False

    def _is_blank(self, token_id: int) -> bool:
        if token_id not in self._blank:
            self._blank[token_id] = not self.tokenizer.decode([token_id]).strip()
        return self._blank[token_id]


def _adds_bos_by_default(tokenizer, bos_id: int) -> bool:
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return with_special[:1] == [bos_id] and without[:1] != [bos_id]
