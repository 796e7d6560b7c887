"""Which stages a `dpo run` executes, decided from the run directory's manifests before Ray starts.

A stage is current when its manifest matches its config hash and the manifest of the stage before it,
and that stage is current too (a redone upstream stage writes a new manifest hash, so everything after
it is stale). From that:

    dpo run                       the stages from the first stale one on; none if every stage is current
    dpo run --from-stage S        S and everything after it, redone; stale stages before S run first
    dpo run --only S              S alone, redone; the stages before S must be current
    dpo run --to-stage S          stop after S (combines with the above)

Also here: running the planned stages in order (`run_stages`, which `dpo run`, the one-stage commands
and `dpo sweep` share), and the submission id of a run, so Ray refuses a second `ray job submit` of it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass

from pipeline.cli.preflight import check_counts
from pipeline.config import Config, ConfigError, section_hash
from pipeline.data.sources import InputError, hub_dataset
from pipeline.demo.prepare import DEMO
from pipeline.runtime.ray_setup import init_ray
from pipeline.runtime.resources import check_resources
from pipeline.runtime.storage import OutdatedStageError, RunDir
from pipeline.stages import STAGE_NAMES, STAGES, by_name, cluster_requests, enabled_stages
from pipeline.stages.base import check, fingerprint, is_current, upstream_manifest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """What to execute: `run` in order, redoing those in `force`; `current` were finished before."""

    stages: tuple[str, ...]  # the stages asked for, in order (score absent if no reference, none past --to-stage)
    current: tuple[str, ...]  # finished and up to date now
    run: tuple[str, ...]
    force: frozenset[str]

    def describe(self, run_dir: str) -> str:
        if not self.run:
            return (
                f"run {run_dir}: every stage finished ({', '.join(self.stages)}); nothing to do. "
                "Use --from-stage to redo."
            )
        skipped = [s for s in self.stages if s in self.current and s not in self.run]
        parts = [f"run {run_dir}: running {', '.join(self.run)}"]
        if self.force:
            parts.append(f"redoing {', '.join(s for s in self.run if s in self.force)}")
        if skipped:
            parts.append(f"finished already: {', '.join(skipped)}")
        return "; ".join(parts)


def current_stages(config: Config, stages: tuple[str, ...]) -> tuple[str, ...]:
    """The leading stages whose manifests match this config and their upstream (read-only, no Ray)."""
    run_dir = RunDir(config.run_dir)
    try:
        if config.demo.enabled and not is_current(DEMO, config, run_dir, None):
            return ()  # the demo makes tokenize's input: until it is ready, nothing downstream is current
    except OutdatedStageError:
        return ()
    current: list[str] = []
    for name in stages:
        stage = by_name(name)
        try:
            tied_to = fingerprint(stage, config, upstream_manifest(stage, config, run_dir))
            if tied_to is None or not is_current(stage, config, run_dir, tied_to):
                break
        except (OSError, RuntimeError, OutdatedStageError):
            # The input or the upstream stage is not there (yet), or was written by other code: running the
            # stage will say why (an outdated stage is refused, naming --force, unless it is being redone).
            break
        current.append(name)
    return tuple(current)


def make_plan(
    stages: tuple[str, ...],
    current: tuple[str, ...],
    *,
    from_stage: str | None = None,
    only: str | None = None,
    to_stage: str | None = None,
    force: bool = False,
) -> Plan:
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
                f"(no manifest, or its config or input changed); run `dpo run --to-stage {only}` first"
            )
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
    stages = tuple(s.name for s in enabled_stages(config))
    return make_plan(stages, current_stages(config, stages), **flags)


def submission_id(config: Config, stage: str = "run") -> str:
    """`raydpo-<hash>-<stage>`: the same work gets the same id, so Ray refuses a second submission of it.

    The hash covers the run directory and the config of `stage` and every stage before it (for "run":
    all stages); a change that reruns the stage changes the id. Resource fields do not count.
    """
    if stage not in ("run", "iterate") and stage not in STAGE_NAMES:
        raise ConfigError(f"--stage {stage}: expected run, iterate or one of {', '.join(STAGE_NAMES)}")
    stages = STAGES if stage in ("run", "iterate") else STAGES[: STAGE_NAMES.index(stage) + 1]
    picked = {"run_dir": config.run_dir, **{s.name: s.config_hash(config) for s in stages}}
    if stage == "iterate":  # the rounds' own sections too (resource fields left out, as for the stages)
        picked["rounds"] = section_hash(config, ("rounds", "generate", "label", "data"))
    if config.demo.enabled:
        picked["demo"] = DEMO.config_hash(config)
    digest = hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:12]
    return f"raydpo-{digest}-{stage}"


def run_stages(config: Config, stages: tuple[str, ...], *, force: bool | frozenset[str]) -> dict[str, dict]:
    """Run the named stages in order, redoing those in `force` (True: all, the demo's preparation too);
    a stage the config has no use for (score, for a reference-free loss) is skipped. Returns the manifests."""
    if "tokenize" in stages and not config.demo.enabled:
        check_input(config.data.path)  # a missing file is an error before Ray starts, not after
    # One writer per run directory, from before Ray starts to after the last stage: a second `dpo` on
    # it is refused at once, naming this one.
    with RunDir(config.run_dir).lease():
        init_ray(config.ray)
        # A request this cluster can never satisfy fails now, naming the resource, instead of hanging.
        check_resources(cluster_requests(config, stages))
        for stage in enabled_stages(config):
            if stage.name in stages:
                check(stage, config)  # e.g. a train run too large for the cluster's GPUs
        forced = frozenset(stages) if force is True else frozenset(force or ())
        manifests = {}
        if config.demo.enabled and "tokenize" in stages:
            manifests["demo"] = DEMO.run(config, force=force is True)  # redone only by --force itself
        for i, stage in enumerate(map(by_name, stages)):
            if not stage.enabled(config):
                log.info("%s: skipped, the configured loss has no use for it", stage.name)
                continue
            manifests[stage.name] = stage.run(config, force=stage.name in forced)
            if stage.name == "tokenize":
                check_counts(config, manifests["tokenize"], stages[i + 1 :])  # now, not after score
    return manifests


def check_input(path: str) -> None:
    if not path:
        raise InputError("data.path is not set: name a JSONL/Parquet file, a directory, or a hub dataset")
    if "://" not in path and not os.path.exists(path) and hub_dataset(path) is None:
        raise InputError(f"{path}: no such file or directory (data.path)")
