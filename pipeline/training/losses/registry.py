"""Every loss declared once, with what it needs from the pipeline; every caller asks here.

`train.loss` names one loss or a weighted mix such as {"dpo": 1.0, "sft": 0.1} (a `LossChoice`). The
pipeline never branches on a loss's name: it asks `needs_reference`, `is_unpaired` and
`reads_rejected` of the choice, and the trainer calls `compute_loss`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from pipeline.config import ConfigError, TrainConfig
from pipeline.training.losses import kto, paired
from pipeline.training.losses.interface import KtoLogps, LossOutput, PairLogps

LossChoice = str | Mapping[str, float]  # train.loss: one name, or {name: weight}

# The train.* keys a loss may take as keyword parameters. Each loss takes only those its signature
# names, with its own defaults, so one config carries gamma for simpo and alpha for orpo.
HYPERPARAMETERS = ("beta", "label_smoothing", "gamma", "alpha", "desirable_weight", "undesirable_weight")


@functools.cache
def _params_of(fn: Callable[..., LossOutput]) -> frozenset[str]:
    """Keyword parameters of fn, its batch left out (cached: inspect is slow next to a training step)."""
    params = inspect.signature(fn).parameters
    return frozenset(name for name, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY)


@dataclass(frozen=True)
class LossSpec:
    """One loss: its function and what it needs.

    fn(batch, **hyperparameters) -> LossOutput; batch is a KtoLogps when `unpaired`, else a PairLogps.
    reference_free: fn never reads ref_*; when every loss in use is, the score stage is skipped.
    unpaired: trains on single labelled completions (KTO); such a loss is never mixed with others.
    reads_rejected: fn reads the rejected response; when no loss in use does, the trainer skips its
    forward pass.
    """

    name: str
    fn: Callable[..., LossOutput]
    reference_free: bool = False
    unpaired: bool = False
    reads_rejected: bool = True

    def __post_init__(self) -> None:
        unknown = sorted(self.hyperparameters - set(HYPERPARAMETERS))
        if unknown:
            raise ValueError(
                f"loss {self.name!r} takes {', '.join(unknown)}, which no train.* key sets "
                f"(a loss may take: {', '.join(HYPERPARAMETERS)})"
            )

    @property
    def hyperparameters(self) -> frozenset[str]:
        """The train.* keys this loss reads: the keyword parameters of fn."""
        return _params_of(self.fn)


LOSSES: dict[str, LossSpec] = {
    spec.name: spec
    for spec in (
        LossSpec("dpo", paired.dpo_loss),
        LossSpec("ipo", paired.ipo_loss),
        LossSpec("hinge", paired.hinge_loss),
        LossSpec("robust", paired.robust_loss),
        LossSpec("rpo", paired.rpo_loss),
        LossSpec("simpo", paired.simpo_loss, reference_free=True),
        LossSpec("orpo", paired.orpo_loss, reference_free=True),
        LossSpec("sft", paired.sft_loss, reference_free=True, reads_rejected=False),
        LossSpec("unlikelihood", paired.unlikelihood_loss, reference_free=True),
        LossSpec("kto", kto.kto_loss, unpaired=True, reads_rejected=False),
    )
}


def register(spec: LossSpec) -> LossSpec:
    """Add a loss to LOSSES under spec.name, which must be new; returns spec."""
    if spec.name in LOSSES:
        raise ValueError(f"a loss named {spec.name!r} is registered already")
    LOSSES[spec.name] = spec
    return spec


def loss_weights(loss: LossChoice) -> dict[str, float]:
    """train.loss as {name: weight}, in the order given: names checked against LOSSES, unpaired alone.

    A choice that cannot be trained raises ConfigError (a ValueError) naming train.loss.
    """
    weights = {loss: 1.0} if isinstance(loss, str) else {str(k): float(v) for k, v in loss.items()}
    if not weights:
        raise ConfigError("train.loss is empty; name at least one loss")
    unknown = [name for name in weights if name not in LOSSES]
    if unknown:
        raise ConfigError(
            f"train.loss: unknown loss {', '.join(map(repr, unknown))}; known losses: {', '.join(sorted(LOSSES))}"
        )
    unpaired = [name for name in weights if LOSSES[name].unpaired]
    if unpaired and len(weights) > 1:
        raise ConfigError(
            f"train.loss: {', '.join(unpaired)} trains on unpaired rows and cannot be mixed with paired losses "
            f"({', '.join(weights)})"
        )
    return weights


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


def loss_hyperparameters(train: TrainConfig) -> dict[str, float]:
    """The train section's loss hyperparameters, as `compute_loss` takes them."""
    return {name: getattr(train, name) for name in HYPERPARAMETERS}


def compute_loss(loss: LossChoice, batch: PairLogps | KtoLogps, **hyperparameters: float) -> LossOutput:
    """One loss, or a weighted sum of losses, over one batch.

    loss: a name in LOSSES, or {name: weight} such as {"dpo": 1.0, "sft": 0.1}. hyperparameters: any of
    HYPERPARAMETERS (beta is required); each loss gets those its signature names and its own defaults
    for the rest. loss = sum_k w_k loss_k and losses = sum_k w_k losses_k. The rewards reported are those
    of the first loss in the choice (every loss defines rewards: beta (pi - ref) for the losses that read
    the reference, beta * mean log-prob for simpo / orpo, beta * summed log-prob for sft / unlikelihood).
    """
    unknown = sorted(set(hyperparameters) - set(HYPERPARAMETERS))
    if unknown or "beta" not in hyperparameters:
        raise TypeError(
            f"compute_loss takes beta and any of {', '.join(HYPERPARAMETERS)}; got {', '.join(sorted(hyperparameters))}"
        )
    weighted: list[tuple[float, LossOutput]] = []
    for name, weight in loss_weights(loss).items():
        spec = LOSSES[name]
        expected = KtoLogps if spec.unpaired else PairLogps
        if not isinstance(batch, expected):
            raise ValueError(f"loss {name!r} takes a {expected.__name__}, got {type(batch).__name__}")
        params = {k: v for k, v in hyperparameters.items() if k in spec.hyperparameters}
        weighted.append((weight, spec.fn(batch, **params)))
    first = weighted[0][1]
    return LossOutput(
        loss=sum(w * out.loss for w, out in weighted),
        losses=sum(w * out.losses for w, out in weighted),
        chosen_rewards=first.chosen_rewards,
        rejected_rewards=first.rejected_rewards,
    )
