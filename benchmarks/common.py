"""Shared pieces of the benchmarks: model shapes, synthetic pairs, the machine, MFU, and the table.

Every benchmark builds its model from a config (random weights, no download) and feeds it synthetic
token ids, so the numbers measure compute and data movement, not a tokenizer or the hub.
"""

from __future__ import annotations

import math
import os
import platform
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
FIRST_WORD_ID = 3  # ids below are special tokens


@dataclass(frozen=True)
class Shape:
    """A model shape and the pairs fed to it. Lengths are means; each sequence draws +-25% around them."""

    name: str
    arch: str  # llama | gpt2
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    mlp: int
    vocab: int
    prompt_len: int
    response_len: int
    pairs_per_step: int
    score_micro_batch: int  # pairs per forward pass in the score benchmark
    max_positions: int = 2048

    @property
    def tokens_per_pair(self) -> int:
        """Mean non-pad tokens of one pair: prompt + chosen and prompt + rejected."""
        return 2 * (self.prompt_len + self.response_len)


SHAPES = {
    # Runs everywhere in seconds: the path every variant takes, at toy size. ~96 tokens a pair.
    "tiny": Shape(
        "tiny",
        "llama",
        hidden=128,
        layers=2,
        heads=4,
        kv_heads=2,
        mlp=344,
        vocab=1000,
        prompt_len=32,
        response_len=16,
        pairs_per_step=4,
        score_micro_batch=8,
        max_positions=256,
    ),
    # GPT-2 small with an untied output layer (163.0M parameters), the "162M" row.
    "gpt162m": Shape(
        "gpt162m",
        "gpt2",
        hidden=768,
        layers=12,
        heads=12,
        kv_heads=12,
        mlp=3072,
        vocab=50257,
        prompt_len=256,
        response_len=256,
        pairs_per_step=8,
        score_micro_batch=16,
        max_positions=1024,
    ),
    # The Llama 1.1B shape of the issue (TinyLlama's): ~1024 tokens a pair.
    "llama1b": Shape(
        "llama1b",
        "llama",
        hidden=2048,
        layers=22,
        heads=32,
        kv_heads=4,
        mlp=5632,
        vocab=32000,
        prompt_len=256,
        response_len=256,
        pairs_per_step=8,
        score_micro_batch=16,
    ),
    # Larger Llama shapes for the scale rows (--strategy fsdp, --cpu-offload, --lora): Llama 3.2 3B (its
    # output layer untied here), Llama 3.1 8B, Llama 2 13B; 1024 tokens a pair, 2 pairs a step.
    "llama3b": Shape(
        "llama3b",
        "llama",
        hidden=3072,
        layers=28,
        heads=24,
        kv_heads=8,
        mlp=8192,
        vocab=128256,
        prompt_len=256,
        response_len=256,
        pairs_per_step=2,
        score_micro_batch=8,
    ),
    "llama8b": Shape(
        "llama8b",
        "llama",
        hidden=4096,
        layers=32,
        heads=32,
        kv_heads=8,
        mlp=14336,
        vocab=128256,
        prompt_len=256,
        response_len=256,
        pairs_per_step=2,
        score_micro_batch=8,
    ),
    "llama13b": Shape(
        "llama13b",
        "llama",
        hidden=5120,
        layers=40,
        heads=40,
        kv_heads=40,
        mlp=13824,
        vocab=32000,
        prompt_len=256,
        response_len=256,
        pairs_per_step=2,
        score_micro_batch=8,
    ),
}


