"""An evaluation with no judge and no reward judges nothing: it reports what needs neither and names what it
skipped, with the key that turns each part on; a chosen judge and reward are named at the top."""

from __future__ import annotations

import pyarrow as pa
import pytest

from pipeline.config import EvaluateConfig
from pipeline.data.schemas import JUDGMENTS, SAMPLES
from pipeline.evaluation.held_out import pair_accuracy
from pipeline.evaluation.report import report_notes, write_report_files
from pipeline.evaluation.scope import describe_skipped, judged_by, skipped_judgments
from pipeline.evaluation.summary import evaluation_summary


def sample_rows(models=("policy", "reference"), temperatures=(0.0, 1.0), prompts=3) -> list[dict]:
    rows = []
    for model in models:
        for t in temperatures:
            for p in range(prompts):
                rows.append(
                    {
                        "model": model,
                        "temperature": t,
                        "prompt_index": p,
                        "sample_index": 0,
                        "prompt": f"review {p}:",
                        "completion": f" {model} says | hello\nagain at {t}",
                        "completion_ids": [5, 6],
                        "logps": -3.0 - p,
                        "ref_logps": -3.5 - p if model == "policy" else -3.0 - p,
                        "kl": 0.5 if model == "policy" else 0.0,
                        "reward": None,
                        "candidates": 1,
                        "tokens_generated": 2,
                    }
                )
    return rows


def unjudged_summary(ev: EvaluateConfig, skipped: list[dict]) -> tuple[dict, dict]:
    rows = sample_rows()
    accuracy = {"policy": pair_accuracy([-1.0, -2.0], [-3.0, -1.0], [-2.0, -2.0], [-2.0, -2.0], beta=0.1)}
    summary = evaluation_summary(
        rows,
        pa.Table.from_pylist(rows, schema=SAMPLES),
        JUDGMENTS.empty_table(),
        ev,
        kl_bounds={},
        accuracy=accuracy,
        policy_names=["policy"],
        num_prompts=3,
        chosen_texts=None,
        candidates=[],
        skipped=skipped,
    )
    return summary, accuracy


def test_no_judge_and_no_reward_report_what_needs_neither_and_name_what_was_skipped(tmp_path):
    ev = EvaluateConfig(temperatures=[0.0, 1.0])
    assert ev.judge is None and ev.reward is None  # no default judge: nothing is judged unless asked
    skipped = skipped_judgments(ev, held_out_scored=True)
    assert [s["why"] for s in skipped] == ["evaluate.judge is not set", "evaluate.reward is not set"]
    assert "evaluate.judge: api with evaluate.judge_api" in skipped[0]["enable"]
    assert "vader" in skipped[0]["enable"]  # the installed plug-in's judge is offered, not used
    summary, accuracy = unjudged_summary(ev, skipped)
    assert summary["judge"] is None and summary["reward"] is None and summary["skipped"] == skipped
    assert all(r["win_rate"] is None and r["reward_mean"] is None for r in summary["rows"])
    policy = next(r for r in summary["rows"] if r["model"] == "policy" and r["temperature"] == 1.0)
    assert policy["kl_mean"] == pytest.approx(0.5)

    written = write_report_files(
        tmp_path,
        title="Evaluation of runs/mine",
        summary_rows=summary["rows"],
        training_metrics={"policy": [{"step": 1, "loss": 0.69}]},
        notes=report_notes(summary, samples_per_prompt=1, accuracy=accuracy),
        header=[judged_by(ev, None), *map(describe_skipped, skipped)],
        samples=sample_rows(),
    )
    assert "win_rate_vs_temperature.png" not in written and "reward_vs_kl.png" not in written
    assert (tmp_path / "kl_vs_temperature.png").read_bytes().startswith(b"\x89PNG")
    text = (tmp_path / "report.md").read_text()
    top = text.split("## Summary")[0]
    assert "Judge: none. Reward: none. Nothing here is judged" in top
    assert "win rates (policy vs the reference's samples, and vs the held-out chosen responses): skipped" in top
    assert "task reward (reward_mean" in top and "set evaluate.reward to a reward a plug-in registers" in top
    # The table shows what was measured, no empty win-rate or reward columns.
    assert "| model | temperature | n | kl_mean | samples_per_answer | tokens_per_answer |" in text
    assert "win_rate" not in text.split("## Summary")[1].split("## Figures")[0]
    # Held-out implicit-reward accuracy and margin, and the samples side by side (one cell per completion).
    assert "Implicit-reward accuracy of policy on 2 held-out pairs: 0.500" in text
    assert "mean margin" in text and "Unparsed judge verdicts" not in text
    samples = text.split("## Samples (T = 0)")[1]
    assert samples.count("Prompt ") == 3
    assert "| policy |  policy says \\| hello<br>again at 0.0 |" in samples


def test_a_chosen_judge_and_reward_are_named_at_the_top():
    ev = EvaluateConfig(judge="api", reward="vader")
    assert judged_by(ev, "api:gpt-4o") == "Judge: api:gpt-4o (evaluate.judge). Reward: vader (evaluate.reward)."
    assert skipped_judgments(ev, held_out_scored=True) == []
    (reference_free,) = skipped_judgments(ev, held_out_scored=False)
    assert reference_free["what"] == "held-out implicit-reward accuracy"
