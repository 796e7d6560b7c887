"""A train stage killed after a checkpoint resumes from it, and ends where an uninterrupted run ends."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import write_pairs

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).parent.parent


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "train" / "metrics.jsonl").read_text().splitlines()]


def test_killed_training_resumes_and_matches_the_uninterrupted_run(tmp_path, tiny_model_dir):
    data = write_pairs(tmp_path / "pairs.jsonl", 80)
    settings = {
        "demo.enabled": "false", "data.path": data, "model.path": tiny_model_dir, "data.eval_fraction": "0.0",
        "train.learning_rate": "1e-3", "train.max_steps": "60", "train.checkpoint_steps": "5",
        "train.batch_size": "8", "train.micro_batch_size": "8", "train.cpus_per_worker": "0.5", "ray.num_cpus": "2",
    }
    common = ["--config", str(ROOT / "configs" / "demo_smoke.yaml")]
    for key, value in settings.items():
        common += ["--set", f"{key}={value}"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    for stage in ("tokenize", "score"):
        done = cli(stage, *common, "--set", f"run_dir={straight}")
        assert done.returncode == 0, done.stderr[-3000:]
    shutil.copytree(straight, killed)  # the same data for both; manifests hash contents, not the folder

    done = cli("train", *common, "--set", f"run_dir={straight}")  # the uninterrupted run
    assert done.returncode == 0, done.stderr[-3000:]

    # The same run, killed after its first checkpoint: driver, its local Ray and the workers, all at once.
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "train", *common, "--set", f"run_dir={killed}"],
                            cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list((killed / "train.work").rglob("step-*")):
        assert proc.poll() is None, "training ended before its first checkpoint was seen"
        assert time.time() < deadline, "no checkpoint within 5 minutes"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "train" / "manifest.json").exists()  # killed before it finished

    resumed = cli("train", *common, "--set", f"run_dir={killed}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    first, second = metrics(straight), metrics(killed)
    assert [m["step"] for m in second] == list(range(1, 61))
    assert second[0]["step"] == 1  # the history before the kill came back with the checkpoint
    for a, b in zip(first, second):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["rewards/margins"] - b["rewards/margins"]) < 1e-5
