"""End to end: the `dpo` CLI on the shrunk demo config, as a user runs it, judged by an API judge.

The judge is the OpenAI-compatible one, pointed at the scripted loopback server of tests/helpers/fake_chat_server.py,
with its key planted in the environment of every command. The last test then searches every file the
commands wrote (checkpoints, Ray Train's own state, the judge cache) and everything they printed for the
key: it must have been sent with every request and written nowhere.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.helpers.fake_chat_server import KEY_ENV, SECRET, TEMPLATE, FakeChatServer
from tests.helpers.vllm_check import needs_vllm

ROOT = Path(__file__).resolve().parents[2]
SUMMARY_KEYS = {
    "model",
    "temperature",
    "n",
    "reward_mean",
    "kl_mean",
    "win_rate",
    "win_rate_ci_low",
    "win_rate_ci_high",
}
OUTPUTS: list[str] = []  # everything every command printed, for the key search


@pytest.fixture(scope="module")
def judge():
    server = FakeChatServer()
    server.always = "The first one reads better.\nPreferred: A"  # the tiny model's texts need no real judging
    yield server
    server.close()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("e2e") / "run"


@pytest.fixture(scope="module")
def dpo(judge, run_dir):
    """`dpo <command> --config configs/demo_smoke.yaml` with the API judge and its key, on this module's run_dir."""
    judge_settings = {
        "evaluate.judge": "api",
        "evaluate.judge_api.base_url": judge.url,
        "evaluate.judge_api.model": "judge-model",
        "evaluate.judge_api.api_key_env": KEY_ENV,
        "evaluate.judge_api.prompt_template": json.dumps(TEMPLATE),
        "evaluate.judge_api.max_retries": "1",
    }  # no cache_path: the cache is on by default, at <run_dir>/judge_cache.sqlite
    sets = [f"run_dir={run_dir}", *(f"{k}={v}" for k, v in judge_settings.items())]

    def run(command: str, *extra: str) -> subprocess.CompletedProcess:
        args = [command, "--config", "configs/demo_smoke.yaml", *(a for s in sets for a in ("--set", s)), *extra]
        done = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=900,
            env={**os.environ, KEY_ENV: SECRET},
        )
        OUTPUTS.append(done.stdout + done.stderr)
        return done

    run.sets = sets  # type: ignore[attr-defined]  # the overrides, for a test that loads the same config
    return run


