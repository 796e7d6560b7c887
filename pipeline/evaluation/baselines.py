"""Evaluation baselines beside the reference's own samples: best-of-N, and the data's preferred responses.

Best-of-N. For each answer, draw N completions from the reference and keep the one the task's
REWARD scores highest (with the demo task: VADER's compound score, the same reward the summary reports).
It is the standard inference-time alternative to fine-tuning, so a trained policy should be compared with
it at matched KL and at its real price: N samples, and N times the tokens, per answer.

Its KL to the reference has no per-sample estimate: the best-of-N policy has no explicit density to take a
log-ratio of. For rewards without ties it is exactly log N - (N - 1) / N, and with ties (a discrete reward,
repeated completions) it is lower (Beirami et al., 2024, "Theoretical guarantees on the best-of-n alignment
policy"). The report therefore gives that bound as the KL of best-of-N, marked as a bound.

Preferred responses. Each model's samples are also judged against the `chosen` response of a
held-out pair with the same prompt, the data set's own idea of a good answer, in both orders like every
other comparison.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import cast

import numpy as np
import pyarrow as pa

from pipeline.config import ConfigError
from pipeline.evaluation.judges import Judge
from pipeline.evaluation.judgments import judge_samples
from pipeline.evaluation.plugins import Reward


def best_of_n_name(n: int) -> str:
    """The model name of the best-of-N baseline in the summary, Parquet and plots."""
    return f"best_of_{n}"


def best_of_n_kl_bound(n: int, *, greedy: bool = False) -> float:
    """Upper bound on KL(best-of-n || reference) in nats: log n - (n - 1) / n, exact without reward ties.

    Greedy decoding gives n identical candidates, so best-of-n IS the reference there: KL 0.
    """
    if n < 1:
        raise ValueError(f"best-of-n needs n >= 1, got {n}")
    if greedy:
        return 0.0
    return math.log(n) - (n - 1) / n


def pick_best(scores: np.ndarray, n: int) -> np.ndarray:
    """Index (0..n-1) of the best candidate in each consecutive group of n.

    scores: shape (answers * n,), candidates of one answer next to each other. Returns shape (answers,).
    Ties go to the earliest candidate, so the pick is deterministic. NaN scores are an error: a reward
    that failed must not silently lose (or win) a comparison.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if n < 1:
        raise ValueError(f"best-of-n needs n >= 1, got {n}")
    if scores.size % n:
        raise ValueError(f"{scores.size} candidate scores do not split into groups of {n}")
    if not np.all(np.isfinite(scores)):
        raise ValueError("best-of-n got NaN or infinite candidate scores")
    return scores.reshape(-1, n).argmax(axis=1)  # argmax returns the first maximum


