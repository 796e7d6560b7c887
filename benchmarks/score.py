"""Score-stage throughput: the forward-only reference pass, against our own train step and TRL's precompute.

    python benchmarks/score.py --shape tiny|gpt162m|llama1b [--compare trl] [--pairs N]
                               [--chunked] [--packing] [--compile] [--packed-attn flex_attention]

Rows: `pipeline.model.scoring.score_pairs` as the score stage runs it (inference_mode, micro-batches of similar
length), the same loop in the data's own order (no length bucketing), then one row per switch asked for
(`score.chunked_logps`, `score.packing`, `score.compile`) and, with more than one, all of them
together. Weights are bf16 on CUDA (the score stage loads `model.dtype`), float32 on CPU. The train-step
rows (our step, same shape, from benchmarks/train_step.py, with the same switches) give the score/train
ratio. Tokens = non-pad tokens of chosen and rejected sequences, prompt included. MFU counts 2 x params
FLOPs per token. With --compare trl, TRL's `precompute_ref_log_probs` pass is timed on the same pairs.
The last line is `speedup_vs_trl: <float>` (`nan` when TRL is not measured).
"""

from __future__ import annotations

import argparse
import math
import tempfile

import common
import numpy as np
import pyarrow as pa
import torch
import train_step
from common import Row


def pairs_table(rows: dict[str, list]) -> pa.Table:
    ids = pa.list_(pa.int32())
    return pa.table({k: pa.array(rows[k], type=ids) for k in ("prompt_ids", "chosen_ids", "rejected_ids")})


def score_unsorted(model, table: pa.Table, *, pad_id: int, micro_batch: int, device: str, **_) -> np.ndarray:
    """score_pairs' loop without its length sort: micro-batches in the data's order, padded to their longest."""
    from pipeline.model.logps.dispatch import batch_sequence_logps

    prompts, chosen, rejected = (table[k].to_pylist() for k in ("prompt_ids", "chosen_ids", "rejected_ids"))
    out = []
    with torch.inference_mode():
        for start in range(0, table.num_rows, micro_batch):
            sl = slice(start, start + micro_batch)
            logps, _, _ = batch_sequence_logps(
                model, prompts[sl] * 2, chosen[sl] + rejected[sl], pad_id=pad_id, device=device
            )
            c, r = logps.chunk(2)
            out.append(torch.stack([c, r], 1).double().cpu().numpy())
    return np.concatenate(out)


SWITCHES = {"chunked": "chunked logprobs", "packing": "packing", "compile": "torch.compile"}


def variants(args) -> list[tuple[str, dict]]:
    """(row name, options): the stage as configured by default, unsorted, each switch alone, then all together."""
    chosen = [o for o in SWITCHES if getattr(args, o)]
    label = lambda combo: " + ".join(f"packing ({args.packed_attn})" if o == "packing" else SWITCHES[o] for o in combo)
    out = [("raydpo score_pairs (length-bucketed)", {}), ("raydpo unsorted micro-batches", {"sort": False})]
    out += [(f"raydpo score_pairs + {label([o])}", {o: True}) for o in chosen]
    if len(chosen) > 1:
        out.append((f"raydpo score_pairs + {label(chosen)}", dict.fromkeys(chosen, True)))
    return out


def measure_score(
    shape,
    table,
    warm_table,
    device,
    dtype,
    *,
    micro_batch: int,
    chunk_size: int,
    repeats: int,
    packed_attn: str,
    sort: bool = True,
    chunked: bool = False,
    packing: bool = False,
    compile: bool = False,
) -> tuple[float, str, int]:
    """Best of `repeats` timed passes over `table` after one pass over `warm_table`: (tokens/s, peak memory, params).

    The model is built per row, as a score actor builds it: attention `packed_attn` when packing, each
    decoder block compiled when `compile` (what score.compile does).
    """
    from pipeline.model.pretrained import compile_decoder_layers
    from pipeline.model.scoring import score_pairs

    common.free_memory(device)
    model = common.build_model(shape, device, dtype=dtype, attn=packed_attn if packing else "sdpa").eval()
    if compile:
        compile_decoder_layers(model)
    fn = score_pairs if sort else score_unsorted
    options = dict(
        pad_id=common.PAD_ID,
        micro_batch=micro_batch,
        device=str(device),
        packing=packing,
        chunk_size=chunk_size if chunked else None,
    )
    tokens = sum(
        2 * len(p) + len(c) + len(r)
        for p, c, r in zip(*(table[k].to_pylist() for k in ("prompt_ids", "chosen_ids", "rejected_ids")))
    )
    fn(model, warm_table, **options)
    common.reset_peak_memory(device)
    elapsed = math.inf
    for _ in range(repeats):
        start = common.now(device)
        fn(model, table, **options)
        elapsed = min(elapsed, common.now(device) - start)
    params = common.num_params(model)
    del model
    return tokens / elapsed, common.peak_memory(device), params


