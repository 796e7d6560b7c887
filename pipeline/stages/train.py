"""Stage 3, train: Ray Train TorchTrainer workers run a preference loss over the scored shards.

The reference model is not loaded here: its log-probs come with the data. Each optimizer step sees
`train.batch_size` pairs over all workers, in micro-batches of `train.micro_batch_size` per worker
with gradient accumulation, so the update equals that of one big batch. Checkpoints are Hugging Face
directories (safetensors) plus optimizer state, resumable from the last one.

`train.loss: kto` trains on unpaired rows instead (pipeline.stages.kto): a step is `train.batch_size` rows,
and KTO's reference point is estimated once per step from the mismatched pairs the score stage fixed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import tempfile
import time
from contextlib import nullcontext

import ray
import torch

from pipeline.config import Config, TrainConfig, loss_names
from pipeline.model.batch_logps import batch_sequence_logps
from pipeline.runtime.resources import Request
from pipeline.runtime.storage import RunDir
from pipeline.stages.base import Stage, StageRun

log = logging.getLogger(__name__)

METRIC_KEYS = (
    "step", "epoch", "loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
    "logps/chosen", "logps/rejected", "grad_norm", "learning_rate", "tokens_per_s",
)


def needs_reference(config: Config) -> bool:
    from pipeline.model.losses import REFERENCE_FREE

    return not all(name in REFERENCE_FREE for name in loss_names(config))


def upstream_stage(config: Config) -> str:
    """Reference-free losses train straight from the tokenize stage; the rest need the score stage."""
    return "score" if needs_reference(config) else "tokenize"


def lr_factor(step: int, *, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base learning rate at optimizer step `step` (0-based): warmup, then decay."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "constant":
        return 1.0
    raise ValueError(f"train.lr_schedule: unknown schedule {schedule!r} (cosine, linear, constant)")


def total_steps(train: TrainConfig, num_rows: int) -> int:
    if train.max_steps is not None:
        return train.max_steps
    return max(1, train.epochs * math.ceil(num_rows / train.batch_size))


def accumulation(train: TrainConfig) -> int:
    per_worker = train.batch_size // train.num_workers
    if per_worker * train.num_workers != train.batch_size or per_worker % train.micro_batch_size:
        raise ValueError(
            f"train.batch_size ({train.batch_size}) must be num_workers ({train.num_workers}) x "
            f"micro_batch_size ({train.micro_batch_size}) x a whole number of accumulation steps"
        )
    return per_worker // train.micro_batch_size


def _disable_dropout(model: torch.nn.Module) -> None:
    # DPO compares log-probs of the policy against fixed reference numbers computed without dropout;
    # dropout in the policy would bias that comparison and make resumed runs diverge.
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def is_unpaired(loss: str | dict) -> bool:
    """True for KTO, which trains on unpaired (prompt, completion, label) rows."""
    return "kto" in ([loss] if isinstance(loss, str) else list(loss))


def check_data_kind(config: Config, upstream: dict, *, where: str) -> None:
    """Refuse a loss that does not fit the data: KTO needs unpaired rows, the other losses need pairs.

    `upstream` is the manifest the trainer reads (a score manifest carries data_kind; one from before
    KTO, or a tokenize manifest, is taken as pairs). Also warns when KTO's classes are out of balance.
    """
    names = loss_names(config)
    kind = upstream.get("data_kind", "pairs")
    if not is_unpaired(config.train.loss):
        if kind == "unpaired":
            raise ValueError(
                f"train.loss: {'+'.join(names)} trains on pairs, but {where} holds unpaired (prompt, completion, label) rows; "
                "use train.loss: kto"
            )
        return
    if len(names) > 1:
        raise ValueError(f"train.loss: kto trains on unpaired rows and cannot be mixed with paired losses ({', '.join(names)})")
    if kind != "unpaired":
        raise ValueError(
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
            counts["desirable"], counts["undesirable"],
        )


def reads_only_chosen(loss: str | dict) -> bool:
    return (loss if isinstance(loss, str) else "+".join(loss)) == "sft"


def policy_sequence_logps(model, prompts, responses, *, train: TrainConfig, pad_id: int, device):
    """`pipeline.model.batch_logps.batch_sequence_logps` under bf16 autocast on GPU, packed and chunked as `train` says."""
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    with autocast:
        return batch_sequence_logps(
            model, prompts, responses, pad_id=pad_id, device=device, packing=train.packing,
            chunk_size=train.logps_chunk_size if train.chunked_logps else None,
        )


def micro_batch_loss(model, batch: dict, *, train: TrainConfig, pad_id: int, device, with_reference: bool, scale: float):
    """Forward one micro-batch, return (loss to backprop, sums of the step's metrics, token count)."""
    from pipeline.model.losses import PairLogps, compute_loss

    b = len(batch["prompt_ids"])
    if reads_only_chosen(train.loss):
        # Preferred-FT never looks at the rejected response: don't pay a forward pass for it.
        logps, counts, tokens = policy_sequence_logps(model, batch["prompt_ids"], batch["chosen_ids"], train=train, pad_id=pad_id, device=device)
        chosen, rejected, chosen_len, rejected_len = logps, torch.zeros_like(logps), counts, torch.ones_like(counts)
    else:
        prompts = list(batch["prompt_ids"])
        logps, counts, tokens = policy_sequence_logps(
            model, prompts + prompts, list(batch["chosen_ids"]) + list(batch["rejected_ids"]), train=train, pad_id=pad_id, device=device
        )
        chosen, rejected, chosen_len, rejected_len = logps[:b], logps[b:], counts[:b], counts[b:]
    ref = {}
    if with_reference:
        ref = dict(
            ref_chosen_logps=torch.tensor(batch["ref_chosen_logps"], device=device, dtype=torch.float32),
            ref_rejected_logps=torch.tensor(batch["ref_rejected_logps"], device=device, dtype=torch.float32),
        )
    pair = PairLogps(
        policy_chosen_logps=chosen, policy_rejected_logps=rejected,
        chosen_lengths=chosen_len.float(), rejected_lengths=rejected_len.float(), **ref,
    )
    out = compute_loss(
        train.loss if isinstance(train.loss, str) else dict(train.loss), pair,
        beta=train.beta, label_smoothing=train.label_smoothing, gamma=train.gamma, alpha=train.alpha,
    )
    # Sum over pairs divided by the pairs in the whole step: accumulated micro-batches then give the
    # same gradient as one large batch.
    loss = out.losses.sum() * scale
    sums = torch.stack([
        out.losses.detach().sum(),
        out.chosen_rewards.sum(),
        out.rejected_rewards.sum(),
        (out.chosen_rewards > out.rejected_rewards).float().sum(),
        (out.chosen_rewards - out.rejected_rewards).sum(),
        chosen.detach().sum(),
        rejected.detach().sum(),
        torch.tensor(float(len(out.losses)), device=device),
    ]).double()
    return loss, sums, tokens


def train_loop(loop_config: dict) -> None:
    """The per-worker training function run by Ray Train."""
    import ray.train
    import ray.train.torch

    from pipeline.stages import kto
    from pipeline.runtime.checkpoints import load_training_state, save_training_state
    from pipeline.model.losses import kto_reference_point
    from pipeline.model.loading import compile_decoder_layers, load_model, load_tokenizer, save_pretrained

    train = TrainConfig(**loop_config["train"])
    if train.torch_threads:
        torch.set_num_threads(train.torch_threads)
    torch.manual_seed(train.seed)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()

    checkpoint = ray.train.get_checkpoint()
    start_step, history = 0, []
    with (checkpoint.as_directory() if checkpoint else nullcontext(None)) as ckpt_dir:
        source = ckpt_dir or loop_config["model_path"]
        model = load_model(
            source, dtype=torch.float32, trust_remote_code=loop_config["trust_remote_code"],
            attn_implementation=loop_config.get("attn_implementation"),
        )
        tokenizer = load_tokenizer(source, trust_remote_code=loop_config["trust_remote_code"])
        _disable_dropout(model)
        if train.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if train.compile:
            compile_decoder_layers(model)
        model.train()
        model = ray.train.torch.prepare_model(model)
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=train.learning_rate, weight_decay=train.weight_decay, fused=device.type == "cuda"
        )
        if ckpt_dir:
            start_step, history = load_training_state(ckpt_dir, optimizer)
            if rank == 0:
                print(f"train: resuming at step {start_step} from checkpoint {checkpoint.path}", flush=True)
    bare = model.module if hasattr(model, "module") else model

    steps, accum = loop_config["total_steps"], accumulation(train)
    unpaired = is_unpaired(train.loss)
    scale = 1.0 / (train.batch_size // world)
    shard = ray.train.get_dataset_shard("train")

    def micro_batches():
        epoch = 0
        while True:
            for batch in shard.iter_batches(batch_size=train.micro_batch_size, batch_format="numpy", drop_last=True):
                yield epoch, batch
            epoch += 1

    stream = micro_batches()
    for _ in range(start_step * accum):  # a resumed run continues where the data left off
        next(stream)

    step = start_step
    while step < steps:
        t0 = time.perf_counter()
        lr = train.learning_rate * lr_factor(step, total=steps, warmup=train.warmup_steps, schedule=train.lr_schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        sums, tokens = torch.zeros(8, dtype=torch.float64, device=device), 0
        step_batches = [next(stream) for _ in range(accum)]
        if unpaired:
            # KTO's reference point z comes from the whole step's mismatched pairs, on every worker.
            kl_policy, kl_ref, tokens = kto.kl_logps(
                model, [b for _, b in step_batches], train=train, pad_id=tokenizer.pad_token_id, device=device, world=world,
            )
            step_kl = float(kto_reference_point(kl_policy, kl_ref))
        for micro, (epoch, batch) in enumerate(step_batches):
            sync = micro == accum - 1 or world == 1
            with (nullcontext() if sync else model.no_sync()):
                if unpaired:
                    loss, batch_sums, batch_tokens = kto.micro_batch_loss(
                        model, batch, train=train, pad_id=tokenizer.pad_token_id, device=device,
                        kl_policy=kl_policy, kl_ref=kl_ref, scale=scale,
                    )
                else:
                    loss, batch_sums, batch_tokens = micro_batch_loss(
                        model, batch, train=train, pad_id=tokenizer.pad_token_id, device=device,
                        with_reference=loop_config["with_reference"], scale=scale,
                    )
                loss.backward()
            sums += batch_sums
            tokens += batch_tokens
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), train.max_grad_norm if train.max_grad_norm > 0 else float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        totals = torch.cat([sums, torch.tensor([float(tokens)], dtype=torch.float64, device=device)])
        if world > 1:
            torch.distributed.all_reduce(totals)
        elapsed = time.perf_counter() - t0
        pairs = totals[7].item()
        if step % train.logging_steps == 0 or step == steps:
            if unpaired:
                loss_metrics = kto.metrics_row(totals, kl=step_kl)
            else:
                loss_metrics = {
                    "loss": totals[0].item() / pairs,
                    "rewards/chosen": totals[1].item() / pairs,
                    "rewards/rejected": totals[2].item() / pairs,
                    "rewards/accuracies": totals[3].item() / pairs,
                    "rewards/margins": totals[4].item() / pairs,
                    "logps/chosen": totals[5].item() / pairs,
                    "logps/rejected": totals[6].item() / pairs,
                }
            history.append({
                "step": step,
                "epoch": epoch,
                **loss_metrics,
                "grad_norm": float(grad_norm),
                "learning_rate": lr,
                "tokens_per_s": totals[8].item() / elapsed,
            })
        if rank == 0 and history and history[-1]["step"] == step and (step % max(1, steps // 10) == 0 or step == steps):
            row = history[-1]
            if unpaired:  # KTO has no pairs, so no accuracy; its reference point is what to watch
                detail = f"kl {row['kl']:.4f}"
            else:
                detail = f"margins {row['rewards/margins']:.3f} accuracy {row['rewards/accuracies']:.2f}"
            print(f"train step {step}/{steps}: loss {row['loss']:.4f} {detail} lr {lr:.2e} {row['tokens_per_s']:.0f} tokens/s", flush=True)
        if step == steps or (train.checkpoint_steps and step % train.checkpoint_steps == 0):
            metrics = history[-1] if history else {"step": step}
            if rank == 0:
                with tempfile.TemporaryDirectory() as tmp:
                    save_pretrained(bare, tokenizer, tmp)
                    save_training_state(tmp, optimizer, step=step, history=history)
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=f"step-{step:07d}")
            else:
                ray.train.report(metrics)


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
    from pipeline.model.losses import LOSSES

    for name in loss_names(config):
        if name not in LOSSES:
            raise ValueError(f"train.loss: unknown loss {name!r} (known: {', '.join(sorted(LOSSES))})")
    check_data_kind(config, upstream, where=where)
    if train.batch_size > upstream["rows_train"]:
        raise ValueError(f"train.batch_size ({train.batch_size}) is larger than the {upstream['rows_train']} training pairs")
    return total_steps(train, upstream["rows_train"])


def make_trainer(run: StageRun, steps: int):
    """A TorchTrainer over the upstream's train shards, resuming from this work's last checkpoint."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    config, train, run_dir = run.config, run.config.train, run.run_dir
    source = upstream_stage(config)
    # The attempt's name ties checkpoints to this config and this data: a rerun of the same work
    # resumes from its last checkpoint; changed work starts fresh.
    name = f"{run.stage.config_hash(config)}-{run.upstream['manifest_hash'][:8]}"
    storage = run_dir.uri_of("train.work")
    if run.force and run_dir.exists("train.work", name):
        run_dir.fs.delete_dir(run_dir.path("train.work", name))
    if "://" not in storage:
        os.makedirs(storage, exist_ok=True)
    return TorchTrainer(
        train_loop,
        train_loop_config={
            "train": dataclasses.asdict(train),
            "model_path": config.model.path,
            "trust_remote_code": config.model.trust_remote_code,
            "attn_implementation": config.model.attn_implementation,
            "total_steps": steps,
            "with_reference": source == "score",
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
            failure_config=FailureConfig(max_failures=0),
        ),
        datasets={"train": ray.data.read_parquet(run.data_dir.uri_of(source, "train"))},
        dataset_config=ingest_config(train.num_workers),
    )


def export_final(run: StageRun, checkpoint) -> list[dict]:
    """The last checkpoint, less its optimizer state, as `train/final` (a Hugging Face directory), and
    its metrics history as `train/metrics.jsonl`; returns the history."""
    writer = run.writer
    with checkpoint.as_directory() as ckpt:
        history = json.loads(open(os.path.join(ckpt, "trainer_state.json")).read())["history"]
        with tempfile.TemporaryDirectory() as tmp:
            final = os.path.join(tmp, "final")
            shutil.copytree(ckpt, final, ignore=shutil.ignore_patterns("optimizer.safetensors", "trainer_state.json", ".*"))
            _upload_dir(run.run_dir, final, f"{writer.staging}/final")
    writer.write_text("metrics.jsonl", "".join(json.dumps(row) + "\n" for row in history))
    return history


def train_stage(run: StageRun) -> dict:
    """Train on `<data_dir>/{score|tokenize}/train` into `<run_dir>/train/` (final/ and metrics.jsonl).

    data_dir is the run's own unless a sweep points many runs at one, so that they share one score stage.
    """
    source = upstream_stage(run.config)
    steps = check_training(run.config, run.upstream, where=run.data_dir.uri_of(source))
    result = make_trainer(run, steps).fit()
    if result.checkpoint is None:
        raise RuntimeError("train: the run ended without a checkpoint")
    history = export_final(run, result.checkpoint)
    log.info("train: %d steps; final policy in %s", steps, run.run_dir.uri_of("train", "final"))
    return {
        "upstream_stage": source,
        "rows_in": run.upstream["rows_train"],
        "steps": steps,
        "final_metrics": history[-1] if history else {},
        "checkpoint": result.checkpoint.path,
    }


def train_requests(config: Config) -> list[Request]:
    tr = config.train
    bundle = {"CPU": tr.cpus_per_worker, **({"GPU": 1.0} if tr.use_gpu else {})}
    return [Request("train", "worker", tr.num_workers, bundle,
                    {"CPU": "train.cpus_per_worker", "GPU": "train.use_gpu"}, "train.num_workers")]


TRAIN = Stage(
    name="train",
    sections=("model", "train"),
    body=train_stage,
    upstream=upstream_stage,
    requests=train_requests,
)


def _upload_dir(run_dir: RunDir, local: str, rel: str) -> None:
    fs = run_dir.fs
    for root, _, files in os.walk(local):
        for name in files:
            src = os.path.join(root, name)
            dst = run_dir.path(rel, os.path.relpath(src, local))
            fs.create_dir(dst.rsplit("/", 1)[0], recursive=True)
            with open(src, "rb") as f, fs.open_output_stream(dst) as out:
                shutil.copyfileobj(f, out)
