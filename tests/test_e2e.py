"""End to end: the `dpo` CLI on the shrunk demo config, as a user runs it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).parent.parent
SUMMARY_KEYS = {"model", "temperature", "n", "reward_mean", "kl_mean", "win_rate", "win_rate_ci_low", "win_rate_ci_high"}


def dpo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=900
    )


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("e2e") / "run"


def test_cli_runs_every_stage(run_dir):
    done = dpo("run", "--config", "configs/demo_smoke.yaml", "--set", f"run_dir={run_dir}")
    assert done.returncode == 0, done.stderr[-4000:]
    assert f"report: {run_dir}/evaluate/report.md" in done.stdout
    summary = json.loads((run_dir / "evaluate" / "summary.json").read_text())
    assert {(r["model"], r["temperature"]) for r in summary["rows"]} == {
        (m, t) for m in ("policy", "reference", "best_of_2") for t in (0.0, 1.0)
    }
    for row in summary["rows"]:
        assert SUMMARY_KEYS <= set(row)
        assert row["n"] == summary["num_prompts"] >= 1  # one sample per held-out prompt
        assert -1.0 <= row["reward_mean"] <= 1.0
        assert 0.0 <= row["win_rate_vs_chosen_ci_low"] <= row["win_rate_vs_chosen"] <= row["win_rate_vs_chosen_ci_high"] <= 1.0
    judged = [r for r in summary["rows"] if r["model"] != "reference"]
    assert all(0.0 <= r["win_rate_ci_low"] <= r["win_rate"] <= r["win_rate_ci_high"] <= 1.0 for r in judged)
    best = [r for r in summary["rows"] if r["model"] == "best_of_2"]
    assert all(r["samples_per_answer"] == 2 and r["tokens_per_answer"] > 0 and r["kl_bound"] >= 0 for r in best)
    assert summary["implicit_reward_accuracy"]["pairs"] > 0
    tokenize = json.loads((run_dir / "tokenize" / "manifest.json").read_text())
    assert tokenize["rows_in"] == tokenize["rows_out"] + sum(tokenize["dropped"].values())


def test_rerun_is_a_no_op_and_one_stage_can_be_forced(run_dir):
    before = json.loads((run_dir / "train" / "manifest.json").read_text())
    again = dpo("run", "--config", "configs/demo_smoke.yaml", "--set", f"run_dir={run_dir}")
    assert again.returncode == 0, again.stderr[-4000:]
    assert "every stage finished (tokenize, score, train, evaluate); nothing to do" in again.stdout
    assert json.loads((run_dir / "train" / "manifest.json").read_text()) == before
    forced = dpo("evaluate", "--config", "configs/demo_smoke.yaml", "--set", f"run_dir={run_dir}", "--force")
    assert forced.returncode == 0, forced.stderr[-4000:]
    assert json.loads((run_dir / "train" / "manifest.json").read_text()) == before


def test_unknown_key_fails_before_any_work(run_dir):
    done = dpo("tokenize", "--config", "configs/demo_smoke.yaml", "--set", "train.bta=0.1")
    assert done.returncode != 0
    assert "train.bta: unknown key" in done.stderr


def test_sweep_reuses_one_score_stage_and_yields_a_policy_per_setting(run_dir):
    score_manifest = (run_dir / "score" / "manifest.json").read_text()
    done = dpo("sweep", "--config", "configs/demo_smoke.yaml", "--set", f"run_dir={run_dir}",
               "--set", "train.loss=[dpo,sft]", "--set", "train.cpus_per_worker=0.5")
    assert done.returncode == 0, done.stderr[-4000:]
    assert (run_dir / "score" / "manifest.json").read_text() == score_manifest  # untouched: not recomputed
    for member in ("loss-dpo", "loss-sft"):
        assert (run_dir / "sweep" / member / "train" / "final" / "model.safetensors").exists()
    summary = json.loads((run_dir / "sweep" / "evaluate" / "summary.json").read_text())
    assert {r["model"] for r in summary["rows"]} == {"loss-dpo", "loss-sft", "reference", "best_of_2"}
    assert set(summary["implicit_reward_accuracy"]) == {"loss-dpo", "loss-sft"}
