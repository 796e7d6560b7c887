"""What an evaluation judges, what it skipped, and how to turn the skipped parts on.

Evaluation judges only what the user asked it to judge. With no `evaluate.reward` and no `evaluate.judge`
it still reports what needs neither: held-out implicit-reward accuracy and margins, KL to the reference per
temperature, and the models' samples side by side. Each judgment left out is named, with why and the key
that turns it on, in summary.json ("skipped"), at the top of report.md and in the log.
"""

from __future__ import annotations

from pipeline.config import EvaluateConfig
from pipeline.evaluation.plugins import API_JUDGE, JUDGE_GROUP, REWARD_GROUP, registered


def _known(group: str, *builtin: str) -> str:
    names = sorted({*registered(group), *builtin})
    return ", ".join(names) if names else "none installed"


def skipped_judgments(ev: EvaluateConfig, *, held_out_scored: bool) -> list[dict[str, str]]:
    """The judgments this evaluation leaves out: each {"what", "why", "enable"} (the key to set).

    held_out_scored: whether the run has a score stage, whose reference log-probs the held-out
    implicit-reward accuracy needs (a reference-free loss has none).
    """
    skipped = []
    if ev.judge is None:
        skipped.append(
            {
                "what": "win rates (policy vs the reference's samples"
                + (", and vs the held-out chosen responses)" if ev.judge_vs_chosen else ")"),
                "why": "evaluate.judge is not set",
                "enable": f"set evaluate.judge: {API_JUDGE} with evaluate.judge_api {{base_url, model, api_key_env}} "
                f"(any OpenAI-compatible chat endpoint), or a judge a plug-in registers "
                f"(installed: {_known(JUDGE_GROUP)})",
            }
        )
    if ev.reward is None:
        skipped.append(
            {
                "what": "task reward (reward_mean, the reward-vs-KL frontier, the best-of-N baseline)",
                "why": "evaluate.reward is not set",
                "enable": f"set evaluate.reward to a reward a plug-in registers (installed: {_known(REWARD_GROUP)})",
            }
        )
    if not held_out_scored:
        skipped.append(
            {
                "what": "held-out implicit-reward accuracy",
                "why": "the loss is reference-free, so no score stage computed reference log-probs",
                "enable": "train with a loss that reads the reference (e.g. train.loss: dpo)",
            }
        )
    return skipped


def judged_by(ev: EvaluateConfig, judge_name: str | None) -> str:
    """The line at the top of a report that names what judged it (or that nothing did)."""
    judge = f"{judge_name or ev.judge} (evaluate.judge)" if ev.judge else "none"
    reward = f"{ev.reward} (evaluate.reward)" if ev.reward else "none"
    line = f"Judge: {judge}. Reward: {reward}."
    if ev.judge is None and ev.reward is None:
        line += (
            " Nothing here is judged: the report gives what needs neither a judge nor a reward "
            "(held-out implicit-reward accuracy and margins, KL to the reference, samples side by side)."
        )
    return line


def describe_skipped(item: dict[str, str]) -> str:
    """One skipped judgment as a line of the report and the log."""
    return f"{item['what']}: skipped, {item['why']}; to turn it on, {item['enable']}."
