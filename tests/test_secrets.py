"""The judge's API key never lands in a run: not in manifests, logs, reports, caches, JSONL or Parquet bytes.

One small `dpo run` on the tiny model (sft: no score stage, to keep it short), evaluated by the API judge
against the scripted loopback server of tests/test_api_judge.py, with the key planted in the environment;
then every file under the run directory (checkpoints and Ray Train's own state included) and the command's
output are searched for it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import write_pairs
from tests.test_api_judge import KEY_ENV, SECRET, TEMPLATE, FakeChatServer

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).parent.parent


def test_the_judge_key_is_used_but_never_written(tmp_path, tiny_model_dir):
    server = FakeChatServer()
    server.always = "The first one reads better.\nPreferred: A"  # the tiny model's texts need no real judging
    run_dir = tmp_path / "run"
    config = tmp_path / "secret_test.yaml"
    config.write_text(json.dumps({  # JSON is YAML
        "run_dir": str(run_dir),
        "data": {"path": str(write_pairs(tmp_path / "pairs.jsonl", 24)), "eval_fraction": 0.25},
        "model": {"path": str(tiny_model_dir)},
        "tokenize": {"max_prompt_length": 16, "max_length": 40},
        "train": {"loss": "sft", "learning_rate": 1e-3, "max_steps": 2, "checkpoint_steps": 1, "batch_size": 4,
                  "micro_batch_size": 4, "cpus_per_worker": 0.5},
        "evaluate": {"num_prompts": 3, "temperatures": [1.0], "max_tokens": 6, "bootstrap_samples": 50,
                     "judge": "api",
                     "judge_api": {"base_url": server.url, "model": "judge-model", "api_key_env": KEY_ENV,
                                   "prompt_template": TEMPLATE, "max_retries": 1, "backoff_base_s": 0.01,
                                   "cache_path": "${run_dir}/judge_cache.sqlite"}},
        "ray": {"num_cpus": 2},
    }))
    try:
        done = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "--config", str(config)], cwd=ROOT,
                              env={**os.environ, KEY_ENV: SECRET}, capture_output=True, text=True, timeout=600)
    finally:
        server.close()
    assert done.returncode == 0, done.stderr[-4000:]
    # The key was really there to leak: every request carried it.
    assert server.count > 0 and all(r["auth"] == f"Bearer {SECRET}" for r in server.received)
    assert json.loads((run_dir / "evaluate" / "summary.json").read_text())["judge"] == "api"
    assert (run_dir / "judge_cache.sqlite").exists()

    files = [p for p in run_dir.rglob("*") if p.is_file()]
    kinds = {p.suffix for p in files}
    assert {".json", ".jsonl", ".parquet", ".md", ".safetensors", ".sqlite"} <= kinds, kinds
    leaked = [str(p.relative_to(run_dir)) for p in files if SECRET.encode() in p.read_bytes()]
    assert leaked == []
    assert SECRET not in done.stdout + done.stderr
