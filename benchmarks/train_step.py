"""Train-step throughput with reference log-probs precomputed: our step against a plain loop and TRL.

    python benchmarks/train_step.py --shape tiny|gpt162m|llama1b|llama3b|llama8b|llama13b [--compare trl]
                                    [--steps N] [--warmup N] [--chunked] [--grad-checkpointing] [--compile]
                                    [--strategy ddp|fsdp] [--cpu-offload] [--lora R]

Our step is the train stage's own `pipeline.training.step.train_step` (forward, backward, grad
clipping, AdamW fused on CUDA) with the paired objective, bf16 autocast over float32 master weights on
CUDA, float32 on CPU; the model is built from a config (random weights). Rows: a plain loop (full
logits -> float32 log_softmax -> gather, through the same `train_step`), our step, and each option
asked for alone and all together. Tokens = non-pad tokens of the chosen and rejected sequences, prompt
included. The last line is `speedup_vs_trl: <float>` (best raydpo row over best TRL row, `nan` when no
TRL figure applies).

`--strategy fsdp` (one process: a process group of one, FSDP2 on its one GPU), `--cpu-offload` and
`--lora R` build the policy the way the train stage does (`pipeline.training.policy.prepare_policy`:
bf16 compute over fp32 shards; LoRA on a frozen bf16 base), so one GPU shows how large a shape each
trains. Each row also prints the capacity plan's peak for it (`pipeline.planning.memory`), beside the
measured one.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import socket
import tempfile
from collections.abc import Iterable
from typing import NamedTuple

import common
import torch
from common import Row

OPTIONS = ("packing", "chunked", "grad_checkpointing", "compile")


def build_policy(shape: common.Shape, device: torch.device, train, *, attn: str = "sdpa"):
    """The train stage's policy for `train` (`prepare_policy`: strategy, LoRA, checkpointing, compile),
    built from the shape's config with random weights (FSDP's shards drawn shard by shard)."""
    from transformers import AutoModelForCausalLM

    from pipeline.training.lora import init_adapters
    from pipeline.training.policy import base_dtype, prepare_policy
    from pipeline.training.sharding import parameters_on_meta

    dtype = base_dtype(train, device)
    if train.strategy == "fsdp":
        with parameters_on_meta():
            model = AutoModelForCausalLM.from_config(common.model_config(shape, attn=attn), dtype=dtype)
    else:
        model = common.build_model(shape, device, dtype=dtype, attn=attn)
    model = prepare_policy(model, train, device=device, base_path=f"benchmark-{shape.name}")
    if train.strategy == "fsdp":
        torch.manual_seed(0)
        with torch.no_grad():
            for param in model.parameters():  # values do not change speed or memory
                param.normal_(0.0, 0.02)
    if train.lora:
        init_adapters(model, seed=0)
    return model


def plain_loop_loss(model, batch: dict, *, device: torch.device, beta: float, rows: int):
    """The textbook step: full logits, float32 log_softmax over the vocabulary, gather, mask, DPO loss."""
    from pipeline.model.logps.padded import collate_sequences
    from pipeline.training.losses import PairLogps, Reduction, compute_loss

    prompts = list(batch["prompt_ids"])
    input_ids, attention_mask, response_mask = (
        t.to(device)
        for t in collate_sequences(
            prompts + prompts, list(batch["chosen_ids"]) + list(batch["rejected_ids"]), pad_id=common.PAD_ID
        )
    )
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    with autocast:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # (2B, T, V)
    logp = torch.log_softmax(logits.float(), dim=-1)[:, :-1]  # (2B, T-1, V) float32
    per_token = logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    mask = response_mask[:, 1:]
    seq = (per_token * mask).sum(-1)
    b = len(prompts)
    out = compute_loss(
        "dpo",
        PairLogps(
            policy_chosen_logps=seq[:b],
            policy_rejected_logps=seq[b:],
            ref_chosen_logps=torch.as_tensor(batch["ref_chosen_logps"], device=device, dtype=torch.float32),
            ref_rejected_logps=torch.as_tensor(batch["ref_rejected_logps"], device=device, dtype=torch.float32),
        ),
        beta=beta,
    )
    return out.reduced({Reduction.ROWS: rows}), int(attention_mask.sum())


class PlainLoop:
    """`plain_loop_loss` as a train-step objective, so the baseline row runs the very step ours does."""

    def __init__(self, device: torch.device, *, beta: float):
        self.device, self.beta = device, beta

    def begin_step(self, model, batches, *, world: int):
        from pipeline.training.metrics import StepMetrics

        return sum(len(batch["prompt_ids"]) for batch in batches) * world, StepMetrics.of(self.device)

    def micro_batch_loss(self, model, batch: dict, shared: int, *, index: int):
        from pipeline.training.metrics import StepMetrics

        loss, tokens = plain_loop_loss(model, batch, device=self.device, beta=self.beta, rows=shared)
        return loss, StepMetrics.of(self.device, rows=len(batch["prompt_ids"]), tokens=tokens)

    def end_step(self, totals: dict) -> None:
        return None

    def loss_metrics(self, totals: dict, shared) -> dict:
        return {}

    def progress(self, row: dict) -> str:
        return ""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        return None


class Measured(NamedTuple):
    tokens_per_s: float
    memory: str  # peak memory, formatted
    params: int
    first_batch_s: float  # seconds from the loop's start to its first batch (the data path's start-up)


def measure_train(
    shape: common.Shape,
    batches: Iterable[dict],
    device: torch.device,
    *,
    steps: int,
    warmup: int,
    plain: bool = False,
    chunked: bool = False,
    grad_checkpointing: bool = False,
    compile: bool = False,
    packing: bool = False,
    packed_attn: str = "sdpa",
    chunk_size: int = 1024,
    profile: bool = False,
    scale: dict | None = None,
) -> Measured:
    """Time `steps` optimizer steps after `warmup` over `batches` (a list is cycled; an iterator, such as
    Ray Data's, is read once and must hold warmup + steps batches). `scale`: TrainConfig's strategy,
    cpu_offload and lora for the policy (default ddp, full fine-tuning)."""
    from pipeline.config import TrainConfig
    from pipeline.training.objectives import objective_for
    from pipeline.training.policy import make_optimizer
    from pipeline.training.step import train_step

    common.free_memory(device)
    pairs = len(batches[0]["prompt_ids"])
    lr = 1e-6
    train = TrainConfig(
        loss="dpo",
        beta=0.1,
        learning_rate=lr,
        batch_size=pairs,
        micro_batch_size=pairs,
        max_grad_norm=1.0,
        chunked_logps=chunked,
        logps_chunk_size=chunk_size,
        packing=packing,
        gradient_checkpointing=grad_checkpointing,
        compile=compile,
        **(scale or {}),
    )
    model = build_policy(shape, device, train, attn=packed_attn if packing else "sdpa")
    params = common.num_params(model)
    optimizer = make_optimizer(model, train, device=device)
    objective = (
        PlainLoop(device, beta=train.beta)
        if plain
        else objective_for(train, pad_id=common.PAD_ID, device=device, with_reference=True)
    )
    tokens, start, first_batch = 0, None, None
    profiler = _profiler(device) if profile else contextlib.nullcontext()
    stream = itertools.cycle(batches) if isinstance(batches, list) else iter(batches)
    begin = common.now(device)
    for i in range(warmup + steps):
        if i == warmup:
            common.reset_peak_memory(device)
            start = common.now(device)
            if profile:
                profiler.__enter__()
        batch = next(stream)
        if first_batch is None:
            first_batch = common.now(device) - begin
        result = train_step(model, optimizer, [batch], objective=objective, lr=lr, max_grad_norm=train.max_grad_norm)
        if i >= warmup:
            tokens += result.tokens
    elapsed = common.now(device) - start
    if profile:
        profiler.__exit__(None, None, None)
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(profiler.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=70))
    memory = common.peak_memory(device)
    del model, optimizer
    common.free_memory(device)
    return Measured(tokens / elapsed, memory, params, first_batch)


def _profiler(device: torch.device):
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    return profile(activities=activities)


def variants(args) -> list[tuple[str, dict]]:
    """(row name, options) for every row asked for: each option alone, then all of them together."""
    chosen = [o for o in OPTIONS if getattr(args, o)]
    out = [("plain loop (full logits, fp32 log_softmax)", {"plain": True}), ("raydpo train_step", {})]
    label = {
        "packing": f"packing ({args.packed_attn})",
        "chunked": "chunked logprobs",
        "grad_checkpointing": "grad checkpointing",
        "compile": "torch.compile",
    }
    for option in chosen:
        out.append((f"raydpo + {label[option]}", {option: True}))
    combos = [chosen]
    if "grad_checkpointing" in chosen and len(chosen) > 2:
        combos.insert(0, [o for o in chosen if o != "grad_checkpointing"])  # the fastest set, then the leanest
    for combo in combos if len(chosen) > 1 else []:
        out.append(("raydpo + " + " + ".join(label[o] for o in combo), dict.fromkeys(combo, True)))
    return out


class _StepTimer:
    """TrainerCallback timing each optimizer step end to end (data, forward, backward, optimizer)."""

    def __init__(self, device):
        from transformers import TrainerCallback

        timer = self

        class Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                timer.ends = [common.now(device)]

            def on_step_end(self, args, state, control, **kwargs):
                timer.ends.append(common.now(device))

        self.callback = Callback()
        self.ends: list[float] = []


def measure_trl_train(shape, rows, device, *, steps: int, warmup: int, **overrides) -> tuple[float, str]:
    """TRL's DPOTrainer on the same pairs, model shape, batch and dtype, reference log-probs precomputed."""
    from transformers import PrinterCallback
    from trl import DPOTrainer

    common.quiet_hf()
    common.free_memory(device)
    model = common.build_model(shape, device)
    model.config.use_cache = False
    timer = _StepTimer(device)
    with tempfile.TemporaryDirectory() as out:
        config = common.trl_config(out, pairs=shape.pairs_per_step, steps=warmup + steps, device=device, **overrides)
        trainer = DPOTrainer(
            model=model,
            args=config,
            train_dataset=common.trl_dataset(rows),
            processing_class=common.word_tokenizer(shape.vocab),
            callbacks=[timer.callback],
        )
        # Count the tokens of every training batch TRL collates (in order: the sampler is sequential).
        counts: list[int] = []
        collate = trainer.data_collator

        def counting_collator(examples):
            batch = collate(examples)
            counts.append(int(batch["attention_mask"].sum()))
            return batch

        trainer.data_collator = counting_collator
        trainer.remove_callback(PrinterCallback)
        common.reset_peak_memory(device)
        trainer.train()
    memory = common.peak_memory(device)
    elapsed = timer.ends[warmup + steps] - timer.ends[warmup]
    tokens = sum(counts[warmup : warmup + steps])
    del trainer, model
    common.free_memory(device)
    return tokens / elapsed, memory


def trl_settings(device: torch.device) -> list[tuple[str, dict]]:
    """TRL settings to try; the best one is TRL's figure. TRL defaults to gradient checkpointing on."""
    out = [("gc off", {"gradient_checkpointing": False}), ("gc on (TRL default)", {"gradient_checkpointing": True})]
    if device.type == "cuda" and common.liger_available():
        out.append(("gc off, liger", {"gradient_checkpointing": False, "use_liger_kernel": True}))
    return out


def trl_rows(shape, rows, device, *, steps: int, warmup: int, label: str, params: int) -> list[Row]:
    if not common.trl_available():
        out = [Row("trl DPOTrainer: trl not installed", None, device=common.device_label(device))]
        gpu = common.gpu_name(device) or ""
        published = common.TRL_PUBLISHED_TRAIN_TOKENS_PER_S.get(shape.name)
        if published and common.TRL_PUBLISHED_GPU in gpu:
            out.append(
                Row(
                    "trl best",
                    published,
                    common.mfu(published, params, device),
                    device=gpu,
                    note="published figure, not measured in this run",
                )
            )
        return out
    out = []
    for name, overrides in trl_settings(device):
        try:
            rate, memory = measure_trl_train(shape, rows, device, steps=steps, warmup=warmup, **overrides)
            out.append(Row(f"trl DPOTrainer ({name})", rate, common.mfu(rate, params, device), memory, label))
        except Exception as exc:  # one failing setting should not hide the others
            out.append(
                Row(f"trl DPOTrainer ({name}): failed", None, device=label, note=f"{type(exc).__name__}: {exc}"[:120])
            )
    return out


def setup_label(scale: dict) -> str:
    from pipeline.planning.memory import Setup

    return Setup(scale["strategy"], cpu_offload=scale["cpu_offload"], lora=scale.get("lora")).label


def speedup(rows: list[Row]) -> float:
    ours, theirs = common.best(rows, "raydpo"), common.best(rows, "trl")
    if ours is None or theirs is None:
        return math.nan
    return ours.tokens_per_s / theirs.tokens_per_s


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p)
    p.add_argument("--compare", choices=["trl"], default=None)
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (allocator, kernels, compilation)")
    p.add_argument("--chunked", action="store_true", help="add a row with chunked log-probs")
    p.add_argument("--grad-checkpointing", action="store_true", help="add a row with activation checkpointing")
    p.add_argument("--compile", action="store_true", help="add a row with torch.compile (per decoder block)")
    p.add_argument("--packing", action="store_true", help="add a row with padding-free packed sequences")
    p.add_argument(
        "--packed-attn", default="sdpa", help="attention for packed rows: sdpa | flex_attention | flash_attention_2"
    )
    p.add_argument("--chunk-size", type=int, default=1024, help="response tokens per logits chunk")
    p.add_argument("--profile", action="store_true", help="print the top kernels of each row's timed steps")
    p.add_argument("--strategy", choices=["ddp", "fsdp"], default="ddp", help="train.strategy of every row")
    p.add_argument("--cpu-offload", action="store_true", help="train.cpu_offload (with --strategy fsdp)")
    p.add_argument("--lora", type=int, default=0, metavar="R", help="train.lora with rank R on every linear (0: off)")
    return p.parse_args(argv)


