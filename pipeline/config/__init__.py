"""Typed, read-only experiment config: one YAML per experiment, `--set a.b=c` overrides on top.

    sections.py     the sections (data, model, tokenize, score, train, evaluate, ray, demo) and their checks
    rounds.py       the sections of on-policy rounds (rounds, generate, label), for `dpo iterate`
    checks.py       ConfigError and the checks several sections share
    typed_yaml.py   a YAML mapping into those dataclasses: unknown keys and wrong types name the key's path
    credentials.py  URIs that carry credentials are refused
    loading.py      load_config, and section_hash: each stage hashes only the sections that change its
                    output (named in the stage's declaration), which is how a finished stage knows it can
                    be skipped

Everything a caller needs is importable from `pipeline.config`.
"""

from pipeline.config.credentials import refuse_credentials
from pipeline.config.loading import RESOURCE_FIELDS, load_config, section_hash
from pipeline.config.rounds import GenerateConfig, LabelConfig, RoundsConfig
from pipeline.config.sections import (
    STRATEGIES,
    Config,
    ConfigError,
    DataConfig,
    DemoConfig,
    EvaluateConfig,
    LoraConfig,
    ModelConfig,
    RayConfig,
    ScoreConfig,
    TokenizeConfig,
    TrainConfig,
    check_gpus_per_actor,
)

__all__ = [
    "RESOURCE_FIELDS",
    "STRATEGIES",
    "Config",
    "ConfigError",
    "DataConfig",
    "DemoConfig",
    "EvaluateConfig",
    "GenerateConfig",
    "LabelConfig",
    "LoraConfig",
    "ModelConfig",
    "RayConfig",
    "RoundsConfig",
    "ScoreConfig",
    "TokenizeConfig",
    "TrainConfig",
    "check_gpus_per_actor",
    "load_config",
    "refuse_credentials",
    "section_hash",
]
