"""Trackers and the live metrics file without Ray: names, resume, joining a run, refusing what cannot work.
(The train stage writing to all three trackers is in tests/stage/test_stages.py.)"""

import json
import math

import pytest

from pipeline.config import ConfigError, load_config, section_hash
from pipeline.runtime.storage import RunDir
from pipeline.runtime.tracking import (
    MetricsLog,
    Trackers,
    TrackingRun,
    check_trackers,
    flat_params,
    run_name,
    summary_metrics,
    tracking_run,
    train_metrics,
)


def rows(n: int, start: int = 1) -> list[dict]:
    return [
        {"step": s, "epoch": 0, "loss": 0.7 - 0.01 * s, "rewards/accuracies": None} for s in range(start, start + n)
    ]


def read_rows(path) -> list[dict]:
    return [json.loads(line) for line in open(path)]


def test_each_logged_row_is_on_disk_at_once_and_a_resume_rewrites_from_the_checkpoint(tmp_path):
    run_dir = RunDir(str(tmp_path / "run"))
    log = MetricsLog(run_dir, "train.work/a/metrics.jsonl", [])
    path = tmp_path / "run" / "train.work" / "a" / "metrics.jsonl"
    for row in rows(5):
        log.append(row)
        assert read_rows(path)[-1] == row  # no close needed: a crash right now keeps this row
    # Resumed from the checkpoint of step 3: steps 4 and 5 are logged again, once.
    resumed = MetricsLog(run_dir, "train.work/a/metrics.jsonl", rows(3))
    assert [r["step"] for r in read_rows(path)] == [1, 2, 3]
    resumed.append(rows(1, start=4)[0])
    assert [r["step"] for r in read_rows(path)] == [1, 2, 3, 4]


def test_on_an_object_store_the_file_is_rewritten_now_and_then_and_on_flush(tmp_path):
    remote = RunDir(f"file://{tmp_path}/run")  # a URI: written as an object store is, whole
    log = MetricsLog(remote, "m.jsonl", [], rewrite_s=3600)
    log.append(rows(1)[0])
    assert remote.read_text("m.jsonl") == ""  # not yet: at most every rewrite_s
    log.flush()
    assert [json.loads(line)["step"] for line in remote.read_text("m.jsonl").splitlines()] == [1]


def test_names_follow_trl_and_skip_what_is_not_a_number():
    assert train_metrics({"step": 3, "epoch": 1, "loss": 0.5, "rewards/accuracies": None, "kl": math.nan}) == {
        "train/epoch": 1.0,
        "train/loss": 0.5,
    }
    summary = [
        {
            "model": "policy",
            "temperature": 0.25,
            "win_rate": 0.8,
            "win_rate_ci_low": 0.7,
            "win_rate_ci_high": 0.9,
            "reward_mean": 0.4,
            "kl_mean": 12.0,
        },
        {"model": "reference", "temperature": 1.0, "win_rate": None, "reward_mean": -0.1, "kl_mean": 0.0},
        {"model": "loss-ipo", "temperature": 1.0, "win_rate": 0.6},
    ]
    assert summary_metrics(summary, ["policy", "reference"]) == {
        "eval/T0.25/policy/win_rate": 0.8,
        "eval/T0.25/policy/win_rate_ci_low": 0.7,
        "eval/T0.25/policy/win_rate_ci_high": 0.9,
        "eval/T0.25/policy/reward_mean": 0.4,
        "eval/T0.25/policy/kl_mean": 12.0,
        "eval/T1/reference/reward_mean": -0.1,
        "eval/T1/reference/kl_mean": 0.0,
    }
    assert flat_params(
        {"train": {"beta": 0.1, "loss": "dpo", "report_to": ["tensorboard"]}, "data": {"columns": {}}}
    ) == {"train.beta": "0.1", "train.loss": "dpo", "train.report_to": '["tensorboard"]', "data.columns": "{}"}


def test_the_tracker_keys_load_and_never_rerun_training(tmp_path):
    config = load_config(
        None,
        [
            "train.report_to=[mlflow, wandb]",
            "train.tracker_project=imdb",
            "train.mlflow_tracking_uri=http://127.0.0.1:5000",
        ],
    )
    assert config.train.report_to == ["mlflow", "wandb"] and config.train.tracker_project == "imdb"
    assert load_config(None, []).train.report_to == ["tensorboard"]  # the default: free and local
    assert section_hash(config, ("train",)) == section_hash(load_config(None, []), ("train",))
    run = tracking_run(config.train, "s3://b/run", "abc-123")
    assert TrackingRun.from_dict(json.loads(json.dumps(run.to_dict()))) == run
    assert run.run_id != tracking_run(config.train, "s3://b/other", "abc-123").run_id


