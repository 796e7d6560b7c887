"""Build a frozen dataclass from a YAML mapping, checking every key and type on the way.

Unknown keys are errors naming the key's path (`train.bta: unknown key`), so a typo never silently
falls back to a default; a renamed key names its new name.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Union

from pipeline.config.sections import ConfigError

# Keys whose name changed: an old config fails naming the new key instead of "unknown key".
RENAMED_KEYS = {"chunked_logprobs": "chunked_logps", "logprob_chunk_size": "logps_chunk_size"}


def build(cls, raw: Any, *, prefix: str):
    where = prefix.rstrip(".") or "the config"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    for key in unknown:
        if key in RENAMED_KEYS:
            raise ConfigError(f"{prefix}{key}: renamed to {prefix}{RENAMED_KEYS[key]}")
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key (known: {', '.join(sorted(names))})")
    values = {}
    for name in names & set(raw):
        values[name] = coerce(hints[name], raw[name], path=f"{prefix}{name}")
    return cls(**values)


def coerce(hint, value, *, path: str):
    if hint is Any:
        return value  # checked by the code that owns the section (e.g. ApiJudgeConfig)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, prefix=f"{path}.")
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None:
            if type(None) in options:
                return None
            raise ConfigError(f"{path}: must not be null")
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return coerce(option, value, path=path)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[-1] if len(errors) == 1 else f"{path}: {value!r} fits none of {hint}")
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return [coerce(item, v, path=f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        key_type, item = typing.get_args(hint)
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return {coerce(key_type, k, path=path): coerce(item, v, path=f"{path}.{k}") for k, v in value.items()}
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):
            # YAML 1.1 reads `1e-6` (no dot) as a string; it is the usual way to write a learning rate.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported type {hint}")
