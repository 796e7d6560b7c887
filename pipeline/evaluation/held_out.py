"""How well a trained policy's implicit reward r = beta * (log pi(y|x) - log pi_ref(y|x)) sorts held-out data.

Pairs (DPO and its siblings): the fraction of pairs whose chosen response gets the larger reward, as the
DPO paper reports it. Unpaired rows (KTO): there is no partner to compare with, so the measure is the
probability that a desirable completion's reward exceeds an undesirable one's, over every (desirable,
undesirable) combination (the area under the ROC curve of the reward as a classifier of the label; ties
count one half). 0.5 is chance for both.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pyarrow as pa


def pair_accuracy(
    policy_chosen: np.ndarray,
    policy_rejected: np.ndarray,
    ref_chosen: np.ndarray,
    ref_rejected: np.ndarray,
    *,
    beta: float,
) -> dict:
    """How often the implicit reward ranks held-out pairs as the data does.

    The four arrays: log-probs of each pair's chosen and rejected response under the policy and the
    reference, shape (pairs,) each. Returns kind "pairs", pairs, accuracy and margin_mean.
    """
    margins = beta * ((np.asarray(policy_chosen) - ref_chosen) - (np.asarray(policy_rejected) - ref_rejected))
    return {
        "kind": "pairs",
        "pairs": len(margins),
        "accuracy": float((margins > 0).mean()),
        "margin_mean": float(margins.mean()),
    }


def unpaired_separation(policy_logps: np.ndarray, ref_logps: np.ndarray, desirable: np.ndarray, *, beta: float) -> dict:
    """How well the implicit reward of held-out (prompt, completion, label) rows separates the two labels.

    policy_logps, ref_logps: each completion's log-prob under the policy and the reference; desirable: its
    label; shape (rows,) each. Returns kind "unpaired", the row counts, each label's mean reward, and auc
    (None when only one label occurs).
    """
    rewards = beta * (np.asarray(policy_logps, dtype=np.float64) - np.asarray(ref_logps, dtype=np.float64))
    desirable = np.asarray(desirable, dtype=bool)
    good, bad = rewards[desirable], rewards[~desirable]
    out = {
        "kind": "unpaired",
        "rows": len(rewards),
        "desirable": len(good),
        "undesirable": len(bad),
        "reward_desirable_mean": float(good.mean()) if len(good) else None,
        "reward_undesirable_mean": float(bad.mean()) if len(bad) else None,
        "auc": None,
    }
    if len(good) and len(bad):
        # Rank-sum form of P(r_good > r_bad) + P(equal) / 2: O(n log n), not every combination.
        ranks = _average_ranks(np.concatenate([good, bad]))
        out["auc"] = float((ranks[: len(good)].sum() - len(good) * (len(good) + 1) / 2) / (len(good) * len(bad)))
    return out


def held_out_from_logps(
    held: pa.Table, kind: str, *, betas: Mapping[str, float], policy_logps: Mapping[str, tuple[np.ndarray, np.ndarray]]
) -> dict[str, dict]:
    """Per policy, how its implicit reward sorts the scored held-out split: `pair_accuracy`, or for
    unpaired (KTO) data, `kind` "unpaired", `unpaired_separation`.

    held: the score stage's eval split (ref_chosen_logps, ref_rejected_logps, and label when unpaired).
    betas[name]: the policy's beta; policy_logps[name]: its (chosen, rejected) log-probs of each row,
    shape (rows,) each.
    """
    out = {}
    for name, beta in betas.items():
        chosen, rejected = policy_logps[name]
        if kind == "unpaired":  # a completion and its label; `rejected` is a sum over nothing
            labels = held["label"].to_numpy(zero_copy_only=False)
            out[name] = unpaired_separation(chosen, held["ref_chosen_logps"].to_numpy(), labels, beta=beta)
        else:
            out[name] = pair_accuracy(
                chosen, rejected, held["ref_chosen_logps"].to_numpy(), held["ref_rejected_logps"].to_numpy(), beta=beta
            )
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
        return (
            f"Implicit-reward accuracy of {name} on {result['pairs']} held-out pairs: {result['accuracy']:.3f} "
            f"(0.5 is chance); mean margin beta * (log-ratio chosen - log-ratio rejected): {result['margin_mean']:.4f}."
        )
    if result["auc"] is None:
        return (
            f"Implicit-reward separation of {name}: not defined, the {result['rows']} held-out rows "
            f"are all of one label ({result['desirable']} desirable, {result['undesirable']} undesirable)."
        )
    return (
        f"Implicit-reward separation of {name} on {result['rows']} held-out rows ({result['desirable']} desirable, "
        f"{result['undesirable']} undesirable): P(a desirable completion's reward > an undesirable one's) = "
        f"{result['auc']:.3f}; mean rewards {result['reward_desirable_mean']:.3f} "
        f"vs {result['reward_undesirable_mean']:.3f}."
    )
