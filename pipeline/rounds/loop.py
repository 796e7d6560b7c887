"""The rounds: the prompt set once, pi_0's evaluation, then round after round, then the report.

    prompts                                      <run_dir>/prompts/        the prompt set, held-out prompts apart
    rounds/0/evaluate                            pi_0 on the held-out prompts: the baseline
    for t in 1..rounds.count:                    <run_dir>/rounds/<t>/
        generate   pi_{t-1} samples the round's prompts
        label      every completion scored; rows in the `scored` format
        tokenize   best vs worst pairs (data.pairing, data.min_score_gap)
        score      the pairs under the round's reference (pi_0, or pi_{t-1})
        train      from pi_{t-1}: pi_t
        evaluate   pi_t on the held-out prompts, against pi_0 and pi_{t-1}
    rounds_report                                the table across rounds, the plot, the trackers

Every box is a stage run through the one skeleton (pipeline/stages/base.py), so a finished stage is skipped,
an interrupted one is redone (train from its last checkpoint) and a redone one reruns what follows it: a
finished round is skipped, an interrupted one resumes. `from_round` redoes round k and every round after it.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

from pipeline.config import Config, ConfigError
from pipeline.rounds.layout import chain_hash, evaluate_config, policy, round_config, round_dir
from pipeline.rounds.refusals import check_rounds
from pipeline.rounds.rounds_report import ROUNDS_REPORT
from pipeline.runtime.ray_setup import init_ray
from pipeline.runtime.resources import Request, check_resources
from pipeline.runtime.storage import RunDir
from pipeline.stages import SCORE, TOKENIZE, TRAIN
from pipeline.stages.base import check
from pipeline.stages.evaluate import EVALUATE
from pipeline.stages.generate import GENERATE, generate_body
from pipeline.stages.label import LABEL
from pipeline.stages.prompts import PROMPTS_STAGE
from pipeline.stages.round_evaluate import ROUND_EVALUATE, evaluate_round

log = logging.getLogger(__name__)


def round_requests(config: Config) -> list[Request]:
    """What one round places on the cluster, stage by stage (they run one after another)."""
    first = round_config(config, 1)
    stages = (GENERATE, LABEL, TOKENIZE, SCORE, TRAIN, EVALUATE)
    return [r for s in stages if s.enabled(first) for r in s.requests(first) if r.count > 0]


def run_rounds(
    config: Config, *, from_round: int | None = None, force: bool = False, before: Callable[[], None] | None = None
) -> dict:
    """Run what is not finished of `rounds.count` rounds (all with `force`; round `from_round` on, redone).

    before(): work that makes the prompt set or pi_0 (the demo's), run under the lease once Ray is up.
    Returns the report stage's manifest.
    """
    check_rounds(config)
    if from_round is not None and not 1 <= from_round <= config.rounds.count:
        raise ConfigError(f"--from-round {from_round}: rounds run from 1 to rounds.count={config.rounds.count}")
    root = RunDir(config.run_dir)
    with root.lease():  # one writer for the whole loop; each stage's lease on its round's folder is its own
        init_ray(config.ray)
        if before is not None:
            before()
        check_resources(round_requests(config))
        for stage in (TRAIN, EVALUATE):
            check(stage, round_config(config, 1))  # e.g. a train run too large for the cluster's GPUs
        prompts = PROMPTS_STAGE.run(config, force=force)
        evaluations = [evaluate(config, 0, prompts, [], force=force)]
        trained: dict | None = None
        for t in range(1, config.rounds.count + 1):
            redo = force or (from_round is not None and t >= from_round)
            log.info("round %d of %d%s", t, config.rounds.count, " (redone)" if redo else "")
            trained = run_round(config, t, prompts, trained, force=redo)
            evaluations.append(evaluate(config, t, prompts, evaluations, force=redo, trained=trained))
        return ROUNDS_REPORT.run(
            config, force=force, upstream_hash=chain_hash(*(e["manifest_hash"] for e in evaluations)), body=None
        )


def run_round(config: Config, t: int, prompts: dict, previous: dict | None, *, force: bool) -> dict:
    """generate -> label -> tokenize -> score -> train of round t; returns its train manifest."""
    here = round_config(config, t)
    GENERATE.run(
        here,
        force=force,
        data_dir=RunDir(config.run_dir),
        out_dir=RunDir(here.run_dir),
        # The round's prompts and the policy it samples: pi_0, or the previous round's train stage as it stands.
        upstream_hash=chain_hash(prompts["manifest_hash"], t, previous["manifest_hash"] if previous else "pi_0"),
        body=functools.partial(generate_body, round_index=t),
    )
    LABEL.run(here, force=force)
    TOKENIZE.run(here, force=force)
    if SCORE.enabled(here):
        SCORE.run(here, force=force)
    return TRAIN.run(here, force=force)


def evaluate(
    config: Config, t: int, prompts: dict, before: list[dict], *, force: bool, trained: dict | None = None
) -> dict:
    """Round t's evaluate stage (round 0: pi_0's), tied to the policy's train stage and its baselines'."""
    baselines = (
        {} if t == 0 else {"initial": RunDir(round_dir(config, 0)), "previous": RunDir(round_dir(config, t - 1))}
    )
    tied = [prompts["manifest_hash"], t, trained["manifest_hash"] if trained else config.model.path]
    return ROUND_EVALUATE.run(
        evaluate_config(config, t),
        force=force,
        upstream_hash=chain_hash(*tied, *(b["manifest_hash"] for b in before[:1] + before[-1:])),
        body=functools.partial(
            evaluate_round,
            round_index=t,
            policy=policy(config, t),
            prompts_dir=RunDir(config.run_dir),
            baselines=baselines,
        ),
    )
