"""Every loss declared once, with what it needs from the pipeline; every caller asks here.

`train.loss` names one loss, a list of names (TRL's `loss_type`, weighted by `train.loss_weights`) or a
weighted mix such as {"dpo": 1.0, "sft": 0.1} (a `LossChoice`); TRL's names are accepted where ours
differ (`ALIASES`). The pipeline never branches on a loss's name: it asks `needs_reference`,
`is_unpaired`, `reads_rejected`, `is_batch_wise`, `loss_states`, `needs_prefix_logps` and
`needs_sq_logps` of the choice; `pipeline.training.losses.loss_config.check_loss_config` checks the keys up
front and `pipeline.training.losses.compute.compute_loss` runs the losses.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import ConfigError, TrainConfig
from pipeline.training.losses import anchored, kto, paired, reference_free, transport
from pipeline.training.losses.interface import LossOutput, Reduction
from pipeline.training.losses.limits import Range

LossChoice = str | Sequence[str] | Mapping[str, float]  # train.loss: a name, names (with loss_weights), {name: weight}

# The train.* keys a loss may take as keyword parameters. Each loss takes only those its signature
# names, with its own defaults, so one config carries gamma for simpo and alpha for orpo.
HYPERPARAMETERS = (
    "beta",
    "label_smoothing",
    "gamma",
    "alpha",
    "desirable_weight",
    "undesirable_weight",
    "discopop_tau",
    "dpop_lambda",
    "f_divergence_type",
    "f_alpha_divergence_coef",
)
# The train.* keys that change every paired loss of a choice, applied by compute_loss (modifiers.py).
MODIFIERS = ("ld_alpha", "use_weighting")

# TRL's loss_type names where ours differ: a TRL user's settings carry over.
ALIASES = {"sigmoid": "dpo"}


@functools.cache
def _params_of(fn: Callable[..., LossOutput]) -> frozenset[str]:
    """Keyword parameters of fn, its batch left out (cached: inspect is slow next to a training step)."""
    params = inspect.signature(fn).parameters
    return frozenset(name for name, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY)


@dataclass(frozen=True)
class LossSpec:
    """One loss: its function and what it needs.

    fn(batch, **hyperparameters) -> LossOutput of per-row values; batch is a KtoLogps when `unpaired`,
    else a PairLogps.
    reference_free: fn never reads ref_*; when every loss in use is, the score stage is skipped.
    unpaired: trains on single labelled completions (KTO); such a loss is never mixed with others.
    reads_rejected: fn reads the rejected response; when no loss in use does, the trainer skips its
    forward pass.
    batch_wise: fn compares rows with each other (AOT sorts them), so it gets the whole optimizer step's
    pairs (`PairLogps.step`, gathered over workers and micro-batches) beside its own rows.
    state: the type of a running state fn takes as `state=` (BCO's reward mean), None for none; it
    starts as `state()`, is updated after each step from the loss's `state_sums`, and is checkpointed.
    reduction: how the step's per-row values become the loss that trains (`Reduction`).
    limits: ranges of a train.* key that this loss needs beyond the key's own (checks.py).
    trl: whether TRL 1.16 ships this loss (under its own name or an alias), for the docs' table.
    """

    name: str
    fn: Callable[..., LossOutput]
    reference_free: bool = False
    unpaired: bool = False
    reads_rejected: bool = True
    batch_wise: bool = False
    state: type | None = None
    reduction: Reduction = Reduction.ROWS
    limits: Mapping[str, Range] = field(default_factory=dict)
    trl: bool = False

    def __post_init__(self) -> None:
        unknown = sorted(self.hyperparameters - set(HYPERPARAMETERS))
        if unknown:
            raise ValueError(
                f"loss {self.name!r} takes {', '.join(unknown)}, which no train.* key sets "
                f"(a loss may take: {', '.join(HYPERPARAMETERS)})"
            )
        if (self.state is not None) != ("state" in _params_of(self.fn)):
            raise ValueError(f"loss {self.name!r}: declare state= exactly when its function takes state=")

    @property
    def hyperparameters(self) -> frozenset[str]:
        """The train.* keys this loss reads: the keyword parameters of fn (its running state aside)."""
        return _params_of(self.fn) - {"state"}


LIMITS = {
    "robust": {"label_smoothing": Range(0.0, 0.5, high_open=True, why="it divides by 1 - 2 label_smoothing")},
    "exo_pair": {
        "label_smoothing": Range(0.0, 1.0, low_open=True, high_open=True, why="EXO's epsilon; the paper uses 1e-3")
    },
}

LOSSES: dict[str, LossSpec] = {
    spec.name: spec
    for spec in (
        LossSpec("dpo", paired.dpo_loss, trl=True),
        LossSpec("sigmoid_norm", paired.sigmoid_norm_loss, trl=True),
        LossSpec("ipo", paired.ipo_loss, trl=True),
        LossSpec("hinge", paired.hinge_loss, trl=True),
        LossSpec("robust", paired.robust_loss, limits=LIMITS["robust"], trl=True),
        LossSpec("exo_pair", paired.exo_pair_loss, limits=LIMITS["exo_pair"], trl=True),
        LossSpec("discopop", paired.discopop_loss, trl=True),
        LossSpec("dpop", paired.dpop_loss),
        LossSpec("rpo", paired.rpo_loss),
        LossSpec("nca_pair", anchored.nca_pair_loss, trl=True),
        LossSpec("bco_pair", anchored.bco_pair_loss, state=anchored.RewardMean, trl=True),
        LossSpec("sppo_hard", anchored.sppo_hard_loss, trl=True),
        LossSpec("apo_zero", anchored.apo_zero_loss, trl=True),
        LossSpec("apo_down", anchored.apo_down_loss, trl=True),
        LossSpec("aot", transport.aot_loss, batch_wise=True, trl=True),
        LossSpec("aot_unpaired", transport.aot_unpaired_loss, batch_wise=True, trl=True),
        LossSpec("simpo", reference_free.simpo_loss, reference_free=True),
        LossSpec("orpo", reference_free.orpo_loss, reference_free=True),
        LossSpec(
            "sft",
            reference_free.sft_loss,
            reference_free=True,
            reads_rejected=False,
            reduction=Reduction.CHOSEN_TOKENS,
            trl=True,
        ),
        LossSpec("unlikelihood", reference_free.unlikelihood_loss, reference_free=True),
        LossSpec("kto", kto.kto_loss, unpaired=True, reads_rejected=False),
    )
}


def register(spec: LossSpec) -> LossSpec:
    """Add a loss to LOSSES under spec.name, which must be new; returns spec."""
    if spec.name in LOSSES or spec.name in ALIASES:
        raise ValueError(f"a loss named {spec.name!r} is registered already")
    LOSSES[spec.name] = spec
    return spec


def canonical(name: str) -> str:
    """Our name of a loss given by ours or by TRL's (`ALIASES`)."""
    return ALIASES.get(name, name)


def _named_weights(loss: LossChoice, weights: Sequence[float] | None) -> list[tuple[str, float]]:
    if isinstance(loss, str):
        loss = [loss]
    if isinstance(loss, Mapping):
        if weights is not None:
            raise ConfigError(
                "train.loss_weights: train.loss is a mapping {name: weight} already; "
                "give the weights there or list the names"
            )
        return [(str(k), float(v)) for k, v in loss.items()]
    names = [str(name) for name in loss]
    if weights is not None and len(weights) != len(names):
        raise ConfigError(
            f"train.loss_weights: {len(weights)} weights for {len(names)} losses ({', '.join(names)}); give one each"
        )
    return list(zip(names, [1.0] * len(names) if weights is None else [float(w) for w in weights]))


def loss_weights(loss: LossChoice, weights: Sequence[float] | None = None) -> dict[str, float]:
    """train.loss (with train.loss_weights) as {our name: weight}, in the order given.

    Names are checked against LOSSES and ALIASES; an unpaired loss stands alone; a name may appear once
    (an alias and its loss are the same name); at most one loss keeps a running state. A choice that
    cannot be trained raises ConfigError (a ValueError) naming the key.
    """
    pairs = _named_weights(loss, weights)
    if not pairs:
        raise ConfigError("train.loss is empty; name at least one loss")
    unknown = [name for name, _ in pairs if canonical(name) not in LOSSES]
    if unknown:
        known = sorted([*LOSSES, *ALIASES])
        raise ConfigError(f"train.loss: unknown loss {', '.join(map(repr, unknown))}; known losses: {', '.join(known)}")
    out: dict[str, float] = {}
    for name, weight in pairs:
        if canonical(name) in out:
            raise ConfigError(f"train.loss: {name!r} is named twice ({canonical(name)!r}); name each loss once")
        out[canonical(name)] = weight
    unpaired = [name for name in out if LOSSES[name].unpaired]
    if unpaired and len(out) > 1:
        raise ConfigError(
            f"train.loss: {', '.join(unpaired)} trains on unpaired rows and cannot be mixed with paired losses "
            f"({', '.join(out)})"
        )
    stateful = [name for name in out if LOSSES[name].state is not None]
    if len(stateful) > 1:
        raise ConfigError(f"train.loss: {', '.join(stateful)} each keep a running state; mix at most one of them")
    return out


def choice_of(train: TrainConfig) -> dict[str, float]:
    """`loss_weights` of a train section."""
    return loss_weights(train.loss, train.loss_weights)


def loss_specs(loss: LossChoice) -> list[LossSpec]:
    """The declarations of the losses in a choice, in its order."""
    return [LOSSES[name] for name in loss_weights(loss)]


def needs_reference(loss: LossChoice) -> bool:
    """True unless every loss in the choice is reference-free: then no reference log-probs are scored."""
    return not all(spec.reference_free for spec in loss_specs(loss))


def is_unpaired(loss: LossChoice) -> bool:
    """True for a loss that trains on unpaired (prompt, completion, label) rows (KTO)."""
    return any(spec.unpaired for spec in loss_specs(loss))


def reads_rejected(loss: LossChoice) -> bool:
    """True when some loss in the choice reads the rejected response's log-probs."""
    return any(spec.reads_rejected for spec in loss_specs(loss))


def is_batch_wise(loss: LossChoice) -> bool:
    """True when some loss in the choice needs the whole step's pairs (AOT)."""
    return any(spec.batch_wise for spec in loss_specs(loss))


def loss_states(loss: LossChoice) -> dict[str, Any]:
    """The initial running state of each loss in the choice that keeps one: {name: state}."""
    return {spec.name: spec.state() for spec in loss_specs(loss) if spec.state is not None}


def needs_prefix_logps(train: TrainConfig) -> bool:
    """True when training reads each response's log-prob over its first min(len_w, len_l) tokens (LD-DPO):
    the score stage then writes the reference's, as ref_{chosen,rejected}_prefix_logps."""
    return train.ld_alpha is not None


def needs_sq_logps(train: TrainConfig) -> bool:
    """True when training reads the policy's sum of log sum_v pi(v)^2 over each response (WPO's weights)."""
    return train.use_weighting


def loss_hyperparameters(train: TrainConfig) -> dict[str, Any]:
    """The train section's loss hyperparameters and modifiers, as `compute_loss` takes them."""
    return {name: getattr(train, name) for name in (*HYPERPARAMETERS, *MODIFIERS)}
