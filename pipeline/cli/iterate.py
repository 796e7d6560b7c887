"""`dpo iterate --config X`: on-policy rounds (pipeline/rounds), the demo's preparation first where enabled.

dpo iterate --config configs/demo_rounds.yaml          the rounds not finished yet, then the report
dpo iterate --config X --from-round 2                  redo round 2 and every round after it
dpo iterate --config X --force                         redo everything, the prompt set included
"""

from __future__ import annotations

from pipeline.config import Config
from pipeline.demo.prepare import DEMO
from pipeline.demo.round_prompts import DEMO_PROMPTS
from pipeline.rounds.loop import run_rounds
from pipeline.rounds.refusals import check_rounds
from pipeline.runtime.storage import RunDir

__all__ = ["check_rounds", "iterate"]


def iterate(config: Config, *, from_round: int | None, force: bool) -> None:
    """Run the rounds; with `demo.enabled`, the demo's pi_0 and prompt set are made (or found made) first."""

    def prepare_demo() -> None:
        DEMO.run(config, force=force)
        DEMO_PROMPTS.run(config, force=force)

    run_rounds(config, from_round=from_round, force=force, before=prepare_demo if config.demo.enabled else None)
    report = RunDir(config.run_dir)
    print(f"report: {report.uri_of('rounds_report', 'report.md')}")
    print(f"summary: {report.uri_of('rounds_report', 'summary.json')}")
