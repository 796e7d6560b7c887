"""The pipeline's stages, in order, each declared once (`pipeline.stages.base.Stage`).

The CLI, run planning, sweeps, the resource check and submission ids read these declarations; only the
CLI layer and jobs/ import this package.
"""

from __future__ import annotations

from pipeline.config import Config, ConfigError
from pipeline.runtime.resources import Request
from pipeline.stages.base import Stage
from pipeline.stages.evaluate import EVALUATE
from pipeline.stages.score import SCORE
from pipeline.stages.tokenize import TOKENIZE
from pipeline.stages.train import TRAIN

STAGES: tuple[Stage, ...] = (TOKENIZE, SCORE, TRAIN, EVALUATE)
STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)

__all__ = [
    "EVALUATE",
    "SCORE",
    "STAGES",
    "STAGE_NAMES",
    "TOKENIZE",
    "TRAIN",
    "Stage",
    "by_name",
    "cluster_requests",
    "enabled_stages",
]


def by_name(name: str) -> Stage:
    for stage in STAGES:
        if stage.name == name:
            return stage
    raise ConfigError(f"{name}: not a stage (stages: {', '.join(STAGE_NAMES)})")


def enabled_stages(config: Config) -> tuple[Stage, ...]:
    """The stages this config runs, in order (reference-free losses have no score stage)."""
    return tuple(s for s in STAGES if s.enabled(config))


def cluster_requests(config: Config, names: tuple[str, ...] = STAGE_NAMES) -> list[Request]:
    """What the named stages (those this config runs) place on the cluster, for the resource check."""
    return [r for s in STAGES if s.name in names and s.enabled(config) for r in s.requests(config) if r.count > 0]
