"""The config's error type and the checks that more than one section shares (no section lives here)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key's path."""


def check_gpus_per_actor(value: float, *, path: str) -> None:
    """A GPU fraction (several small models share a GPU) or a whole number of GPUs (one model spread over them)."""
    if value <= 0 or (value > 1 and value != int(value)):
        raise ConfigError(f"{path}: {value:g} GPUs; give a fraction up to 1 or a whole number of GPUs")


def check_choice(value: str, choices: tuple[str, ...], *, path: str) -> None:
    """Refuse a value that is not one of `choices`, naming the key and the choices."""
    if value not in choices:
        raise ConfigError(f"{path}: {value!r} is not one of {', '.join(choices)}")


def check_at_least(value: float, least: float, *, path: str) -> None:
    """Refuse a number below `least`, naming the key."""
    if value < least:
        raise ConfigError(f"{path}: {value:g}; must be at least {least:g}")
