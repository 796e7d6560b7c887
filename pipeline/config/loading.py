"""Load a config: one YAML per experiment, `--set a.b=c` overrides on top, checked, frozen; and the
hash of the sections a stage's output depends on."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from pipeline.config.credentials import refuse_credentials_in
from pipeline.config.sections import Config, ConfigError
from pipeline.config.typed_yaml import build


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML file (or start from defaults), apply `a.b=value` overrides, validate, freeze."""
    raw: dict[str, Any] = {}
    if path is not None:
        if not Path(path).is_file():
            raise ConfigError(
                f"--config {path}: no such file (configs/ holds examples; `dpo init <data file>` writes a starter)"
            )
        text = Path(path).read_text()
        raw = yaml.safe_load(text) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form a.b=value")
        _set_path(raw, key.strip().split("."), yaml.safe_load(value))
    run_dir = _absolute(str(raw.get("run_dir", Config.run_dir)).rstrip("/"))
    raw = _interpolate(raw, {"${run_dir}": run_dir})
    config = build(Config, {**raw, "run_dir": run_dir}, prefix="")
    refuse_credentials_in(config.to_dict(), prefix="")
    # Ray workers do not share the driver's working directory: local paths must be absolute.
    model = config.model
    return config.replace(
        data=dataclasses.replace(config.data, path=_absolute(config.data.path, must_exist=True)),
        model=dataclasses.replace(
            model,
            path=_absolute(model.path, must_exist=True),
            ref_path=model.ref_path and _absolute(model.ref_path, must_exist=True),
        ),
    )


def _absolute(path: str, *, must_exist: bool = False) -> str:
    """An absolute local path; URIs and hub ids (which do not exist locally) are left alone."""
    if not path or "://" in path or (must_exist and not Path(path).exists()):
        return path
    return str(Path(path).absolute())


def _interpolate(node: Any, values: dict[str, str]) -> Any:
    """Replace `${run_dir}` in string values, so paths inside a run follow --set run_dir=..."""
    if isinstance(node, dict):
        return {k: _interpolate(v, values) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, values) for v in node]
    if isinstance(node, str):
        for key, value in values.items():
            node = node.replace(key, value)
    return node


def _set_path(tree: dict, keys: list[str], value: Any) -> None:
    for key in keys[:-1]:
        node = tree.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {'.'.join(keys)}: {key} is not a section")
        tree = node
    tree[keys[-1]] = value


# Where and how fast a stage runs, or where it reports, not what it computes: changing these never reruns a
# finished stage.
RESOURCE_FIELDS = (
    "tokenize.num_actors",
    "score.num_actors",
    "score.shard_rows",
    "score.cpus_per_actor",
    "score.gpus_per_actor",
    "train.cpus_per_worker",
    "train.torch_threads",
    "evaluate.max_actors",
    "evaluate.gpus_per_actor",
    "evaluate.vllm_kv_cache_gib",
    "generate.num_actors",
    "generate.gpus_per_actor",
    "generate.vllm_kv_cache_gib",
    "label.num_actors",
    "label.gpus_per_actor",
    "train.report_to",
    "train.tracker_project",
    "train.mlflow_tracking_uri",
    # Resuming reproduces the uninterrupted run, so how often to checkpoint and how often to recover never
    # change what training computes.
    "train.checkpoint_steps",
    "train.max_failures",
)


def section_hash(config: Config, keys: tuple[str, ...]) -> str:
    """A stable hash of the named sections (or dotted fields) of the config, resource fields left out."""
    tree = config.to_dict()
    for field_path in RESOURCE_FIELDS:
        section, name = field_path.split(".")
        tree[section].pop(name, None)
    picked = {}
    for key in keys:
        node: Any = tree
        for part in key.split("."):
            node = node[part]
        picked[key] = node
    blob = json.dumps(picked, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
