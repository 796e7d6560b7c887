"""Several actors' work at once: each actor is started when a slot is free and killed as soon as its
own calls are done, so a GPU (or a CPU) goes to the next model at once.

Evaluate uses it to sample every model, and to score the held-out pairs, side by side: Ray starts the
actors the cluster has room for and keeps the rest waiting; `max_actors` caps how many exist at once
(on an autoscaling cluster, how many nodes the work may ask for).

Faults: an actor started with `actor_options(retries)` that dies (its process killed, its node gone) is
restarted by Ray, which runs again only the calls that had not finished: every other job, and the calls
of this one that were done, are kept. Once its restarts run out, `wait_for` fails naming the job.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Iterable
from typing import Any

import ray
import ray.exceptions

log = logging.getLogger(__name__)


def actor_options(retries: int) -> dict:
    """ray.remote options for an actor that survives `retries` deaths, each time redoing only the calls in
    flight (Ray's actor restart and task retry)."""
    return {"max_restarts": retries, "max_task_retries": retries}


class ActorJobError(RuntimeError):
    """A job's actor died more often than its restarts allow; the message names the job."""


Start = Callable[[], Any]  # () -> an actor handle (pending until the cluster has room for it)
Calls = Callable[[Any], list]  # actor -> the ObjectRefs of its method calls, submitted in order
Stop = Callable[[Any], None]  # actor -> None: kills it and frees what it holds (default: ray.kill)


class ActorJobs:
    """`submit` queues a job; `wait_for` runs jobs, at most `max_actors` at a time, until the named ones
    are done and returns their results (the list of their calls' values). Each actor is stopped by its
    job's `stop` (ray.kill unless given) as soon as its calls are done. Use it as a context manager: on
    leaving, every actor still alive is stopped, whether the work finished or failed. Each finished job
    is logged under `label`, with how many are done, running and waiting."""

    def __init__(self, max_actors: int, *, label: str = "jobs") -> None:
        if max_actors < 1:
            raise ValueError(f"max_actors must be at least 1, got {max_actors}")
        self.max_actors, self.label = max_actors, label
        self._queued: list[tuple[Hashable, Start, Calls, Stop]] = []
        self._running: dict[Any, tuple[Hashable, Any, list, Stop]] = {}  # last call's ref -> (name, actor, refs, stop)
        self._results: dict[Hashable, list] = {}
        self._names: set[Hashable] = set()  # every job ever submitted

    def __enter__(self) -> ActorJobs:
        return self

    def __exit__(self, *exc) -> None:
        for _, actor, _, stop in self._running.values():
            stop(actor)
        self._running.clear()
        self._queued.clear()

    def submit(self, name: Hashable, start: Start, calls: Calls, stop: Stop = ray.kill) -> None:
        if name in self._names:
            raise ValueError(f"a job named {name!r} was submitted already")
        self._names.add(name)
        self._queued.append((name, start, calls, stop))
        self._fill()

    def wait_for(self, names: Iterable[Hashable]) -> dict[Hashable, list]:
        names = list(names)
        unknown = [n for n in names if n not in self._names]
        if unknown:
            raise KeyError(f"no job named {unknown[0]!r} was submitted")
        while any(n not in self._results for n in names):
            ready, _ = ray.wait(list(self._running), num_returns=1)
            name, actor, refs, stop = self._running.pop(ready[0])
            try:
                self._results[name] = ray.get(refs)
            except ray.exceptions.RayActorError as err:
                raise ActorJobError(
                    f"job {name!r}: its actor died and could not be restarted again "
                    f"({type(err).__name__}; see the log above for how it died)"
                ) from err
            finally:
                stop(actor)
            self._fill()
            log.info(
                "%s: %s done (%d of %d jobs done, %d running, %d waiting)",
                self.label,
                " ".join(map(str, name)) if isinstance(name, tuple) else name,
                len(self._results),
                len(self._names),
                len(self._running),
                len(self._queued),
            )
        return {n: self._results[n] for n in names}

    def _fill(self) -> None:
        while self._queued and len(self._running) < self.max_actors:
            name, start, calls, stop = self._queued.pop(0)
            actor = start()
            refs = calls(actor)
            if not refs:
                stop(actor)
                raise ValueError(f"job {name!r} submitted no calls")
            self._running[refs[-1]] = (name, actor, refs, stop)
