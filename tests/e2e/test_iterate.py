"""`dpo iterate` end to end on tiny models: two on-policy rounds with a reward model as the labeller.

One run directory goes through what a user's does: a first round run alone (then a second round added: the
first is not redone, which is also what a kill between rounds leaves), a run killed inside the second round
and resumed (the second round's finished stages are skipped, the rest done), and the report across rounds
with every round's win rates, reward and KL, also in TensorBoard with the round as the step.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.runtime.storage import RunDir
from tests.helpers.rounds import make_tiny_reward_model_dir, write_prompt_set, write_rounds_config

ROOT = Path(__file__).resolve().parents[2]
ROUND_STAGES = ("generate", "label", "tokenize", "score", "train", "evaluate")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("iterate")
    config = write_rounds_config(
        root / "rounds.yaml",
        run_dir=root / "run",
        prompts=write_prompt_set(root / "prompts.jsonl", 24),
        model=tiny_model_dir,
        reward_model=make_tiny_reward_model_dir(root / "rm"),
    )
    return config, root / "run"


def dpo(config: Path, *args: str, **popen) -> subprocess.Popen:
    """`dpo iterate --config <config> ...` in a session of its own (so a kill takes its local Ray with it)."""
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "iterate", "--config", str(config), *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        **popen,
    )


def finish(process: subprocess.Popen) -> str:
    out, _ = process.communicate(timeout=1800)
    assert process.returncode == 0, out[-4000:]
    return out


def manifests(run_dir: Path, round_index: int) -> dict[str, dict]:
    here = RunDir(str(run_dir / "rounds" / str(round_index)))
    return {stage: m for stage in ROUND_STAGES if (m := here.manifest(stage)) is not None}


@pytest.fixture(scope="module")
def first_round(setup) -> dict[str, dict]:
    config, run_dir = setup
    finish(dpo(config, "--set", "rounds.count=1"))
    return manifests(run_dir, 1)


def test_a_round_runs_every_stage_from_the_policy_before_it(first_round, setup, tiny_model_dir):
    _, run_dir = setup
    assert tuple(first_round) == ROUND_STAGES
    assert first_round["generate"]["policy"] == str(tiny_model_dir)  # round 1 samples from pi_0
    assert first_round["generate"]["completions"] == 8 * 4 and first_round["label"]["completions"] == 32
    assert first_round["train"]["steps"] == 3
    assert (run_dir / "rounds" / "1" / "train" / "final" / "config.json").is_file()
    report = json.loads((run_dir / "rounds_report" / "summary.json").read_text())
    assert sorted({r["round"] for r in report["rows"]}) == [0, 1]


@pytest.fixture(scope="module")
def killed_and_resumed(first_round, setup):
    """Round 2 added; the run killed once round 2's score stage is finished, then run again to the end."""
    config, run_dir = setup
    process = dpo(config)
    scored = run_dir / "rounds" / "2" / "score" / "manifest.json"
    deadline = time.monotonic() + 1800
    while not scored.exists():
        assert process.poll() is None, process.communicate()[0][-4000:]
        assert time.monotonic() < deadline, "round 2's score stage did not finish"
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    at_kill = manifests(run_dir, 2)
    out = finish(dpo(config))
    return at_kill, out


def test_adding_a_round_leaves_the_finished_round_as_it_was(killed_and_resumed, first_round, setup):
    _, run_dir = setup
    assert manifests(run_dir, 1) == first_round  # not redone: the same manifests, to the timestamp


def test_a_run_killed_inside_a_round_resumes_it(killed_and_resumed, setup):
    at_kill, out = killed_and_resumed
    _, run_dir = setup
    assert {"generate", "label", "tokenize", "score"} <= set(at_kill) and "evaluate" not in at_kill
    after = manifests(run_dir, 2)
    assert tuple(after) == ROUND_STAGES
    for stage in at_kill:
        assert after[stage] == at_kill[stage], f"{stage} was redone"
    assert "score: finished already" in out
    # Round 2 sampled from round 1's policy and trained from it.
    assert after["generate"]["policy"].endswith("rounds/1/train/final")


def test_the_report_has_every_rounds_win_rates_reward_and_kl(killed_and_resumed, setup):
    _, run_dir = setup
    rows = json.loads((run_dir / "rounds_report" / "summary.json").read_text())["rows"]
    assert [(r["round"], r["temperature"]) for r in rows] == [(t, temp) for t in (0, 1, 2) for temp in (0.0, 1.0)]
    for row in rows:
        assert row["n"] == 4 * 2 and row["reward_mean"] is not None
        if row["round"] == 0:
            assert abs(row["kl_mean"]) < 1e-3  # pi_0 against itself: zero up to float noise
            assert row["win_rate_vs_initial"] is None
        else:
            for baseline in ("initial", "previous"):
                low, rate, high = (row[f"win_rate_vs_{baseline}{s}"] for s in ("_ci_low", "", "_ci_high"))
                assert 0 <= low <= rate <= high <= 1
    first = [r for r in rows if r["round"] == 1]
    assert all(r["win_rate_vs_initial"] == r["win_rate_vs_previous"] for r in first)  # round 1's previous is pi_0
    report = (run_dir / "rounds_report" / "report.md").read_text()
    assert "| 2 | 1 |" in report and (run_dir / "rounds_report" / "reward_vs_kl.png").stat().st_size > 0


def test_trackers_get_the_round_as_the_step(killed_and_resumed, setup):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run_dir = setup
    rows = json.loads((run_dir / "rounds_report" / "summary.json").read_text())["rows"]
    report = RunDir(str(run_dir)).manifest("rounds_report")
    events = EventAccumulator(str(run_dir / "tensorboard" / f"rounds-{report['config_hash'][:8]}"))
    events.Reload()
    kl = [(e.step, pytest.approx(e.value, abs=1e-6)) for e in events.Scalars("rounds/kl_mean/T1")]
    assert kl == [(r["round"], r["kl_mean"]) for r in rows if r["temperature"] == 1.0]


def test_a_round_past_the_count_is_refused_before_ray_starts(setup):
    config, _ = setup
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "iterate", "--config", str(config), "--from-round", "3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "dpo: error: iterate: --from-round 3: rounds run from 1 to rounds.count=2"
    )
