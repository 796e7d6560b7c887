"""Preference losses: pure tensor functions and the one declaration of what each needs.

- `interface`: `PairLogps` / `KtoLogps` in, `LossOutput` out.
- `paired`: the paired losses (dpo, ipo, hinge, robust, rpo, simpo, orpo, sft, unlikelihood).
- `kto`: the unpaired loss and its reference point.
- `registry`: `LOSSES` ({name: LossSpec}) and what callers ask of `train.loss`: `loss_weights`,
  `needs_reference`, `is_unpaired`, `reads_rejected`, and `compute_loss`.

Imports torch (and pipeline.config) only.
"""

from pipeline.training.losses.interface import KtoLogps, LossOutput, PairLogps
from pipeline.training.losses.kto import kto_loss, kto_reference_point
from pipeline.training.losses.paired import (
    dpo_loss,
    hinge_loss,
    ipo_loss,
    orpo_loss,
    robust_loss,
    rpo_loss,
    sft_loss,
    simpo_loss,
    unlikelihood_loss,
)
from pipeline.training.losses.registry import (
    HYPERPARAMETERS,
    LOSSES,
    LossChoice,
    LossSpec,
    compute_loss,
    is_unpaired,
    loss_hyperparameters,
    loss_specs,
    loss_weights,
    needs_reference,
    reads_rejected,
    register,
)

__all__ = [
    "HYPERPARAMETERS",
    "LOSSES",
    "KtoLogps",
    "LossChoice",
    "LossOutput",
    "LossSpec",
    "PairLogps",
    "compute_loss",
    "dpo_loss",
    "hinge_loss",
    "ipo_loss",
    "is_unpaired",
    "kto_loss",
    "kto_reference_point",
    "loss_hyperparameters",
    "loss_specs",
    "loss_weights",
    "needs_reference",
    "orpo_loss",
    "reads_rejected",
    "register",
    "robust_loss",
    "rpo_loss",
    "sft_loss",
    "simpo_loss",
    "unlikelihood_loss",
]
