"""`dpo sweep`: several policies from ONE tokenize and ONE score stage, on one plot.

The reference log-probs depend on neither beta nor the loss, so a sweep over `train.*` values reuses
the frozen shards: each member trains into `<run_dir>/sweep/<member>/train`, reading
`<run_dir>/score/train`, and one evaluate stage puts every member against the reference in one table
and one reward-vs-KL plot, like the DPO paper's frontier figure. Members train in parallel threads,
each a TorchTrainer, as far as the cluster's CPUs (or GPUs) allow while leaving Ray Data a CPU.

    dpo sweep --config configs/demo.yaml --set train.beta=[0.05,0.1,0.5] --set train.loss=[dpo,sft,unlikelihood]
    dpo sweep --config configs/demo.yaml --set "train=[{loss: dpo}, {loss: dpo, ld_alpha: 0.5}, {loss: ipo}]"
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import logging
import re
from concurrent.futures import ThreadPoolExecutor

import ray
import yaml

from pipeline.cli.preflight import check_counts, preflight
from pipeline.cli.schedule import run_stages
from pipeline.config import Config, ConfigError, load_config
from pipeline.runtime.storage import RunDir
from pipeline.stages import EVALUATE, SCORE, TRAIN, enabled_stages
from pipeline.stages.base import check
from pipeline.stages.evaluate import Policy, evaluate_policies
from pipeline.training.losses import check_loss_config

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Member:
    name: str
    config: Config


def split_overrides(overrides: list[str]) -> tuple[list[str], dict[str, list]]:
    """Separate sweep axes (`train.x=[a,b]`, or `train=[{...}, {...}]`: members listed whole) from plain
    overrides. Only train.* keys sweep."""
    plain, axes = [], {}
    for item in overrides:
        key, sep, value = item.partition("=")
        parsed = yaml.safe_load(value) if sep else None
        if (key.startswith("train.") or key == "train") and isinstance(parsed, list):
            if not parsed:
                raise ConfigError(f"{key}: a sweep needs at least one value")
            if key == "train" and not all(isinstance(v, dict) and v for v in parsed):
                raise ConfigError("train: a sweep over whole members lists mappings of train keys, e.g. [{loss: dpo}]")
            axes[key] = parsed
        else:
            plain.append(item)
    return plain, axes


def _settings(key: str, value) -> list[str]:
    """A sweep point's overrides: one `train.x=v`, or one per key of a member listed whole."""
    items = [(f"train.{k}", v) for k, v in value.items()] if key == "train" else [(key, value)]
    return [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}" for k, v in items]


def _name(key: str, value) -> str:
    """A sweep point's part of its member's name (and folder)."""
    items = list(value.items()) if key == "train" else [(key.split(".", 1)[1], value)]
    return "_".join(re.sub(r"[^A-Za-z0-9.+-]", "", f"{k}-{v}") for k, v in items)


def members(config_path: str, overrides: list[str]) -> tuple[Config, list[Member]]:
    """The base config and one member per point of the cartesian product of the sweep axes."""
    plain, axes = split_overrides(overrides)
    base = load_config(config_path, plain)
    if not axes:
        raise ConfigError("dpo sweep: give at least one train.* key a list, e.g. --set train.beta=[0.05,0.1,0.5]")
    out = []
    for values in itertools.product(*axes.values()):
        settings = [setting for key, v in zip(axes, values) for setting in _settings(key, v)]
        name = "_".join(_name(key, v) for key, v in zip(axes, values))
        trained = load_config(config_path, [*plain, *settings]).train  # typed and checked like any override
        out.append(Member(name, base.replace(run_dir=f"{base.run_dir}/sweep/{name}", train=trained)))
    check_distinct(out)
    return base, out


def check_distinct(sweep: list[Member]) -> None:
    """Two members in one directory would overwrite each other: refuse values that name the same member
    (`train.beta=[0.1, 0.10]` reads as 0.1 twice)."""
    seen: dict[str, Member] = {}
    for member in sweep:
        if member.name in seen:
            same = member.config.train == seen[member.name].config.train
            raise ConfigError(
                f"dpo sweep: two members would share {member.config.run_dir}"
                + (
                    " (their values are equal once read: give each value once)"
                    if same
                    else " (their values differ only in characters a directory name drops)"
                )
            )
        seen[member.name] = member


def parallel_slots(config: Config) -> int:
    """How many members can train at once while one CPU stays free for Ray Data."""
    train = config.train
    resources = ray.cluster_resources()
    if train.use_gpu:
        return max(1, int(resources.get("GPU", 0) // train.num_workers))
    free = resources.get("CPU", 1) - 1
    return max(1, int(free // (train.num_workers * train.cpus_per_worker)))


def run(config_path: str, overrides: list[str], *, force: bool = False) -> dict:
    """Tokenize and score once, train every member (in parallel as far as the cluster allows), evaluate all."""
    base, sweep = members(config_path, overrides)
    for member in sweep:  # every member's settings and the shared inputs, before Ray starts
        preflight(member.config.replace(run_dir=base.run_dir), tuple(s.name for s in enabled_stages(member.config)))
    data_dir = RunDir(base.run_dir)
    with data_dir.lease():  # the sweep writes the shared stages and its members' folders: one sweep at a time
        return _run(base, sweep, data_dir, force=force)


def shared_stages_config(base: Config, sweep: list[Member]) -> Config:
    """The config the shared tokenize and score stages run with: a member's train section that needs the
    score stage, where one does (the base's own loss may be reference-free while a swept one is not), and
    one whose loss reads the prefix log-probs where one does, so that ONE score stage serves every member."""
    scoring = [m.config for m in sweep if SCORE.enabled(m.config)]
    scored = next((c for c in scoring if SCORE.derived(c)), scoring[0] if scoring else base)
    return base.replace(train=scored.train)


def _run(base: Config, sweep: list[Member], data_dir: RunDir, *, force: bool) -> dict:
    for member in sweep:  # a loss key out of range refuses the sweep before any stage runs
        check_loss_config(member.config.train)
    manifests = run_stages(shared_stages_config(base, sweep), ("tokenize", "score"), force=force)
    for member in sweep:
        check_counts(member.config, manifests["tokenize"], ("train",))  # its batch size against the rows made
        check(TRAIN, member.config)  # a member too large for the cluster's GPUs fails before any trains
    slots = min(len(sweep), parallel_slots(base))
    log.info("sweep: %d members, %d training at a time", len(sweep), slots)
    with ThreadPoolExecutor(max_workers=slots) as pool:
        manifests = list(pool.map(lambda m: TRAIN.run(m.config, force=force, data_dir=data_dir), sweep))
    upstream = hashlib.sha256("".join(m["manifest_hash"] for m in manifests).encode()).hexdigest()[:16]
    policies = [Policy(m.name, RunDir(m.config.run_dir), m.config.train.beta) for m in sweep]
    return EVALUATE.run(
        base,
        force=force,
        data_dir=data_dir,
        out_dir=RunDir(f"{base.run_dir}/sweep"),
        upstream_hash=upstream,
        body=functools.partial(evaluate_policies, policies=policies),
    )
