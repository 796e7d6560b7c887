"""A tiny GPT-2 with two faults a test can switch on in its config.json, for the chaos tests.

It is a real model loaded the way users load theirs (remote code, `model.trust_remote_code: true`):

    chaos_sleep_s     every forward pass sleeps this long first, so that a stage lasts long enough for a
                      test to kill one of its processes mid-stage (the numbers it computes are unchanged)
    chaos_kill_token  a forward pass whose input holds this token id SIGKILLs its own process, as an
                      out-of-memory kill or a crashing kernel would: a batch that always kills its actor

Weights, tokenizer and log-probs are those of `tests.helpers.tiny.make_tiny_model_dir` with the same seed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

CODE = """
import os
import signal
import time

from transformers import GPT2Config, GPT2LMHeadModel


class ChaosConfig(GPT2Config):
    model_type = "chaos_gpt2"

    def __init__(self, chaos_sleep_s=0.0, chaos_kill_token=None, **kwargs):
        self.chaos_sleep_s = chaos_sleep_s
        self.chaos_kill_token = chaos_kill_token
        super().__init__(**kwargs)


class ChaosLM(GPT2LMHeadModel):
    config_class = ChaosConfig

    def forward(self, input_ids=None, **kwargs):
        if self.config.chaos_kill_token is not None and input_ids is not None:
            if (input_ids == self.config.chaos_kill_token).any():
                os.kill(os.getpid(), signal.SIGKILL)
        if self.config.chaos_sleep_s:
            time.sleep(self.config.chaos_sleep_s)
        return super().forward(input_ids=input_ids, **kwargs)
"""


def make_chaos_model_dir(base: Path, target: Path, *, sleep_s: float = 0.0, kill_token: int | None = None) -> Path:
    """A copy of the tiny model directory `base` as a ChaosLM with the given faults."""
    shutil.copytree(base, target)
    (target / "chaos_gpt2.py").write_text(CODE)
    config = json.loads((target / "config.json").read_text())
    config.update(
        {
            "model_type": "chaos_gpt2",
            "architectures": ["ChaosLM"],
            "auto_map": {"AutoConfig": "chaos_gpt2.ChaosConfig", "AutoModelForCausalLM": "chaos_gpt2.ChaosLM"},
            "chaos_sleep_s": sleep_s,
            "chaos_kill_token": kill_token,
        }
    )
    (target / "config.json").write_text(json.dumps(config, indent=2))
    return target
