"""Ray Data actor pools with bounded retries, and a failed batch named when its retries run out.

Ray Data restarts a pool's actors and retries their batches without limit by default, so a batch that
kills its actor every time (an out-of-memory row, a crashing kernel) would never fail the stage. Here a
batch whose actor dies is retried `retries` times on a restarted actor (Ray's `max_task_retries`; the
actor itself may restart any number of times, so deaths spread over a long stage are survived), then the
stage fails. Errors raised by our own code are never retried: they would only fail again.

To name the batch, each actor notes the batch it works on in a ledger folder (one small file per actor
process, removed when the batch is done). A process that dies leaves its note behind, so when the pool
fails, the ledger says which batch was in flight in each death.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections import Counter
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import ray

def pool_options(retries: int) -> dict:
    """map_batches keyword arguments: a batch is retried `retries` times after its actor died, then fails."""
    return {"max_restarts": -1, "max_task_retries": retries}


class LedgerBatches:
    """Base of a Ray Data callable class whose `process(batch)` does the work: each batch is noted in the
    ledger while in flight. `key` is the column that names rows in the note (an id, a source)."""

    def __init__(self, ledger: str | None, key: str) -> None:
        self._ledger = ledger
        self._key = key
        self._note = None
        if ledger is not None:
            self._fs, root = pafs.FileSystem.from_uri(ledger) if "://" in ledger else (pafs.LocalFileSystem(), ledger)
            self._note = f"{root}/{socket.gethostname()}-{os.getpid()}.json"

    def process(self, batch: pa.Table) -> pa.Table:
        raise NotImplementedError

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self._note is None:
            return self.process(batch)
        keys = batch[self._key]
        note = {"rows": batch.num_rows, "first": keys[0].as_py() if len(keys) else None,
                "last": keys[-1].as_py() if len(keys) else None}
        with self._fs.open_output_stream(self._note) as out:
            out.write(json.dumps(note).encode())
        result = self.process(batch)
        self._fs.delete_file(self._note)
        return result


def in_flight(ledger: str) -> Counter:
    """How many actor deaths each noted batch was in flight for: {(rows, first, last): deaths}."""
    fs, root = pafs.FileSystem.from_uri(ledger) if "://" in ledger else (pafs.LocalFileSystem(), ledger)
    found: Counter = Counter()
    for info in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
        if info.type == pafs.FileType.File:
            with contextlib.suppress(OSError, ValueError), fs.open_input_stream(info.path) as f:
                note = json.loads(f.read())
                found[(note["rows"], note["first"], note["last"])] += 1
    return found


class PoolFailed(RuntimeError):
    """A pool's batch kept killing its actor; the message names the batch."""


@contextlib.contextmanager
def named_failures(ledger: str, *, what: str, retries: int) -> Iterator[None]:
    """Run a pool inside this block: if an actor's death fails it, the error names the batch in flight."""
    try:
        yield
    except ray.exceptions.RayActorError as err:
        noted = in_flight(ledger)
        if not noted:
            raise PoolFailed(f"{what}: an actor of the pool died and its batch ran out of retries "
                             f"(ray.max_retries={retries}); no batch was noted in flight") from err
        (rows, first, last), deaths = noted.most_common(1)[0]
        raise PoolFailed(
            f"{what}: the batch of {rows} rows from {first} to {last} was in flight in {deaths} actor death(s) "
            f"and ran out of retries (ray.max_retries={retries}); look for what kills the process on these rows "
            "(memory, a crashing kernel)") from err
