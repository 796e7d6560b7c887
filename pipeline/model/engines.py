"""Inference engines behind the sampler actor: transformers `generate` on any device, vLLM on GPUs.

Every engine honours one contract, so the sample and evaluate stages never branch on which one runs:

    engine = make_engine("auto", checkpoint_dir)
    completions = engine.generate(prompt_ids, SamplingParams(n=4, temperature=0.7, seed=1))
    completions[i][j]  # the j-th of n samples for prompt i: text, token_ids, token_logps, finish_reason
    engine.close()

Semantics shared by all engines:

- `temperature == 0` is greedy decoding; the n completions of a prompt are then identical copies.
  Otherwise tokens are sampled from softmax(logits / temperature) restricted to the top-p nucleus.
- `Completion.token_logps[t]` is log pi(token_ids[t] | prompt, token_ids[:t]) under the RAW model: temperature 1,
  no top-p, no penalties, whatever temperature was used to sample. The evaluation estimates
  KL(pi || pi_ref) from these numbers, and a teacher-forced forward pass over prompt + completion
  (`pipeline.model.logps.token_logps`) gives the same values up to float noise.
- Generation stops at EOS (the tokenizer's EOS and any EOS id in the checkpoint's generation config).
  When it does, the EOS token is the last entry of `token_ids` (with its log-prob), it occurs
  nowhere else, and `finish_reason == "stop"`, also when the EOS was token number `max_tokens`.
  Otherwise exactly `max_tokens` tokens come back, none of them EOS, and `finish_reason == "length"`.
  `text` is the decoded completion without special tokens. Batch padding never leaks into a result.
- Seeds: every call is deterministic on its own (no state carries over between calls): the same
  prompts, params and seed give the same completions on the same engine, hardware and software.
  Random streams are keyed by (seed, prompt content, occurrence of that prompt in the call, sample
  index), so a prompt's samples do not depend on its neighbours, its position, or how the prompts
  were split into calls or shards (see each engine for what float noise can still change).
"""

from __future__ import annotations

import gc
import hashlib
import importlib.util
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

ENGINE_KINDS = ("hf", "vllm", "auto")

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class SamplingParams:
    """How to decode: the knobs vLLM and transformers share, and nothing else."""

    n: int = 1  # completions per prompt
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0  # nucleus mass kept; 1 keeps the whole vocabulary
    max_tokens: int = 64  # new tokens per completion, EOS included
    seed: int = 0  # fixes the samples; see the engines for the scope of the guarantee

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class Completion:
    """One sampled continuation of one prompt."""

    text: str  # decoded token_ids, special tokens (EOS) skipped
    token_ids: list[int]  # generated ids only, prompt excluded; ends with EOS when finish_reason == "stop"
    token_logps: list[float]  # raw-model log-prob of each entry of token_ids (temperature 1, no top-p)
    finish_reason: str  # "stop" (emitted EOS) or "length" (reached max_tokens)


@runtime_checkable
class Engine(Protocol):
    name: str

    def generate(self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams) -> list[list[Completion]]:
        """One list of `params.n` completions per prompt, in prompt order."""
        ...

    def close(self) -> None:
        """Free the model and its device memory; the engine is unusable afterwards."""
        ...


def stream_seed(seed: int, *keys: int) -> int:
    """A well-mixed 63-bit seed for the random stream named by (seed, *keys); keys are ints >= 0."""
    state = np.random.SeedSequence([seed, *keys]).generate_state(1, dtype=np.uint64)[0]
    return int(state) & (2**63 - 1)


