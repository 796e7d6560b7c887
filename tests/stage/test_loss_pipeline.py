"""The new losses through the stages `dpo run` runs (tokenize, score, train) on a local Ray with a tiny model:
TRL's names and weights, LD-DPO's prefix log-probs written by the score stage and read by the trainer,
AOT's step gathered over two FSDP workers, BCO's running mean kept in the checkpoint."""

from __future__ import annotations

import json
import math
import random

import pytest

from pipeline.cli.schedule import run_stages
from pipeline.config import load_config, section_hash
from pipeline.data.schemas import SCORED_PREFIX
from pipeline.runtime.storage import RunDir, read_parquet_dir
from pipeline.stages import SCORE
from pipeline.stages.train import check_training

WORDS = "the movie was great terrible boring wonderful a film cast lovely dull ending sad".split()


def write_pairs(path, n: int) -> None:
    """n pairs whose responses differ in length, so each pair has a shared prefix and an excess."""
    rng = random.Random(0)
    with open(path, "w") as f:
        for i in range(n):
            chosen, rejected = (" ".join(rng.choices(WORDS, k=rng.randint(2, 8))) for _ in range(2))
            f.write(json.dumps({"prompt": f"review {i}:", "chosen": " " + chosen, "rejected": " " + rejected}) + "\n")


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from pipeline.config import RayConfig
    from pipeline.runtime.ray_setup import init_ray

    init_ray(RayConfig(num_cpus=2))
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir, ray_local):
    root = tmp_path_factory.mktemp("loss_pipeline")
    write_pairs(root / "pairs.jsonl", 40)
    config = load_config(
        None,
        [
            f"run_dir={root / 'run'}",
            f"data.path={root / 'pairs.jsonl'}",
            f"model.path={tiny_model_dir}",
            "data.eval_fraction=0.2",
            "tokenize.max_prompt_length=16",
            "tokenize.max_length=32",
            "score.batch_size=8",
            "train.loss=[sigmoid, bco_pair, aot]",  # TRL's loss_type and loss_weights
            "train.loss_weights=[1.0, 0.5, 0.5]",
            "train.ld_alpha=0.5",
            "train.beta=0.1",
            "train.learning_rate=0.01",
            "train.lr_schedule=constant",
            "train.max_steps=4",
            "train.checkpoint_steps=2",
            "train.batch_size=8",
            "train.micro_batch_size=2",
            "train.strategy=fsdp",
            "train.num_workers=2",
            "train.cpus_per_worker=0.5",  # two workers take one of the two CPUs: Ray Data keeps the other
            "train.report_to=[]",
        ],
    )
    return config, run_stages(config, ("tokenize", "score", "train"), force=False)


def test_the_score_stage_writes_the_prefix_log_probs_ld_dpo_reads(run):
    """The shorter response of a pair is all prefix; the longer one's prefix leaves out its excess tokens,
    whose log-probs are negative, so its prefix sum is the larger."""
    config, manifests = run
    assert manifests["score"]["prefix_logps"] is True
    scored = read_parquet_dir(RunDir(config.run_dir), "score/train")
    assert scored.schema.names == SCORED_PREFIX.names
    for row in scored.to_pylist():
        for side, other in (("chosen", "rejected"), ("rejected", "chosen")):
            full, prefix = row[f"ref_{side}_logps"], row[f"ref_{side}_prefix_logps"]
            if row[f"{side}_len"] <= row[f"{other}_len"]:
                assert prefix == pytest.approx(full, abs=1e-5)
            else:
                assert full < prefix < 0


def test_the_first_step_has_the_mixs_step_zero_loss_and_training_moves_it(run):
    """At the first step the policy is the reference, so every LD log-ratio is 0: sigmoid's log 2, BCO's
    2 log 2 (its shift starts at 0), AOT's log 2, weighted 1, 0.5, 0.5: 2.5 log 2."""
    config, _ = run
    lines = RunDir(config.run_dir).read_text("train/metrics.jsonl").splitlines()
    metrics = [json.loads(line) for line in lines]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert metrics[0]["loss"] == pytest.approx(2.5 * math.log(2.0), abs=1e-5)
    assert metrics[-1]["loss"] != pytest.approx(metrics[0]["loss"], abs=1e-3)


def test_the_checkpoint_keeps_bcos_running_mean(run):
    _, manifests = run
    path = manifests["train"]["checkpoint"]
    state = json.loads(RunDir(path).read_text("trainer_state.json"))
    assert state["step"] == 4 and state["objective"]["bco_pair"]["steps"] == 4
    assert state["objective"]["bco_pair"]["mean"] != 0.0


def test_ld_alpha_reruns_the_score_stage_and_the_trainer_refuses_a_score_stage_without_prefixes(run):
    import dataclasses

    config, manifests = run
    plain = config.replace(train=dataclasses.replace(config.train, ld_alpha=None))
    assert SCORE.config_hash(plain) != SCORE.config_hash(config)  # turning ld_alpha on rescores once
    assert SCORE.config_hash(plain) == section_hash(plain, ("model",))  # without it, finished stages stay valid
    without = {**manifests["score"], "prefix_logps": False}
    with pytest.raises(ValueError, match=r"train\.ld_alpha: LD-DPO reads the reference's prefix log-probs"):
        check_training(config, without, where="run/score")