def test_cli_runs_every_stage(dpo, run_dir):
    done = dpo("run")
    assert done.returncode == 0, done.stderr[-4000:]
    assert f"report: {run_dir}/evaluate/report.md" in done.stdout
    summary = json.loads((run_dir / "evaluate" / "summary.json").read_text())
    assert summary["judge"] == "api"
    assert {(r["model"], r["temperature"]) for r in summary["rows"]} == {
        (m, t) for m in ("policy", "reference", "best_of_2") for t in (0.0, 1.0)
    }
    for row in summary["rows"]:
        assert SUMMARY_KEYS <= set(row)
        assert row["n"] == summary["num_prompts"] >= 1  # one sample per held-out prompt
        assert -1.0 <= row["reward_mean"] <= 1.0
        assert (
            0.0
            <= row["win_rate_vs_chosen_ci_low"]
            <= row["win_rate_vs_chosen"]
            <= row["win_rate_vs_chosen_ci_high"]
            <= 1.0
        )
    judged = [r for r in summary["rows"] if r["model"] != "reference"]
    assert all(0.0 <= r["win_rate_ci_low"] <= r["win_rate"] <= r["win_rate_ci_high"] <= 1.0 for r in judged)
    best = [r for r in summary["rows"] if r["model"] == "best_of_2"]
    assert all(r["samples_per_answer"] == 2 and r["tokens_per_answer"] > 0 and r["kl_bound"] >= 0 for r in best)
    assert summary["implicit_reward_accuracy"]["pairs"] > 0
    tokenize = json.loads((run_dir / "tokenize" / "manifest.json").read_text())
    assert tokenize["rows_in"] == tokenize["rows_out"] + sum(tokenize["dropped"].values())
    # Progress a user can follow: evaluate's sampling and judging counts, the judge's tally in the manifest.
    judge_stats = json.loads((run_dir / "evaluate" / "manifest.json").read_text())["judge_stats"]
    assert judge_stats["requests"] > 0 and judge_stats["unparsed"] == 0
    assert "evaluate: sampled " in done.stderr
    assert re.search(r"evaluate: judged (\d+) of \1 \(api:judge-model\)", done.stderr)  # the last count: all in
    # A line per logged step, each once, with the time left; TensorBoard (the default tracker) has the loss
    # curve and the evaluate summary, read by its own reader.
    step_lines = [line for line in (done.stdout + done.stderr).splitlines() if re.search(r"train step \d+/4:", line)]
    assert len(step_lines) == len(set(step_lines)) == 4 and all(" left" in line for line in step_lines), step_lines
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (named,) = (run_dir / "tensorboard").iterdir()
    assert named.name == run_dir.name and [p.name for p in named.iterdir()] == ["train"]  # <run_dir name>/train
    events = EventAccumulator(str(named / "train"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    assert {"eval/T1/policy/win_rate", "eval/T1/policy/win_rate_ci_low", "eval/T0/reference/reward_mean"} <= set(
        events.Tags()["scalars"]
    )


@needs_vllm
def test_evaluate_samples_with_vllm_in_ray_actors(run_dir, tmp_path):
    """`dpo evaluate --set evaluate.engine=vllm` on the finished run (a copy, so the other tests see it as
    they left it): each model's sampler actor runs vLLM's CPU build, its engine-core and worker processes
    inside the actor's 2 CPUs (4 in the cluster: both models side by side), and closes it when its samples
    are in. Greedy decoding is deterministic, so at T = 0 vLLM's completions are the transformers
    engine's, token for token, with the same log-probs in float32 and so the same KL estimates."""
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "evaluate",
            "--config",
            "configs/demo_smoke.yaml",
            "--set",
            f"run_dir={copy}",
            "--set",
            "evaluate.engine=vllm",
            "--set",
            "ray.num_cpus=4",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads((copy / "evaluate" / "summary.json").read_text())
    assert (summary["engine"], summary["engine_requested"]) == ("vllm", "vllm")
    assert {(r["model"], r["temperature"]) for r in summary["rows"]} == {
        (m, t) for m in ("policy", "reference", "best_of_2") for t in (0.0, 1.0)
    }
    greedy = lambda d: sorted(
        (r["model"], r["prompt_index"], r["sample_index"], r["completion_ids"], r["logps"], r["kl"])
        for r in pq.read_table(d / "evaluate" / "samples.parquet").to_pylist()
        if r["temperature"] == 0.0
    )
    by_hf, by_vllm = greedy(run_dir), greedy(copy)
    assert [r[:4] for r in by_vllm] == [r[:4] for r in by_hf]
    for hf_row, vllm_row in zip(by_hf, by_vllm):
        assert vllm_row[4:] == pytest.approx(hf_row[4:], abs=1e-4)


def test_unknown_key_fails_before_any_work(dpo):
    done = dpo("tokenize", "--set", "train.bta=0.1")
    assert done.returncode != 0
    assert "train.bta: unknown key" in done.stderr


def test_sweep_reuses_one_score_stage_and_yields_a_policy_per_setting(dpo, run_dir):
    score_manifest = (run_dir / "score" / "manifest.json").read_text()
    done = dpo(
        "sweep",
        "--set",
        "train.loss=[dpo,sft]",
        "--set",
        "train.cpus_per_worker=0.5",
        "--set",
        "evaluate.temperatures=[1.0]",
        "--set",
        "evaluate.best_of_n=0",
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert (run_dir / "score" / "manifest.json").read_text() == score_manifest  # untouched: not recomputed
    for member in ("loss-dpo", "loss-sft"):
        assert (run_dir / "sweep" / member / "train" / "final" / "model.safetensors").exists()
    summary = json.loads((run_dir / "sweep" / "evaluate" / "summary.json").read_text())
    assert {(r["model"], r["temperature"]) for r in summary["rows"]} == {
        (m, 1.0) for m in ("loss-dpo", "loss-sft", "reference")
    }
    assert set(summary["implicit_reward_accuracy"]) == {"loss-dpo", "loss-sft"}


def test_rerun_is_a_no_op_and_one_stage_can_be_forced(dpo, run_dir):
    manifest = lambda stage: json.loads((run_dir / stage / "manifest.json").read_text())
    before = {stage: manifest(stage) for stage in ("tokenize", "score", "train")}
    again = dpo("run")
    assert again.returncode == 0, again.stderr[-4000:]
    assert "every stage finished (tokenize, score, train, evaluate); nothing to do" in again.stdout
    assert {stage: manifest(stage) for stage in before} == before
    forced = dpo("score", "--force")
    assert forced.returncode == 0, forced.stderr[-4000:]
    assert manifest("score")["finished_at"] >= before["score"]["finished_at"]  # a new attempt...
    assert manifest("score")["manifest_hash"] == before["score"]["manifest_hash"]  # ...byte-identical scores
    assert manifest("tokenize") == before["tokenize"] and manifest("train") == before["train"]  # one stage only
    # Byte-identical scores do not invalidate what follows: a plain `dpo run` has nothing to do (read from the
    # manifests, no Ray), where a timestamp in the hash would have retrained and re-evaluated.
    from pipeline.cli.schedule import current_stages
    from pipeline.config import load_config
    from pipeline.stages import STAGE_NAMES as STAGES

    # The config the runs used (the API judge's settings are part of evaluate's hash), read as `dpo run` reads it.
    assert current_stages(load_config(ROOT / "configs/demo_smoke.yaml", dpo.sets), STAGES) == STAGES


def test_the_judge_key_is_used_but_never_written(judge, run_dir):
    # The key was really there to leak: every request carried it.
    assert judge.count > 0 and all(r["auth"] == f"Bearer {SECRET}" for r in judge.received)
    assert (run_dir / "judge_cache.sqlite").exists()
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    kinds = {p.suffix for p in files}
    assert {".json", ".jsonl", ".parquet", ".md", ".safetensors", ".sqlite"} <= kinds, kinds
    leaked = [str(p.relative_to(run_dir)) for p in files if SECRET.encode() in p.read_bytes()]
    assert leaked == []
    assert len(OUTPUTS) >= 5 and not [out for out in OUTPUTS if SECRET in out]
