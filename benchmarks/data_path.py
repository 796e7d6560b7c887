"""Data-path check: does feeding the train step from Ray Data shards cost throughput?

    python benchmarks/data_path.py --shape tiny|gpt162m|llama1b [--steps N] [--warmup N] [--prefetch N]

Synthetic scored pairs are written as Parquet shards (the score stage's schema) to a temporary directory.
The same train step (`pipeline.training.step.train_step`: forward, backward, AdamW) then runs twice: fed from
`ray.data.read_parquet(...).iter_batches(batch_size=micro, batch_format="numpy", prefetch_batches=...)`, as
the train workers read their shards, and fed from the same batches already in memory. Prints both
tokens/s and their ratio (target >= 0.95). Warmup steps (Ray Data's start-up included) are not timed;
time to the first batch is printed apart.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import tempfile

import common
import pyarrow as pa
import pyarrow.parquet as pq
import train_step
from common import Row


def write_shards(rows: dict[str, list], directory: str, *, shards: int) -> None:
    """Rows as `shards` Parquet files in the SCORED schema, the score stage's output."""
    from pipeline.data.schemas import SCORED

    n = len(rows["prompt_ids"])
    table = pa.table(
        {
            "id": rows["id"],
            "source": [f"synthetic#{i}" for i in range(n)],
            "prompt_ids": rows["prompt_ids"],
            "chosen_ids": rows["chosen_ids"],
            "rejected_ids": rows["rejected_ids"],
            "label": pa.nulls(n, pa.bool_()),
            "prompt_len": [len(p) for p in rows["prompt_ids"]],
            "chosen_len": [len(c) for c in rows["chosen_ids"]],
            "rejected_len": [len(r) for r in rows["rejected_ids"]],
            "ref_chosen_logps": rows["ref_chosen_logps"],
            "ref_rejected_logps": rows["ref_rejected_logps"],
        },
        schema=SCORED,
    )
    per = math.ceil(n / shards)
    for i in range(shards):
        pq.write_table(table.slice(i * per, per), os.path.join(directory, f"part-{i:05d}.parquet"))


def run_loop(shape, batches, device, *, steps: int, warmup: int) -> tuple[float, float, str]:
    """Train on an iterable of numpy micro-batches: (tokens/s after warmup, seconds to first batch, peak memory)."""
    measured = train_step.measure_train(shape, batches, device, steps=steps, warmup=warmup)
    return measured.tokens_per_s, measured.first_batch_s, measured.memory


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--prefetch", type=int, default=2, help="Ray Data prefetch_batches")
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds of both feeds; the best of each is kept")
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs given to the local Ray")
    return p.parse_args(argv)


def main(argv=None) -> None:
    import ray

    args = parse_args(argv)
    shape, device, label = common.start(args)
    micro = shape.pairs_per_step
    n = (args.warmup + args.steps) * micro
    rows_data = common.make_pairs(shape, n, seed=args.seed)
    print(
        f"shape {shape.name}: {n} pairs in {args.shards} Parquet shards, micro-batch {micro}, prefetch {args.prefetch}"
    )

    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # no per-execution INFO lines between rows
        ray.data.DataContext.get_current().enable_progress_bars = False
        with tempfile.TemporaryDirectory() as directory:
            write_shards(rows_data, directory, shards=args.shards)
            dataset = ray.data.read_parquet(directory)

            def ray_batches():
                return dataset.iter_batches(
                    batch_size=micro, batch_format="numpy", prefetch_batches=args.prefetch, drop_last=True
                )

            # The in-memory feed gets the very batches Ray Data yields (same rows, order and dtypes).
            in_memory = list(ray_batches())
            results = {"ray": [], "memory": []}
            for _ in range(args.rounds):
                results["memory"].append(run_loop(shape, in_memory, device, steps=args.steps, warmup=args.warmup))
                results["ray"].append(run_loop(shape, ray_batches(), device, steps=args.steps, warmup=args.warmup))
                print(
                    f"  round: in memory {results['memory'][-1][0]:,.0f} tokens/s, "
                    f"Ray Data {results['ray'][-1][0]:,.0f} tokens/s",
                    flush=True,
                )
    finally:
        ray.shutdown()

    mem_best = max(results["memory"], key=lambda r: r[0])
    ray_best = max(results["ray"], key=lambda r: r[0])
    rows = [
        Row("train step fed from memory", mem_best[0], None, mem_best[2], label),
        Row(
            f"train step fed from Ray Data Parquet shards (prefetch {args.prefetch})",
            ray_best[0],
            None,
            ray_best[2],
            label,
            note=f"first batch after {ray_best[1]:.2f}s",
        ),
    ]
    common.print_table(rows, title=f"data path, shape {shape.name} (best of {args.rounds} rounds)")
    print(f"in_memory_tokens_per_s: {mem_best[0]:.1f}")
    print(f"ray_data_tokens_per_s: {ray_best[0]:.1f}")
    print(f"ratio_ray_over_memory: {ray_best[0] / mem_best[0]:.3f} (target >= 0.95)")


if __name__ == "__main__":
    main()
