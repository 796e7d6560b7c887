"""The train stage's Ray Train worker: set up the policy, run train steps, log and checkpoint.

Ray Train runs `train_loop_per_worker` on every worker. The step itself is
`pipeline.training.step.train_step` with the objective the loss declares
(`pipeline.training.objectives.objective_for`) and the policy comes from `pipeline.training.policy` (ddp or
FSDP2, LoRA); this module adds only what needs Ray Train: the worker's rank and device, its data shard,
DDP's wrapper, and reporting metrics and checkpoints (each rank its own shards; the layout is
`pipeline.runtime.checkpoints`). Every logged step goes out as it happens: to `ray.train.report` from
every rank, and from rank 0 to the attempt's metrics.jsonl, to the trackers `train.report_to` names, and
as a line with the step, tokens/s and the time left. Ray Train is imported at the top here; the train
stage imports this module only where it builds the TorchTrainer, so that importing the stage (every CLI
command does) does not pay for Ray Train.
"""

from __future__ import annotations

import itertools
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

import ray.train
import ray.train.torch
import torch

from pipeline.config import TrainConfig
from pipeline.model.pretrained import load_tokenizer
from pipeline.runtime.checkpoint_layout import read_objective_state
from pipeline.runtime.checkpoints import read_checkpoint, write_checkpoint, write_export
from pipeline.runtime.storage import RunDir
from pipeline.runtime.tracking import MetricsLog, Trackers, TrackingRun, train_metrics
from pipeline.training.objectives import Objective, objective_for
from pipeline.training.policy import load_policy, make_optimizer
from pipeline.training.step import StepResult, train_step
from pipeline.training.step_plan import NONFINITE_REPORT, accumulation, checkpoint_every, lr_factor


@dataclass(frozen=True)
class TrainLoopConfig:
    """What every Train worker receives from the train stage: the frozen train section as loaded and
    checked on the driver, and the facts of this run. Ray Train hands a worker a dict, so the stage
    passes {LOOP_KEY: TrainLoopConfig(...)}."""

    train: TrainConfig
    model_path: str
    trust_remote_code: bool
    attn_implementation: str | None
    total_steps: int
    with_reference: bool  # the rows carry the reference's log-probs (the score stage ran)
    run_dir: str
    attempt: str  # the attempt's folder under train.work
    tracking: TrackingRun
    params: dict[str, str]  # the whole config, flattened, as the trackers' run parameters


LOOP_KEY = "loop"


@dataclass
class Worker:
    """One worker's training state: the policy (DDP-wrapped, or FSDP's shards), its tokenizer and
    optimizer, and the step it starts at with the metrics logged before it and the losses' running
    states (from the checkpoint it resumes)."""

    model: torch.nn.Module
    tokenizer: Any
    optimizer: torch.optim.Optimizer
    start_step: int
    history: list[dict]
    objective_state: dict[str, dict]  # the losses' running states at start_step (BCO's reward mean)

    @property
    def bare_model(self) -> torch.nn.Module:
        """The model without DDP's wrapper: what is saved (an FSDP model is its own)."""
        return cast(torch.nn.Module, self.model.module) if hasattr(self.model, "module") else self.model


def train_loop_per_worker(ray_config: dict) -> dict | None:
    """The per-worker training function run by Ray Train; `ray_config[LOOP_KEY]` is the stage's TrainLoopConfig."""
    loop_config: TrainLoopConfig = ray_config[LOOP_KEY]
    train = loop_config.train
    if train.torch_threads:
        torch.set_num_threads(train.torch_threads)
    torch.manual_seed(train.seed)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    worker = set_up(loop_config, train, device=device, rank=rank)
    objective = objective_for(
        train, pad_id=worker.tokenizer.pad_token_id, device=device, with_reference=loop_config.with_reference
    )
    objective.load_state_dict(worker.objective_state)
    steps, accum = loop_config.total_steps, accumulation(train)
    every = checkpoint_every(train, steps)
    stream = micro_batches(
        ray.train.get_dataset_shard("train"), size=train.micro_batch_size, skip=worker.start_step * accum
    )
    skipped = worker.history[-1].get("nonfinite_skipped", 0) if worker.history else 0
    step_log = StepLog(loop_config, worker, objective, steps=steps) if rank == 0 else None
    try:
        for step in range(worker.start_step, steps):
            start = time.perf_counter()
            lr = train.learning_rate * lr_factor(
                step, total=steps, warmup=train.warmup_steps, schedule=train.lr_schedule
            )
            epochs, batches = zip(*(next(stream) for _ in range(accum)))
            result = train_step(
                worker.model,
                worker.optimizer,
                batches,
                objective=objective,
                lr=lr,
                max_grad_norm=train.max_grad_norm,
                world=world,
            )
            done = step + 1
            if not result.updated:
                if train.nonfinite != "skip":
                    return nonfinite_stop(result, batches, step=done, world=world)
                skipped += 1
            logged = done % train.logging_steps == 0 or done == steps
            checkpoint = done == steps or bool(every and done % every == 0)
            if logged:
                row = history_row(result, step=done, epoch=epochs[-1], lr=lr, elapsed=time.perf_counter() - start)
                worker.history.append(row if train.nonfinite != "skip" else {**row, "nonfinite_skipped": skipped})
                if step_log:
                    step_log.logged(worker.history[-1])
            if logged or checkpoint:  # the same on every rank: Ray Train needs each rank's every report
                report(
                    worker,
                    objective,
                    step=done,
                    rank=rank,
                    world=world,
                    checkpoint=checkpoint,
                    step_log=step_log,
                    export=done == steps,
                    merge=train.lora is None or train.lora.merge,
                )
    finally:
        if step_log:
            step_log.close()


