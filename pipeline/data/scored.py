"""Scored rows: one prompt with several scored completions, made into preference pairs.

    {"prompt": str | messages, "completions": [{"text": str | messages, "score": number}, ...]}

The text may also be under "response" or "content", the score under "overall_score" (UltraFeedback's raw
rows). A string completion under a message-list prompt is one assistant turn. Pairs are made by `pairing`
(see `make_pairs`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from pipeline.data.chat import ChatRenderer
from pipeline.data.examples import check_fields, checked_example, same_shape
from pipeline.data.outcomes import Example, Reject

PAIRINGS = ("best_vs_worst", "best_vs_rest", "all_pairs")
SCORED_TEXT_KEYS = ("text", "response", "content")
SCORED_SCORE_KEYS = ("score", "overall_score")


def scored_examples(row: dict, renderer: ChatRenderer, *, pairing: str, min_score_gap: float) -> list[Example | Reject]:
    """One outcome per pair `pairing` makes: an `Example`, or a `Reject` for a pair failing a check.

    Raises `Reject` when the whole row is rejected (a bad field, or no pair at all).
    """
    prompt, completions = row.get("prompt"), row.get("completions")
    if prompt is None or completions is None:
        raise Reject("missing_field")
    if not isinstance(completions, list) or not isinstance(prompt, (str, list)):
        raise Reject("wrong_type")
    texts, scores = _texts_and_scores(completions, conversational=isinstance(prompt, list))
    same_shape(prompt, texts)
    pairs = make_pairs(scores, pairing=pairing, min_score_gap=min_score_gap)
    if not pairs:
        raise Reject("no_pair")
    # The prompt is shared by every pair: check it once, so a bad prompt is one rejection, not one per pair.
    check_fields(prompt, [])
    outcomes: list[Example | Reject] = []
    for better, worse in pairs:
        try:
            outcomes.append(checked_example(renderer, prompt, [texts[better], texts[worse]]))
        except Reject as reject:
            outcomes.append(reject)
    return outcomes


def _texts_and_scores(completions: list, *, conversational: bool) -> tuple[list, list[float]]:
    texts, scores = [], []
    for item in completions:
        if not isinstance(item, dict):
            raise Reject("wrong_type")
        text = next((item[k] for k in SCORED_TEXT_KEYS if item.get(k) is not None), None)
        score = next((item[k] for k in SCORED_SCORE_KEYS if item.get(k) is not None), None)
        if text is None or score is None:
            raise Reject("missing_field")
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            raise Reject("wrong_type")
        if conversational and isinstance(text, str):
            text = [{"role": "assistant", "content": text}]
        texts.append(text)
        scores.append(score)
    return texts, scores


def make_pairs(scores: Sequence[float], *, pairing: str, min_score_gap: float = 0.0) -> list[tuple[int, int]]:
    """(better, worse) index pairs from per-completion scores. Ties never pair; gaps below min_score_gap don't.

    best_vs_worst: the highest score against the lowest (first index wins ties), at most one pair.
    best_vs_rest: the highest against each other completion with a lower score.
    all_pairs: every two completions with different scores, higher first, in index order.
    """

    def ok(better: int, worse: int) -> bool:
        gap = scores[better] - scores[worse]
        return gap > 0 and gap >= min_score_gap

    n = len(scores)
    if n < 2:
        return []
    best = min(range(n), key=lambda i: (-scores[i], i))
    if pairing == "best_vs_worst":
        worst = min(range(n), key=lambda i: (scores[i], i))
        return [(best, worst)] if ok(best, worst) else []
    if pairing == "best_vs_rest":
        return [(best, j) for j in range(n) if j != best and ok(best, j)]
    if pairing == "all_pairs":
        ordered = ((i, j) if scores[i] > scores[j] else (j, i) for i in range(n) for j in range(i + 1, n))
        return [(hi, lo) for hi, lo in ordered if ok(hi, lo)]
    raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
