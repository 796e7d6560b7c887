"""A new user's first hour, through the `dpo` command as they would type it: a tiny local model made from
their own data (`dpo tiny-model`), a starter config for the data (`dpo init`), a batch size too large for
it refused the moment tokenize finishes, a tokenize that yields nothing refused without committing, then
a run that succeeds with a report that judges nothing it was not told to judge, a model card, and a
terminal that shows our lines and none of Ray's or the libraries'."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.model.locate import has_chat_template
from tests.helpers.tiny import write_pairs

# Every line a quiet `dpo` prints: our log lines, progress, its results, or the error line.
OUR_LINES = re.compile(
    r"^(\d\d:\d\d:\d\d (INFO|WARNING|ERROR) |train step \d+/\d+: |run \S+: |report: |summary: |wrote |dpo: error: )"
)
QUICK = [
    "train.max_steps=2",
    "train.learning_rate=1.0e-3",
    "train.cpus_per_worker=0.5",
    "evaluate.num_prompts=4",
    "evaluate.max_tokens=8",
    "tokenize.max_length=128",
    "tokenize.max_prompt_length=32",
]


def dpo(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=1200
    )


def sets(*overrides: str) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def not_ours(done: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (done.stdout + done.stderr).splitlines() if line.strip() and not OUR_LINES.match(line)]


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("first_hour")
    write_pairs(home / "prefs.jsonl", 48)
    return home


@pytest.fixture(scope="module")
def config(home) -> Path:
    made = dpo(home, "tiny-model", "tiny", "--data", "prefs.jsonl")
    assert made.returncode == 0, made.stderr
    assert (home / "tiny" / "config.json").exists() and has_chat_template(str(home / "tiny"))
    init = dpo(home, "init", "prefs.jsonl", "--model", "tiny")
    assert init.returncode == 0, init.stderr
    assert init.stdout.startswith("wrote prefs.yaml: format standard, 48 rows, loss dpo; next: dpo run")
    written = yaml.safe_load((home / "prefs.yaml").read_text())
    assert written["data"]["format"] == "standard" and written["evaluate"]["judge"] is None
    assert written["train"]["batch_size"] <= 48
    return home / "prefs.yaml"


def test_a_batch_larger_than_the_data_is_refused_when_tokenize_finishes_not_after_score(home, config):
    done = dpo(home, "run", "--config", str(config), *sets(*QUICK, "train.batch_size=64"))
    assert done.returncode == 2, done.stderr
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("dpo: error")]
    assert re.fullmatch(
        r"dpo: error: train: train\.batch_size \(64\) is larger than the \d+ training rows tokenize made; "
        r"set train\.batch_size to at most \d+.*",
        line,
    )
    run = home / "runs" / "prefs"
    assert (run / "tokenize" / "manifest.json").exists() and not (run / "score").exists()
    assert not_ours(done) == []


def test_a_tokenize_that_yields_nothing_fails_naming_its_reasons_and_commits_nothing(home, config):
    run = home / "runs" / "prefs"
    finished = (run / "tokenize" / "manifest.json").read_text()
    # Every prompt here is 3 tokens or more ("review 12:"): 2 leaves no room for any response token.
    done = dpo(home, "tokenize", "--config", str(config), *sets(*QUICK, "tokenize.max_length=2"))
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines()[-1].startswith(
        "dpo: error: tokenize: 48 rows in, 0 out (dropped: {'too_long': 48}); every pair is longer than the "
        "limits: raise tokenize.max_length"
    )
    assert not (run / "tokenize").exists()  # nothing committed
    kept = json.loads(finished)["manifest_hash"]  # the earlier result is kept, not destroyed
    assert (run / "history" / "tokenize" / kept / "manifest.json").read_text() == finished
    assert not_ours(done) == []


def test_a_first_run_on_ones_own_data_judges_nothing_it_was_not_told_to(home, config):
    done = dpo(home, "run", "--config", str(config), *sets(*QUICK, "train.batch_size=8", "train.micro_batch_size=4"))
    assert done.returncode == 0, done.stderr[-3000:]
    run = home / "runs" / "prefs"
    assert "tokenize: put back the result made earlier with these settings" in done.stderr  # from history
    summary = json.loads((run / "evaluate" / "summary.json").read_text())
    assert summary["judge"] is None and summary["reward"] is None
    assert [s["why"] for s in summary["skipped"]] == ["evaluate.judge is not set", "evaluate.reward is not set"]
    assert all(r["win_rate"] is None and r["reward_mean"] is None for r in summary["rows"])
    assert summary["implicit_reward_accuracy"]["pairs"] > 0
    report = (run / "evaluate" / "report.md").read_text()
    assert "- Judge: none. Reward: none. Nothing here is judged" in report.split("## Summary")[0]
    assert "## Samples (T = 0)" in report
    assert "evaluate: win rates (policy vs the reference's samples" in done.stderr  # said in the log too
    card = (run / "train" / "final" / "README.md").read_text()
    assert "# prefs: dpo on prefs.jsonl" in card and "| beta | 0.1 |" in card
    assert "Judge: none; reward: none" in card and "Held-out implicit-reward accuracy" in card
    # Quiet: our lines only; Ray's and the libraries' output is in the run's log file.
    assert not_ours(done) == []
    assert len([line for line in done.stdout.splitlines() if line.startswith("train step ")]) == 2
    log = max((run / "logs").glob("dpo-*.log"), key=lambda p: p.stat().st_mtime)  # this command's
    assert "(RayTrainWorker" in log.read_text()  # the workers' output, kept


def test_verbose_shows_what_quiet_keeps_in_the_log(home, config):
    done = dpo(home, "evaluate", "--config", str(config), "--force", "--verbose", *sets(*QUICK))
    assert done.returncode == 0, done.stderr[-3000:]
    assert not_ours(done) != []  # Ray's own lines, as before
