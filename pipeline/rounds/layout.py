"""Where each round lives and the config each of its stages runs with (pure: no Ray, no I/O).

Round t (1-based) lives under `<run_dir>/rounds/<t>/`. It samples from pi_{t-1} and trains from it: pi_0 is
`model.path`, pi_t is `<run_dir>/rounds/<t>/train/final`. Its pairs are scored under the reference
`rounds.reference` names: initial (pi_0's reference, `model.ref_path` or `model.path`) or previous
(pi_{t-1}). Round 0 holds only an evaluate stage: pi_0's samples, the baseline every round is judged against.

A round's tokenize, score and train stages are the pipeline's own, run with `round_config`: the round's run
directory, its label stage's `scored` rows as the data (no held-out split: the rounds hold prompts out
before sampling), pi_{t-1} as the model and the round's reference as `model.ref_path`.
"""

from __future__ import annotations

import dataclasses
import hashlib

from pipeline.config import Config, DemoConfig

ROUNDS_DIR = "rounds"
FINAL = "train/final"  # a round's policy, under its directory


def round_dir(config: Config, round_index: int) -> str:
    """The directory of round `round_index` (0: pi_0's evaluation only)."""
    return f"{config.run_dir}/{ROUNDS_DIR}/{round_index}"


def policy(config: Config, round_index: int) -> str:
    """pi_t: `model.path` for t = 0, else round t's exported policy."""
    return config.model.path if round_index == 0 else f"{round_dir(config, round_index)}/{FINAL}"


def reference(config: Config, round_index: int) -> str:
    """The reference round `round_index` scores its pairs under (see the module docstring)."""
    if config.rounds.reference == "initial":
        return config.model.reference
    return policy(config, round_index - 1)


def round_config(config: Config, round_index: int) -> Config:
    """The config round `round_index`'s generate, label, tokenize, score and train stages run with."""
    if round_index < 1:
        raise ValueError(f"rounds count from 1, got {round_index}")
    here = round_dir(config, round_index)
    data = dataclasses.replace(
        config.data,
        path=f"{here}/label/scored",
        format="scored",
        columns={},
        split=None,
        eval_split=None,
        eval_fraction=0.0,
    )
    model = dataclasses.replace(
        config.model, path=policy(config, round_index - 1), ref_path=reference(config, round_index)
    )
    return config.replace(run_dir=here, data=data, model=model, demo=DemoConfig())


def evaluate_config(config: Config, round_index: int) -> Config:
    """The config of round `round_index`'s evaluate: the run's own (pi_0 is `model`), in the round's directory."""
    return config.replace(run_dir=round_dir(config, round_index), demo=DemoConfig())


def chain_hash(*parts: object) -> str:
    """A stable hash of what ties a stage to the work before it (manifest hashes, the round, a policy)."""
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:16]