def measure_trl_precompute(
    shape, rows, warm_rows, device, *, micro_batch: int, dtype: torch.dtype, bf16: bool
) -> tuple[float, str]:
    """Time TRL's own `_precompute_ref_logps` (its reference pass, caching included) on the same pairs."""
    from trl import DPOTrainer

    common.quiet_hf()
    timings: list[float] = []
    original = DPOTrainer._precompute_ref_logps

    def timed(self, dataset, name, batch_size):
        start = common.now(device)
        out = original(self, dataset, name, batch_size)
        timings.append(common.now(device) - start)
        return out

    DPOTrainer._precompute_ref_logps = timed
    model = common.build_model(shape, device, dtype=dtype)
    tokenizer = common.word_tokenizer(shape.vocab)
    try:
        for data in (warm_rows, rows):  # the first trainer warms the device up; the second is timed
            common.reset_peak_memory(device)
            with tempfile.TemporaryDirectory() as out:
                config = common.trl_config(
                    out, pairs=micro_batch, steps=1, device=device, bf16=bf16, gradient_checkpointing=False
                )
                DPOTrainer(model=model, args=config, train_dataset=common.trl_dataset(data), processing_class=tokenizer)
    finally:
        DPOTrainer._precompute_ref_logps = original
    memory = common.peak_memory(device)
    del model
    common.free_memory(device)
    return common.pair_tokens(rows, range(len(rows["prompt_ids"]))) / timings[-1], memory


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p)
    p.add_argument("--compare", choices=["trl"], default=None)
    p.add_argument("--pairs", type=int, default=0, help="pairs scored in the timed pass; 0: 8 micro-batches")
    p.add_argument("--micro-batch", type=int, default=0, help="pairs per forward; 0: the shape's default")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per row; the best is reported")
    p.add_argument("--chunked", action="store_true", help="add a row with chunked log-probs (score.chunked_logps)")
    p.add_argument(
        "--packing", action="store_true", help="add a row with padding-free packed sequences (score.packing)"
    )
    p.add_argument(
        "--packed-attn", default="sdpa", help="attention for packed rows: sdpa | flex_attention | flash_attention_2"
    )
    p.add_argument(
        "--compile", action="store_true", help="add a row with torch.compile per decoder block (score.compile)"
    )
    p.add_argument("--chunk-size", type=int, default=1024)
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto", help="auto: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--train-steps", type=int, default=5, help="timed steps of the train-step row (for the ratio)")
    p.add_argument("--warmup", type=int, default=2)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    shape, device, label = common.start(args)
    micro = args.micro_batch or shape.score_micro_batch
    n = args.pairs or 8 * micro
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(
        args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32
    )
    rows_data = common.make_pairs(shape, n, seed=args.seed)
    warm_data = common.make_pairs(shape, 2 * micro, seed=args.seed + 1)
    table, warm_table = pairs_table(rows_data), pairs_table(warm_data)
    print(
        f"shape {shape.name}: {n} pairs in micro-batches of {micro}, ~{shape.tokens_per_pair} tokens/pair, "
        f"weights {dtype}"
    )

    rows: list[Row] = []
    params = 0
    for name, options in variants(args):
        rate, memory, params = measure_score(
            shape,
            table,
            warm_table,
            device,
            dtype,
            micro_batch=micro,
            chunk_size=args.chunk_size,
            repeats=args.repeats,
            packed_attn=args.packed_attn,
            **options,
        )
        rows.append(Row(name, rate, common.mfu(rate, params, device, flops_per_token_per_param=2.0), memory, label))
        print(f"  {name}: {rate:,.0f} tokens/s", flush=True)
    common.free_memory(device)

    train_batches = common.numpy_batches(
        common.make_pairs(shape, (args.warmup + args.train_steps) * shape.pairs_per_step, seed=args.seed),
        shape.pairs_per_step,
    )
    train_rates = []
    train_variants = [("train step (ours)", {})]
    fast = {o: True for o in SWITCHES if getattr(args, o)}
    if fast:
        train_variants.append(("train step (ours) + " + " + ".join(SWITCHES[o] for o in fast), fast))
    for name, options in train_variants:
        rate, memory, _, _ = train_step.measure_train(
            shape,
            train_batches,
            device,
            steps=args.train_steps,
            warmup=args.warmup,
            chunk_size=args.chunk_size,
            packed_attn=args.packed_attn,
            **options,
        )
        train_rates.append(rate)
        rows.append(
            Row(name, rate, common.mfu(rate, params, device), memory, label, note="for the ratio; MFU at 6 x params")
        )

    if args.compare == "trl":
        if not common.trl_available():
            rows.append(Row("trl precompute_ref_log_probs: trl not installed", None, device=label))
        else:
            settings = [
                (
                    "fp32 weights" + (", bf16 autocast" if device.type == "cuda" else ""),
                    torch.float32,
                    device.type == "cuda",
                )
            ]
            if device.type == "cuda":
                settings.append(("bf16 weights", torch.bfloat16, True))
            for name, trl_dtype, bf16 in settings:
                try:
                    rate, memory = measure_trl_precompute(
                        shape, rows_data, warm_data, device, micro_batch=micro, dtype=trl_dtype, bf16=bf16
                    )
                    rows.append(
                        Row(
                            f"trl precompute_ref_log_probs ({name})",
                            rate,
                            common.mfu(rate, params, device, flops_per_token_per_param=2.0),
                            memory,
                            label,
                        )
                    )
                except Exception as exc:
                    rows.append(
                        Row(
                            f"trl precompute_ref_log_probs ({name}): failed",
                            None,
                            device=label,
                            note=f"{type(exc).__name__}: {exc}"[:120],
                        )
                    )

    common.print_table(rows, title=f"score (forward only), shape {shape.name}")
    ours, theirs = common.best(rows, "raydpo"), common.best(rows, "trl")
    print(f"score/train tokens/s ratio: {ours.tokens_per_s / max(train_rates):.2f} (target >= 2.5)")
    print(f"speedup_vs_trl: {ours.tokens_per_s / theirs.tokens_per_s if theirs else math.nan}")


if __name__ == "__main__":
    main()
