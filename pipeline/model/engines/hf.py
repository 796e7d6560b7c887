"""The transformers engine: `generate` with left-padded batches, seeded per row; any device."""

from __future__ import annotations

import gc
from collections.abc import Sequence
from typing import cast

import torch
from transformers import GenerationConfig, LogitsProcessorList

from pipeline.model.engines.contract import Completion, SamplingParams
from pipeline.model.engines.seeding import prompt_stream_keys, sample_from_uniforms, stream_seed
from pipeline.model.pretrained import load_model, load_tokenizer

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class HFEngine:
    """transformers `generate` with left-padded batches; the CPU default and the GPU fallback.

    Determinism: a completion depends on the seed, its prompt and its sample index, never on
    `batch_size` or on the other prompts in the call: each (prompt, sample) row draws its uniforms
    from its own CPU generator (the same stream on every device) and samples by inverse CDF in a
    logits processor, while generate() itself runs greedy. What batching can still change is float
    noise from padding (other matmul shapes, ~1e-6 in a logit), which flips a token only where two
    candidates are that close: practically never for greedy decoding, rarely for sampling.

    Memory: generate() keeps the raw logits of every step, batch_size * max_tokens * vocab floats
    (32 * 64 * 50k * 4 bytes = 400 MB); lower batch_size for large vocabularies.
    """

    name = "hf"

    def __init__(
        self,
        model_path: str,
        *,
        device: str = "cpu",
        dtype: str | torch.dtype = "float32",
        batch_size: int = 32,
        trust_remote_code: bool = False,
        gpus: int = 1,
    ):
        """gpus > 1 (with device="cuda"): the model's layers are spread over the GPUs this process sees."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = device
        self.batch_size = batch_size
        self.tokenizer = load_tokenizer(model_path, trust_remote_code=trust_remote_code)
        self.model = load_model(
            model_path, dtype=_torch_dtype(dtype), device=device, trust_remote_code=trust_remote_code, spread=gpus > 1
        )
        self.model.eval()
        checkpoint_eos = _as_id_list(getattr(self.model.generation_config, "eos_token_id", None))
        self.eos_ids = sorted({self.tokenizer.eos_token_id, *checkpoint_eos})
        self.pad_id = self.tokenizer.pad_token_id
        # A checkpoint's generation_config.json may carry sampling defaults (temperature, top_p,
        # repetition_penalty, ...) that generate() would apply silently. Only ours count here.
        self.model.generation_config = GenerationConfig(eos_token_id=self.eos_ids, pad_token_id=self.pad_id)
        self.max_positions = getattr(self.model.config, "max_position_embeddings", None)

    def generate(self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams) -> list[list[Completion]]:
        """`params.n` completions for each prompt (lists of token ids, no padding), in prompt order."""
        if self.model is None:
            raise RuntimeError("engine is closed")
        prompts = [[int(t) for t in p] for p in prompt_ids]
        self._check_prompts(prompts, max_tokens=params.max_tokens)
        # Greedy samples are identical: decode once per prompt and copy.
        copies = 1 if params.greedy else params.n
        stream_keys = prompt_stream_keys(prompts)
        rows = [(i, j) for i in range(len(prompts)) for j in range(copies)]
        # Rows of similar length share a batch (less padding); results do not depend on batching.
        order = sorted(range(len(rows)), key=lambda r: len(prompts[rows[r][0]]))
        done: list[Completion | None] = [None] * len(rows)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            batch_rows = [rows[r] for r in chunk]
            seeds = [stream_seed(params.seed, *stream_keys[i], j) for i, j in batch_rows]
            outs = self._generate_batch([prompts[i] for i, _ in batch_rows], seeds, params)
            for r, completion in zip(chunk, outs):
                done[r] = completion
        filled = cast("list[Completion]", done)  # every row was generated above
        n = params.n
        return [[filled[i * copies + (0 if params.greedy else j)] for j in range(n)] for i in range(len(prompts))]

    def _check_prompts(self, prompts: list[list[int]], *, max_tokens: int) -> None:
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty: a decoder-only model needs at least one token to condition on")
            if self.max_positions is not None and len(p) + max_tokens > self.max_positions:
                raise ValueError(
                    f"prompt {i} has {len(p)} tokens; with max_tokens={max_tokens} it exceeds the model's "
                    f"{self.max_positions} positions"
                )

    @torch.inference_mode()
    def _generate_batch(self, prompts: list[list[int]], seeds: list[int], params: SamplingParams) -> list[Completion]:
        """One completion per prompt; row b samples from the random stream seeded by seeds[b]."""
        input_ids, attention_mask = _left_pad(prompts, self.pad_id)
        width = input_ids.shape[1]
        processors = LogitsProcessorList()
        if not params.greedy:
            uniforms = _row_uniforms(seeds, params.max_tokens).to(self.device)
            processors.append(
                _SeededSampler(uniforms, prompt_width=width, temperature=params.temperature, top_p=params.top_p)
            )
        model = self.model
        if model is None:
            raise RuntimeError("engine is closed")
        # transformers types generate's self as a protocol its own model classes do not meet
        out = model.generate(  # pyright: ignore[reportAttributeAccessIssue]
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            logits_processor=processors,
            do_sample=False,  # sampling, when asked for, happens in _SeededSampler
            num_beams=1,
            max_new_tokens=params.max_tokens,
            eos_token_id=self.eos_ids,
            pad_token_id=self.pad_id,
            return_dict_in_generate=True,
            output_logits=True,  # raw logits, before any processor: the log-probs we report
        )
        generated = out.sequences[:, width:]  # (B, steps)
        logps = _generated_logps(out.logits, generated).cpu()
        return self._completions(generated.cpu(), logps)

    def _completions(self, generated: torch.Tensor, logps: torch.Tensor) -> list[Completion]:
        """Cut each row at its first EOS. generated, logps: (B, steps) on the CPU."""
        eos = torch.tensor(self.eos_ids)
        steps = generated.shape[1]
        completions = []
        for ids, row_logps in zip(generated, logps):
            hits = torch.nonzero(torch.isin(ids, eos)).flatten()
            # Everything after the first EOS is padding for rows that finished before the batch did.
            length, reason = (int(hits[0]) + 1, "stop") if len(hits) else (steps, "length")
            token_ids = ids[:length].tolist()
            completions.append(
                Completion(
                    text=self.tokenizer.decode(token_ids, skip_special_tokens=True),
                    token_ids=token_ids,
                    token_logps=row_logps[:length].tolist(),
                    finish_reason=reason,
                )
            )
        return completions

    def close(self) -> None:
        self.model = None
        gc.collect()
        if self.device.startswith("cuda") and torch.cuda.is_available():
            torch.cuda.empty_cache()


class _SeededSampler:
    """A logits processor that samples the next token itself and hands generate() a one-hot score.

    transformers' own sampling draws every row from one global RNG, so a row's sample would depend
    on the batch it sits in. Here row r draws from its own precomputed uniforms, and generate() runs
    in greedy mode, whose argmax picks exactly the token chosen here.
    """

    def __init__(self, uniforms: torch.Tensor, *, prompt_width: int, temperature: float, top_p: float):
        self.uniforms = uniforms  # (B, max_tokens) float64
        self.prompt_width = prompt_width
        self.temperature = temperature
        self.top_p = top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        # min(): generate() never runs past max_new_tokens, but an index error here would hide why.
        step = min(input_ids.shape[1] - self.prompt_width, self.uniforms.shape[1] - 1)
        tokens = sample_from_uniforms(scores, self.uniforms[:, step], temperature=self.temperature, top_p=self.top_p)
        one_hot = torch.full_like(scores, float("-inf"))
        return one_hot.scatter_(1, tokens.unsqueeze(1), 0.0)


def _left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, width) long: every row's last prompt token sits at column width - 1."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for b, p in enumerate(prompts):
        input_ids[b, width - len(p) :] = torch.tensor(p)
        attention_mask[b, width - len(p) :] = 1
    return input_ids, attention_mask


def _row_uniforms(seeds: list[int], max_tokens: int) -> torch.Tensor:
    """(B, max_tokens) float64 uniforms, row b from a CPU generator seeded with seeds[b] (the same on every device)."""
    return torch.stack(
        [torch.rand(max_tokens, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) for seed in seeds]
    )


def _generated_logps(step_logits: Sequence[torch.Tensor], generated: torch.Tensor) -> torch.Tensor:
    """Raw-model log-prob of each generated token: step_logits[t] (B, V), generated (B, steps) -> (B, steps).

    One step at a time, so no (B, steps, V) float copy of the logits is made.
    """
    per_step = [
        step_logits[t].float().log_softmax(-1).gather(1, generated[:, t : t + 1]).squeeze(1)
        for t in range(generated.shape[1])
    ]
    return torch.stack(per_step, dim=1)


def _torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def _as_id_list(ids: int | Sequence[int] | None) -> list[int]:
    if ids is None:
        return []
    return [int(ids)] if isinstance(ids, int) else [int(i) for i in ids]
