"""Test helpers: the train step run the way the Ray Train workers run it, without Ray.

`run_steps` builds the policy (`pipeline.training.policy.load_policy`), its optimizer and objective, and
runs `train_step` over fixed rows: each optimizer step takes the next `batch_size` rows, worker `rank`
of `world` its own contiguous share, in micro-batches. `spawn` starts `world` processes joined by a
gloo process group (fully_shard runs on CPU there), each calling a function of this module.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.fs as pafs
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from fsspec.implementations.local import LocalFileSystem

from pipeline.config import TrainConfig
from pipeline.model.pretrained import load_tokenizer
from pipeline.runtime.checkpoint_layout import read_objective_state
from pipeline.runtime.checkpoints import read_checkpoint, write_checkpoint, write_export
from pipeline.training.objectives import objective_for
from pipeline.training.policy import load_policy, make_optimizer
from pipeline.training.step import train_step
from pipeline.training.step_plan import accumulation
from tests.helpers.micro_batches import split

CPU = torch.device("cpu")


def step_batches(rows: dict, train: TrainConfig, step: int, *, rank: int, world: int) -> list[dict]:
    """Worker `rank`'s micro-batches of optimizer step `step`."""
    per_worker = train.batch_size // world
    start = step * train.batch_size + rank * per_worker
    mine = {k: v[start : start + per_worker] for k, v in rows.items()}
    batches = split(mine, train.micro_batch_size)
    assert len(batches) == accumulation(train)
    return batches


def run_steps(
    model_dir: str,
    train: TrainConfig,
    rows: dict,
    steps: int,
    *,
    rank: int = 0,
    world: int = 1,
    out: Path | None = None,
    checkpoint_at: int | None = None,
    resume_from: Path | None = None,
    read_via=None,
    export_check: bool = False,
) -> list[dict]:
    """Per-step {loss metrics..., grad_norm} of `steps` optimizer steps; with `out`, a checkpoint after
    step `checkpoint_at` in out/checkpoint-rank<r> (with the losses' running states) and the final export
    in out/hf (from `write_export`). With `export_check`, one more row: `export_both_ways` of the trained model."""
    model = load_policy(model_dir, train, device=CPU, resuming=resume_from is not None)
    optimizer = make_optimizer(model, train, device=CPU)
    start = 0
    tokenizer = load_tokenizer(model_dir)
    objective = objective_for(train, pad_id=tokenizer.pad_token_id, device=CPU, with_reference=True)
    if resume_from is not None:
        start, _ = read_checkpoint(resume_from, model, optimizer, filesystem=read_via)
        objective.load_state_dict(read_objective_state(resume_from, filesystem=read_via))
    results = []
    for step in range(start, steps):
        result = train_step(
            model,
            optimizer,
            step_batches(rows, train, step, rank=rank, world=world),
            objective=objective,
            lr=train.learning_rate,
            max_grad_norm=train.max_grad_norm,
            world=world,
        )
        results.append({**result.loss_metrics, "grad_norm": result.grad_norm})
        if out is not None and step + 1 == checkpoint_at:
            write_checkpoint(
                out / f"checkpoint-rank{rank}",
                model,
                optimizer,
                rank=rank,
                step=step + 1,
                history=[],
                objective_state=objective.state_dict(),
            )
    if out is not None:
        write_export(out, model, tokenizer, rank=rank, world=world, merge=True)
        if export_check:
            results.append(export_both_ways(model, tokenizer, out, rank=rank, world=world))
    return results


def export_both_ways(model, tokenizer, out: Path, *, rank: int, world: int) -> list[dict]:
    """The trained model exported by every rank into out/shared, in files of at most 40 kB (several, so that
    each rank writes its own), and gathered whole onto rank 0 and saved by transformers into out/gathered (the
    export as it was before every rank wrote its share). Returns each rank's files and the most tensor bytes it
    held at once."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from pipeline.training.export import export_pretrained

    stats = export_pretrained(model, tokenizer, str(out / "shared"), rank=rank, world=world, max_shard_size="40kB")
    whole = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        model.save_pretrained(str(out / "gathered"), state_dict=whole)
    per_rank = [None] * world
    dist.all_gather_object(per_rank, {"files": stats.files, "peak_bytes": stats.peak_bytes})
    return per_rank


def merge_rank_dirs(out: Path, world: int) -> Path:
    """The ranks' checkpoint directories merged into one, as Ray Train merges what each worker reports."""
    merged = out / "checkpoint"
    for rank in range(world):
        for path in (out / f"checkpoint-rank{rank}").rglob("*"):
            if path.is_file():
                target = merged / path.relative_to(out / f"checkpoint-rank{rank}")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(path.read_bytes())
    return merged


def _worker(rank: int, world: int, store: str, fn_name: str, kwargs: dict, result_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        result = globals()[fn_name](rank=rank, world=world, **kwargs)
        if rank == 0:
            Path(result_file).write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def spawn(fn_name: str, *, world: int, result_file: Path, **kwargs):
    """Run `fn_name(rank=, world=, **kwargs)` of this module in `world` processes over gloo; rank 0's result."""
    # Rendezvous through a file, not a port picked in advance that another process may take meanwhile.
    store = result_file.with_name(result_file.name + ".store")
    store.unlink(missing_ok=True)
    mp.spawn(_worker, args=(world, str(store), fn_name, kwargs, str(result_file)), nprocs=world)
    return json.loads(result_file.read_text())


def scenarios(
    *, rank: int, world: int, model_dir: str, out: str, runs: dict, resume: str | None = None, export: str | None = None
) -> dict:
    """Each of `runs` ({name: (train config dict, rows, steps, checkpoint_at)}) in turn, in this process
    group; then, when `resume` names one, that run again from its checkpoint (the ranks' directories
    merged, as Ray Train merges what workers report) into new model and optimizer objects, to the end. The
    run `export` names ends with `export_both_ways`, under results["export"]."""
    results = {}
    for name, (train, rows, steps, checkpoint_at) in runs.items():
        results[name] = run_steps(
            model_dir,
            TrainConfig(**train),
            rows,
            steps,
            rank=rank,
            world=world,
            out=Path(out) / name,
            checkpoint_at=checkpoint_at,
            export_check=name == export,
        )
        if name == export:
            results["export"] = results[name].pop()
    if resume is not None:
        train, rows, steps, _ = runs[resume]
        dist.barrier()
        checkpoint = merge_rank_dirs(Path(out) / resume, world) if rank == 0 else Path(out) / resume / "checkpoint"
        dist.barrier()
        recording = RecordingFileSystem()
        results["resumed"] = run_steps(
            model_dir,
            TrainConfig(**train),
            rows,
            steps,
            rank=rank,
            world=world,
            out=Path(out) / "resumed",
            resume_from=checkpoint.resolve(),
            read_via=pafs.PyFileSystem(pafs.FSSpecHandler(recording)),
        )
        per_rank = [None] * world
        dist.all_gather_object(per_rank, recording.reads)
        results["resume_reads"] = per_rank
    return results


class RecordingFileSystem(LocalFileSystem):
    """fsspec's local filesystem noting every read: {file name: [(start, end), ...] byte ranges read}, as an
    object store's ranged GETs would fetch them."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.reads: dict[str, list[tuple[int, int]]] = {}

    def _open(self, path, mode="rb", **kwargs):
        opened = super()._open(path, mode=mode, **kwargs)
        ranges, read = self.reads.setdefault(Path(path).name, []), opened.read

        def noted(*args):
            start = opened.tell()
            data = read(*args)
            ranges.append((start, start + len(data)))
            return data

        opened.read = noted
        return opened
