"""Which stages a `dpo run` executes, decided from the run directory's manifests before Ray starts.

A stage is current when its manifest matches its config hash and the manifest of the stage before it,
and that stage is current too (a redone upstream stage writes a new manifest hash, so everything after
it is stale). From that:

    dpo run                       the stages from the first stale one on; none if every stage is current
    dpo run --from-stage S        S and everything after it, redone; stale stages before S run first
    dpo run --only S              S alone, redone; the stages before S must be current
    dpo run --to-stage S          stop after S (combines with the above)

Also here: the submission id of a run, so a second `ray job submit` of the same work is refused by Ray.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from pipeline.config import Config, ConfigError, stage_hash
from pipeline.runtime.storage import RunDir

STAGES = ("tokenize", "score", "train", "evaluate")


@dataclass(frozen=True)
class Plan:
    """What to execute: `run` in order, redoing those in `force`; `current` were finished before."""

    stages: tuple[str, ...]  # the stages asked for, in order (score absent if no reference, none past --to-stage)
    current: tuple[str, ...]  # finished and up to date now
    run: tuple[str, ...]
    force: frozenset[str]

    def describe(self, run_dir: str) -> str:
        if not self.run:
            return (f"run {run_dir}: every stage finished ({', '.join(self.stages)}); nothing to do. "
                    "Use --from-stage to redo.")
        skipped = [s for s in self.stages if s in self.current and s not in self.run]
        parts = [f"run {run_dir}: running {', '.join(self.run)}"]
        if self.force:
            parts.append(f"redoing {', '.join(s for s in self.run if s in self.force)}")
        if skipped:
            parts.append(f"finished already: {', '.join(skipped)}")
        return "; ".join(parts)


def pipeline_stages(config: Config) -> tuple[str, ...]:
    """The stages this config runs: reference-free losses have no score stage."""
    from pipeline.stages.train import needs_reference

    return STAGES if needs_reference(config) else tuple(s for s in STAGES if s != "score")


def current_stages(config: Config, stages: tuple[str, ...]) -> tuple[str, ...]:
    """The leading stages whose manifests match this config and their upstream (read-only, no Ray)."""
    from pipeline.demo.prepare import STAGE as DEMO
    from pipeline.demo.prepare import demo_hash

    run_dir = RunDir(config.run_dir)
    if config.demo.enabled and not run_dir.is_finished(DEMO, config_hash=demo_hash(config), upstream_hash=None):
        return ()  # the demo makes tokenize's input: until it is ready, nothing downstream is current
    current: list[str] = []
    upstream_hash: str | None = None
    for stage in stages:
        if stage == "tokenize":
            upstream_hash = _input_fingerprint(config.data.path)
        if upstream_hash is None or not run_dir.is_finished(stage, config_hash=stage_hash(config, stage), upstream_hash=upstream_hash):
            break
        current.append(stage)
        upstream_hash = run_dir.manifest(stage)["manifest_hash"]
    return tuple(current)


def _input_fingerprint(path: str) -> str | None:
    from pipeline.stages.tokenize import input_fingerprint

    try:
        return input_fingerprint(path)
    except OSError:
        return None  # input not there (yet): tokenize is not current, and running it will say why


def make_plan(stages: tuple[str, ...], current: tuple[str, ...], *, from_stage: str | None = None,
              only: str | None = None, to_stage: str | None = None, force: bool = False) -> Plan:
    """Pure: the plan for a pipeline of `stages` whose leading `current` stages are finished."""
    if from_stage and only:
        raise ConfigError("--from-stage and --only: give one of them")
    if force and (from_stage or only):
        raise ConfigError("--force redoes every stage; with --from-stage or --only, leave it out")
    for flag, stage in (("--from-stage", from_stage), ("--only", only), ("--to-stage", to_stage)):
        if stage is not None and stage not in stages:
            why = " (the configured loss needs no reference model)" if stage == "score" else ""
            raise ConfigError(f"{flag} {stage}: not a stage of this run{why}; its stages are {', '.join(stages)}")
    last = stages.index(to_stage) + 1 if to_stage else len(stages)
    if only:
        if to_stage and stages.index(to_stage) < stages.index(only):
            raise ConfigError(f"--only {only} comes after --to-stage {to_stage}")
        missing = [s for s in stages[: stages.index(only)] if s not in current]
        if missing:
            raise ConfigError(
                f"--only {only}: the stage before it, {missing[0]}, is not finished for this config "
                f"(no manifest, or its config or input changed); run `dpo run --to-stage {only}` first")
        return Plan((only,), current, (only,), frozenset({only}))
    wanted = stages[:last]
    if force:
        return Plan(wanted, current, wanted, frozenset(wanted))
    if from_stage:
        start = stages.index(from_stage)
        if start >= last:
            raise ConfigError(f"--from-stage {from_stage} comes after --to-stage {to_stage}")
        before = tuple(s for s in stages[:start] if s not in current)
        return Plan(wanted, current, before + wanted[start:], frozenset(wanted[start:]))
    return Plan(wanted, current, tuple(s for s in wanted if s not in current), frozenset())


def plan_run(config: Config, **flags) -> Plan:
    """The plan for `dpo run` on this config and its run directory."""
    stages = pipeline_stages(config)
    return make_plan(stages, current_stages(config, stages), **flags)


def submission_id(config: Config, stage: str = "run") -> str:
    """`raydpo-<hash>-<stage>`: the same work gets the same id, so Ray refuses a second submission of it.

    The hash covers the run directory and the config of `stage` and every stage before it (for "run":
    all stages); a change that reruns the stage changes the id. Resource fields do not count.
    """
    if stage != "run" and stage not in STAGES:
        raise ConfigError(f"--stage {stage}: expected run or one of {', '.join(STAGES)}")
    stages = STAGES if stage == "run" else STAGES[: STAGES.index(stage) + 1]
    picked = {"run_dir": config.run_dir, **{s: stage_hash(config, s) for s in stages}}
    if config.demo.enabled:
        from pipeline.demo.prepare import demo_hash

        picked["demo"] = demo_hash(config)
    digest = hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:12]
    return f"raydpo-{digest}-{stage}"

