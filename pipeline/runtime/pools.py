"""Ray Data actor pools with bounded retries, and a failed batch named when its retries run out.

Ray Data restarts a pool's actors and retries their batches without limit by default, so a batch that
kills its actor every time (an out-of-memory row, a crashing kernel) would never fail the stage. Here a
batch whose actor dies is retried `retries` times on a restarted actor (Ray's `max_task_retries`; the
actor itself may restart any number of times, so deaths spread over a long stage are survived), then the
stage fails. Errors raised by our own code are never retried: they would only fail again.

To name the batch, each actor notes the batch it works on in a ledger folder (one small file per actor
process, removed when the batch is done). A process that dies leaves its note behind, so when the pool
fails, the ledger says which batch was in flight in each death.

An actor lost with its node is another matter: Ray cannot tell whether a call to an actor it can no
longer reach ran, so it fails the pool rather than retry the call. `run_pool` tells the two apart by the
ledger and starts a pool that lost a node again, on its whole input (bounded by the same count).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections import Counter
from collections.abc import Callable
from typing import TypeVar

import pyarrow as pa
import pyarrow.fs as pafs
import ray
import ray.exceptions

from pipeline.runtime.storage import RunDir

log = logging.getLogger(__name__)
T = TypeVar("T")


def pool_options(retries: int) -> dict:
    """map_batches keyword arguments: a batch is retried `retries` times after its actor died, then fails."""
    return {"max_restarts": -1, "max_task_retries": retries}


class LedgerBatches:
    """Base of a Ray Data callable class whose `process(batch)` does the work: each batch is noted in the
    ledger while in flight. `key` is the column that names rows in the note (an id, a source)."""

    def __init__(self, ledger: str | None, key: str) -> None:
        self._key = key
        self._note = None
        if ledger is not None:
            self._fs, root = RunDir(ledger).fs_and_root
            self._note = f"{root}/{socket.gethostname()}-{os.getpid()}.json"

    def process(self, batch: pa.Table) -> pa.Table:
        raise NotImplementedError

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.noted(batch, lambda: self.process(batch))

    def noted(self, rows: pa.Table, work: Callable[[], T]) -> T:
        """`work()`, with `rows` (their count, first and last key) noted in the ledger while it runs."""
        if self._note is None:
            return work()
        keys = rows[self._key]
        note = {
            "rows": rows.num_rows,
            "first": keys[0].as_py() if len(keys) else None,
            "last": keys[-1].as_py() if len(keys) else None,
        }
        with self._fs.open_output_stream(self._note) as out:
            out.write(json.dumps(note).encode())
        try:
            return work()
        finally:  # an error raised here is no death: only a process that dies leaves its note behind
            self._fs.delete_file(self._note)


def in_flight(ledger: str) -> Counter:
    """How many actor deaths each noted batch was in flight for: {(rows, first, last): deaths}."""
    fs, root = RunDir(ledger).fs_and_root
    found: Counter = Counter()
    for info in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
        if info.type == pafs.FileType.File:
            with contextlib.suppress(OSError, ValueError), fs.open_input_stream(info.path) as f:
                note = json.loads(f.read())
                found[(note["rows"], note["first"], note["last"])] += 1
    return found


@contextlib.contextmanager
def user_error(*kinds: type[BaseException]):
    """Re-raise an error of `kinds` that a worker raised as itself, not inside Ray's and Ray Data's wrappers:
    the CLI then reads it as the user's mistake it is (exit 2, one line)."""
    try:
        yield
    except Exception as err:
        cause: BaseException | None = err
        seen: set[int] = set()
        while cause is not None and id(cause) not in seen:
            if isinstance(cause, kinds) and type(cause) in kinds:
                raise cause from None
            seen.add(id(cause))
            cause = getattr(cause, "cause", None) or cause.__cause__
        raise


class PoolFailed(RuntimeError):
    """A pool's batch kept killing its actor, or the pool kept losing actors; the message says which."""


def run_pool(work: Callable[[], T], *, ledger: str, what: str, retries: int, reset: Callable[[], None]) -> T:
    """`work()`: run a pool to its end and return what it gives. When it fails because an actor died:

    - a batch noted in flight in more than `retries` deaths kept killing its actor: PoolFailed names it;
    - otherwise the actor was lost with its node (Ray cannot tell whether a call to an unreachable actor
      ran, so it does not retry it): `reset()` drops what the failed run wrote and the pool starts again
      on the whole input, up to `retries` times.
    """
    for attempt in range(retries + 1):
        nodes = alive_nodes()
        try:
            return work()
        except ray.exceptions.RayActorError as err:
            noted = in_flight(ledger)
            worst = noted.most_common(1)[0] if noted else None
            if worst and worst[1] > retries:
                (rows, first, last), deaths = worst
                raise PoolFailed(
                    f"the batch of {rows} rows from {first} to {last} was in flight in {deaths} actor "
                    f"deaths and ran out of retries (ray.max_retries={retries}); look for what kills the process on "
                    "these rows (memory, a crashing kernel)"
                ) from err
            if attempt == retries:
                raise PoolFailed(
                    f"the {what} pool lost an actor {retries + 1} times, each time with no batch to "
                    f"blame (nodes lost?); gave up after ray.max_retries={retries} restarts"
                ) from err
            log.warning(
                "%s: the pool lost an actor (%s), most likely with its node; starting it again (%d of %d)",
                what,
                type(err).__name__,
                attempt + 1,
                retries,
            )
            wait_for_node_loss(nodes)
            reset()
    raise AssertionError("unreachable")


NODE_LOSS_WAIT_S = 60.0  # longer than Ray's health checks take to declare a silent node dead


def alive_nodes() -> set[str]:
    return {node["NodeID"] for node in ray.nodes() if node["Alive"]}


def wait_for_node_loss(before: set[str], *, timeout_s: float = NODE_LOSS_WAIT_S) -> None:
    """Wait until Ray has declared dead a node that was alive in `before` (or `timeout_s` passed): until
    then it may still place the new pool's actors on the lost node, and those never start."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not before - alive_nodes():
        time.sleep(1.0)
