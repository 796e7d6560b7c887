"""Stage tests on a local Ray with a tiny model: row accounting, skip on rerun, --force, crash safety,
and the step-0 invariant (policy == reference gives zero rewards and a loss of log 2)."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.runtime.storage import RunDir, read_parquet_dir
from pipeline.runtime.tracking import TrackingRun
from pipeline.stages import EVALUATE, SCORE, TOKENIZE, TRAIN
from pipeline.stages.evaluate import Policy, held_out_measures
from tests.helpers.datasets_on_disk import write_dataset_dict
from tests.helpers.tiny import write_pairs


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from pipeline.config import RayConfig
    from pipeline.runtime.ray_setup import init_ray

    init_ray(RayConfig(num_cpus=2))
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def config(tmp_path_factory, tiny_model_dir, ray_local):
    root = tmp_path_factory.mktemp("stages")
    data = write_pairs(root / "pairs.jsonl", 60)
    with open(data, "a") as f:  # rows the stage must account for, not lose
        f.write("{not json\n")
        f.write(json.dumps({"prompt": "p", "chosen": " same", "rejected": " same"}) + "\n")
        f.write(json.dumps({"prompt": "review 0:", "chosen": "x"}) + "\n")
        with open(data) as again:
            f.write(again.readline())  # the first pair once more: a duplicate
    overrides = [
        f"run_dir={root / 'run'}",
        f"data.path={data}",
        f"model.path={tiny_model_dir}",
        "data.eval_fraction=0.25",
        "tokenize.max_prompt_length=16",
        "tokenize.max_length=64",
        "score.batch_size=8",
        "train.learning_rate=0.0",  # policy stays equal to the reference: the step-0 invariant
        "train.max_steps=2",
        "train.batch_size=8",
        "train.micro_batch_size=4",
        "train.cpus_per_worker=0.5",
        "evaluate.num_prompts=4",
        "evaluate.temperatures=[0.0, 1.0]",
        "evaluate.max_tokens=6",
        "evaluate.reward=vader",
        "evaluate.judge=vader",
        "evaluate.bootstrap_samples=100",
        "evaluate.best_of_n=2",
        "train.report_to=[tensorboard, mlflow, wandb]",  # each read back by its own library below
    ]
    return load_config(None, overrides)


@pytest.fixture(scope="module")
def finished(config):
    """Run the four stages once; the tests below read what they wrote."""
    return {
        "tokenize": TOKENIZE.run(config),
        "score": SCORE.run(config),
        "train": TRAIN.run(config),
        "evaluate": EVALUATE.run(config),
    }


def test_every_row_is_accounted_for(finished):
    tok = finished["tokenize"]
    assert tok["rows_in"] == 64
    assert tok["rows_in"] == tok["rows_out"] + sum(tok["dropped"].values())
    assert tok["dropped"] == {"duplicate_pair": 1, "identical_responses": 1, "malformed_json": 1, "missing_field": 1}
    assert tok["audit"]["duplicates"] == 1
    assert tok["rows_train"] + tok["rows_eval"] == tok["rows_out"] == 60


def test_rejected_rows_are_kept_with_source_and_reason(finished, config):
    from pipeline.stages.tokenize import rejected_rows

    rejected = rejected_rows(RunDir(config.run_dir))
    assert sorted(r["reason"] for r in rejected) == [
        "duplicate_pair",
        "identical_responses",
        "malformed_json",
        "missing_field",
    ]
    assert sorted(r["source"].rsplit(":", 1)[1] for r in rejected) == ["61", "62", "63", "64"]
    assert next(r for r in rejected if r["reason"] == "malformed_json")["raw"] == "{not json"


def test_rows_survive_scoring(finished, config):
    run_dir = RunDir(config.run_dir)
    assert finished["score"]["rows_train"] == finished["tokenize"]["rows_train"]
    assert finished["score"]["rows_eval"] == finished["tokenize"]["rows_eval"]
    scored = read_parquet_dir(run_dir, "score/train")
    tokenized = read_parquet_dir(run_dir, "tokenize/train")
    assert scored["id"].to_pylist() == tokenized["id"].to_pylist()
    assert all(v < 0 for v in scored["ref_chosen_logps"].to_pylist())


def test_policy_equal_to_reference_gives_log2_and_zero_rewards(finished, config):
    """Tokenizer, masking, scorer and trainer agree: at lr 0 every implicit reward is 0."""
    lines = RunDir(config.run_dir).read_text("train/metrics.jsonl").splitlines()
    metrics = [json.loads(line) for line in lines]
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert abs(m["loss"] - math.log(2)) < 1e-5
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
            assert abs(m[key]) < 1e-5
        assert m["logps/chosen"] < 0 and m["grad_norm"] > 0 and m["tokens_per_s"] > 0


def test_final_policy_loads_with_transformers(finished, config):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(RunDir(config.run_dir).path("train", "final"))
    assert model.config.n_layer == 2


def test_summary_has_a_row_per_model_and_temperature(finished, config):
    summary = RunDir(config.run_dir).read_json("evaluate/summary.json")
    keys = {
        "model",
        "temperature",
        "n",
        "reward_mean",
        "kl_mean",
        "win_rate",
        "win_rate_ci_low",
        "win_rate_ci_high",
        "win_rate_vs_chosen",
        "kl_bound",
        "samples_per_answer",
        "tokens_per_answer",
    }
    assert {(r["model"], r["temperature"]) for r in summary["rows"]} == {
        (m, t) for m in ("policy", "reference", "best_of_2") for t in (0.0, 1.0)
    }
    for row in summary["rows"]:
        assert keys <= set(row)
        if row["model"] == "best_of_2":
            assert row["kl_mean"] is None and row["samples_per_answer"] == 2.0
        else:
            # Policy == reference here, so KL estimates are zero up to float noise.
            assert abs(row["kl_mean"]) < 1e-3 and row["samples_per_answer"] == 1.0
        # Every held-out prompt has a chosen response: every sample is judged against it.
        assert row["judged_vs_chosen"] == row["n"] > 0
        assert (
            0.0
            <= row["win_rate_vs_chosen_ci_low"]
            <= row["win_rate_vs_chosen"]
            <= row["win_rate_vs_chosen_ci_high"]
            <= 1.0
        )
    rows = {(r["model"], r["temperature"]): r for r in summary["rows"]}
    # Greedy candidates are identical: best-of-2 at T = 0 is the reference's greedy answer, a tie with it.
    assert rows[("best_of_2", 0.0)]["reward_mean"] == rows[("reference", 0.0)]["reward_mean"]
    assert rows[("best_of_2", 0.0)]["win_rate"] == 0.5 and rows[("best_of_2", 0.0)]["kl_bound"] == 0.0
    assert summary["best_of_n"]["candidates_sampled"] == 2 * 2 * summary["num_prompts"]
    for name in ("report.md", "reward_vs_kl.png", "training_curves.png", "win_rate_vs_temperature.png"):
        assert RunDir(config.run_dir).exists("evaluate", name)


def test_rerun_skips_finished_stages(finished, config):
    again = TOKENIZE.run(config), SCORE.run(config), TRAIN.run(config), EVALUATE.run(config)
    for stage, manifest in zip(("tokenize", "score", "train", "evaluate"), again):
        assert manifest["manifest_hash"] == finished[stage]["manifest_hash"], stage


def test_a_stage_killed_before_commit_is_redone(finished, config):
    # Runs before test_force_redoes_a_stage, so the finished score stage is still current: no rescoring.
    run_dir = RunDir(config.run_dir)
    before = SCORE.run(config)
    assert before["manifest_hash"] == finished["score"]["manifest_hash"]
    # An attempt that dies midway: it has removed the old manifest and written half its shards.
    attempt = run_dir.begin("score")
    attempt.write_text("train/part-00000.parquet", "half a file")
    assert run_dir.manifest("score") is None
    assert not run_dir.is_finished("score", config_hash=before["config_hash"], upstream_hash=before["upstream_hash"])
    after = SCORE.run(config)
    assert after["rows_train"] == before["rows_train"]
    assert read_parquet_dir(run_dir, "score/train").num_rows == before["rows_train"]


def shard_bytes(config) -> dict[str, bytes]:
    from pathlib import Path

    root = Path(RunDir(config.run_dir).path("tokenize"))
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.parquet"))}


def test_force_redoes_a_stage(finished, config):
    before = shard_bytes(config)
    redone = TOKENIZE.run(config, force=True)
    assert shard_bytes(config) == before  # same input and config: byte-identical shards
    assert redone["finished_at"] >= finished["tokenize"]["finished_at"]  # a new attempt...
    assert redone["manifest_hash"] == finished["tokenize"]["manifest_hash"]  # ...with the same content hash
    assert redone["rows_out"] == finished["tokenize"]["rows_out"]
    # Shards are deterministic: the same input gives the same pairs in the same order.
    ids = read_parquet_dir(RunDir(config.run_dir), "tokenize/train")["id"].to_pylist()
    assert ids == sorted(ids)
    # Byte-identical output does not invalidate what follows: the score stage is still finished.
    run_dir = RunDir(config.run_dir)
    assert run_dir.is_finished(
        "score", config_hash=finished["score"]["config_hash"], upstream_hash=redone["manifest_hash"]
    )


def test_inspect_prints_the_audit_with_decoded_rows(finished, config, capsys):
    from pipeline.cli.inspection import print_tokenize_audit

    print_tokenize_audit(config)
    out = capsys.readouterr().out
    assert "dropped: duplicate_pair" in out and "chosen longer than rejected" in out
    assert "review" in out  # decoded example rows


def test_the_live_metrics_file_is_what_train_metrics_jsonl_holds(finished, config):
    run_dir = RunDir(config.run_dir)
    attempt = finished["train"]["tracking"]["attempt"]
    assert run_dir.read_text(f"train.work/{attempt}/metrics.jsonl") == run_dir.read_text("train/metrics.jsonl")


def test_each_tracker_holds_the_training_curve_the_config_and_the_evaluate_summary(finished, config, monkeypatch):
    """Read back with each library's own reader: TensorBoard's event accumulator, MLflow's client, and
    `wandb leet inspect` on the offline run files."""
    run_dir = RunDir(config.run_dir)
    attempt, steps = finished["train"]["tracking"]["attempt"], finished["train"]["steps"]
    losses = [json.loads(line)["loss"] for line in run_dir.read_text("train/metrics.jsonl").splitlines()]
    summary = RunDir(config.run_dir).read_json("evaluate/summary.json")["rows"]
    win_rate = next(r["win_rate"] for r in summary if r["model"] == "policy" and r["temperature"] == 1.0)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    name = f"{Path(config.run_dir).name}/train"  # the run directory's name and the stage, not a hash
    events = EventAccumulator(run_dir.path("tensorboard", *name.split("/")))
    events.Reload()
    assert [(e.step, pytest.approx(e.value)) for e in events.Scalars("train/loss")] == [(1, losses[0]), (2, losses[1])]
    assert {
        "train/rewards/chosen",
        "train/rewards/margins",
        "train/logps/rejected",
        "train/grad_norm",
        "train/learning_rate",
        "train/tokens_per_s",
    } <= set(events.Tags()["scalars"])
    assert events.Scalars("eval/T1/policy/win_rate")[-1].value == pytest.approx(win_rate)
    assert events.Scalars("eval/T1/policy/win_rate")[-1].step == steps
    assert b"train.beta: 0.1" in events.Tensors("config/text_summary")[0].tensor_proto.string_val[0]

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"file:{run_dir.path('mlruns')}")
    (run,) = client.search_runs([client.get_experiment_by_name("raydpo").experiment_id])
    assert run.info.run_name == name and run.data.params["train.beta"] == "0.1"
    assert run.data.tags["raydpo_attempt"] == attempt
    assert [(m.step, pytest.approx(m.value)) for m in client.get_metric_history(run.info.run_id, "train/loss")] == [
        (1, losses[0]),
        (2, losses[1]),
    ]
    assert run.data.metrics["eval/T1/policy/win_rate"] == pytest.approx(win_rate)
    assert {"eval/T1/best_of_2/win_rate_ci_low", "eval/T0/reference/reward_mean"} <= set(run.data.metrics)

    records = []
    for path in sorted(Path(run_dir.path("wandb")).glob("offline-run-*/run-*.wandb")):  # offline: no key here
        out = subprocess.run(
            [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(path)],
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
        records += [json.loads(line) for line in out.splitlines() if line.strip()]
    history = [r["history"]["item"] for r in records if r["type"] == "history"]
    assert [pytest.approx(h["train/loss"]) for h in history if "train/loss" in h] == losses
    assert any(h.get("eval/T1/policy/win_rate") == pytest.approx(win_rate) for h in history)
    run_records = [r["run"] for r in records if r["type"] == "run"]
    assert {r["run_id"] for r in run_records} == {TrackingRun.from_dict(finished["train"]["tracking"]).run_id}
    assert len(run_records) == 2  # training and evaluate: one run, joined
    assert any(r["config"]["update"].get("train.beta") == "0.1" for r in run_records)


# ------------------------------------------------------------------------------------------------- KTO


def write_unpaired(path, n: int) -> None:
    """n unpaired rows, every third one labelled undesirable."""
    import random

    from tests.helpers.tiny import CORPUS

    rng = random.Random(1)
    rows = [{"prompt": f"review {i}:", "completion": " " + rng.choice(CORPUS), "label": i % 3 != 0} for i in range(n)]
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


@pytest.fixture(scope="module")
def kto_run(tmp_path_factory, tiny_model_dir, ray_local):
    """Tokenize, score and train (lr 0, two steps) a small unpaired dataset with train.loss=kto, on two
    FSDP workers: their shards reported per rank, the export gathered from them."""
    root = tmp_path_factory.mktemp("kto")
    write_unpaired(root / "unpaired.jsonl", 22)  # by prompt hash, 16 rows train (10 desirable), 6 held out
    config = load_config(
        None,
        [
            f"run_dir={root / 'run'}",
            f"data.path={root / 'unpaired.jsonl'}",
            f"model.path={tiny_model_dir}",
            "data.eval_fraction=0.25",
            "tokenize.max_prompt_length=16",
            "tokenize.max_length=24",
            "score.batch_size=8",
            "train.loss=kto",
            "train.beta=0.1",
            "train.desirable_weight=1.0",
            "train.undesirable_weight=1.5",
            "train.learning_rate=0.0",  # policy == reference: every log-ratio is 0 and so is z
            "train.max_steps=2",
            "train.batch_size=16",  # every step is the whole split, so its class counts are known
            "train.micro_batch_size=4",  # two micro-batches per worker and step share the step's z
            "train.strategy=fsdp",
            "train.num_workers=2",
            "train.cpus_per_worker=0.5",  # two workers take one of the two CPUs: Ray Data keeps the other
        ],
    )
    return config, {"tokenize": TOKENIZE.run(config), "score": SCORE.run(config), "train": TRAIN.run(config)}


def test_kto_scored_shards_pair_each_prompt_with_another_completion(kto_run):
    from pipeline.data.schemas import SCORED_KTO

    config, manifests = kto_run
    assert manifests["score"]["data_kind"] == "unpaired"
    assert manifests["score"]["labels"]["train"] == {"desirable": 10, "undesirable": 6}
    scored = read_parquet_dir(RunDir(config.run_dir), "score/train")
    assert scored.schema.names == SCORED_KTO.names and scored.num_rows == 16
    chosen = dict(zip(scored["id"].to_pylist(), scored["chosen_ids"].to_pylist()))
    for row in scored.to_pylist():
        assert row["kl_partner_id"] != row["id"]
        assert row["kl_completion_ids"] == chosen[row["kl_partner_id"]][: 24 - len(row["prompt_ids"])]
        assert row["ref_kl_logps"] < 0 and row["ref_chosen_logps"] < 0 and row["ref_rejected_logps"] == 0.0


def test_kto_at_policy_equal_to_reference_gives_the_predicted_loss(kto_run):
    """lr 0: r = 0 and z = max(0, ~0) = 0, so each row's loss is lambda (1 - sigmoid(0)) = lambda / 2."""
    config, _ = kto_run
    metrics = [json.loads(line) for line in RunDir(config.run_dir).read_text("train/metrics.jsonl").splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    predicted = 0.5 * (1.0 * 10 + 1.5 * 6) / 16
    for m in metrics:
        assert abs(m["loss"] - predicted) < 1e-5
        assert 0.0 <= m["kl"] < 1e-5
        assert abs(m["rewards/chosen"]) < 1e-5 and abs(m["rewards/rejected"]) < 1e-5
        assert m["rewards/accuracies"] is None
        assert m["logps/chosen"] < 0 and m["grad_norm"] > 0


def test_kto_data_refuses_a_paired_loss(kto_run):
    config, _ = kto_run
    with pytest.raises(ValueError, match="dpo trains on pairs"):
        TRAIN.run(config.replace(train=dataclasses.replace(config.train, loss="dpo")))


def test_kto_held_out_separation_is_chance_when_policy_equals_reference(kto_run):
    """Held-out KTO rows have no partner: evaluate measures how the implicit reward separates the labels.
    At lr 0 every reward is 0, every (desirable, undesirable) comparison a tie: exactly 0.5."""
    config, manifests = kto_run
    assert manifests["score"]["labels"]["eval"] == {"desirable": 4, "undesirable": 2}
    run_dir = RunDir(config.run_dir)
    measures = held_out_measures(run_dir, [Policy("kto", run_dir, config.train.beta)], config=config)
    result = measures["kto"]
    assert (result["kind"], result["rows"], result["desirable"], result["undesirable"]) == ("unpaired", 6, 4, 2)
    assert result["auc"] == 0.5
    assert result["reward_desirable_mean"] == 0.0 and result["reward_undesirable_mean"] == 0.0


def test_a_named_eval_split_is_the_eval_set(config, tmp_path):
    """data.eval_split: a DatasetDict's own test split is held out instead of prompts by hash."""
    train = [{"prompt": f"review {i}:", "chosen": " great film", "rejected": " awful film"} for i in range(8)]
    test = [
        {"prompt": "review 90:", "chosen": " a truly delightful film", "rejected": " an awful, dull film"},
        train[0],
    ]  # also in train: held out, never trained on
    data = write_dataset_dict(tmp_path / "dd", {"train": train, "test": test})
    split_config = config.replace(
        run_dir=str(tmp_path / "run"),
        data=dataclasses.replace(config.data, path=str(data), eval_split="test", eval_fraction=0.0),
    )
    manifest = TOKENIZE.run(split_config)
    assert (manifest["rows_in"], manifest["rows_train"], manifest["rows_eval"]) == (10, 7, 2)
    assert manifest["dropped"] == {"duplicate_pair": 1}
    held_out = read_parquet_dir(RunDir(split_config.run_dir), "tokenize/eval")
    assert held_out.num_rows == 2
