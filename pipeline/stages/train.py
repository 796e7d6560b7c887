"""Stage 3, train: Ray Train TorchTrainer workers run a preference loss over the scored shards.

The reference model is not loaded here: its log-probs come with the data. Each optimizer step sees
`train.batch_size` pairs over all workers, in micro-batches of `train.micro_batch_size` per worker
with gradient accumulation, so the update equals that of one big batch. `train.strategy` is ddp (each
worker holds the whole model) or fsdp (FSDP2 shards it over the workers), either with LoRA's adapters
(`train.lora`). Checkpoints are sharded (`pipeline.runtime.checkpoints`), resumable from the last
one; the last also holds the policy as a Hugging Face directory, which becomes `train/final`. The
workers run `pipeline.stages.train_worker`; the step itself is `pipeline.training.step`.

`train.loss: kto` trains on unpaired rows instead (`pipeline.training.objectives.KtoObjective`): a step is
`train.batch_size` rows, and KTO's reference point is estimated once per step from the mismatched pairs
the score stage fixed.
"""

from __future__ import annotations

import json
import logging
import os

import pyarrow.fs as pafs
import ray

from pipeline.config import Config, ConfigError
from pipeline.evaluation.model_card import CARD, model_card
from pipeline.runtime.checkpoint_layout import HF_DIR
from pipeline.runtime.logs import gate_library_consoles
from pipeline.runtime.resources import Request
from pipeline.runtime.tracking import check_trackers, flat_params, tracking_run
from pipeline.stages.base import Stage, StageRun
from pipeline.stages.fit_check import check_fits
from pipeline.training.losses import (
    check_loss_config,
    choice_of,
    is_unpaired,
    loss_specs,
    needs_prefix_logps,
    needs_reference,
)
from pipeline.training.step_plan import NONFINITE_CHOICES, NONFINITE_REPORT, accumulation, total_steps

log = logging.getLogger(__name__)


def upstream_stage(config: Config) -> str:
    """Reference-free losses train straight from the tokenize stage; the rest need the score stage."""
    return "score" if needs_reference(config.train.loss) else "tokenize"


def check_data_kind(config: Config, upstream: dict, *, where: str) -> None:
    """Refuse a loss that does not fit the data: KTO needs unpaired rows, the other losses need pairs.

    `upstream` is the manifest the trainer reads (a score manifest carries data_kind; one from before
    KTO, or a tokenize manifest, is taken as pairs). Also warns when KTO's classes are out of balance.
    """
    names = list(choice_of(config.train))  # also refuses KTO mixed with paired losses
    kind = upstream.get("data_kind", "pairs")
    if not is_unpaired(config.train.loss):
        if kind == "unpaired":
            raise ConfigError(
                f"train.loss: {'+'.join(names)} trains on pairs, but {where} holds unpaired "
                "(prompt, completion, label) rows; "
                "use train.loss: kto"
            )
        return
    if kind != "unpaired":
        raise ConfigError(
            f"train.loss: kto trains on unpaired (prompt, completion, label) rows, but {where} holds pairs; "
            "give it unpaired data (data.format: unpaired) or choose a paired loss"
        )
    counts = upstream["labels"]["train"]
    desirable = config.train.desirable_weight * counts["desirable"]
    undesirable = config.train.undesirable_weight * counts["undesirable"]
    # Ethayarajh et al. 2024 (Sec. 4.2) keep lambda_D n_D / (lambda_U n_U) in [1, 4/3].
    if not undesirable or not 1.0 <= desirable / undesirable <= 4.0 / 3.0:
        log.warning(
            "train: KTO's weighted class ratio desirable_weight*%d / (undesirable_weight*%d) is outside [1, 4/3], "
            "the range the KTO paper recommends; set train.desirable_weight / train.undesirable_weight",
            counts["desirable"],
            counts["undesirable"],
        )


def ingest_config(num_workers: int):
    """How Ray Train hands the shards to workers. Rows come in file order (preserve_order): a resumed run
    skips the micro-batches it already took, so the order must be the same every time. One worker reads
    the dataset itself; only several need streaming_split, whose coordinator actor costs one more
    process start (about 7 s of a small train stage on 2 cores)."""
    import ray.train

    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = True
    return ray.train.DataConfig(datasets_to_split=[] if num_workers == 1 else "all", execution_options=options)


