"""`check_loss_config`: the train.* keys the chosen losses read, checked before anything runs.

Every refusal is a ConfigError naming the key to change. The same checks run again in `compute_loss`,
so a loss never trains on a value its declaration refuses.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

from pipeline.config import ConfigError, TrainConfig
from pipeline.training.losses.limits import F_DIVERGENCES, KEY_RANGES
from pipeline.training.losses.registry import HYPERPARAMETERS, LOSSES, LossSpec, choice_of, loss_hyperparameters

log = logging.getLogger(__name__)

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}


def check_values(specs: list[LossSpec], values: Mapping[str, Any]) -> None:
    """Refuse a value in `values` of a key that one of `specs` reads and whose range (the key's, narrowed by
    the loss's `limits`) it is outside; and the modifiers' values (ld_alpha, f_divergence_type). A key
    missing from `values` is left to the loss's own default."""
    for spec in specs:
        for key in sorted(spec.hyperparameters & set(values)):
            allowed = spec.limits.get(key) or KEY_RANGES.get(key)
            value = values[key]
            if allowed is not None and isinstance(value, (int, float)) and not allowed.admits(float(value)):
                raise ConfigError(f"train.{key}: {value!r}; {spec.name} needs {allowed.describe(key)}")
    kind = values.get("f_divergence_type", "reverse_kl")
    if kind not in F_DIVERGENCES:
        raise ConfigError(f"train.f_divergence_type: {kind!r} is not one of {', '.join(F_DIVERGENCES)}")
    ld_alpha = values.get("ld_alpha")
    if ld_alpha is not None and not KEY_RANGES["ld_alpha"].admits(float(ld_alpha)):
        raise ConfigError(f"train.ld_alpha: {ld_alpha!r}; LD-DPO needs {KEY_RANGES['ld_alpha'].describe('ld_alpha')}")


def check_modifiers(specs: list[LossSpec], values: Mapping[str, Any]) -> None:
    """Refuse an option that a loss of the choice cannot take (TRL refuses the same combinations)."""
    names = ", ".join(spec.name for spec in specs)
    modifying = [key for key in ("ld_alpha", "use_weighting") if values.get(key) not in (None, False)]
    if modifying and any(spec.unpaired for spec in specs):
        raise ConfigError(f"train.{modifying[0]}: changes paired losses; {names} trains on unpaired rows")
    if values.get("use_weighting"):
        sorting = [spec.name for spec in specs if spec.batch_wise]
        if sorting:
            raise ConfigError(
                f"train.use_weighting: {', '.join(sorting)} sorts the step's pairs, which would misalign WPO's "
                "per-pair weights; turn one of them off"
            )
    if values.get("f_divergence_type", "reverse_kl") != "reverse_kl":
        # f-DPO's reparameterisation leaves beta log Z(x) behind, which cancels only in a chosen-minus-
        # rejected score: a loss built on the log-ratios otherwise has no f-divergence form.
        lacking = [
            spec.name
            for spec in specs
            if not spec.reference_free and not spec.unpaired and "f_divergence_type" not in spec.hyperparameters
        ]
        if lacking:
            takes = sorted(n for n, s in LOSSES.items() if "f_divergence_type" in s.hyperparameters)
            raise ConfigError(
                f"train.f_divergence_type: {', '.join(lacking)} has no f-divergence form; set reverse_kl, or "
                f"use one of {', '.join(takes)}"
            )


def unread_keys(specs: list[LossSpec], values: Mapping[str, Any]) -> list[str]:
    """The loss keys set to something other than their default that no loss of the choice reads."""
    read = set().union(*(spec.hyperparameters for spec in specs))
    return [
        key
        for key in HYPERPARAMETERS
        if key not in read and key in _DEFAULTS and values.get(key, _DEFAULTS[key]) != _DEFAULTS[key]
    ]


def check_loss_config(train: TrainConfig) -> None:
    """Refuse, with a ConfigError naming the key, a train section whose losses cannot train as configured:
    unknown names, weights that do not match, a value outside what a loss of the choice needs, an
    option the choice cannot take. A loss key set but read by no loss of the choice is only warned about
    (a sweep over losses shares one train section)."""
    specs = [LOSSES[name] for name in choice_of(train)]
    values = loss_hyperparameters(train)
    check_values(specs, values)
    check_modifiers(specs, values)
    unread = unread_keys(specs, values)
    if unread:
        log.warning(
            "train: %s set, but no loss of %s reads %s",
            ", ".join(f"{key}={values[key]!r}" for key in unread),
            "+".join(spec.name for spec in specs),
            "it" if len(unread) == 1 else "them",
        )