def model_config(shape: Shape, *, attn: str = "sdpa"):
    """A transformers config for `shape`, dropout off (the trainer turns it off too)."""
    if shape.arch == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=shape.vocab,
            hidden_size=shape.hidden,
            intermediate_size=shape.mlp,
            num_hidden_layers=shape.layers,
            num_attention_heads=shape.heads,
            num_key_value_heads=shape.kv_heads,
            max_position_embeddings=shape.max_positions,
            tie_word_embeddings=False,
            use_cache=False,
            pad_token_id=PAD_ID,
            bos_token_id=BOS_ID,
            eos_token_id=EOS_ID,
            attn_implementation=attn,
        )
    if shape.arch == "gpt2":
        from transformers import GPT2Config

        return GPT2Config(
            vocab_size=shape.vocab,
            n_positions=shape.max_positions,
            n_embd=shape.hidden,
            n_layer=shape.layers,
            n_head=shape.heads,
            n_inner=shape.mlp,
            tie_word_embeddings=False,
            use_cache=False,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            pad_token_id=PAD_ID,
            bos_token_id=BOS_ID,
            eos_token_id=EOS_ID,
            attn_implementation=attn,
        )
    raise ValueError(f"unknown arch {shape.arch!r}")


def build_model(
    shape: Shape, device: torch.device, *, dtype: torch.dtype = torch.float32, seed: int = 0, attn: str = "sdpa"
):
    """Randomly initialised causal LM of `shape` on `device`; float32 master weights unless told."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):  # initialise on the device: a 1.1B model's CPU init takes longer than its benchmark
        model = AutoModelForCausalLM.from_config(model_config(shape, attn=attn), dtype=dtype)
    return model.to(device)


def num_params(model) -> int:
    """Distinct parameters (a tied matrix counts once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def make_pairs(shape: Shape, n: int, *, seed: int = 0) -> dict[str, list]:
    """n synthetic scored pairs as the score stage writes them: ids, lengths, reference log-probs.

    Deterministic in `seed`. Prompt and response lengths are uniform within +-25% of the shape's means;
    responses end in EOS as the tokenize stage makes them.
    """
    rng = np.random.default_rng(seed)

    def length(mean: int) -> int:
        return int(rng.integers(max(1, math.floor(0.75 * mean)), math.ceil(1.25 * mean) + 1))

    def ids(n_tokens: int, *, eos: bool) -> list[int]:
        out = rng.integers(FIRST_WORD_ID, shape.vocab, size=n_tokens).tolist()
        if eos:
            out[-1] = EOS_ID
        return out

    rows = {k: [] for k in ("id", "prompt_ids", "chosen_ids", "rejected_ids", "ref_chosen_logps", "ref_rejected_logps")}
    for i in range(n):
        rows["id"].append(f"pair-{seed}-{i}")
        rows["prompt_ids"].append(ids(length(shape.prompt_len), eos=False))
        chosen, rejected = ids(length(shape.response_len), eos=True), ids(length(shape.response_len), eos=True)
        rows["chosen_ids"].append(chosen)
        rows["rejected_ids"].append(rejected)
        # Near the log-prob of a random token under a random model, so DPO margins start near zero.
        rows["ref_chosen_logps"].append(-math.log(shape.vocab) * len(chosen) + float(rng.normal()))
        rows["ref_rejected_logps"].append(-math.log(shape.vocab) * len(rejected) + float(rng.normal()))
    return rows


def pair_tokens(rows: dict[str, list], index) -> int:
    """Non-pad tokens of chosen + rejected sequences (prompt counted in both) for rows `index`."""
    return sum(
        2 * len(rows["prompt_ids"][i]) + len(rows["chosen_ids"][i]) + len(rows["rejected_ids"][i]) for i in index
    )


def numpy_batches(rows: dict[str, list], batch_size: int) -> list[dict[str, np.ndarray]]:
    """Consecutive micro-batches shaped like Ray Data numpy batches (object arrays of int64 arrays)."""
    out = []
    n = len(rows["prompt_ids"])
    for start in range(0, n - batch_size + 1, batch_size):
        batch = {}
        for key, values in rows.items():
            part = values[start : start + batch_size]
            if key.endswith("_ids"):
                arr = np.empty(len(part), dtype=object)
                arr[:] = [np.asarray(v, dtype=np.int64) for v in part]
                batch[key] = arr
            else:
                batch[key] = np.asarray(part)
        out.append(batch)
    return out


def batch_tokens(batch: dict) -> int:
    return int(
        sum(
            2 * len(p) + len(c) + len(r)
            for p, c, r in zip(batch["prompt_ids"], batch["chosen_ids"], batch["rejected_ids"])
        )
    )


# --- the machine ---------------------------------------------------------------------------------------

# Dense bf16 tensor-core peaks from the vendor data sheets, FLOP/s (no sparsity).
PEAK_BF16_FLOPS = {
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,  # SXM (HBM3), the reference
    "H200": 989e12,
    "GH200": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
}


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def gpu_name(device: torch.device) -> str | None:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else None


def peak_flops(device: torch.device) -> float | None:
    """Peak dense bf16 FLOP/s of the device, None where unknown (CPUs, unlisted GPUs): MFU is then n/a."""
    name = gpu_name(device)
    if name is None:
        return None
    for key, value in PEAK_BF16_FLOPS.items():  # most specific first
        if key in name:
            return value
    return None


def configure_threads(threads: int, device: torch.device) -> str:
    """Set torch's CPU threads: `threads` if positive; else 1 on a CPU run when the machine is already
    busier than its cores (OpenMP threads spinning against other processes made a 2-thread run 60x slower
    than a 1-thread one on a shared 2-core box), else torch's default. Returns what was done, for the log."""
    if threads > 0:
        torch.set_num_threads(threads)
        return f"torch threads {threads} (asked)"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    cores = os.cpu_count() or 1
    if device.type == "cpu" and load >= cores:
        torch.set_num_threads(1)
        return f"torch threads 1 (load average {load:.1f} >= {cores} cores: shared machine)"
    return f"torch threads {torch.get_num_threads()} (default; load average {load:.1f})"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_machine(device: torch.device) -> str:
    import transformers

    parts = [
        f"cpu: {cpu_model()} ({os.cpu_count()} cores visible, torch threads {torch.get_num_threads()})",
        f"torch {torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}",
    ]
    if device.type == "cuda":
        peak = peak_flops(device)
        parts.append(
            f"gpu: {gpu_name(device)}, peak bf16 {peak / 1e12:.0f} TFLOP/s"
            if peak
            else f"gpu: {gpu_name(device)}, peak unknown"
        )
    else:
        parts.append("gpu: none (CPU run: MFU n/a)")
    return "\n".join(parts)


def device_label(device: torch.device) -> str:
    return gpu_name(device) or f"CPU ({cpu_model()})"


def mfu(
    tokens_per_s: float, params: int, device: torch.device, *, flops_per_token_per_param: float = 6.0
) -> float | None:
    """Model FLOP utilisation: flops_per_token_per_param x params x tokens/s / peak.

    6 for a training step (forward 2 + backward 4), 2 for forward only. Attention score FLOPs and padding
    are not counted, so the figure is conservative.
    """
    peak = peak_flops(device)
    if peak is None:
        return None
    return flops_per_token_per_param * params * tokens_per_s / peak


# --- timing and memory ---------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def now(device: torch.device) -> float:
    synchronize(device)
    return time.perf_counter()


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> str:
    """Peak CUDA memory allocated since the last reset, or the process's peak RSS on CPU (cumulative)."""
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS*"


def free_memory(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --- the table -----------------------------------------------------------------------------------------


@dataclass
class Row:
    system: str
    tokens_per_s: float | None  # None: not measured (the system column says why)
    mfu: float | None = None
    memory: str = "-"
    device: str = "-"
    note: str = ""


def fmt_rate(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:,.0f}"


def print_table(rows: list[Row], *, title: str) -> None:
    header = ("system", "tokens/s", "MFU", "peak memory", "device")
    cells = [
        (
            r.system + (f" [{r.note}]" if r.note else ""),
            fmt_rate(r.tokens_per_s),
            "n/a" if r.mfu is None else f"{100 * r.mfu:.1f}%",
            r.memory,
            r.device,
        )
        for r in rows
    ]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |"
    print(f"\n{title}")
    print(line)
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for c in cells:
        print(
            "| "
            + " | ".join(v.ljust(w) if i == 0 or i == 4 else v.rjust(w) for i, (v, w) in enumerate(zip(c, widths)))
            + " |"
        )
    if any(r.memory.endswith("*") for r in rows):
        print("* CPU: the process's peak resident set so far, not per row")
    sys.stdout.flush()


def best(rows: list[Row], prefix: str) -> Row | None:
    candidates = [r for r in rows if r.system.startswith(prefix) and r.tokens_per_s and not math.isnan(r.tokens_per_s)]
    return max(candidates, key=lambda r: r.tokens_per_s) if candidates else None


# --- the command line every benchmark shares ----------------------------------------------------------


def add_common_args(parser) -> None:
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0: 1 on a busy CPU, else default")
    parser.add_argument("--seed", type=int, default=0)


def start(args) -> tuple[Shape, torch.device, str]:
    """Shape, device and device label from the shared arguments; prints the machine first."""
    shape, device = SHAPES[args.shape], pick_device(args.device)
    threads = configure_threads(args.threads, device)
    print(describe_machine(device))
    print(threads)
    return shape, device, device_label(device)


# --- TRL, for the comparison rows (an optional benchmark dependency) ------------------------------------


def trl_available() -> bool:
    try:
        import trl  # noqa: F401
    except Exception:  # not installed, or installed against other versions
        return False
    return True


def liger_available() -> bool:
    try:
        import liger_kernel  # noqa: F401
    except Exception:
        return False
    return True


# TRL's best published DPO training throughput with precomputed reference log-probs, from the issue,
# on one H100: used only when TRL is absent AND this run is on a matching GPU, and labelled so.
TRL_PUBLISHED_TRAIN_TOKENS_PER_S = {"llama1b": 18_500.0, "gpt162m": 53_000.0}
TRL_PUBLISHED_GPU = "H100"


def word(token_id: int) -> str:
    return {PAD_ID: "<pad>", BOS_ID: "<s>", EOS_ID: "</s>"}.get(token_id, f"t{token_id}")


def word_tokenizer(vocab: int):
    """A tokenizer whose text is the ids themselves ("t17 t5 </s>" <-> [17, 5, 2]).

    TRL's DPOTrainer tokenizes text; with this tokenizer it reproduces our synthetic token ids exactly.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({word(i): i for i in range(vocab)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def quiet_hf() -> None:
    """No progress bars or per-step log lines from datasets / transformers in the middle of our tables."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()


def trl_dataset(rows: dict[str, list]):
    """Our synthetic pairs as a TRL text dataset. Responses end in EOS, so TRL adds none."""
    from datasets import Dataset

    def text(ids):
        return " ".join(word(i) for i in ids)

    return Dataset.from_dict(
        {
            "prompt": [text(p) for p in rows["prompt_ids"]],
            "chosen": [" " + text(c) for c in rows["chosen_ids"]],
            "rejected": [" " + text(r) for r in rows["rejected_ids"]],
        }
    )


def trl_config(output_dir: str, *, pairs: int, steps: int, device: torch.device, **overrides):
    """DPOConfig matched to our step: same pairs per step, no truncation, AdamW, bf16 autocast on CUDA."""
    from trl import DPOConfig

    settings = dict(
        output_dir=output_dir,
        per_device_train_batch_size=pairs,
        gradient_accumulation_steps=1,
        max_steps=steps,
        learning_rate=1e-6,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=1.0,
        beta=0.1,
        loss_type=["sigmoid"],
        max_length=None,
        precompute_ref_log_probs=True,
        precompute_ref_batch_size=pairs,
        bf16=device.type == "cuda",
        fp16=False,
        use_cpu=device.type != "cuda",
        optim="adamw_torch_fused" if device.type == "cuda" else "adamw_torch",
        train_sampling_strategy="sequential",
        dataloader_num_workers=0,
        logging_steps=10**6,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=0,
    )
    settings.update(overrides)
    return DPOConfig(**settings)
