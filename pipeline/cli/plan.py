"""`dpo plan`: the capacity plan of a config as a table, before anything runs (no Ray, no weights).

    dpo plan --config configs/llama8b.yaml                        per GPU at train.num_workers, fewest 80 GiB GPUs
    dpo plan --config X --gpu-gib 24 --gpu-gib 80 --gpu-gib 141    one "fewest GPUs" column per size

The figures come from `pipeline.planning.memory` (how they are counted is in its docstring).
"""

from __future__ import annotations

from pipeline.config import Config
from pipeline.planning.memory import (
    GIB,
    USABLE_FRACTION,
    ModelShape,
    Workload,
    configured_setup,
    estimate,
    fewest_gpus,
    for_run,
    setups,
)

DEFAULT_GPU_GIB = 80.0


def describe_run(config: Config, shape: ModelShape, work: Workload) -> list[str]:
    """The plan's header: the model and what one micro-batch puts through it."""
    train = config.train
    options = [
        name
        for name, on in (
            ("chunked log-probs", work.chunk_size),
            ("gradient checkpointing", work.gradient_checkpointing),
            ("micro-batches accumulate", work.accumulates),
        )
        if on
    ]
    return [
        f"capacity plan: {config.model.path} ({shape.model_type}, {shape.params / 1e9:.2f}B parameters: "
        f"{shape.layers} layers, hidden {shape.hidden}, vocab {shape.vocab})",
        f"micro-batch: {train.micro_batch_size} rows, {work.tokens} tokens at tokenize.max_length "
        f"{config.tokenize.max_length}" + (f"; {', '.join(options)}" if options else ""),
        f"GiB per GPU at train.num_workers={train.num_workers}; a GPU's usable memory is "
        f"{USABLE_FRACTION:.0%} of it; host: per worker, with CPU offload",
    ]


def plan_table(config: Config, shape: ModelShape, work: Workload, gpu_gibs: list[float]) -> list[str]:
    """One markdown row per strategy: memory per GPU at the configured workers, fewest GPUs per size."""
    workers, configured = config.train.num_workers, configured_setup(config.train)
    sizes = [f"fewest {gib:g} GiB GPUs" for gib in gpu_gibs]
    header = ["strategy", "weights", "gradients", "optimizer", "activations", "peak", "host", *sizes]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for setup in setups(config.train):
        memory = estimate(shape, setup, work, workers=workers)
        label = setup.label + (" (configured)" if setup == configured else "")
        figures = [memory.weights, memory.gradients, memory.optimizer, memory.activations, memory.peak]
        fewest = [fewest_gpus(shape, setup, work, gpu_gib=gib) for gib in gpu_gibs]
        cells = [
            label,
            *(f"{b / GIB:.1f}" for b in figures),
            f"{memory.host / GIB:.1f}" if memory.host else "-",
            *("none" if n is None else str(n) for n in fewest),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def print_plan(config: Config, gpu_gibs: list[float] | None = None) -> None:
    shape, work = for_run(config)
    gpu_gibs = gpu_gibs or [DEFAULT_GPU_GIB]
    print("\n".join([*describe_run(config, shape, work), "", *plan_table(config, shape, work, gpu_gibs)]))
