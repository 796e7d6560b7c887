"""Rewards and judges by name: what `evaluate.reward` and `evaluate.judge` refer to.

A task plugs its own in as Python entry points, declared in its package's pyproject.toml under the groups
raydpo.rewards (an entry is a reward: texts -> one float each) and raydpo.judges (an entry takes the
evaluate config section and returns a Judge); the demo task's are there. Evaluation finds them by name
and never imports a task. The API judge is evaluation's own: "api", set up by `evaluate.judge_api`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from typing import Any

import numpy as np

from pipeline.config import ConfigError, EvaluateConfig
from pipeline.evaluation.api_judge import make_api_judge
from pipeline.evaluation.judges import Judge

REWARD_GROUP = "raydpo.rewards"
JUDGE_GROUP = "raydpo.judges"
API_JUDGE = "api"

# A task reward: texts (prompt + completion) -> float64 array of shape (len(texts),).
Reward = Callable[[Sequence[str]], np.ndarray]
# A judge entry point: the evaluate config section -> a Judge.
JudgeFactory = Callable[[EvaluateConfig], Judge]


def make_reward(name: str | None, *, setting: str = "evaluate.reward") -> Reward | None:
    """The reward registered under `name`; None for None (a task without a reward). `setting`: the key that
    names it, for the error an unknown name raises."""
    if name is None:
        return None
    return _load(REWARD_GROUP, name, setting=setting, kind="reward", builtin=(), none_allowed=True)


def make_judge(evaluate_config: EvaluateConfig, *, api_cache_path: str | None = None) -> Judge | None:
    """The judge `evaluate_config.judge` names: "api" (configured by `judge_api`) or a registered one;
    None when it names none (no win rates are judged).

    api_cache_path: the API judge's response cache where `judge_api` does not name one.
    """
    name = evaluate_config.judge
    if name is None:
        return None
    if name == API_JUDGE:
        return make_api_judge(evaluate_config.judge_api, where="evaluate.judge_api", default_cache_path=api_cache_path)
    factory: JudgeFactory = _load(JUDGE_GROUP, name, setting="evaluate.judge", kind="judge", builtin=(API_JUDGE,))
    return factory(evaluate_config)


def check_judge(evaluate_config: EvaluateConfig, *, section: str = "evaluate") -> None:
    """Refuse what `make_judge` would refuse (an unknown name, API judge settings that do not parse)
    without building a task's judge: the check that runs before any stage does. `section`: where the
    judge's keys are (evaluate, or label for the rounds' judge labeller), for the messages. Settings for the
    API judge under another judge (or none) are refused too: they would be ignored without a word."""
    if evaluate_config.judge_api and evaluate_config.judge != API_JUDGE:
        raise ConfigError(
            f"{section}.judge_api is set but {section}.judge is {evaluate_config.judge or 'not set'}; "
            f"set {section}.judge: {API_JUDGE} to judge with it, or remove {section}.judge_api"
        )
    if evaluate_config.judge is None:
        return
    if evaluate_config.judge == API_JUDGE:
        make_api_judge(evaluate_config.judge_api, where=f"{section}.judge_api")  # settings only: no request, no cache
    else:
        _load(JUDGE_GROUP, evaluate_config.judge, setting=f"{section}.judge", kind="judge", builtin=(API_JUDGE,))


def registered(group: str) -> list[str]:
    """The names registered in an entry point group, sorted."""
    return sorted({ep.name for ep in entry_points(group=group)})


def _load(group: str, name: str, *, setting: str, kind: str, builtin: Sequence[str], none_allowed: bool = False) -> Any:
    """The object registered as `name` in `group`; a ValueError naming `setting` and the known names if
    there is none, or if installed packages register different objects under that name (a ConfigError:
    the user's to fix)."""
    targets = {ep.value: ep for ep in entry_points(group=group, name=name)}
    if not targets:
        known = ", ".join(sorted({*registered(group), *builtin})) or "none"
        raise ConfigError(
            f"{setting}: unknown {kind} {name!r} (known: {known}{'; null for none' if none_allowed else ''})"
        )
    if len(targets) > 1:
        raise ConfigError(
            f"{setting}: {kind} {name!r} is registered more than once ({', '.join(sorted(targets))}) "
            f"in the entry point group {group}"
        )
    (entry,) = targets.values()
    return entry.load()