def scale_options(args) -> dict:
    """TrainConfig's strategy, cpu_offload and lora from the arguments; under fsdp, a process group of one."""
    from pipeline.config import LoraConfig

    if args.strategy == "fsdp" and not torch.distributed.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        backend = "nccl" if torch.cuda.is_available() and args.device != "cpu" else "gloo"
        torch.distributed.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    lora = {"lora": LoraConfig(r=args.lora, alpha=2.0 * args.lora)} if args.lora else {}
    return {"strategy": args.strategy, "cpu_offload": args.cpu_offload, **lora}


def planned_gib(
    shape: common.Shape, batches: list[dict], scale: dict, options: dict, *, chunk_size: int
) -> float | None:
    """The capacity plan's peak for a row (`pipeline.planning.memory`, one worker), None for non-Llama shapes."""
    from pipeline.planning.memory import GIB, ModelShape, Setup, Workload, estimate

    if shape.arch != "llama":
        return None
    longest = max(
        len(p) + max(len(c), len(r))
        for b in batches
        for p, c, r in zip(b["prompt_ids"], b["chosen_ids"], b["rejected_ids"])
    )
    work = Workload(
        tokens=2 * len(batches[0]["prompt_ids"]) * longest,
        chunk_size=chunk_size if options.get("chunked") else None,
        gradient_checkpointing=options.get("grad_checkpointing", False),
        accumulates=False,
    )
    setup = Setup(scale["strategy"], cpu_offload=scale["cpu_offload"], lora=scale.get("lora"))
    return estimate(ModelShape.from_config(common.model_config(shape).to_dict()), setup, work, workers=1).peak / GIB


