"""How well a trained policy's implicit reward r = beta * (log pi(y|x) - log pi_ref(y|x)) sorts held-out data.

Pairs (DPO and its siblings): the fraction of pairs whose chosen response gets the larger reward, as the
DPO paper reports it. Unpaired rows (KTO): there is no partner to compare with, so the measure is the
probability that a desirable completion's reward exceeds an undesirable one's, over every (desirable,
undesirable) combination (the area under the ROC curve of the reward as a classifier of the label; ties
count one half). 0.5 is chance for both.
"""

from __future__ import annotations

import numpy as np


def pair_accuracy(policy_chosen, policy_rejected, ref_chosen, ref_rejected, *, beta: float) -> dict:
    """How often the implicit reward ranks held-out pairs as the data does."""
    margins = beta * ((np.asarray(policy_chosen) - ref_chosen) - (np.asarray(policy_rejected) - ref_rejected))
    return {"kind": "pairs", "pairs": int(len(margins)), "accuracy": float((margins > 0).mean()),
            "margin_mean": float(margins.mean())}


def unpaired_separation(policy_logps, ref_logps, desirable, *, beta: float) -> dict:
    """How well the implicit reward of held-out (prompt, completion, label) rows separates the two labels."""
    rewards = beta * (np.asarray(policy_logps, dtype=np.float64) - np.asarray(ref_logps, dtype=np.float64))
    desirable = np.asarray(desirable, dtype=bool)
    good, bad = rewards[desirable], rewards[~desirable]
    out = {"kind": "unpaired", "rows": int(len(rewards)), "desirable": int(len(good)), "undesirable": int(len(bad)),
           "reward_desirable_mean": float(good.mean()) if len(good) else None,
           "reward_undesirable_mean": float(bad.mean()) if len(bad) else None, "auc": None}
    if len(good) and len(bad):
        # Rank-sum form of P(r_good > r_bad) + P(equal) / 2: O(n log n), not every combination.
        ranks = _average_ranks(np.concatenate([good, bad]))
        out["auc"] = float((ranks[: len(good)].sum() - len(good) * (len(good) + 1) / 2) / (len(good) * len(bad)))
    return out


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given the mean of the ranks they span."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    ranks = np.empty(len(values))
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def describe(name: str, result: dict) -> str:
    """One line for the evaluation report."""
    if result["kind"] == "pairs":
        return f"Implicit-reward accuracy of {name} on {result['pairs']} held-out pairs: {result['accuracy']:.3f}."
    if result["auc"] is None:
        return (f"Implicit-reward separation of {name}: not defined, the {result['rows']} held-out rows "
                f"are all of one label ({result['desirable']} desirable, {result['undesirable']} undesirable).")
    return (f"Implicit-reward separation of {name} on {result['rows']} held-out rows ({result['desirable']} desirable, "
            f"{result['undesirable']} undesirable): P(a desirable completion's reward > an undesirable one's) = "
            f"{result['auc']:.3f}; mean rewards {result['reward_desirable_mean']:.3f} vs {result['reward_undesirable_mean']:.3f}.")
