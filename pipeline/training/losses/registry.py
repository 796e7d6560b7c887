"""Every loss declared once, with what it needs from the pipeline; every caller asks here.

`train.loss` names one loss, a list of names (TRL's `loss_type`, weighted by `train.loss_weights`) or a
weighted mix such as {"dpo": 1.0, "sft": 0.1} (a `LossChoice`); TRL's names are accepted where ours
differ (`ALIASES`). The pipeline never branches on a loss's name: it asks `needs_reference`,
`is_unpaired`, `reads_rejected`, `is_batch_wise`, `loss_states`, `needs_prefix_logps` and
`needs_sq_logps` of the choice; `pipeline.training.losses.loss_config.check_loss_config` checks the keys up
front and `pipeline.training.losses.compute.compute_loss` runs the losses.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pipeline.config import ConfigError, TrainConfig
from pipeline.training.losses.limits import Range
from pipeline.training.losses.loss_spec import HYPERPARAMETERS, MODIFIERS, LossSpec, Reduction
from pipeline.training.losses.reward_mean import RewardMean

LossChoice = str | Sequence[str] | Mapping[str, float]  # train.loss: a name, names (with loss_weights), {name: weight}

# TRL's loss_type names where ours differ: a TRL user's settings carry over.
ALIASES = {"sigmoid": "dpo"}

LIMITS = {
    "robust": {"label_smoothing": Range(0.0, 0.5, high_open=True, why="it divides by 1 - 2 label_smoothing")},
    "exo_pair": {
        "label_smoothing": Range(0.0, 1.0, low_open=True, high_open=True, why="EXO's epsilon; the paper uses 1e-3")
    },
}

# The keyword parameters of our losses, as their signatures name them (each is checked against its
# signature when it loads, and every one by tests/unit/test_loss_registry.py).
BETA = ("beta",)
F_DPO = ("beta", "f_divergence_type", "f_alpha_divergence_coef")
SMOOTHED = ("beta", "label_smoothing")


def _ours(where: str) -> str:
    """This package's "module.function" as the "pipeline.training.losses.module:function" that LossSpec loads."""
    module, _, function = where.rpartition(".")
    return f"pipeline.training.losses.{module}:{function}"


LOSSES: dict[str, LossSpec] = {
    spec.name: spec
    for spec in (
        LossSpec("dpo", _ours("paired.dpo_loss"), (*F_DPO, "label_smoothing"), trl=True),
        LossSpec("sigmoid_norm", _ours("paired.sigmoid_norm_loss"), F_DPO, trl=True),
        LossSpec("ipo", _ours("paired.ipo_loss"), F_DPO, trl=True),
        LossSpec("hinge", _ours("paired.hinge_loss"), F_DPO, trl=True),
        LossSpec("robust", _ours("paired.robust_loss"), (*F_DPO, "label_smoothing"), limits=LIMITS["robust"], trl=True),
        LossSpec(
            "exo_pair", _ours("paired.exo_pair_loss"), (*F_DPO, "label_smoothing"), limits=LIMITS["exo_pair"], trl=True
        ),
        LossSpec("discopop", _ours("paired.discopop_loss"), (*F_DPO, "discopop_tau"), trl=True),
        LossSpec("dpop", _ours("paired.dpop_loss"), ("beta", "dpop_lambda")),
        LossSpec("rpo", _ours("paired.rpo_loss"), (*SMOOTHED, "alpha")),
        LossSpec("nca_pair", _ours("anchored.nca_pair_loss"), BETA, trl=True),
        LossSpec("bco_pair", _ours("anchored.bco_pair_loss"), BETA, state=RewardMean, trl=True),
        LossSpec("sppo_hard", _ours("anchored.sppo_hard_loss"), BETA, trl=True),
        LossSpec("apo_zero", _ours("anchored.apo_zero_loss"), BETA, trl=True),
        LossSpec("apo_down", _ours("anchored.apo_down_loss"), BETA, trl=True),
        LossSpec("aot", _ours("transport.aot_loss"), SMOOTHED, batch_wise=True, trl=True),
        LossSpec("aot_unpaired", _ours("transport.aot_unpaired_loss"), SMOOTHED, batch_wise=True, trl=True),
        LossSpec("simpo", _ours("reference_free.simpo_loss"), ("beta", "gamma"), reference_free=True),
        LossSpec("orpo", _ours("reference_free.orpo_loss"), ("beta", "alpha"), reference_free=True),
        LossSpec(
            "sft",
            _ours("reference_free.sft_loss"),
            BETA,
            reference_free=True,
            reads_rejected=False,
            reduction=Reduction.CHOSEN_TOKENS,
            trl=True,
        ),
        LossSpec("unlikelihood", _ours("reference_free.unlikelihood_loss"), ("beta", "alpha"), reference_free=True),
        LossSpec(
            "kto",
            _ours("kto.kto_loss"),
            ("beta", "desirable_weight", "undesirable_weight"),
            unpaired=True,
            reads_rejected=False,
        ),
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