def best_of_n_answers(candidates: Sequence[dict], scores: np.ndarray, n: int, *, model: str) -> list[dict]:
    """Keep the best of each group of n candidates: one sample row per answer.

    candidates: sample rows (keys of the evaluate samples table, with `completion_ids`), groups of n
    consecutive rows sharing temperature, prompt_index and sample_index. scores: the reward of each,
    shape (len(candidates),). Each kept row gets `model`, its own reward, kl None (see the module doc),
    `candidates` = n and `tokens_generated` = the tokens of all n candidates: the answer's sampling cost.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(candidates) != scores.size:
        raise ValueError(f"{len(candidates)} candidates but {scores.size} scores")
    best = pick_best(scores, n)
    out = []
    for group, pick in enumerate(best):
        members = candidates[group * n : (group + 1) * n]
        keys = {(c["temperature"], c["prompt_index"], c["sample_index"]) for c in members}
        if len(keys) != 1:
            raise ValueError(f"candidate group {group} mixes answers: {sorted(keys)}")
        kept = dict(members[pick])
        kept.update(
            model=model,
            reward=float(scores[group * n + pick]),
            kl=None,
            candidates=n,
            tokens_generated=sum(len(c["completion_ids"]) for c in members),
        )
        out.append(kept)
    return out


def preferred_responses(eval_pairs: pa.Table, prompts: Sequence[Sequence[int]]) -> list[list[int] | None]:
    """For each prompt, the `chosen_ids` of the first held-out row with that prompt, or None.

    eval_pairs: the tokenize stage's eval split (prompt_ids, chosen_ids, label), in its id order. Unpaired
    (KTO) rows count only when labelled desirable: an undesirable completion is no preferred response.
    """
    first: dict[tuple[int, ...], list[int]] = {}
    labels = eval_pairs["label"].to_pylist() if "label" in eval_pairs.column_names else [None] * eval_pairs.num_rows
    prompt_ids = cast("list[list[int]]", eval_pairs["prompt_ids"].to_pylist())
    chosen_ids = cast("list[list[int]]", eval_pairs["chosen_ids"].to_pylist())
    for prompt, chosen, label in zip(prompt_ids, chosen_ids, labels):
        if label is False:
            continue
        first.setdefault(tuple(prompt), chosen)
    return [first.get(tuple(p)) for p in prompts]


def rows_with_chosen(rows: Sequence[dict], chosen_texts: Sequence[str | None], models: Sequence[str]) -> list[dict]:
    """The sample rows of `models` whose prompt has a preferred response: those `judge_against_chosen` judges."""
    return [r for r in rows if r["model"] in set(models) and chosen_texts[r["prompt_index"]] is not None]


def judgments_to_make(rows: Sequence[dict], compared: Sequence[str], chosen_texts: Sequence[str | None] | None) -> int:
    """How many verdicts evaluate asks of its judge: every sample of `compared` against the reference's, and
    with `chosen_texts` every sample of `compared` and the reference against the preferred response; each
    pair in both orders."""
    against_reference = sum(r["model"] in set(compared) for r in rows)
    against_chosen = len(rows_with_chosen(rows, chosen_texts, [*compared, "reference"])) if chosen_texts else 0
    return 2 * (against_reference + against_chosen)


def judge_against_chosen(
    judge: Judge,
    rows: Sequence[dict],
    chosen_texts: Sequence[str | None],
    chosen_lengths: Sequence[int | None],
    models: Sequence[str],
) -> list[dict]:
    """Every sample of `models` against its prompt's preferred response, in both orders.

    rows: sample rows (model, temperature, prompt_index, prompt, completion, completion_ids).
    chosen_texts[p] / chosen_lengths[p]: the decoded preferred response of prompt p and its token count, or
    None where the data has none (that prompt's samples are then not judged: see `summary` counts).
    Returns judgment rows with baseline "chosen"; scores follow `judge_both_orders` (ties and inconsistent
    verdicts 0.5, unparsed verdicts 0.5 and counted).
    """
    mine = rows_with_chosen(rows, chosen_texts, models)
    if not mine:
        return []
    return judge_samples(
        judge,
        mine,
        "chosen",
        [chosen_texts[r["prompt_index"]] for r in mine],
        [chosen_lengths[r["prompt_index"]] for r in mine],
    )


def reward_scorer(reward_fn: Reward | None, *, best_of_n: int, reward_name: str | None) -> Reward | None:
    """The function that ranks best-of-N candidates, or an error naming what the config lacks."""
    if best_of_n < 0:
        raise ConfigError(f"evaluate.best_of_n: must be >= 0 (0 turns the baseline off), got {best_of_n}")
    if best_of_n and reward_fn is None:
        raise ConfigError(
            "evaluate.best_of_n needs evaluate.reward: the task's reward picks the best of N "
            f"(got reward {reward_name!r})"
        )
    return reward_fn


def best_of_n_rows(candidates: Sequence[dict], reward_fn: Reward, n: int) -> list[dict]:
    """The best-of-n baseline's sample rows: each group of n reference candidates scored by the task's
    reward, the best kept (`best_of_n_answers`). The candidates come from the reference, so their engine
    log-probs already are log pi_ref: each candidate's ref_logps is set to its logps, in place."""
    for c in candidates:
        c["ref_logps"] = c["logps"]
    scores = reward_fn([c["prompt"] + c["completion"] for c in candidates])
    return best_of_n_answers(candidates, scores, n, model=best_of_n_name(n))


def best_of_n_kl_bounds(n: int, temperatures: Sequence[float]) -> dict[tuple[str, float], float]:
    """{(best-of-n's name, temperature): its KL bound}, 0 at temperature 0 (greedy candidates coincide)."""
    return {(best_of_n_name(n), float(t)): best_of_n_kl_bound(n, greedy=t == 0) for t in temperatures}
