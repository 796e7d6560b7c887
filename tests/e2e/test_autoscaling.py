"""The pipeline on an autoscaling cluster: Ray's fake autoscaler adds the nodes the stages ask for, and takes
them away once idle.

The head has no CPUs and no GPUs; one worker type of 2 CPUs goes from 0 to 2 nodes. `dpo run` (tokenize,
score, train, evaluate) joins it as a driver would under `ray job submit`, with RAYDPO_AUTOSCALING=1 as
cluster.yaml sets it: nothing can run until the autoscaler starts a node, which it does for the stages'
pending work and their `request_resources`. A watcher on the cluster notes the worker nodes alive each
second. See tests/helpers/fake_autoscaler.py for how the head is started and stopped (never `ray stop`).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.runtime.storage import RunDir
from tests.helpers.fake_autoscaler import FakeAutoscalingHead, NodeWatch
from tests.helpers.tiny import write_pairs

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "configs" / "demo_smoke.yaml"
IDLE_TIMEOUT_S = 20.0
STAGES = ("tokenize", "score", "train", "evaluate")


@pytest.fixture(scope="module")
def cluster():
    """The head, up and alone. On a loaded machine `ray start` may give up waiting for its own raylet (Ray
    allows it 30 s): it is started again, up to three times, before the test fails saying why."""
    failures = []
    for _ in range(3):
        head = FakeAutoscalingHead(worker_cpus=2, max_workers=2, idle_timeout_s=IDLE_TIMEOUT_S)
        watch = NodeWatch(head)
        up = watch.wait(lambda workers: workers == 0, timeout=180, alive=head.running)
        if up:
            break
        failures.append(head.start_log())
        watch.stop()
        head.stop()
    else:
        pytest.fail("the head did not come up alone in three tries:\n" + "\n---\n".join(failures))
    try:
        yield head, watch
    finally:
        watch.stop()
        head.stop()


def test_the_pipeline_runs_on_nodes_the_autoscaler_adds_and_they_go_away_when_idle(cluster, tmp_path, tiny_model_dir):
    head, watch = cluster
    data = write_pairs(tmp_path / "pairs.jsonl", 40)
    sets = [
        f"run_dir={tmp_path / 'run'}",
        "demo.enabled=false",
        f"data.path={data}",
        f"model.path={tiny_model_dir}",
        "data.eval_fraction=0.25",
        "tokenize.max_prompt_length=16",
        "tokenize.max_length=64",
        "score.batch_size=8",
        "train.max_steps=2",
        "train.batch_size=4",
        "train.micro_batch_size=2",
        "train.report_to=[]",
        "evaluate.num_prompts=2",
        "evaluate.temperatures=[1.0]",
        "evaluate.max_tokens=4",
        "evaluate.best_of_n=0",
        "evaluate.judge_vs_chosen=false",
        "evaluate.bootstrap_samples=20",
    ]
    run = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "run", "--config", str(SMOKE), *(f"--set={s}" for s in sets)],
        cwd=ROOT,
        env={**head.env, "RAY_ADDRESS": head.address, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=1500,
    )
    output = (run.stdout + run.stderr)[-4000:]
    assert run.returncode == 0, f"{output}\n--- autoscaler:\n{head.monitor_log()}"
    added = max(sample["workers"] for sample in watch.samples)
    assert 1 <= added <= 2, watch.samples  # the autoscaler added nodes, and no more than its maximum
    run_dir = RunDir(str(tmp_path / "run"))
    assert all(run_dir.manifest(stage) is not None for stage in STAGES)
    # Idle nodes go: within the idle timeout and a few autoscaler rounds, the head is alone again.
    gone = watch.wait(lambda workers: workers == 0, timeout=IDLE_TIMEOUT_S + 120)
    assert gone, f"worker nodes still alive: {watch.workers()}\n--- autoscaler:\n{head.monitor_log()}"
