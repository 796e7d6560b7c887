"""The train stage's Ray Train worker: set up the policy, run train steps, log and checkpoint.

Ray Train runs `train_loop_per_worker` on every worker. The step itself is
`pipeline.model.train_step.train_step` with the objective the loss declares
(`pipeline.model.objectives.objective_for`); this module adds only what needs Ray Train: the worker's
rank and device, its data shard, DDP, and reporting checkpoints. Ray Train is imported at the top
here; the train stage imports this module only where it builds the TorchTrainer, so that importing the
stage (every CLI command does) does not pay for Ray Train.
"""

from __future__ import annotations

import itertools
import tempfile
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import ray.train
import ray.train.torch
import torch

from pipeline.config import TrainConfig
from pipeline.model.loading import compile_decoder_layers, load_model, load_tokenizer, save_pretrained
from pipeline.model.objectives import objective_for
from pipeline.model.train_step import (NONFINITE_REPORT, Objective, StepResult, accumulation, checkpoint_every,
                                       disable_dropout, lr_factor, train_step)
from pipeline.runtime.checkpoints import load_training_state, save_training_state


@dataclass
class Worker:
    """One worker's training state: the DDP-wrapped policy, its tokenizer and optimizer, and the step
    it starts at with the metrics logged before it (from the checkpoint it resumes)."""

    model: torch.nn.Module
    tokenizer: Any
    optimizer: torch.optim.Optimizer
    start_step: int
    history: list[dict]

    @property
    def bare_model(self) -> torch.nn.Module:
        """The model without its DDP wrapper: what is saved."""
        return self.model.module if hasattr(self.model, "module") else self.model


def train_loop_per_worker(loop_config: dict) -> None:
    """The per-worker training function run by Ray Train; `loop_config` is what the train stage's run() passes."""
    train = TrainConfig(**loop_config["train"])
    if train.torch_threads:
        torch.set_num_threads(train.torch_threads)
    torch.manual_seed(train.seed)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    worker = set_up(loop_config, train, device=device, rank=rank)
    objective = objective_for(train, pad_id=worker.tokenizer.pad_token_id, device=device,
                              with_reference=loop_config["with_reference"])
    steps, accum = loop_config["total_steps"], accumulation(train)
    every = checkpoint_every(train, steps)
    stream = micro_batches(ray.train.get_dataset_shard("train"), size=train.micro_batch_size, skip=worker.start_step * accum)
    skipped = worker.history[-1].get("nonfinite_skipped", 0) if worker.history else 0
    for step in range(worker.start_step, steps):
        start = time.perf_counter()
        lr = train.learning_rate * lr_factor(step, total=steps, warmup=train.warmup_steps, schedule=train.lr_schedule)
        epochs, batches = zip(*(next(stream) for _ in range(accum)))
        result = train_step(worker.model, worker.optimizer, batches, objective=objective, lr=lr,
                            max_grad_norm=train.max_grad_norm, world=world)
        done = step + 1
        if not result.updated:
            if train.nonfinite != "skip":
                stop_on_nonfinite(result, batches, step=done, rank=rank, world=world)
                return
            skipped += 1
        if done % train.logging_steps == 0 or done == steps:
            row = history_row(result, step=done, epoch=epochs[-1], lr=lr, elapsed=time.perf_counter() - start)
            worker.history.append(row if train.nonfinite != "skip" else {**row, "nonfinite_skipped": skipped})
            if rank == 0 and (done % max(1, steps // 10) == 0 or done == steps):
                print_progress(row, objective, steps=steps)
        if done == steps or (every and done % every == 0):
            report(worker, step=done, rank=rank)


def stop_on_nonfinite(result: StepResult, batches, *, step: int, rank: int, world: int) -> None:
    """Report the step that went non-finite with the ids of its pairs, and no checkpoint; every worker
    returns after it (they all saw the same sums), so Ray Train ends the run instead of retrying it.

    The pairs named are those of the workers whose own loss was not finite, or every pair of the step
    when only the gradient norm was."""
    mine = ([str(i) for batch in batches for i in batch["id"]], result.local_loss_finite)
    gathered = [mine]
    if world > 1:
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, mine)
    culprits = [i for ids, finite in gathered if not finite for i in ids] or [i for ids, _ in gathered for i in ids]
    ray.train.report({NONFINITE_REPORT: step, "loss": result.loss_metrics.get("loss"), "grad_norm": result.grad_norm,
                      "pair_ids": culprits if rank == 0 else []})


def set_up(loop_config: dict, train: TrainConfig, *, device: torch.device, rank: int) -> Worker:
    """Load the policy (from the last checkpoint when Ray Train resumes one), wrap it in DDP, make its optimizer."""
    checkpoint = ray.train.get_checkpoint()
    start_step, history = 0, []
    with (checkpoint.as_directory() if checkpoint else nullcontext(None)) as checkpoint_dir:
        source = checkpoint_dir or loop_config["model_path"]
        model = load_model(
            source, dtype=torch.float32, trust_remote_code=loop_config["trust_remote_code"],
            attn_implementation=loop_config.get("attn_implementation"),
        )
        tokenizer = load_tokenizer(source, trust_remote_code=loop_config["trust_remote_code"])
        disable_dropout(model)
        if train.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if train.compile:
            compile_decoder_layers(model)
        model.train()
        model = ray.train.torch.prepare_model(model)
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=train.learning_rate, weight_decay=train.weight_decay, fused=device.type == "cuda"
        )
        if checkpoint_dir:
            start_step, history = load_training_state(checkpoint_dir, optimizer)
            if rank == 0:
                print(f"train: resuming at step {start_step} from checkpoint {checkpoint.path}", flush=True)
    return Worker(model, tokenizer, optimizer, start_step, history)


def micro_batches(shard, *, size: int, skip: int) -> Iterator[tuple[int, dict]]:
    """(epoch, numpy micro-batch of `size` rows) from the worker's shard, epoch after epoch without end.

    The first `skip` are left out: a resumed run continues where the data left off (the rows come in
    the same order every time, see the train stage's ingest_config).
    """

    def endless() -> Iterator[tuple[int, dict]]:
        for epoch in itertools.count():
            for batch in shard.iter_batches(batch_size=size, batch_format="numpy", drop_last=True):
                yield epoch, batch

    return itertools.islice(endless(), skip, None)


def history_row(result: StepResult, *, step: int, epoch: int, lr: float, elapsed: float) -> dict:
    """One line of metrics.jsonl: the step's loss metrics, gradient norm, learning rate and throughput."""
    return {
        "step": step,
        "epoch": epoch,
        **result.loss_metrics,
        "grad_norm": result.grad_norm,
        "learning_rate": lr,
        "tokens_per_s": result.tokens / elapsed,
    }


def print_progress(row: dict, objective: Objective, *, steps: int) -> None:
    print(
        f"train step {row['step']}/{steps}: loss {row['loss']:.4f} {objective.progress(row)} "
        f"lr {row['learning_rate']:.2e} {row['tokens_per_s']:.0f} tokens/s",
        flush=True,
    )


def report(worker: Worker, *, step: int, rank: int) -> None:
    """Report the last logged metrics to Ray Train; rank 0 adds a checkpoint (the model, optimizer and history)."""
    metrics = worker.history[-1] if worker.history else {"step": step}
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(worker.bare_model, worker.tokenizer, tmp)
        save_training_state(tmp, worker.optimizer, step=step, history=worker.history)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=f"step-{step:07d}")
