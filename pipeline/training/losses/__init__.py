"""Preference losses: pure tensor functions and the one declaration of what each needs.

- `interface`: `PairLogps` / `KtoLogps` in, a `LossOutput` of per-row values out; `Reduction`.
- `ratios`: log-ratios, per-token means, f-DPO's scores: what the paired losses are built from.
- `paired`: losses on the reward margin (dpo, sigmoid_norm, ipo, hinge, robust, exo_pair, discopop, dpop, rpo).
- `anchored`: losses that anchor each response's reward (nca_pair, bco_pair and its running mean,
  sppo_hard, apo_zero, apo_down).
- `transport`: the batch-wise AOT losses (aot, aot_unpaired).
- `reference_free`: simpo, orpo, sft, unlikelihood.
- `kto`: the unpaired loss and its reference point.
- `modifiers`: LD-DPO's length-desensitised log-probs and WPO's pair weights.
- `registry`: `LOSSES` ({name: LossSpec}), TRL's `ALIASES`, and what callers ask of `train.loss`.
- `limits`, `checks`: the keys' ranges and `check_loss_config`, run before anything starts.
- `compute`: `compute_loss` and the one place a loss's rows are reduced (`ChoiceOutput.reduced`).

Imports torch (and pipeline.config) only. The table of every loss is docs/losses.md.
"""

from pipeline.training.losses.anchored import RewardMean
from pipeline.training.losses.compute import ChoiceOutput, compute_loss, denominators
from pipeline.training.losses.interface import KtoLogps, LossOutput, PairLogps, Reduction, StepPairs
from pipeline.training.losses.kto import kto_loss, kto_reference_point
from pipeline.training.losses.loss_config import check_loss_config
from pipeline.training.losses.modifiers import length_desensitised, wpo_weights
from pipeline.training.losses.registry import (
    ALIASES,
    HYPERPARAMETERS,
    LOSSES,
    MODIFIERS,
    LossChoice,
    LossSpec,
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
