"""The allowed range of a numeric train.* key, the ranges every loss needs (`KEY_RANGES`), f-DPO's divergences."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Range:
    """low <= value <= high, either end open when said; `why` is told to the user with a refusal."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    why: str = ""

    def admits(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def describe(self, key: str) -> str:
        """The range as an inequality over `key`, e.g. "0 <= label_smoothing < 0.5"."""
        parts = []
        if self.low > -math.inf:
            parts.append(f"{self.low:g} {'<' if self.low_open else '<='} ")
        parts.append(key)
        if self.high < math.inf:
            parts.append(f" {'<' if self.high_open else '<='} {self.high:g}")
        text = "".join(parts)
        return f"{text} ({self.why})" if self.why else text


# What every loss that reads the key needs; a loss may narrow it (LossSpec.limits).
KEY_RANGES = {
    "beta": Range(0.0, low_open=True),
    "label_smoothing": Range(0.0, 0.5, why="above 0.5 the labels are believed wrong more often than right"),
    "alpha": Range(0.0),
    "desirable_weight": Range(0.0),
    "undesirable_weight": Range(0.0),
    "discopop_tau": Range(0.0, low_open=True),
    "dpop_lambda": Range(0.0),
    "gamma": Range(),
    "f_alpha_divergence_coef": Range(),
    "ld_alpha": Range(0.0, 1.0, why="1 keeps every token, 0 drops the longer response's excess"),
}

# The f-divergences of f-DPO (Wang et al. 2023, "Beyond Reverse KL", Table 1) by TRL's names.
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