def prompt_stream_keys(prompts: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """(content hash, occurrence) per prompt: the key of its random streams.

    Keying by content rather than by position means a prompt's samples do not depend on the other
    prompts in the call, on its position, or on how a data set was split into calls or shards.
    The occurrence count (0 for the first copy of a prompt in a call, 1 for the next, ...) keeps
    repeated prompts from receiving identical samples.
    """
    seen: dict[int, int] = {}
    keys = []
    for p in prompts:
        digest = hashlib.blake2b(np.asarray(p, dtype=np.int64).tobytes(), digest_size=8).digest()
        content = int.from_bytes(digest, "little")
        keys.append((content, seen.get(content, 0)))
        seen[content] = seen.get(content, 0) + 1
    return keys


def sample_from_uniforms(logits: torch.Tensor, uniforms: torch.Tensor, *, temperature: float, top_p: float) -> torch.Tensor:
    """Draw one token per row by inverting the CDF of the processed distribution at a given uniform.

    logits: (B, V) raw model logits; uniforms: (B,) in [0, 1). Returns (B,) long token ids.
    The distribution is softmax(logits / temperature), cut to the smallest set of most likely tokens
    whose mass reaches top_p (the most likely token always stays), renormalised. One uniform per
    token per row is all the randomness needed, so each row can own its random stream cheaply.
    """
    # float64 keeps the cumulative sum over a large vocabulary exact enough; MPS has no float64.
    dtype = torch.float32 if logits.device.type == "mps" else torch.float64
    probs = torch.softmax(logits.to(dtype) / temperature, dim=-1)  # (B, V)
    if top_p < 1.0:
        # Stable sort: ties at the nucleus edge are broken by token id, the same way every call.
        sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    cdf = probs.cumsum(dim=-1)  # (B, V)
    total = cdf[:, -1:]
    target = torch.minimum(uniforms.to(dtype).unsqueeze(-1) * total, torch.nextafter(total, torch.zeros_like(total)))
    # right=True picks the first token whose cdf exceeds the target: never a zero-probability token.
    tokens = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    return tokens.clamp_(max=logits.shape[-1] - 1)


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
    ):
        from transformers import GenerationConfig

        from pipeline.model.loading import load_model, load_tokenizer

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = device
        self.batch_size = batch_size
        self.tokenizer = load_tokenizer(model_path, trust_remote_code=trust_remote_code)
        self.model = load_model(model_path, dtype=_torch_dtype(dtype), device=device, trust_remote_code=trust_remote_code)
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
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty: a decoder-only model needs at least one token to condition on")
            if self.max_positions is not None and len(p) + params.max_tokens > self.max_positions:
                raise ValueError(
                    f"prompt {i} has {len(p)} tokens; with max_tokens={params.max_tokens} it exceeds the model's "
                    f"{self.max_positions} positions"
                )
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
        return [[done[i * copies + (0 if params.greedy else j)] for j in range(params.n)] for i in range(len(prompts))]

    @torch.inference_mode()
    def _generate_batch(self, prompts: list[list[int]], seeds: list[int], params: SamplingParams) -> list[Completion]:
        from transformers import LogitsProcessorList

        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for b, p in enumerate(prompts):  # left padding: every row's last prompt token sits at column width - 1
            input_ids[b, width - len(p) :] = torch.tensor(p)
            attention_mask[b, width - len(p) :] = 1

        processors = LogitsProcessorList()
        if not params.greedy:
            uniforms = torch.stack(
                [
                    torch.rand(params.max_tokens, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
                    for seed in seeds
                ]
            )  # (B, max_tokens)
            processors.append(
                _SeededSampler(uniforms.to(self.device), prompt_width=width, temperature=params.temperature, top_p=params.top_p)
            )
        out = self.model.generate(
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
        steps = generated.shape[1]
        # Raw-model log-prob of each generated token, one step at a time to avoid a (B, steps, V) copy.
        logps = torch.stack(
            [
                out.logits[t].float().log_softmax(-1).gather(1, generated[:, t : t + 1]).squeeze(1)
                for t in range(steps)
            ],
            dim=1,
        ).cpu()  # (B, steps)
        generated = generated.cpu()

        eos = torch.tensor(self.eos_ids)
        completions = []
        for b in range(len(prompts)):
            ids = generated[b]
            hits = torch.nonzero(torch.isin(ids, eos)).flatten()
            # Everything after the first EOS is padding for rows that finished before the batch did.
            length, reason = (int(hits[0]) + 1, "stop") if len(hits) else (steps, "length")
            token_ids = ids[:length].tolist()
            completions.append(
                Completion(
                    text=self.tokenizer.decode(token_ids, skip_special_tokens=True),
                    token_ids=token_ids,
                    token_logps=logps[b, :length].tolist(),
                    finish_reason=reason,
                )
            )
        return completions

    def close(self) -> None:
        self.model = None
        gc.collect()
        if self.device.startswith("cuda") and torch.cuda.is_available():
            torch.cuda.empty_cache()


class VLLMEngine:
    """vLLM's offline `LLM` on the GPU(s) visible to this process (in a Ray actor: the ones Ray assigned).

    Determinism: each prompt is its own request with its own seed, derived from (seed, prompt
    content, occurrence) as in HFEngine (vLLM seeds the request's n samples from it), so samples do
    not depend on the other prompts in the call. vLLM's batched kernels are not batch-invariant,
    though: another mix of concurrent requests changes float noise and so, rarely, a token. For the
    same seed, samples differ from HFEngine's (different random streams and kernels).

    Log-probs: vLLM's V1 engine reports log-probs of the raw model output, before temperature, top-p
    or penalties (`logprobs_mode="raw_logprobs"`, its default); we ask for that mode explicitly where
    the installed vLLM knows the option. The old V0 engine reported post-temperature log-probs.

    Differences from HFEngine: `device` and `batch_size` are accepted for a common signature and
    ignored (vLLM schedules its own batches); a prompt + max_tokens longer than the context ends with
    finish_reason "length" instead of raising. Extra keyword arguments go to `vllm.LLM`
    (gpu_memory_utilization, max_model_len, tensor_parallel_size, ...).
    """

    name = "vllm"

    def __init__(
        self,
        model_path: str,
        *,
        device: str = "cuda",
        dtype: str = "auto",
        batch_size: int | None = None,
        trust_remote_code: bool = False,
        **llm_kwargs: Any,
    ):
        del device, batch_size  # see the class docstring
        try:
            import vllm
        except ImportError as err:
            raise ImportError("engine 'vllm' needs the vllm package: pip install 'raydpo[vllm]' (GPU only)") from err
        self._vllm = vllm
        kwargs: dict[str, Any] = dict(model=model_path, tokenizer=model_path, dtype=dtype, trust_remote_code=trust_remote_code)
        if _vllm_has_engine_arg("logprobs_mode"):
            kwargs["logprobs_mode"] = "raw_logprobs"
        else:
            warnings.warn(
                f"vllm {getattr(vllm, '__version__', '?')} has no logprobs_mode option: assuming its V1 engine, "
                "which reports raw-model log-probs; a V0 engine would report post-temperature ones",
                stacklevel=2,
            )
        kwargs.update(llm_kwargs)
        self._llm = vllm.LLM(**kwargs)

    def generate(self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams) -> list[list[Completion]]:
        """`params.n` completions for each prompt (lists of token ids), in prompt order."""
        if self._llm is None:
            raise RuntimeError("engine is closed")
        prompts = [[int(t) for t in p] for p in prompt_ids]
        if not prompts:
            return []
        copies = 1 if params.greedy else params.n  # greedy: decode once, copy (some vLLMs reject n > 1 there)
        stream_keys = prompt_stream_keys(prompts)
        per_prompt = [
            self._vllm.SamplingParams(
                n=copies,
                temperature=params.temperature,
                top_p=1.0 if params.greedy else params.top_p,
                max_tokens=params.max_tokens,
                seed=stream_seed(params.seed, *stream_keys[i]),
                logprobs=0,  # only the sampled token's log-prob
                skip_special_tokens=True,
            )
            for i in range(len(prompts))
        ]
        outputs = self._llm.generate([{"prompt_token_ids": p} for p in prompts], per_prompt, use_tqdm=False)
        results = []
        for request in outputs:  # LLM.generate returns requests in input order
            samples = [self._completion(o) for o in sorted(request.outputs, key=lambda o: o.index)]
            results.append(samples * params.n if params.greedy else samples)
        return results

    @staticmethod
    def _completion(output: Any) -> Completion:
        token_ids = [int(t) for t in output.token_ids]
        # output.logprobs[t] maps token id -> Logprob for step t; with logprobs=0 it holds the sampled token.
        token_logps = [float(output.logprobs[t][tok].logprob) for t, tok in enumerate(token_ids)]
        if output.finish_reason not in ("stop", "length"):
            raise RuntimeError(f"vLLM request finished with reason {output.finish_reason!r}")
        return Completion(text=output.text, token_ids=token_ids, token_logps=token_logps, finish_reason=output.finish_reason)

    def close(self) -> None:
        llm, self._llm = self._llm, None
        if llm is None:
            return
        # V1 runs the model in an engine-core process; stop it so its GPU memory is released now.
        shutdown = getattr(getattr(getattr(llm, "llm_engine", None), "engine_core", None), "shutdown", None)
        if callable(shutdown):
            shutdown()
        del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _vllm_has_engine_arg(name: str) -> bool:
    import dataclasses

    try:
        from vllm.engine.arg_utils import EngineArgs

        return name in {f.name for f in dataclasses.fields(EngineArgs)}
    except (ImportError, TypeError):
        return False


def vllm_available() -> bool:
    """True when vllm is installed and torch sees a CUDA device; does not import vllm."""
    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


def make_engine(kind: str, model_path: str, **kwargs: Any) -> Engine:
    """Build the engine `kind` names: "hf", "vllm", or "auto" (vllm when `vllm_available()`, else hf).

    kwargs go to the engine (device, dtype, batch_size, trust_remote_code, ...). When no device is
    given, the engine uses CUDA if torch sees it and the CPU otherwise. "auto" with device="cpu"
    picks hf.
    """
    if kind not in ENGINE_KINDS:
        raise ValueError(f"unknown engine kind {kind!r}; expected one of {ENGINE_KINDS}")
    if kind == "auto":
        on_cpu = str(kwargs.get("device", "cuda")).startswith("cpu")
        kind = "vllm" if vllm_available() and not on_cpu else "hf"
    kwargs.setdefault("device", "cuda" if torch.cuda.is_available() else "cpu")
    if kind == "vllm":
        if importlib.util.find_spec("vllm") is None:
            raise ImportError("engine 'vllm' was asked for but vllm is not installed: pip install 'raydpo[vllm]', or use 'hf'")
        return VLLMEngine(model_path, **kwargs)
    return HFEngine(model_path, **kwargs)
