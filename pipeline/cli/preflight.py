"""One check, before Ray starts, of everything knowable from the config and the files; and, the moment the
tokenize stage finishes, of what needs its counts.

Each part is asked for its own check: the run directory whether it can be written, the data (its first
rows) whether its columns fit a format and whether it needs a chat template, the model folders whether they
hold a model and a tokenizer (a hub id offline: "not found locally and the hub is unreachable", in a
second), the loss registry whether the losses exist and fit the data, training and evaluation whether their
settings can run, the run directory whether the stages before a one-stage command are finished. Nothing is
loaded and neither Ray nor transformers is imported. A failure raises `ConfigError` or `InputError` marked
with the stage that would have failed, so the CLI prints one line, `dpo: error: <stage>: <what, and which
key to change>`, and exits 2.

To add a check (issue 22's rounds, issue 23's loss settings): append to `CONFIG_CHECKS` a (stage, function
of the config) pair; the function raises ConfigError naming the key.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

from pipeline.config import Config, ConfigError
from pipeline.data.encode import check_options
from pipeline.data.preview import Preview, fits_format, preview
from pipeline.data.sources import InputError, hub_dataset
from pipeline.model.locate import context_from_config, has_chat_template, hub_reachable, model_problem
from pipeline.runtime.storage import RunDir
from pipeline.runtime.tracking import check_trackers
from pipeline.stages import by_name
from pipeline.stages.base import named_errors
from pipeline.stages.evaluate import check_evaluate
from pipeline.stages.tokenize import refuse_beyond_context
from pipeline.training.losses import check_loss_config, is_unpaired, loss_specs
from pipeline.training.step_plan import LR_SCHEDULES, NONFINITE_CHOICES, accumulation

# Model keys and the stages that load them: the error names the first of those this command runs.
MODEL_USERS = {"model.path": ("tokenize", "train", "evaluate"), "model.ref_path": ("score", "evaluate")}


def fail(where: str, problem: str | None, *, error: type[ValueError] = ConfigError) -> None:
    """Raise `problem` (when there is one) as the error of stage `where`."""
    if problem is not None:
        with named_errors(where):
            raise error(problem)


def check_loss(config: Config) -> None:
    """The loss registry's check: known names, mixes it can train, and the values of the train.* keys each
    chosen loss reads (`pipeline.training.losses.check_loss_config`)."""
    loss_specs(config.train.loss)  # unknown names and impossible mixes raise ConfigError
    check_loss_config(config.train)


def check_train_settings(config: Config) -> None:
    """Training's settings that no stage before it needs: schedule, non-finite policy, batch layout, trackers."""
    train = config.train
    if train.lr_schedule not in LR_SCHEDULES:
        raise ConfigError(f"train.lr_schedule: {train.lr_schedule!r} is not one of {', '.join(LR_SCHEDULES)}")
    if train.nonfinite not in NONFINITE_CHOICES:
        raise ConfigError(f"train.nonfinite: {train.nonfinite!r} is not one of {', '.join(NONFINITE_CHOICES)}")
    if not (math.isfinite(train.learning_rate) and train.learning_rate >= 0):
        raise ConfigError(f"train.learning_rate: {train.learning_rate!r}; give a number >= 0 (e.g. 5.0e-7)")
    for key in ("batch_size", "micro_batch_size", "num_workers", "epochs", "logging_steps"):
        if getattr(train, key) < 1:
            raise ConfigError(f"train.{key}: {getattr(train, key)}; must be at least 1")
    if train.max_steps is not None and train.max_steps < 1:
        raise ConfigError(f"train.max_steps: {train.max_steps}; must be at least 1 (or null: train.epochs decides)")
    try:
        accumulation(train)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    check_trackers(train, config.run_dir)


# (stage, check): settings checks that need neither the data nor the run directory; issue 22 adds its
# rounds check (`check_rounds`) here.
CONFIG_CHECKS: list[tuple[str, Callable[[Config], None]]] = [
    ("train", check_loss),
    ("train", check_train_settings),
    ("evaluate", check_evaluate),
]


def check_data(config: Config, view: Preview | None) -> None:
    """The input and the tokenize settings: readable, columns that fit a format, the model's context, and a
    chat template where rows hold messages."""
    data, tok = config.data, config.tokenize
    try:
        check_options(
            format=data.format,
            columns=data.columns,
            pairing=data.pairing,
            min_score_gap=data.min_score_gap,
            max_prompt_length=tok.max_prompt_length,
            max_length=tok.max_length,
        )
    except ValueError as err:
        raise ConfigError(str(err)) from None
    refuse_beyond_context(config, context_from_config(config.model.path))  # the stage asks transformers too
    if view is None:
        return
    problem = fits_format(data, view)
    if problem:
        raise ConfigError(problem)
    if view.messages and not data.chat_template and has_chat_template(config.model.path) is False:
        raise ConfigError(
            f"rows of {data.path} hold message lists (conversational), but the tokenizer at {config.model.path} "
            "has no chat template; set data.chat_template to a Jinja template (see docs/first-hour.md)"
        )