def check_training(config: Config, upstream: dict, *, where: str) -> int:
    """Refuse, before any worker starts, a run its data cannot serve; return the number of optimizer steps."""
    train = config.train
    accumulation(train)  # a bad batch layout
    check_loss_config(train)  # an unknown loss name, a value a loss refuses
    if needs_prefix_logps(train) and upstream_stage(config) == "score" and not upstream.get("prefix_logps"):
        raise ValueError(
            f"train.ld_alpha: LD-DPO reads the reference's prefix log-probs, which {where} lacks; "
            "rerun the score stage with this train section (`dpo run` does), or unset train.ld_alpha"
        )
    if train.nonfinite not in NONFINITE_CHOICES:
        raise ConfigError(f"train.nonfinite: {train.nonfinite!r} is not one of {', '.join(NONFINITE_CHOICES)}")
    check_data_kind(config, upstream, where=where)
    check_trackers(train, config.run_dir)
    if train.batch_size > upstream["rows_train"]:
        raise ConfigError(
            f"train.batch_size ({train.batch_size}) is larger than the {upstream['rows_train']} training pairs"
        )
    return total_steps(train, upstream["rows_train"])


def _upstream(run: StageRun) -> dict:
    """The manifest train reads (score's or tokenize's): train always has an upstream stage."""
    if run.upstream is None:
        raise RuntimeError("train: no upstream manifest (train reads score's or tokenize's)")
    return run.upstream


def attempt_name(run: StageRun) -> str:
    """The attempt's folder under train.work, tied to this config and this data: a rerun of the same work
    resumes from its last checkpoint (and its tracking run); changed work starts fresh."""
    return f"{run.stage.config_hash(run.config)}-{_upstream(run)['manifest_hash'][:8]}"


# Ray Train V2 sends a worker's print() to its log file and, when sys.stdout is not the process's own (in
# a Ray worker it never is), to stdout as well: each line would reach the driver twice.
WORKER_ENV = {"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}}
# Ray Train V2's controller takes each worker's report off a queue of one at every health check, 2 s apart
# by default, and a report waits for the one before it: a report per logged step would hold each step to
# 2 s (30 steps of a small run: 114 s, against 44 s at 0.2 s). Ten checks a second, a small remote call per
# worker each; Ray Train passes the driver's value on to its controller. Set the variable to choose another.
HEALTH_CHECK = ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")


def make_trainer(run: StageRun, steps: int):
    """A TorchTrainer over the upstream's train shards, resuming from this work's last checkpoint."""
    # Ray Train (and the worker module, which imports it) only here: seconds of import that the
    # commands which never build a trainer need not pay.
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.stages.train_worker import LOOP_KEY, TrainLoopConfig, train_loop_per_worker

    gate_library_consoles()  # Ray Train's import may attach consoles of its own: quiet unless --verbose
    config, train, run_dir = run.config, run.config.train, run.run_dir
    source = upstream_stage(config)
    name = attempt_name(run)
    storage = run_dir.uri_of("train.work")
    if run.force and run_dir.exists("train.work", name):
        run_dir.fs.delete_dir(run_dir.path("train.work", name))
    if "://" not in storage:
        os.makedirs(storage, exist_ok=True)
    os.environ.setdefault(*HEALTH_CHECK)
    shards = ray.data.read_parquet(run.data_dir.uri_of(source, "train"))
    shards.context.enable_progress_bars = False  # a bar drawn from the worker would tear the training lines
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            LOOP_KEY: TrainLoopConfig(
                train=train,
                model_path=config.model.path,
                trust_remote_code=config.model.trust_remote_code,
                attn_implementation=config.model.attn_implementation,
                total_steps=steps,
                with_reference=source == "score",
                run_dir=run_dir.uri,
                attempt=name,
                tracking=tracking_run(train, run_dir.uri, name),
                params=flat_params(config.to_dict()),
            )
        },
        scaling_config=ScalingConfig(
            num_workers=train.num_workers,
            use_gpu=train.use_gpu,
            resources_per_worker={"CPU": train.cpus_per_worker, **({"GPU": 1} if train.use_gpu else {})},
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            # A lost worker or node: Ray Train restarts the group from the last checkpoint, in the job.
            failure_config=FailureConfig(max_failures=train.max_failures),
            worker_runtime_env=WORKER_ENV,
            # Ray Train's INFO lines include one per report, and each logged step is a report; warnings and
            # errors still show, and our own step lines say what a person watching needs.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
        datasets={"train": shards},
        dataset_config=ingest_config(train.num_workers),
    )