class StepLog:
    """Rank 0's outlets for each logged step: the attempt's live metrics.jsonl, the trackers, a progress line."""

    def __init__(self, loop_config: TrainLoopConfig, worker: Worker, objective: Objective, *, steps: int):
        self.objective, self.steps = objective, steps
        run_dir = RunDir(loop_config.run_dir)
        self.metrics = MetricsLog(run_dir, f"train.work/{loop_config.attempt}/metrics.jsonl", worker.history)
        tracking = loop_config.tracking
        self.trackers = (
            Trackers(tracking, params=loop_config.params, resume_step=worker.start_step) if tracking.report_to else None
        )
        self.first: tuple[float, int] | None = None  # (time, step) of the first logged step: the rate's start

    def logged(self, row: dict) -> None:
        self.metrics.append(row)
        if self.trackers:
            self.trackers.log(train_metrics(row), step=row["step"])
        now = time.perf_counter()
        if self.first is None:  # the first step pays for the data pipeline's start: no rate from it
            self.first, left = (now, row["step"]), "-:--:--"
        else:
            seconds = int((now - self.first[0]) / (row["step"] - self.first[1]) * (self.steps - row["step"]))
            left = f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
        print(
            f"train step {row['step']}/{self.steps}: loss {row['loss']:.4f} {self.objective.progress(row)} "
            f"lr {row['learning_rate']:.2e} {row['tokens_per_s']:.0f} tokens/s, {left} left",
            flush=True,
        )

    def checkpointed(self) -> None:
        """A checkpoint is being reported: bring the copies on a remote run directory up to date."""
        self.metrics.flush()
        if self.trackers:
            self.trackers.sync()

    def close(self) -> None:
        self.metrics.flush()
        if self.trackers:
            self.trackers.close()


def nonfinite_stop(result: StepResult, batches, *, step: int, world: int) -> dict:
    """What stops the run at a step that went non-finite: the step, its loss and gradient norm, and its
    pairs. Every worker returns it (they all saw the same sums) and Ray Train hands rank 0's to the driver
    as the run's return value: an ended run, not a failure that Ray Train would retry.

    The pairs named are those of the workers whose own loss was not finite, or every pair of the step
    when only the gradient norm was."""
    mine = ([str(i) for batch in batches for i in batch["id"]], result.local_loss_finite)
    gathered: list[Any] = [mine]  # under several workers, None slots that all_gather_object fills
    if world > 1:
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, mine)
    culprits = [i for ids, finite in gathered if not finite for i in ids] or [i for ids, _ in gathered for i in ids]
    return {
        NONFINITE_REPORT: step,
        "loss": result.loss_metrics.get("loss"),
        "grad_norm": result.grad_norm,
        "pair_ids": culprits,
    }


def set_up(loop_config: TrainLoopConfig, train: TrainConfig, *, device: torch.device, rank: int) -> Worker:
    """Build the policy (`pipeline.training.policy`), wrap it in DDP under ddp, make its optimizer, and
    restore both, and the losses' running states, from the last checkpoint when Ray Train resumes one."""
    checkpoint = ray.train.get_checkpoint()
    model_path, trust_remote_code = loop_config.model_path, loop_config.trust_remote_code
    model = load_policy(
        model_path,
        train,
        device=device,
        trust_remote_code=trust_remote_code,
        attn_implementation=loop_config.attn_implementation,
        resuming=checkpoint is not None,
    )
    if train.strategy == "ddp":
        model = ray.train.torch.prepare_model(model)
    worker = Worker(
        model,
        load_tokenizer(model_path, trust_remote_code=trust_remote_code),
        make_optimizer(model, train, device=device),
        0,
        [],
        {},
    )
    if checkpoint:  # read where it lies, each rank its own shards (never a copy of the whole checkpoint)
        worker.start_step, worker.history = read_checkpoint(
            checkpoint.path, worker.bare_model, worker.optimizer, filesystem=checkpoint.filesystem
        )
        worker.objective_state = read_objective_state(checkpoint.path, filesystem=checkpoint.filesystem)
        if rank == 0:
            print(f"train: resuming at step {worker.start_step} from checkpoint {checkpoint.path}", flush=True)
    return worker


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


def report(
    worker: Worker,
    objective: Objective,
    *,
    step: int,
    rank: int,
    world: int,
    checkpoint: bool,
    step_log: StepLog | None,
    export: bool,
    merge: bool,
) -> None:
    """Report the last logged metrics to Ray Train; with `checkpoint`, each rank adds its part of one (with
    the losses' running states), and the last (`export`) also holds the policy as a Hugging Face directory,
    merged with LoRA's adapters if `merge`."""
    metrics = worker.history[-1] if worker.history else {"step": step}
    if not checkpoint:
        ray.train.report(metrics)
        return
    if step_log:
        step_log.checkpointed()  # first: a checkpoint never gets ahead of the live metrics on a remote run dir
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(
            tmp,
            worker.bare_model,
            worker.optimizer,
            rank=rank,
            step=step,
            history=worker.history,
            objective_state=objective.state_dict(),
        )
        if export:
            write_export(tmp, worker.bare_model, worker.tokenizer, rank=rank, world=world, merge=merge)
        ray.train.report(
            metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=f"step-{step:07d}"
        )