def check_data_kind(config: Config, view: Preview | None) -> None:
    """KTO needs unpaired rows, the other losses pairs: judged from the first rows, before anything runs."""
    if view is None or not view.kinds:
        return
    unpaired_data = view.kinds == {"unpaired"}
    if is_unpaired(config.train.loss) and not unpaired_data:
        raise ConfigError(
            f"train.loss: kto trains on unpaired (prompt, completion, label) rows, but {config.data.path} holds "
            "pairs; choose a paired loss (e.g. train.loss: dpo) or give it unpaired data"
        )
    if unpaired_data and not is_unpaired(config.train.loss):
        raise ConfigError(
            f"train.loss: {config.train.loss} trains on pairs, but {config.data.path} holds unpaired "
            "(prompt, completion, label) rows; use train.loss: kto"
        )


def check_eval_split(config: Config) -> None:
    """Evaluate samples held-out prompts: a split that is sure to be empty is refused before training."""
    if config.data.eval_split is None and config.data.eval_fraction <= 0:
        raise ConfigError(
            f"data.eval_fraction is {config.data.eval_fraction:g} and data.eval_split is not set: no prompt is held "
            "out, so there is nothing to evaluate on; set data.eval_fraction (e.g. 0.05) or data.eval_split, "
            "or stop before evaluate (dpo run --to-stage train)"
        )


def check_counts(config: Config, tokenize: dict, stages: tuple[str, ...]) -> None:
    """What needs the tokenize stage's counts (`tokenize`: its manifest), for the later `stages` this command
    runs: the moment tokenize finishes (or before Ray starts, when it finished earlier), not after score."""
    if "train" in stages:
        rows, batch = tokenize["rows_train"], config.train.batch_size
        if rows == 0:
            fail(
                "train",
                f"the tokenize stage left no training rows ({tokenize['rows_out']} out, all held out); "
                "lower data.eval_fraction",
            )
        if batch > rows:
            fail(
                "train",
                f"train.batch_size ({batch}) is larger than the {rows} training rows tokenize made; "
                f"set train.batch_size to at most {rows} (with train.micro_batch_size dividing it)",
            )
    if "evaluate" in stages and tokenize["rows_eval"] == 0:
        fail(
            "evaluate",
            f"the tokenize stage held out no rows of {tokenize['rows_out']} (data.eval_fraction "
            f"{config.data.eval_fraction:g} of their prompts); raise data.eval_fraction or set data.eval_split",
        )


def check_order(config: Config, stages: tuple[str, ...], run_dir: RunDir) -> None:
    """A stage whose upstream is neither run by this command nor finished cannot start."""
    for name in stages:
        upstream = by_name(name).upstream(config)
        if upstream is None or upstream in stages:
            continue
        with named_errors(name):  # a stage of another raydpo version is refused here, naming --force
            finished = run_dir.manifest(upstream)
        if finished is None:
            fail(
                name,
                f"needs a finished {upstream} stage under {run_dir.uri_of(upstream)}; run `dpo {upstream}` first, "
                "or `dpo run`, which runs every stage in order",
            )


def check_before_planning(config: Config) -> None:
    """What planning itself reads: the loss decides whether the score stage runs at all."""
    with named_errors("train"):
        check_loss(config)


def preflight(config: Config, stages: tuple[str, ...]) -> None:
    """Check `config` for the `stages` this command runs (in order) against the files; raise the first
    problem as its stage's error. No Ray, no model loading: a second or two."""
    stages = tuple(s for s in stages if by_name(s).enabled(config))  # score, for a reference-free loss: none
    run_dir = RunDir(config.run_dir)
    fail("run", run_dir.writable_problem())
    for where, check in CONFIG_CHECKS:
        if where in stages:
            with named_errors(where):
                check(config)
    check_order(config, stages, run_dir)
    if not config.demo.enabled:  # the demo makes its data and its model in its first step
        check_inputs(config, stages)
    with named_errors("tokenize"):
        tokenize = None if "tokenize" in stages else run_dir.manifest("tokenize")
    if tokenize is not None:
        check_counts(config, tokenize, stages)  # the counts are known: no need to guess from the settings
    elif "evaluate" in stages:
        with named_errors("evaluate"):
            check_eval_split(config)


def check_inputs(config: Config, stages: tuple[str, ...]) -> None:
    """The model folders and the data, for the stages that read them."""
    model = config.model
    for key, path in (("model.path", model.path), ("model.ref_path", model.ref_path)):
        where = next((s for s in stages if s in MODEL_USERS[key]), None)
        if where is not None and (path or key == "model.path"):
            fail(where, model_problem(path or "", key=key))
    if "tokenize" not in stages:
        return
    path = config.data.path
    if not path:
        fail("tokenize", "data.path is not set: name a JSONL/Parquet file, a folder, or a hub dataset")
    if "://" not in path and not os.path.exists(path) and hub_dataset(path) is None:
        fail("tokenize", f"data.path: {path}: no such file or folder; set data.path", error=InputError)
    if hub_dataset(path) is not None and not hub_reachable():
        fail(
            "tokenize",
            f"data.path: {path} is not a local file or folder (read as a hub dataset) and the hub is unreachable; "
            "set data.path to a local file",
            error=InputError,
        )
    with named_errors("tokenize"):
        view = preview(config.data)  # InputError for an input that cannot be read at all; None for the hub
    with named_errors("tokenize"):
        check_data(config, view)
    if "train" in stages:
        with named_errors("train"):
            check_data_kind(config, view)