class NonFiniteStepError(RuntimeError):
    """Training stopped at a step whose loss or gradient norm was NaN or infinite (train.nonfinite: error)."""


def check_finite(metrics: dict) -> None:
    """Raise naming the step and its pairs when the workers stopped at a non-finite loss or gradient norm
    (`metrics`: the run's return value, which then says so)."""
    step = metrics.get(NONFINITE_REPORT)
    if step is None:
        return
    ids = metrics.get("pair_ids") or []
    shown = ", ".join(ids[:8]) + (f" and {len(ids) - 8} more" if len(ids) > 8 else "")
    raise NonFiniteStepError(
        f"step {step}: the loss ({metrics.get('loss')}) or the gradient norm ({metrics.get('grad_norm')}) is not "
        f"finite; the step's pairs: {shown}. The weights are those of step {step - 1}; set train.nonfinite: skip "
        "to skip such steps and count them"
    )


def export_final(run: StageRun, checkpoint) -> list[dict]:
    """The last checkpoint's Hugging Face directory as `train/final`, and the attempt's live metrics.jsonl as
    `train/metrics.jsonl`, the very lines logged as training ran; returns them.

    The directory is copied from storage to storage, file by file: never the whole checkpoint to this node."""
    writer = run.writer
    target = run.run_dir.path(writer.staging, "final")
    run.run_dir.fs.create_dir(target, recursive=True)
    pafs.copy_files(
        f"{checkpoint.path.rstrip('/')}/{HF_DIR}",
        target,
        source_filesystem=checkpoint.filesystem,
        destination_filesystem=run.run_dir.fs,
    )
    metrics = run.run_dir.read_text(f"train.work/{attempt_name(run)}/metrics.jsonl")
    writer.write_text("metrics.jsonl", metrics)
    return [json.loads(line) for line in metrics.splitlines() if line.strip()]


def write_card(run: StageRun, steps: int, final_metrics: dict) -> None:
    """train/final/README.md: the model card (base model, data, loss and its settings, last metrics); the
    evaluate stage adds its summary."""
    config = run.config
    keys = sorted({k for spec in loss_specs(config.train.loss) for k in spec.hyperparameters})
    card = model_card(
        config,
        loss_keys={k: getattr(config.train, k) for k in keys},
        data_counts=run.data_dir.manifest("tokenize") or run.upstream or {},
        steps=steps,
        final_metrics=final_metrics,
    )
    run.writer.write_text(f"final/{CARD}", card)


def train_stage(run: StageRun) -> dict:
    """Train on `<data_dir>/{score|tokenize}/train` into `<run_dir>/train/` (final/ and metrics.jsonl).

    data_dir is the run's own unless a sweep points many runs at one, so that they share one score stage.
    """
    source = upstream_stage(run.config)
    steps = check_training(run.config, _upstream(run), where=run.data_dir.uri_of(source))
    result = make_trainer(run, steps).fit()
    check_finite(result.return_value or {})
    if result.checkpoint is None:
        raise RuntimeError("train: the run ended without a checkpoint")
    history = export_final(run, result.checkpoint)
    write_card(run, steps, history[-1] if history else {})
    log.info("train: %d steps; final policy in %s", steps, run.run_dir.uri_of("train", "final"))
    return {
        "upstream_stage": source,
        "rows_in": _upstream(run)["rows_train"],
        "steps": steps,
        "final_metrics": history[-1] if history else {},
        "checkpoint": result.checkpoint.path,
        # Where the evaluate stage logs its summary: the same tracking run as the training curves.
        "tracking": tracking_run(run.config.train, run.run_dir.uri, attempt_name(run)).to_dict(),
    }


def train_requests(config: Config) -> list[Request]:
    tr = config.train
    bundle = {"CPU": tr.cpus_per_worker, **({"GPU": 1.0} if tr.use_gpu else {})}
    return [
        Request(
            "train",
            "worker",
            tr.num_workers,
            bundle,
            {"CPU": "train.cpus_per_worker", "GPU": "train.use_gpu"},
            "train.num_workers",
        )
    ]


TRAIN = Stage(
    name="train",
    sections=("model", "train"),
    body=train_stage,
    upstream=upstream_stage,
    requests=train_requests,
    check=check_fits,
)
