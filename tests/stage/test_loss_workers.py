"""Losses that see more than their own rows, run by two workers (processes joined over gloo, FSDP2 on CPU)
against one worker: AOT sorts the whole step's pairs, gathered over every worker and micro-batch, and
BCO's running reward mean is the whole step's; both give one worker's per-step losses, metrics and
weights. BCO's running mean is checkpointed: a run resumed from its sharded checkpoint, with its state,
into new model, optimizer and objective reproduces the uninterrupted run (the mean moves every step, so a
lost state would show in the losses after the resume).
"""

from __future__ import annotations

import pytest

from pipeline.config import TrainConfig
from tests.helpers.distributed_runs import run_steps, spawn
from tests.helpers.micro_batches import pair_rows

STEPS = 3
BASE = dict(
    beta=0.1,
    learning_rate=1e-3,
    lr_schedule="constant",
    batch_size=8,
    micro_batch_size=2,
    max_grad_norm=1.0,
    seed=0,
)
RUNS = {
    "aot": ({**BASE, "loss": "aot"}, STEPS, None),
    "aot_unpaired": ({**BASE, "loss": "aot_unpaired", "label_smoothing": 0.1}, STEPS, None),
    "bco_pair": ({**BASE, "loss": "bco_pair"}, STEPS, 1),  # checkpointed after step 1, resumed below
}
ROWS = pair_rows(STEPS * 8, seed=3)


@pytest.fixture(scope="module")
def two_workers(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("loss_workers")
    runs = {
        name: ({"strategy": "fsdp", **train, "num_workers": 2}, ROWS, steps, checkpoint_at)
        for name, (train, steps, checkpoint_at) in RUNS.items()
    }
    return spawn(
        "scenarios",
        world=2,
        result_file=out / "results.json",
        model_dir=tiny_llama_dir,
        out=str(out),
        runs=runs,
        resume="bco_pair",
    )


def one_worker(model_dir: str, name: str, *, micro_batch_size: int) -> list[dict]:
    train, steps, _ = RUNS[name]
    return run_steps(model_dir, TrainConfig(**{**train, "micro_batch_size": micro_batch_size}), ROWS, steps)


def assert_same_steps(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for step, (a, b) in enumerate(zip(got, want)):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], abs=1e-5, rel=1e-5), (step, key)


@pytest.mark.parametrize("name", list(RUNS))
def test_two_workers_train_as_one_with_the_whole_batch(tiny_llama_dir, two_workers, name):
    """Two workers of 2 micro-batches of 2 pairs, one worker of 4 micro-batches of 2, one worker of one
    batch of 8: the same step, loss and update."""
    micro = one_worker(tiny_llama_dir, name, micro_batch_size=2)
    whole = one_worker(tiny_llama_dir, name, micro_batch_size=8)
    assert_same_steps(two_workers[name], whole)
    assert_same_steps(micro, whole)
    assert whole[-1]["loss"] != pytest.approx(whole[0]["loss"], abs=1e-4)  # it did train


def test_bcos_running_mean_survives_a_resume(two_workers):
    assert_same_steps(two_workers["resumed"], two_workers["bco_pair"][1:])
