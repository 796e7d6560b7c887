"""FSDP2 against DDP, without Ray: two FSDP workers (processes joined over gloo, where fully_shard runs
on CPU) give the same per-step losses, metrics and final weights as one DDP worker with the same
global batch, within 1e-5 in float32, also with packing and chunked log-probs, with CPU offload, with
gradient checkpointing, for KTO and for LoRA;
a run resumed from its sharded checkpoint into a new model and optimizer reproduces the uninterrupted
one; the export is a Hugging Face directory that from_pretrained loads, equal to the DDP one.

The model is a tiny Llama: the tests' GPT-2 has a key bias whose gradient is zero up to rounding, and
AdamW turns rounding noise into steps of the learning rate's size, so no two summation orders agree
on it.
"""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.config import LoraConfig, TrainConfig
from tests.helpers.distributed_runs import run_steps, spawn
from tests.helpers.micro_batches import kto_rows, pair_rows

STEPS = 4
BASE = dict(
    loss="dpo",
    beta=0.1,
    learning_rate=1e-3,
    lr_schedule="constant",
    batch_size=8,
    micro_batch_size=2,
    max_grad_norm=1.0,
    seed=0,
)
RUNS = {
    "full": (BASE, STEPS, 2),
    "packed_chunked": ({**BASE, "packing": True, "chunked_logps": True, "logps_chunk_size": 3}, 2, None),
    "cpu_offload": ({**BASE, "cpu_offload": True}, 2, None),
    "checkpointing": ({**BASE, "gradient_checkpointing": True}, 2, None),
    "kto": ({**BASE, "loss": "kto", "batch_size": 6, "micro_batch_size": 3}, 2, None),
    "lora": ({**BASE, "learning_rate": 1e-2, "lora": LoraConfig(r=4, alpha=8, target_modules="all-linear")}, 3, None),
}


def rows_for(name: str) -> dict:
    return kto_rows(12, seed=1) if name == "kto" else pair_rows(STEPS * 8, seed=1)


@pytest.fixture(scope="module")
def fsdp_runs(tiny_llama_dir, tmp_path_factory):
    """Every run of RUNS by two FSDP workers, in one process group: (per-step results, output dir)."""
    out = tmp_path_factory.mktemp("fsdp")
    runs = {
        name: ({"strategy": "fsdp", **train, "num_workers": 2}, rows_for(name), steps, checkpoint_at)
        for name, (train, steps, checkpoint_at) in RUNS.items()
    }
    results = spawn(
        "scenarios",
        world=2,
        result_file=out / "results.json",
        model_dir=tiny_llama_dir,
        out=str(out),
        runs=runs,
        resume="full",
        export="full",
    )
    return results, out


@pytest.fixture(scope="module")
def ddp_runs(tiny_llama_dir, tmp_path_factory):
    """Every run of RUNS by one DDP worker (this process), the whole global batch in micro-batches."""
    out = tmp_path_factory.mktemp("ddp")
    results = {
        name: run_steps(
            tiny_llama_dir, TrainConfig(**{**train, "cpu_offload": False}), rows_for(name), steps, out=out / name
        )
        for name, (train, steps, _) in RUNS.items()
    }
    return results, out


def assert_same_steps(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for step, (a, b) in enumerate(zip(got, want)):
        assert a.keys() == b.keys()
        for key in a:
            if b[key] is None:
                assert a[key] is None, (step, key)
            else:
                assert a[key] == pytest.approx(b[key], abs=1e-5, rel=1e-5), (step, key)


def assert_same_weights(dir_a, dir_b) -> None:
    from transformers import AutoModelForCausalLM

    a, b = (AutoModelForCausalLM.from_pretrained(str(d)).state_dict() for d in (dir_a, dir_b))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0, msg=key)


@pytest.mark.parametrize("name", list(RUNS))
def test_two_fsdp_workers_match_one_ddp_worker(fsdp_runs, ddp_runs, name):
    (fsdp, fsdp_out), (ddp, ddp_out) = fsdp_runs, ddp_runs
    assert_same_steps(fsdp[name], ddp[name])
    assert ddp[name][-1]["loss"] != pytest.approx(ddp[name][0]["loss"], abs=1e-4)  # the runs did train
    assert_same_weights(fsdp_out / name / "hf", ddp_out / name / "hf")  # from_pretrained loads the fsdp export


