"""Preference losses: pure tensor functions and the one declaration of what each needs.

- `interface`: `PairLogps` / `KtoLogps` in, a `LossOutput` of per-row values out.
- `ratios`: log-ratios, per-token means, f-DPO's scores: what the paired losses are built from.
- `paired`: losses on the reward margin (dpo, sigmoid_norm, ipo, hinge, robust, exo_pair, discopop, dpop, rpo).
- `anchored`: losses that anchor each response's reward (nca_pair, bco_pair,
  sppo_hard, apo_zero, apo_down).
- `transport`: the batch-wise AOT losses (aot, aot_unpaired).
- `reference_free`: simpo, orpo, sft, unlikelihood.
- `kto`: the unpaired loss and its reference point.
- `modifiers`: LD-DPO's length-desensitised log-probs and WPO's pair weights.
- `loss_spec`: `LossSpec`, one loss's declaration, and `Reduction`; `reward_mean`: BCO's running state.
- `registry`: `LOSSES` ({name: LossSpec}), TRL's `ALIASES`, and what callers ask of `train.loss`.
- `limits`, `loss_config`: the keys' ranges and `check_loss_config`, run before anything starts.
- `compute`: `compute_loss` and the one place a loss's rows are reduced (`ChoiceOutput.reduced`).

The declarations, the registry and the checks import neither torch nor a loss's module: a process that
only asks what a choice needs (the pipeline's driver) never loads torch. The tensor names below
(`compute_loss`, `PairLogps`, ...) are imported from their modules when first asked for. The table of
every loss is docs/losses.md.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from pipeline.training.losses.loss_config import check_loss_config
from pipeline.training.losses.loss_spec import HYPERPARAMETERS, MODIFIERS, LossSpec, Reduction
from pipeline.training.losses.registry import (
    ALIASES,
    LOSSES,
    LossChoice,
    canonical,
    choice_of,
    is_batch_wise,
    is_unpaired,
    loss_hyperparameters,
    loss_specs,
    loss_states,
    loss_weights,
    needs_prefix_logps,
    needs_reference,
    needs_sq_logps,
    reads_rejected,
    register,
)
from pipeline.training.losses.reward_mean import RewardMean

if TYPE_CHECKING:
    from pipeline.training.losses.compute import ChoiceOutput, compute_loss, denominators
    from pipeline.training.losses.interface import KtoLogps, LossOutput, PairLogps, StepPairs
    from pipeline.training.losses.kto import kto_loss, kto_reference_point
    from pipeline.training.losses.modifiers import length_desensitised, wpo_weights

# The names whose modules import torch: {name: module}, imported on first use (PEP 562).
_TENSOR_NAMES = {
    "ChoiceOutput": "compute",
    "compute_loss": "compute",
    "denominators": "compute",
    "KtoLogps": "interface",
    "LossOutput": "interface",
    "PairLogps": "interface",
    "StepPairs": "interface",
    "kto_loss": "kto",
    "kto_reference_point": "kto",
    "length_desensitised": "modifiers",
    "wpo_weights": "modifiers",
}


def __getattr__(name: str) -> Any:
    if name in _TENSOR_NAMES:
        return getattr(importlib.import_module(f"{__name__}.{_TENSOR_NAMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ALIASES",
    "HYPERPARAMETERS",
    "LOSSES",
    "MODIFIERS",
    "ChoiceOutput",
    "KtoLogps",
    "LossChoice",
    "LossOutput",
    "LossSpec",
    "PairLogps",
    "Reduction",
    "RewardMean",
    "StepPairs",
    "canonical",
    "check_loss_config",
    "choice_of",
    "compute_loss",
    "denominators",
    "is_batch_wise",
    "is_unpaired",
    "kto_loss",
    "kto_reference_point",
    "length_desensitised",
    "loss_hyperparameters",
    "loss_specs",
    "loss_states",
    "loss_weights",
    "needs_prefix_logps",
    "needs_reference",
    "needs_sq_logps",
    "reads_rejected",
    "register",
    "wpo_weights",
]
