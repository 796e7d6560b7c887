"""The model card of a trained policy, `train/final/README.md`, as users of TRL and the hub expect one: YAML
metadata the hub reads (base model, library, tags, datasets), then the base model, the data, the loss and its
hyperparameters, the training's last metrics and, once the evaluate stage has run, its summary.

The train stage writes the card without an evaluation; the evaluate stage writes it again with one. Since
the card is rewritten after training, README.md files are no part of a stage's content: manifests do not
list them (pipeline/runtime/storage.py), so rewriting the card never unfinishes the train stage.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from pipeline.config import Config

CARD = "README.md"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
CARD_METRICS = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected")


def _number(value: Any) -> str:
    return "–" if not isinstance(value, (int, float)) or isinstance(value, bool) else f"{value:.4g}"


def _front_matter(config: Config) -> list[str]:
    lines = ["---", "library_name: transformers", "tags: [raydpo, dpo, preference-optimization]"]
    base = config.model.path
    if _HUB_ID.match(base):
        lines.append(f"base_model: {base}")
    data = config.data.path.removeprefix("hf://datasets/")
    if _HUB_ID.match(data):
        lines.append(f"datasets: [{data}]")
    return [*lines, "---", ""]


def evaluation_section(evaluation: Mapping[str, Any] | None, policy: str) -> list[str]:
    """The card's last section: the evaluate stage's summary for `policy`, or a line saying it has not run."""
    if evaluation is None:
        return ["## Evaluation", "", "Not evaluated yet: `dpo evaluate` (or `dpo run`) writes its summary here.", ""]
    judge, reward = evaluation.get("judge_name") or evaluation.get("judge"), evaluation.get("reward")
    lines = [
        "## Evaluation",
        "",
        f"Judge: {judge or 'none'}; reward: {reward or 'none'}; {evaluation['num_prompts']} held-out prompts "
        "(the run's evaluate/report.md has the figures and samples).",
        "",
        "| model | temperature | KL to the reference (nats) | reward | win rate vs reference [95% CI] |",
        "|---|---|---|---|---|",
    ]
    for row in evaluation["rows"]:
        if row["model"] not in (policy, "reference"):
            continue
        rate = row.get("win_rate")
        interval = (
            f"{rate:.3f} [{row['win_rate_ci_low']:.3f}, {row['win_rate_ci_high']:.3f}]" if rate is not None else "–"
        )
        lines.append(
            f"| {row['model']} | {row['temperature']:g} | {_number(row.get('kl_mean'))} | "
            f"{_number(row.get('reward_mean'))} | {interval} |"
        )
    accuracy = evaluation.get("implicit_reward_accuracy") or {}
    accuracy = accuracy.get(policy, accuracy) if "kind" not in accuracy else accuracy
    if accuracy.get("kind") == "pairs":
        lines += [
            "",
            f"Held-out implicit-reward accuracy: {accuracy['accuracy']:.3f} on {accuracy['pairs']} pairs "
            f"(mean margin {accuracy['margin_mean']:.4g}).",
        ]
    elif accuracy.get("kind") == "unpaired" and accuracy.get("auc") is not None:
        lines += ["", f"Held-out implicit-reward separation (AUC): {accuracy['auc']:.3f} on {accuracy['rows']} rows."]
    skipped: Sequence[Mapping[str, str]] = evaluation.get("skipped") or []
    if skipped:
        lines += ["", "Not judged: " + "; ".join(f"{s['what']} ({s['why']})" for s in skipped) + "."]
    return [*lines, ""]


def model_card(
    config: Config,
    *,
    loss_keys: Mapping[str, Any],
    data_counts: Mapping[str, Any],
    steps: int,
    final_metrics: Mapping[str, Any],
    evaluation: Mapping[str, Any] | None = None,
    policy: str = "policy",
) -> str:
    """The card's markdown. loss_keys: the train.* values the chosen loss reads (beta, ...); data_counts:
    the training data's counts (rows_train, rows_eval, and dropped when known); final_metrics: the last
    metrics.jsonl row; evaluation: the evaluate stage's summary.json document, or None before it ran; policy:
    the model's name in that summary (a sweep member's name)."""
    train, name = config.train, config.run_dir.rstrip("/").rsplit("/", 1)[-1]
    # BUG, left for its own change: a list train.loss (names with train.loss_weights) has no .items() and
    # raises AttributeError here; a fix changes what the card says, which a type-only change must not.
    loss = train.loss if isinstance(train.loss, str) else " + ".join(f"{w:g}·{k}" for k, w in train.loss.items())  # pyright: ignore[reportAttributeAccessIssue]
    dropped = data_counts.get("dropped")
    lines = [
        *_front_matter(config),
        f"# {name}: {loss} on {config.data.path.rsplit('/', 1)[-1]}",
        "",
        f"Trained with raydpo (Direct Preference Optimization as Ray stages), loss {loss}, from `{config.model.path}`; "
        f"the reference was `{config.model.reference}`.",
        "",
        "## Data",
        "",
        f"- source: `{config.data.path}`" + (f" (split {config.data.split})" if config.data.split else ""),
        f"- trained on {data_counts.get('rows_train', '?')} rows; {data_counts.get('rows_eval', '?')} held out "
        + (
            f"(split {config.data.eval_split})"
            if config.data.eval_split
            else f"by prompt ({config.data.eval_fraction:g})"
        ),
    ]
    if dropped:
        lines.append(f"- rejected while tokenizing: {', '.join(f'{k} {v}' for k, v in sorted(dropped.items()))}")
    lines += [
        f"- tokens: prompts cut to {config.tokenize.max_prompt_length}, pairs to {config.tokenize.max_length}",
        "",
        "## Training",
        "",
        "| setting | value |",
        "|---|---|",
        f"| loss | {loss} |",
        *(f"| {key} | {value} |" for key, value in loss_keys.items()),
        f"| learning rate | {train.learning_rate:g} ({train.lr_schedule}, {train.warmup_steps} warmup steps) |",
        f"| batch size | {train.batch_size} (micro-batch {train.micro_batch_size} x {train.num_workers} workers) |",
        f"| steps | {steps} |",
        f"| strategy | {train.strategy}" + (f", LoRA r={train.lora.r}" if train.lora else "") + " |",
        f"| seed | {train.seed} |",
        "",
        "Last logged step: "
        + ", ".join(f"{key} {_number(final_metrics.get(key))}" for key in CARD_METRICS if key in final_metrics)
        + ".",
        "",
        *evaluation_section(evaluation, policy),
    ]
    return "\n".join(lines)


def with_evaluation(card: str, evaluation: Mapping[str, Any], *, policy: str = "policy") -> str:
    """`card` with its evaluation section replaced by `evaluation`'s (a summary.json document)."""
    cut = card.find("\n## Evaluation")
    head = card if cut < 0 else card[: cut + 1]
    return head + "\n".join(evaluation_section(evaluation, policy))