def test_resume_from_a_sharded_checkpoint_reproduces_the_run(fsdp_runs):
    """The two ranks read the step-2 checkpoint their first run wrote (the ranks' directories merged, as
    Ray Train merges what workers report) into a new model and optimizer and train on to the end: the
    same steps, the same weights. (tests/chaos/test_chaos.py kills and resumes a Ray Train run under ddp; no test yet
    resumes an fsdp run through Ray Train: this merge stands in for what Ray Train does.)"""
    results, out = fsdp_runs
    checkpoint_at = RUNS["full"][2]
    assert_same_steps(results["resumed"], results["full"][checkpoint_at:])
    assert_same_weights(out / "resumed" / "hf", out / "full" / "hf")


def test_every_rank_writes_its_share_of_the_export_and_none_holds_the_whole_model(fsdp_runs):
    """The export of two FSDP ranks, in files of at most 40 kB: each rank wrote other files, together every file
    of the index, and neither ever held as many tensor bytes as the model has; the weights are those of the
    model gathered whole on one rank and saved by transformers (the export as it was), value for value."""
    from safetensors.torch import load_file

    results, out = fsdp_runs
    rank0, rank1 = results["export"]
    shared, gathered = out / "full" / "shared", out / "full" / "gathered"
    index = json.loads((shared / "model.safetensors.index.json").read_text())
    assert rank0["files"] and rank1["files"] and not set(rank0["files"]) & set(rank1["files"])
    assert sorted(rank0["files"] + rank1["files"]) == sorted(set(index["weight_map"].values()))
    mine, theirs = {}, {}
    for name in rank0["files"] + rank1["files"]:
        mine.update(load_file(str(shared / name)))
    for path in gathered.glob("*.safetensors"):
        theirs.update(load_file(str(path)))
    whole = sum(t.numel() * t.element_size() for t in theirs.values())
    assert max(rank0["peak_bytes"], rank1["peak_bytes"]) < whole / 2
    assert mine.keys() == theirs.keys() == index["weight_map"].keys()
    for key in mine:
        assert torch.equal(mine[key], theirs[key]), key
    assert json.loads((shared / "config.json").read_text()) == json.loads((gathered / "config.json").read_text())
    assert_same_weights(shared, gathered)  # and transformers loads it


def test_a_resume_reads_only_its_own_shards_in_place(fsdp_runs):
    """The resumed run read the checkpoint through a pyarrow filesystem (as it reads s3:// in place). Each rank
    read its own shard file, and of the other rank's file only entries that are not sharded (the optimizer's
    step counts and settings, stored once for all ranks): never the other rank's shards, never a copy."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    results, out = fsdp_runs
    metadata = FileSystemReader(str(out / "full" / "checkpoint" / "state")).read_metadata()
    shared: dict[str, list[tuple[int, int]]] = {}  # per file, the byte ranges of entries every rank reads
    for index, info in metadata.storage_data.items():
        entry = metadata.state_dict_metadata[index.fqn]
        if not isinstance(entry, TensorStorageMetadata) or len(entry.chunks) == 1:
            shared.setdefault(info.relative_path, []).append((info.offset, info.offset + info.length))
    for rank, reads in enumerate(results["resume_reads"]):
        own = f"__{rank}_0.distcp"
        assert reads.get(own), (rank, reads.keys())
        for name, ranges in reads.items():
            if name.endswith(".distcp") and name != own:
                outside = [
                    r
                    for r in ranges
                    if r[1] > r[0] and not any(a <= r[0] and r[1] <= b for a, b in shared.get(name, []))
                ]
                assert not outside, (rank, name, outside[:3])


def test_checkpoint_shards_are_per_rank(fsdp_runs):
    _, out = fsdp_runs
    names = {
        rank: sorted(p.name for p in (out / "full" / f"checkpoint-rank{rank}" / "state").iterdir()) for rank in (0, 1)
    }
    assert names == {0: [".metadata", "__0_0.distcp"], 1: ["__1_0.distcp"]}


def test_a_model_built_on_meta_keeps_the_checkpoints_generation_config(tiny_llama_dir, tmp_path):
    """The fsdp export saves the generation config of the model built on meta: it must be the base's own
    generation_config.json (extra end-of-turn tokens, say), which samplers read their stop tokens from."""
    import shutil

    from transformers import GenerationConfig

    from pipeline.training.sharding import build_on_meta

    base = tmp_path / "base"
    shutil.copytree(tiny_llama_dir, base)
    GenerationConfig(eos_token_id=[2, 7], max_new_tokens=17).save_pretrained(base)
    model = build_on_meta(str(base), dtype=torch.float32)
    assert model.generation_config.eos_token_id == [2, 7] and model.generation_config.max_new_tokens == 17