def test_runs_are_named_by_the_run_directory_and_stage_not_by_hashes(tmp_path):
    assert run_name("/runs/imdb", "train") == ("/runs/imdb", "imdb/train")
    assert run_name("s3://b/runs/imdb/sweep/beta-0.5", "train") == ("s3://b/runs/imdb", "imdb/train/beta-0.5")
    assert run_name("/runs/imdb/rounds/2", "train") == ("/runs/imdb", "imdb/train/round-2")
    train = load_config(None, ["train.report_to=[tensorboard]"]).train
    member = tracking_run(train, str(tmp_path / "imdb" / "sweep" / "beta-0.5"), "f4e72adfda5b0a1d-83b38fcd")
    assert member.display_name == "imdb/train/beta-0.5" and member.home == str(tmp_path / "imdb")
    trackers = Trackers(member)
    trackers.log({"train/loss": 0.5}, step=1)
    trackers.close()
    # One `tensorboard --logdir <run_dir>/tensorboard` shows the member beside the run's own training.
    assert list((tmp_path / "imdb" / "tensorboard" / "imdb" / "train" / "beta-0.5").glob("events.out.tfevents.*"))


def test_other_settings_set_the_earlier_tensorboard_run_aside_under_its_attempt(tmp_path):
    train = load_config(None, ["train.report_to=[tensorboard]"]).train
    for attempt, loss in (("aaaaaaaa1111-x", 0.7), ("bbbbbbbb2222-y", 0.3)):
        trackers = Trackers(tracking_run(train, str(tmp_path / "imdb"), attempt))
        trackers.log({"train/loss": loss}, step=1)
        trackers.close()
    board = tmp_path / "imdb" / "tensorboard" / "imdb"
    assert list((board / "train").glob("events.out.tfevents.*")) and list(
        (board / "train@aaaaaaaa").glob("events.out.tfevents.*")
    )


def test_trackers_that_cannot_work_are_refused_naming_the_fix():
    with pytest.raises(ConfigError, match="unknown tracker 'comet'"):
        check_trackers(load_config(None, ["train.report_to=[comet]"]).train, "/runs/x")
    with pytest.raises(ConfigError, match=r"needs train\.mlflow_tracking_uri"):
        check_trackers(load_config(None, ["train.report_to=[mlflow]"]).train, "s3://bucket/run")
    check_trackers(load_config(None, ["train.report_to=[tensorboard, mlflow, wandb]"]).train, "/runs/x")


def test_a_resumed_tensorboard_run_hides_what_came_after_its_checkpoint(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = TrackingRun(str(tmp_path / "run"), "attempt", ("tensorboard",), "raydpo", None)
    first = Trackers(run, params={"train.beta": "0.1"})
    for step in range(1, 6):
        first.log({"train/loss": 1.0 * step}, step=step)
    first.close()  # stopped at step 5; the last checkpoint was at step 3
    resumed = Trackers(run, resume_step=3)
    for step in range(4, 7):
        resumed.log({"train/loss": 10.0 * step}, step=step)
    resumed.close()
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard" / "attempt"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [
        (1, 1.0),
        (2, 2.0),
        (3, 3.0),
        (4, 40.0),
        (5, 50.0),
        (6, 60.0),
    ]


def test_a_second_writer_joins_the_same_mlflow_run(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    run = TrackingRun(str(tmp_path / "run"), "attempt", ("mlflow",), "raydpo", None)
    training = Trackers(run, params={"train.beta": "0.1"})
    training.log({"train/loss": 0.69}, step=1)
    training.close()
    evaluating = Trackers(run)  # the evaluate stage, later, in another process
    evaluating.log({"eval/T1/policy/win_rate": 0.75}, step=1)
    evaluating.close()
    client = MlflowClient(f"file:{tmp_path / 'run' / 'mlruns'}")
    (found,) = client.search_runs([client.get_experiment_by_name("raydpo").experiment_id])
    assert found.data.metrics == {"train/loss": 0.69, "eval/T1/policy/win_rate": 0.75}
    assert found.data.params == {"train.beta": "0.1"}
