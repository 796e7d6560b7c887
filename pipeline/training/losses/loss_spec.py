"""`LossSpec`: what one loss is and needs, declared without importing its tensor code.

A declaration names its function directly, or by where it lives ("module:function") together with
the train.* keys it takes (`takes`): then the function's module, and torch with it, is imported only
when the loss runs. The pipeline's driver reads declarations (does the choice need the reference? read
the rejected response?) and never runs a loss, so its process never imports torch for them. Whenever a
function is loaded its signature is checked against its declaration, so the two cannot drift apart.
"""

from __future__ import annotations

import enum
import functools
import importlib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pipeline.training.losses.limits import Range

if TYPE_CHECKING:
    from pipeline.training.losses.interface import LossOutput

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


class Reduction(enum.Enum):
    """How a loss's per-row values become the step's loss: their sum over a denominator of the whole step.

    ROWS: the mean over rows (pairs, or KTO examples). CHOSEN_TOKENS: the sum over the chosen responses'
    tokens (sft: each token weighs the same, as in ordinary supervised fine-tuning).
    """

    ROWS = "rows"
    CHOSEN_TOKENS = "chosen_tokens"


@functools.cache
def _params_of(fn: Callable[..., LossOutput]) -> frozenset[str]:
    """Keyword parameters of fn, its batch left out (cached: inspect is slow next to a training step)."""
    params = inspect.signature(fn).parameters
    return frozenset(name for name, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY)


@functools.cache
def _load(where: str) -> Callable[..., LossOutput]:
    """The function at "module:function"."""
    module, _, attribute = where.partition(":")
    return getattr(importlib.import_module(module), attribute)


@dataclass(frozen=True)
class LossSpec:
    """One loss: its function and what it needs.

    fn(batch, **hyperparameters) -> LossOutput of per-row values; batch is a KtoLogps when `unpaired`,
    else a PairLogps. fn is the function itself, or "module:function" (imported when the loss first
    runs; `takes` must then name its keyword parameters, its running state aside).
    takes: the train.* keys fn reads; None reads them from fn's signature.
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
    fn: Callable[..., LossOutput] | str
    takes: tuple[str, ...] | None = None
    reference_free: bool = False
    unpaired: bool = False
    reads_rejected: bool = True
    batch_wise: bool = False
    state: type | None = None
    reduction: Reduction = Reduction.ROWS
    limits: Mapping[str, Range] = field(default_factory=dict)
    trl: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.fn, str):
            if ":" not in self.fn or self.takes is None:
                raise ValueError(
                    f"loss {self.name!r}: fn {self.fn!r} names a function as 'module:function'; "
                    "declare the train.* keys it reads with takes=(...)"
                )
        unknown = sorted(self.hyperparameters - set(HYPERPARAMETERS))
        if unknown:
            raise ValueError(
                f"loss {self.name!r} takes {', '.join(unknown)}, which no train.* key sets "
                f"(a loss may take: {', '.join(HYPERPARAMETERS)})"
            )
        if callable(self.fn):
            self._check(self.fn)

    @property
    def hyperparameters(self) -> frozenset[str]:
        """The train.* keys this loss reads: `takes`, or the keyword parameters of fn (its state aside)."""
        if self.takes is not None:
            return frozenset(self.takes)
        assert callable(self.fn)  # __post_init__ refuses a path without takes
        return _params_of(self.fn) - {"state"}

    @property
    def function(self) -> Callable[..., LossOutput]:
        """fn, imported first where it was named by path, and checked against this declaration."""
        if callable(self.fn):
            return self.fn
        try:
            fn = _load(self.fn)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"loss {self.name!r}: cannot load its function {self.fn!r}: {e}") from e
        self._check(fn)
        return fn

    def _check(self, fn: Callable[..., LossOutput]) -> None:
        params = _params_of(fn)
        if (self.state is not None) != ("state" in params):
            raise ValueError(f"loss {self.name!r}: declare state= exactly when its function takes state=")
        if self.takes is not None and frozenset(self.takes) != params - {"state"}:
            raise ValueError(
                f"loss {self.name!r}: declared to take {', '.join(sorted(self.takes))}, but its function takes "
                f"{', '.join(sorted(params - {'state'}))}"
            )
