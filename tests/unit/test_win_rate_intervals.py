"""Win-rate intervals resample prompts, not single comparisons: a hand-worked case where the difference is exact.

Ten prompts, four comparisons each (four samples, each already judged in both orders). Prompts 0-4 are won
by every sample, prompts 5-9 lost by every sample: the comparisons of one prompt are perfectly correlated.

- Resampling the 40 comparisons (the old interval), a replicate's win rate is Binomial(40, 1/2) / 40.
  P(X <= 13) = 0.019 and P(X <= 14) = 0.040, so its 2.5% quantile is 14/40 = 0.35 and, by symmetry, its
  97.5% quantile 26/40 = 0.65: the interval [0.35, 0.65].
- Resampling the 10 prompts (the new interval), a replicate's win rate is Binomial(10, 1/2) / 10.
  P(X <= 1) = 0.011 and P(X <= 2) = 0.055: the interval [0.2, 0.8].
- The truth: if each new prompt is a sure win or a sure loss with probability 1/2, the win rate measured
  over 10 prompts is itself Binomial(10, 1/2) / 10, whose central 95% range is [0.2, 0.8], the new
  interval. The old one holds the measured rate only when 4 <= X <= 6, probability
  (210 + 252 + 210) / 1024 = 0.66: a "95%" interval that covers 66% of the time.
"""

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from pipeline.data.schemas import JUDGMENTS, SAMPLES
from pipeline.evaluation.length_control import length_controlled_win_rate
from pipeline.evaluation.stats import bootstrap_ci, win_rate
from pipeline.evaluation.summary import summarize

PROMPTS = np.repeat(np.arange(10), 4)  # (40,) the prompt of each comparison
SCORES = np.where(PROMPTS < 5, 1.0, 0.0)  # (40,) every sample of prompts 0-4 wins, of 5-9 loses
# Enough replicates that the empirical quantiles land on the exact ones above (the nearest binomial
# cumulative probability is more than 5 standard errors of the replicate count away from 2.5%).
N_BOOT = 20_000


def test_resampling_comparisons_gives_the_old_too_narrow_interval():
    assert bootstrap_ci(SCORES, n_boot=N_BOOT) == (0.5, 0.35, 0.65)


def test_resampling_prompts_gives_the_right_interval():
    assert bootstrap_ci(SCORES, groups=PROMPTS, n_boot=N_BOOT) == (0.5, 0.2, 0.8)
    assert win_rate(SCORES, groups=PROMPTS, n_boot=N_BOOT) == {
        "win_rate": 0.5,
        "win_rate_ci_low": 0.2,
        "win_rate_ci_high": 0.8,
    }


def test_groups_may_be_any_labels_in_any_order():
    labels = np.array([f"prompt {p}" for p in PROMPTS])
    order = np.random.default_rng(0).permutation(40)
    assert bootstrap_ci(SCORES[order], groups=labels[order], n_boot=N_BOOT) == (0.5, 0.2, 0.8)


def test_one_prompt_has_no_spread_and_a_mislabelled_group_is_refused():
    assert bootstrap_ci(np.array([1.0, 0.0, 1.0]), groups=np.zeros(3)) == (2 / 3, 2 / 3, 2 / 3)
    with pytest.raises(ValueError, match="3 labels for 40 values"):
        win_rate(SCORES, groups=np.arange(3))


def test_the_length_controlled_interval_resamples_prompts_too():
    # Length difference unrelated to the outcome within each half: the fit is identified, the slope small.
    length_diff = np.tile([-2.0, -1.0, 1.0, 2.0], 10)
    by_comparison = length_controlled_win_rate(SCORES, length_diff, n_boot=2000)
    by_prompt = length_controlled_win_rate(SCORES, length_diff, groups=PROMPTS, n_boot=2000)
    assert by_prompt["lc_win_rate"] == by_comparison["lc_win_rate"] == pytest.approx(0.5, abs=1e-3)
    assert (by_prompt["lc_win_rate_ci_low"], by_prompt["lc_win_rate_ci_high"]) == pytest.approx((0.2, 0.8), abs=0.02)
    assert (by_comparison["lc_win_rate_ci_low"], by_comparison["lc_win_rate_ci_high"]) == pytest.approx(
        (0.35, 0.65), abs=0.02
    )


def test_the_summary_resamples_prompts():
    judgments = pa.Table.from_pandas(
        pd.DataFrame(
            {
                "model": "policy",
                "baseline": "reference",
                "temperature": 1.0,
                "prompt_index": PROMPTS.astype(np.int32),
                "verdict_first": np.where(SCORES == 1.0, "A", "B"),
                "verdict_second": np.where(SCORES == 1.0, "B", "A"),
                "score": SCORES,
                "length_diff": np.zeros(40, dtype=np.int32),
            }
        ),
        schema=JUDGMENTS,
        preserve_index=False,
    )
    samples = pa.Table.from_pylist(
        [
            {
                "model": m,
                "temperature": 1.0,
                "prompt_index": int(p),
                "sample_index": s,
                "prompt": "",
                "completion": "",
                "completion_ids": [1],
                "logps": 0.0,
                "ref_logps": 0.0,
                "kl": 0.0,
                "reward": 0.0,
            }
            for m in ("policy", "reference")
            for p in range(10)
            for s in range(4)
        ],
        schema=SAMPLES,
    )
    [policy, _] = summarize(samples, judgments, [1.0], n_boot=N_BOOT, seed=0)
    assert (policy["win_rate"], policy["win_rate_ci_low"], policy["win_rate_ci_high"]) == (0.5, 0.2, 0.8)