def main(argv=None) -> None:
    args = parse_args(argv)
    shape, device, label = common.start(args)
    rows_data = common.make_pairs(shape, (args.warmup + args.steps) * shape.pairs_per_step, seed=args.seed)
    batches = common.numpy_batches(rows_data, shape.pairs_per_step)
    print(
        f"shape {shape.name}: {shape.pairs_per_step} pairs/step, ~{shape.tokens_per_pair} tokens/pair, "
        f"{args.warmup} warmup + {args.steps} timed steps"
    )

    rows: list[Row] = []
    params = 0
    scale = scale_options(args)
    suffix = "" if scale == {"strategy": "ddp", "cpu_offload": False} else f" [{setup_label(scale)}]"
    for name, options in variants(args):
        try:
            rate, memory, params, _ = measure_train(
                shape,
                batches,
                device,
                steps=args.steps,
                warmup=args.warmup,
                chunk_size=args.chunk_size,
                packed_attn=args.packed_attn,
                profile=args.profile,
                scale=scale,
                **options,
            )
        except torch.OutOfMemoryError:  # the largest shape a setting trains is what these rows look for
            rows.append(Row(name + suffix + ": out of memory", None, device=label))
            common.free_memory(device)
            continue
        rows.append(Row(name + suffix, rate, common.mfu(rate, params, device), memory, label))
        plan = planned_gib(shape, batches, scale, options, chunk_size=args.chunk_size)
        print(
            f"  {name}{suffix}: {rate:,.0f} tokens/s, peak {memory}"
            + (f" (capacity plan: {plan:.2f} GiB)" if plan is not None else ""),
            flush=True,
        )
    print(f"model: {params / 1e6:.1f}M parameters; MFU = 6 x params x tokens/s / peak")
    if args.compare == "trl":
        rows += trl_rows(shape, rows_data, device, steps=args.steps, warmup=args.warmup, label=label, params=params)
    common.print_table(rows, title=f"train step, shape {shape.name}")
    print(f"speedup_vs_trl: {speedup(rows)}")


if __name__ == "__main__":
    main()
