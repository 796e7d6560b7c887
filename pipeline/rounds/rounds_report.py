"""The evaluation across rounds, in one place: `<run_dir>/rounds_report/` (report.md, reward_vs_kl.png,
summary.json), and each round's numbers logged to the trackers (`train.report_to`) with the round as the step.

Its input is every round's evaluate stage (rounds 0 to `rounds.count`); it is a stage like any other, so it is
redone only when one of them was.
"""

from __future__ import annotations

import logging
import os
import tempfile

from pipeline.config import Config
from pipeline.evaluation.rounds_summary import plot_rounds_reward_vs_kl, rounds_report, tracker_values
from pipeline.rounds.layout import round_dir
from pipeline.runtime.storage import RunDir
from pipeline.runtime.tracking import Trackers, TrackingRun, flat_params
from pipeline.stages.base import Stage, StageRun

log = logging.getLogger(__name__)

NAME = "rounds_report"


def report_body(run: StageRun) -> dict:
    """Gather rounds 0..count's evaluate summaries into the table, the plot and summary.json; log to trackers."""
    config = run.config
    summaries = [
        RunDir(round_dir(config, t)).read_json("evaluate/summary.json") for t in range(config.rounds.count + 1)
    ]
    rows = [row for s in summaries for row in s["rows"]]
    scored_under = "pi_0" if config.rounds.reference == "initial" else "pi_(t-1)"
    notes = [
        f"pi_0: {config.model.path}; pairs scored under {scored_under} (rounds.reference: {config.rounds.reference})",
        f"{summaries[0]['num_prompts']} held-out prompts x {config.evaluate.samples_per_prompt} samples per "
        "temperature; win rates count ties as half, with 95% intervals that resample prompts",
        f"reward: {config.evaluate.reward or 'none'}; judge: {config.evaluate.judge or 'none'}; "
        f"KL: mean per-sample sum(log pi_t - log pi_0), nats",
    ]
    run.writer.write_json("summary.json", {"rounds": config.rounds.count, "rows": rows, "notes": notes})
    with tempfile.TemporaryDirectory() as tmp:
        plot_rounds_reward_vs_kl(rows, os.path.join(tmp, "reward_vs_kl.png"))
        with open(os.path.join(tmp, "report.md"), "w", encoding="utf-8") as f:
            f.write(rounds_report(rows, title=f"On-policy rounds of {config.run_dir}", notes=notes))
        run.run_dir.upload_dir(tmp, run.writer.staging)
    log_rounds(config, rows, attempt=f"rounds-{run.stage.config_hash(config)[:8]}")
    return {"rounds": config.rounds.count, "rows_out": len(rows), "dropped": {}}


def log_rounds(config: Config, rows: list[dict], *, attempt: str) -> None:
    """Each round's numbers at step = its round, in a tracking run of the rounds (`train.report_to`)."""
    train = config.train
    if not train.report_to:
        return
    run = TrackingRun(config.run_dir, attempt, tuple(train.report_to), train.tracker_project, train.mlflow_tracking_uri)
    trackers = Trackers(run, params=flat_params(config.to_dict()))
    try:
        for step, values in sorted(tracker_values(rows).items()):
            trackers.log(values, step=step)
    finally:
        trackers.close()


ROUNDS_REPORT = Stage(name=NAME, sections=("rounds", "evaluate", "model"), body=report_body)
