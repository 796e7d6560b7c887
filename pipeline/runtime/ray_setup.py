"""Connecting to Ray: a cluster when one is named, an embedded local Ray otherwise."""

from __future__ import annotations

import logging
import os
import sys

import ray

from pipeline.config import ConfigError, RayConfig
from pipeline.runtime import logs
from pipeline.runtime.logs import take_worker_output

log = logging.getLogger(__name__)


def init_ray(config: RayConfig) -> None:
    """Join the cluster in `config.address` or RAY_ADDRESS; else start a local Ray with `num_cpus`.

    Under `ray job submit` RAY_ADDRESS is set, so the same command runs on a laptop and on a cluster.
    """
    if ray.is_initialized():
        return
    address = config.address or os.environ.get("RAY_ADDRESS")
    if address and address.startswith(("http://", "https://")):
        # The usual slip after `export RAY_ADDRESS=http://127.0.0.1:8265` for `ray job submit`.
        raise ConfigError(
            f"RAY_ADDRESS={address} is a job API address: use it with `ray job submit`, which runs this "
            "command on the cluster; to run it here, unset RAY_ADDRESS (or set ray.address to host:6379)"
        )
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        refuse_one_cpu(config.num_cpus)
        # "local": without it Ray joins any cluster `ray start` left running on this machine (and then
        # refuses num_cpus).
        ray.init(address="local", num_cpus=config.num_cpus, log_to_driver=True)
    take_worker_output()  # quiet by default: the workers' lines into the log file, only ours on the terminal
    # Ray Data's bars only for a person watching who asked for the libraries' output (--verbose).
    _configure_ray_data(progress_bars=on_a_terminal() and logs.STATE.library_level <= logging.INFO)
    log.info("Ray resources: %s", ray.cluster_resources())


def refuse_one_cpu(num_cpus: int | None) -> None:
    """A local Ray of one CPU never finishes a stage: each runs an actor beside Ray Data's tasks, and on one
    CPU they wait for each other forever. Refused before Ray starts, naming the key that mends it."""
    cpus = (os.cpu_count() or 1) if num_cpus is None else num_cpus
    if cpus < 2:
        said = (
            f"ray.num_cpus: {cpus}" if num_cpus is not None else f"this machine shows {cpus} CPU (ray.num_cpus unset)"
        )
        raise ConfigError(
            f"{said}: a local Ray needs 2 CPUs or more (each stage runs an actor beside Ray Data's tasks, and on "
            "one CPU they wait for each other forever); set ray.num_cpus: 2 (Ray's CPUs are slots: one core runs two)"
        )


def on_a_terminal() -> bool:
    """Whether a person is watching: stdout and stderr both a terminal (not CI, a pipe, or a job's log)."""
    return sys.stdout.isatty() and sys.stderr.isatty()


def _configure_ray_data(*, progress_bars: bool) -> None:
    # ray.data takes seconds to import, and the CLI imports this module at start-up: only a started Ray needs it.
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.execution_options.preserve_order = True  # shards and training order are deterministic
    # Bars on a terminal; elsewhere none, since Ray Data would print its progress as periodic log lines instead.
    ctx.enable_progress_bars = progress_bars
    ctx.print_on_execution_start = False
    logs.gate_library_consoles()  # importing ray.data attached a console handler of its own
