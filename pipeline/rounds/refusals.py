"""What `dpo iterate` refuses before Ray starts, each as a ConfigError naming the key to change.

`check_rounds(config)` is the whole check of a rounds config: the CLI's pre-flight check calls it, and so does
the loop itself (a job submitted with `jobs/iterate.py` is checked the same way).
"""

from __future__ import annotations

from pipeline.config import Config, ConfigError
from pipeline.stages.evaluate import check_evaluate
from pipeline.stages.label import check_label
from pipeline.training.losses import is_unpaired


def check_rounds(config: Config) -> None:
    """Refuse a config `dpo iterate` cannot run: no rounds, no prompt set, completions that would not fit the
    token budget, a loss that trains on unpaired rows, a labeller or evaluation it cannot build."""
    rounds, tok = config.rounds, config.tokenize
    if rounds.count < 1:
        raise ConfigError(f"rounds.count: {rounds.count}; `dpo iterate` needs at least 1 round")
    if not config.data.path:
        raise ConfigError("data.path: name the prompt set the rounds sample from (JSONL, Parquet, datasets dir, hub)")
    if tok.max_prompt_length + config.generate.max_tokens > tok.max_length:
        raise ConfigError(
            f"generate.max_tokens: {config.generate.max_tokens} new tokens after prompts of up to "
            f"tokenize.max_prompt_length={tok.max_prompt_length} exceed tokenize.max_length={tok.max_length}, "
            "so tokenize would cut the completions; lower generate.max_tokens or raise tokenize.max_length"
        )
    if is_unpaired(config.train.loss):
        raise ConfigError(f"train.loss: {config.train.loss} trains on unpaired rows; rounds make pairs (best vs worst)")
    if config.data.pairing not in ("best_vs_worst", "best_vs_rest", "all_pairs"):
        raise ConfigError(f"data.pairing: {config.data.pairing!r} is not best_vs_worst, best_vs_rest or all_pairs")
    check_label(config)
    check_evaluate(config)
