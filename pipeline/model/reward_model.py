"""A Hugging Face sequence-classification reward model: (prompt, completion) -> one float (torch; no Ray).

The model is an `AutoModelForSequenceClassification` with one output (num_labels == 1), as reward models on
the hub are (Skywork-Reward, ArmoRM's head, RLHFlow's). It reads the conversation through its OWN tokenizer
and chat template, not the policy's:

- a message-list prompt: the prompt's messages then the completion as an assistant turn, rendered with the
  reward model's chat template (`label.chat_template` where its tokenizer has none; neither is an error);
- a text prompt: the same as a user turn and an assistant turn where the reward model has a chat template,
  else the plain text prompt + completion (a classifier such as a sentiment model), with its special tokens.

Texts longer than `max_length` tokens keep their last `max_length` (the completion's end) and are counted.
Batches are padded on the right and scored in order of length, so padding never changes a score: a text's
score in a batch equals its score alone (tests/unit/test_reward_model.py). On a GPU the weights are bfloat16
unless `dtype` says otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class RewardModel:
    """Scores completions after their prompts (`score`), or token ids already made by `encode` (`score_ids`)."""

    def __init__(
        self,
        path: str,
        *,
        device: str = "cpu",
        dtype: str | None = None,
        chat_template: str | None = None,
        max_length: int = 1024,
        batch_size: int = 16,
        trust_remote_code: bool = False,
    ):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer  # slow: loaded where used

        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        self.tokenizer.truncation_side = "left"  # a cut text keeps the completion's end
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        torch_dtype = DTYPES[dtype or ("bfloat16" if device.startswith("cuda") else "float32")]
        self.model = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=torch_dtype, trust_remote_code=trust_remote_code
        )
        if self.model.config.num_labels != 1:
            raise ValueError(
                f"label.model: {path} has {self.model.config.num_labels} outputs; a reward model has one "
                "(num_labels: 1)"
            )
        # The classifier reads the score at the last token that is not padding: it must know the pad id.
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.to(device).eval()
        self.device, self.max_length, self.batch_size = device, max_length, batch_size
        self.template = chat_template or getattr(self.tokenizer, "chat_template", None)

    def render(self, prompt: str | list[dict], completion: str) -> tuple[str, bool]:
        """(the text the reward model reads, whether it is a chat rendering that carries its own special tokens)."""
        if isinstance(prompt, list) or self.template:
            turns = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            if not self.template:
                raise ValueError("label.chat_template: the reward model's tokenizer has no chat template; set one")
            messages = [*turns, {"role": "assistant", "content": completion}]
            text = self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False)
            return text, True
        return prompt + completion, False

    def encode(
        self, prompts: Sequence[str | list[dict]], completions: Sequence[str]
    ) -> tuple[list[list[int]], np.ndarray]:
        """(the token ids scored for each (prompt, completion), at most max_length each; which were cut: bool (n,))."""
        ids, cut = [], []
        for prompt, completion in zip(prompts, completions, strict=True):
            text, templated = self.render(prompt, completion)
            full = self.tokenizer(text, add_special_tokens=not templated, truncation=False)["input_ids"]
            cut.append(len(full) > self.max_length)
            ids.append(full[max(0, len(full) - self.max_length) :])
        return ids, np.array(cut, dtype=bool)

    def score(self, prompts: Sequence[str | list[dict]], completions: Sequence[str]) -> np.ndarray:
        """The reward of each completion after its prompt: float64, shape (len(prompts),)."""
        return self.score_ids(self.encode(prompts, completions)[0])

    @torch.inference_mode()
    def score_ids(self, ids: Sequence[Sequence[int]]) -> np.ndarray:
        """The reward model's output for each token-id list: float64, shape (len(ids),)."""
        scores = np.zeros(len(ids), dtype=np.float64)
        order = np.argsort([len(x) for x in ids], kind="stable")  # similar lengths together: little padding
        pad = self.tokenizer.pad_token_id
        for start in range(0, len(ids), self.batch_size):
            idx = order[start : start + self.batch_size]
            width = max(len(ids[i]) for i in idx)
            input_ids = torch.full((len(idx), width), pad, dtype=torch.long)  # (B, T), right-padded
            attention = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                input_ids[row, : len(ids[i])] = torch.tensor(ids[i])
                attention[row, : len(ids[i])] = 1
            logits = self.model(input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device)).logits
            scores[idx] = logits[:, 0].double().cpu().numpy()  # (B,)
        return scores
