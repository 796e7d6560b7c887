"""Evaluation baselines without Ray: best-of-N selection and its KL bound, judging against the data's chosen
responses, the summary columns they fill, and actors' fetching of models given by URI."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipeline.config import ConfigError
from pipeline.data.schemas import JUDGMENTS, SAMPLES
from pipeline.evaluation.baselines import (
    best_of_n_answers,
    best_of_n_kl_bound,
    best_of_n_name,
    judge_against_chosen,
    pick_best,
    preferred_responses,
    reward_scorer,
)
from pipeline.evaluation.summary import sampling_costs, summarize


def exact_best_of_n_kl(rewards: np.ndarray, n: int) -> float:
    """KL(best-of-n || uniform) over outcomes with these rewards, each of probability 1/M, worked out exactly.

    Ties are broken towards the earlier candidate, as `pick_best` does: P(pick a given level) is the chance
    that the max reward of n draws is that level, shared equally among the outcomes at that level.
    """
    m = rewards.size
    _, counts = np.unique(rewards, return_counts=True)
    below = np.concatenate([[0], np.cumsum(counts)[:-1]])  # outcomes strictly below each level
    level_mass = ((below + counts) / m) ** n - (below / m) ** n
    per_outcome = level_mass / counts  # the pick's probability of each outcome at the level
    return float(np.sum(counts * per_outcome * np.log(per_outcome * m)))


def test_kl_bound_is_log_n_minus_n_minus_1_over_n():
    assert best_of_n_kl_bound(1) == 0.0
    assert best_of_n_kl_bound(2) == pytest.approx(math.log(2) - 0.5)
    assert best_of_n_kl_bound(4) == pytest.approx(math.log(4) - 0.75)
    bounds = [best_of_n_kl_bound(n) for n in range(1, 65)]
    assert all(a < b for a, b in itertools.pairwise(bounds))  # more candidates, further from the reference
    assert best_of_n_kl_bound(8, greedy=True) == 0.0  # n identical greedy candidates: best-of-n is the reference
    with pytest.raises(ValueError, match="n >= 1"):
        best_of_n_kl_bound(0)


@pytest.mark.parametrize("n", [2, 4, 16])
def test_kl_bound_is_the_exact_kl_without_ties_and_an_upper_bound_with_them(n):
    distinct = np.arange(20_000, dtype=float)
    assert exact_best_of_n_kl(distinct, n) == pytest.approx(best_of_n_kl_bound(n), abs=2e-3)
    assert exact_best_of_n_kl(distinct, n) <= best_of_n_kl_bound(n)
    tied = np.repeat([0.0, 1.0, 2.0], [50, 30, 20])  # a reward with three values, like a coarse judge
    assert exact_best_of_n_kl(tied, n) < best_of_n_kl_bound(n)


def test_picking_by_simulation_matches_the_exact_best_of_n_distribution():
    rng = np.random.default_rng(0)
    n, m, draws = 4, 5, 20_000
    outcomes = rng.integers(0, m, size=draws * n)  # uniform reference over 5 outcomes, reward = outcome
    picked = outcomes.reshape(-1, n)[np.arange(draws), pick_best(outcomes.astype(float), n)]
    expected = ((np.arange(1, m + 1) / m) ** n) - ((np.arange(m) / m) ** n)
    np.testing.assert_allclose(np.bincount(picked, minlength=m) / draws, expected, atol=0.01)


def test_pick_best_takes_the_highest_of_each_group_and_the_first_on_ties():
    scores = np.array([0.1, 0.9, 0.3, 0.5, 0.5, -1.0, 2.0, 2.0, 2.0])
    assert pick_best(scores, 3).tolist() == [1, 0, 0]
    with pytest.raises(ValueError, match="groups of 4"):
        pick_best(scores, 4)
    with pytest.raises(ValueError, match="NaN"):
        pick_best(np.array([0.1, np.nan]), 2)


def _candidate(t, p, s, text, ids):
    return {
        "model": "best_of_2",
        "temperature": t,
        "prompt_index": p,
        "sample_index": s,
        "prompt": f"prompt {p}",
        "completion": text,
        "completion_ids": ids,
        "logps": -float(len(ids)),
        "ref_logps": -float(len(ids)),
    }


def test_best_of_n_keeps_the_best_candidate_and_charges_all_of_them():
    candidates = [
        _candidate(1.0, 0, 0, " bad", [5]),
        _candidate(1.0, 0, 0, " good", [6, 7, 8]),
        _candidate(1.0, 1, 0, " fine", [9, 9]),
        _candidate(1.0, 1, 0, " worse", [4]),
    ]
    kept = best_of_n_answers(candidates, np.array([-0.5, 0.8, 0.2, -0.1]), 2, model=best_of_n_name(2))
    assert [k["completion"] for k in kept] == [" good", " fine"]
    assert [k["reward"] for k in kept] == [0.8, 0.2]
    assert [k["tokens_generated"] for k in kept] == [4, 3]  # every candidate's tokens, not just the kept one's
    assert all(k["candidates"] == 2 and k["kl"] is None and k["model"] == "best_of_2" for k in kept)
    assert candidates[1]["model"] == "best_of_2" and "reward" not in candidates[1]  # inputs untouched
    cost = sampling_costs(kept)[("best_of_2", 1.0)]
    assert cost == {"samples_per_answer": 2.0, "tokens_per_answer": 3.5}
    with pytest.raises(ValueError, match="mixes answers"):
        best_of_n_answers(candidates[1:3], np.array([0.0, 1.0]), 2, model="best_of_2")


def test_best_of_n_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"evaluate\.best_of_n: must be >= 0"):
        reward_scorer(None, best_of_n=-1, reward_name=None)
    with pytest.raises(ConfigError, match=r"evaluate\.best_of_n needs evaluate\.reward"):
        reward_scorer(None, best_of_n=4, reward_name=None)
    assert reward_scorer(None, best_of_n=0, reward_name=None) is None


def test_preferred_response_is_the_first_desirable_chosen_of_each_prompt():
    pairs = pa.table(
        {
            "prompt_ids": [[1, 2], [1, 2], [3], [4], [4]],
            "chosen_ids": [[10], [11], [12], [13], [14]],
            "label": [None, None, False, False, True],  # two paired rows, then unpaired (KTO) rows
        }
    )
    assert preferred_responses(pairs, [[1, 2], [3], [4], [5]]) == [[10], None, [14], None]


class LongerWinsJudge:
    """Prefers the longer completion; 'unparsed' whenever a completion says so; ties on equal length."""

    name = "longer"

    def judge(self, prompts, first, second):
        out = []
        for a, b in zip(first, second):
            out.append("unparsed" if "??" in a + b else "A" if len(a) > len(b) else "B" if len(b) > len(a) else "tie")
        return out


def _sample(model, t, p, text):
    return {
        "model": model,
        "temperature": t,
        "prompt_index": p,
        "sample_index": 0,
        "prompt": f"prompt {p}",
        "completion": text,
        "completion_ids": list(range(len(text))),
        "logps": -1.0,
        "ref_logps": -1.0,
        "kl": 0.0 if model != "best_of_2" else None,
        "reward": float(len(text)),
    }


def test_judging_against_chosen_accounts_for_every_sample():
    rows = [
        _sample(m, 1.0, p, text)
        for m, texts in (
            ("policy", [" a long answer", " x", " same", " ??"]),
            ("reference", [" mid", " mid", " mid", " mid"]),
        )
        for p, text in enumerate(texts)
    ]
    chosen = [" chosen one", " chosen two", " same", None]  # prompt 3 has no preferred response
    out = judge_against_chosen(
        LongerWinsJudge(), rows, chosen, [None if c is None else len(c) for c in chosen], ["policy"]
    )
    assert [(j["prompt_index"], j["score"]) for j in out] == [(0, 1.0), (1, 0.0), (2, 0.5)]  # win, loss, tie
    assert all(j["baseline"] == "chosen" and j["model"] == "policy" for j in out)
    assert [j["length_diff"] for j in out] == [14 - 11, 2 - 11, 0]
    # A policy whose answer cannot be judged: counted as unparsed, scored 0.5, never dropped.
    with_unparsed = judge_against_chosen(LongerWinsJudge(), rows, [" c"] * 4, [2] * 4, ["policy"])
    assert len(with_unparsed) == 4 and with_unparsed[3]["verdict_first"] == "unparsed"
    assert with_unparsed[3]["score"] == 0.5
    assert judge_against_chosen(LongerWinsJudge(), rows, [None] * 4, [None] * 4, ["policy"]) == []


def test_summary_keeps_the_two_baselines_apart():
    rows = [
        _sample(m, t, p, " " * (p + 2))
        for m in ("policy", "reference", "best_of_2")
        for t in (0.0, 1.0)
        for p in range(4)
    ]
    for r in rows:
        r.update(candidates=2 if r["model"] == "best_of_2" else 1, tokens_generated=len(r["completion_ids"]))
    judged = [
        {
            "model": m,
            "baseline": "reference",
            "temperature": t,
            "prompt_index": p,
            "verdict_first": "A",
            "verdict_second": "B",
            "score": 1.0,
            "length_diff": 0,
        }
        for m in ("policy", "best_of_2")
        for t in (0.0, 1.0)
        for p in range(4)
    ]
    judged += [
        {
            "model": m,
            "baseline": "chosen",
            "temperature": t,
            "prompt_index": p,
            "verdict_first": "unparsed" if p == 0 else "B",
            "verdict_second": "A",
            "score": 0.5 if p == 0 else 0.0,
            "length_diff": 0,
        }
        for m in ("policy", "reference", "best_of_2")
        for t in (0.0, 1.0)
        for p in range(4)
    ]
    summary = summarize(
        pa.Table.from_pylist(rows, schema=SAMPLES),
        pa.Table.from_pylist(judged, schema=JUDGMENTS),
        [0.0, 1.0],
        n_boot=50,
        seed=0,
        costs=sampling_costs(rows),
        kl_bounds={("best_of_2", 0.0): 0.0, ("best_of_2", 1.0): best_of_n_kl_bound(2)},
    )
    by = {(r["model"], r["temperature"]): r for r in summary}
    assert len(by) == 6
    policy, reference, bon = by[("policy", 1.0)], by[("reference", 1.0)], by[("best_of_2", 1.0)]
    assert policy["win_rate"] == 1.0 and policy["win_rate_vs_chosen"] == pytest.approx(0.125)
    assert policy["judged_vs_chosen"] == 4 and policy["unparsed_vs_chosen"] == 1
    assert reference["win_rate"] is None and reference["win_rate_vs_chosen"] == pytest.approx(0.125)
    assert bon["kl_mean"] is None and bon["kl_bound"] == pytest.approx(math.log(2) - 0.5)
    assert bon["samples_per_answer"] == 2.0 and policy["samples_per_answer"] == 1.0
    assert bon["tokens_per_answer"] == pytest.approx(np.mean([2, 3, 4, 5]))
    assert policy["kl_mean"] == 0.0 and policy["kl_bound"] is None


def test_reward_vs_kl_draws_best_of_n_at_its_bound(tmp_path):
    from pipeline.evaluation.plots import plot_reward_vs_kl
    from pipeline.evaluation.report import SUMMARY_COLUMNS, summary_table

    rows = [
        {
            "model": "best_of_4",
            "temperature": t,
            "reward_mean": 0.3 + t,
            "kl_mean": None,
            "kl_bound": best_of_n_kl_bound(4, greedy=t == 0),
        }
        for t in (0.0, 1.0)
    ]
    plot_reward_vs_kl(rows, tmp_path / "kl.png")
    assert (tmp_path / "kl.png").read_bytes().startswith(b"\x89PNG")
    assert {"kl_bound", "win_rate_vs_chosen", "samples_per_answer", "tokens_per_answer"} <= set(SUMMARY_COLUMNS)
    assert "| best_of_4 | 1.0 |" in summary_table(rows).replace("1.000", "1.0")


def test_a_sampler_fetches_a_model_given_by_uri_into_its_own_temp_dir(tiny_model_dir: Path):
    """The multi-node fix: the actor body, not the driver, copies a URI model, and leaves no copy behind."""
    import tempfile

    from pipeline.runtime.model_copy import local_model
    from pipeline.runtime.sampler import Sampler

    uri = Path(tiny_model_dir).resolve().as_uri()  # file://...: the same code path as s3:// or gs://
    with local_model(uri) as path:
        assert path != str(tiny_model_dir) and (Path(path) / "config.json").exists()
        copy = path
    assert not Path(copy).exists()
    assert Path(tempfile.gettempdir()) in Path(copy).parents
    with local_model(str(tiny_model_dir)) as path:
        assert path == str(tiny_model_dir)  # local paths are used in place, as before
    sampler = Sampler("hf", uri, use_gpu=False, dtype="float32", trust_remote_code=False)
    out = sampler.generate([[5, 6, 7]], {"n": 1, "temperature": 0.0, "max_tokens": 3})
    assert len(out) == 1 and 1 <= len(out[0][0]["token_ids"]) <= 3
    with pytest.raises(FileNotFoundError, match="no model directory"):
        with local_model(uri + "-missing"):
            pass
