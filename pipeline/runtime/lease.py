"""One writer per run directory: a lease held while a process writes there, on any pyarrow filesystem.

A writer claims the directory by writing `<run_dir>/.lease/<token>.json` (who, where, since when) and then
listing `.lease/`: it holds the lease only if no other live claim is there; otherwise it withdraws its
claim. Object stores list what was written before the listing (S3 has been strongly consistent since
2020), so of two writers at most one can miss the other: that one holds the lease, the other is refused.
Two that see each other both withdraw and try again after a random pause; an established holder's claim
stays put, so a latecomer is refused at once with a message naming it.

A holder rewrites its claim every HEARTBEAT_S seconds from a thread. A claim is dead when its heartbeat
is older than TTL_S, or at once when it comes from this machine and its process is gone (a killed
`dpo`, a stopped job driver resubmitted on the same head): a dead holder never locks the directory for
longer than TTL_S. A holder whose claim was taken from it (it stalled past TTL_S) finds out at its next
heartbeat, and `check` refuses to commit anything further.

Leases are re-entrant within a process: the CLI holds one for a whole `dpo run` and every stage it runs
takes it again at no cost.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import pyarrow.fs as pafs

from pipeline.runtime.files import write_atomic

log = logging.getLogger(__name__)

LEASE_DIR = ".lease"
HEARTBEAT_S = 10.0  # how often a holder refreshes its claim
TTL_S = 60.0  # a claim not refreshed for this long belongs to a dead (or hung) holder
ROUNDS = 4  # tries when two writers arrive together and both withdraw


class LeaseError(RuntimeError):
    """Another process is writing this run directory (the message names it), or this one lost its lease."""


def _machine() -> str:
    """This machine and pid namespace: two claims with the same value can compare process ids."""
    parts = [socket.gethostname()]
    with contextlib.suppress(OSError):
        parts.append(open("/proc/sys/kernel/random/boot_id").read().strip())
    with contextlib.suppress(OSError):
        parts.append(os.readlink("/proc/self/ns/pid"))
    return "/".join(parts)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


@dataclass
class Claim:
    token: str
    host: str
    machine: str
    pid: int
    command: str
    started: float
    heartbeat: float

    def describe(self, now: float) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return (
            f"pid {self.pid} on {self.host} ({self.command}), writing since {since}, "
            f"last heartbeat {now - self.heartbeat:.0f} s ago"
        )

    def is_dead(self, now: float, *, ttl: float) -> bool:
        if now - self.heartbeat > ttl:
            return True
        if self.machine == _machine():
            if self.pid == os.getpid():
                return self.token not in _HELD_TOKENS  # a claim of an earlier process that had our pid
            return not _pid_alive(self.pid)
        return False


_HELD_TOKENS: set[str] = set()
_HELD: dict[str, Lease] = {}  # run directory URI -> this process's lease on it
_LOCK = threading.Lock()


@dataclass
class Lease:
    """This process's claim on one run directory, refreshed by a thread until `release`."""

    fs: pafs.FileSystem
    root: str  # the run directory's path on `fs`
    uri: str
    claim: Claim
    ttl: float = TTL_S
    heartbeat_s: float = HEARTBEAT_S
    holds: int = 1
    lost: str | None = None  # why the lease was lost, once it is
    _stop: threading.Event = field(default_factory=threading.Event)

    @property
    def path(self) -> str:
        return f"{self.root}/{LEASE_DIR}/{self.claim.token}.json"

    def check(self) -> None:
        """Raise if this lease was lost (another writer took the directory after our heartbeat stalled)."""
        if self.lost:
            raise LeaseError(f"{self.uri}: lost the run directory's lease ({self.lost}); nothing more is committed")

    def beat(self) -> bool:
        """Refresh the claim; False (and `lost` set) once another writer has removed it."""
        try:
            if self.fs.get_file_info(self.path).type == pafs.FileType.NotFound:
                self.lost = "its claim was removed by another writer that took it for dead"
                log.error("%s: %s", self.uri, self.lost)
                return False
            self.claim.heartbeat = time.time()
            _write_claim(self.fs, self.path, self.claim)
        except OSError as err:  # a brief storage outage: the next beat tries again
            log.warning("%s: lease heartbeat failed: %s", self.uri, err)
        return True

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s) and self.beat():
            pass

    def withdraw(self) -> None:
        _HELD_TOKENS.discard(self.claim.token)
        with contextlib.suppress(OSError):
            self.fs.delete_file(self.path)

    def release(self) -> None:
        self._stop.set()
        self.withdraw()


def _write_claim(fs: pafs.FileSystem, path: str, claim: Claim) -> None:
    write_atomic(fs, path, json.dumps(asdict(claim)).encode())


def _claims(fs: pafs.FileSystem, root: str) -> list[tuple[str, Claim | None]]:
    """Every claim file under `.lease/`, parsed; None for one that cannot be read (being replaced)."""
    selector = pafs.FileSelector(f"{root}/{LEASE_DIR}", allow_not_found=True)
    found = []
    for info in fs.get_file_info(selector):
        if info.type != pafs.FileType.File or not info.base_name.endswith(".json"):
            continue
        try:
            with fs.open_input_stream(info.path) as f:
                found.append((info.path, Claim(**json.loads(f.read()))))
        except (OSError, ValueError, TypeError):
            found.append((info.path, None))
    return found


def _others(fs: pafs.FileSystem, root: str, token: str, *, ttl: float) -> list[Claim]:
    """Live claims other than `token`'s; dead ones are removed on the way."""
    now, live = time.time(), []
    for path, claim in _claims(fs, root):
        if claim is not None and claim.token == token:
            continue
        if claim is None:
            continue  # a claim caught mid-write: its writer will see ours
        if claim.is_dead(now, ttl=ttl):
            log.warning("%s: taking over from a dead writer: %s", root, claim.describe(now))
            with contextlib.suppress(OSError):
                fs.delete_file(path)
            continue
        live.append(claim)
    return live


def _refusal(uri: str, holder: Claim, ttl: float) -> LeaseError:
    return LeaseError(
        f"{uri} is being written by another process: {holder.describe(time.time())}. Wait for it to finish "
        f"(or stop it); a holder that died frees the directory {ttl:.0f} s after its last heartbeat, at once on "
        "its own machine"
    )


def acquire(
    fs: pafs.FileSystem, root: str, uri: str, *, command: str, ttl: float = TTL_S, heartbeat_s: float = HEARTBEAT_S
) -> Lease:
    """Claim the run directory at `root` or raise LeaseError naming the live holder."""
    now = time.time()
    claim = Claim(
        token=uuid.uuid4().hex,
        host=socket.gethostname(),
        machine=_machine(),
        pid=os.getpid(),
        command=command,
        started=now,
        heartbeat=now,
    )
    lease = Lease(fs, root, uri, claim, ttl=ttl, heartbeat_s=heartbeat_s)
    fs.create_dir(f"{root}/{LEASE_DIR}", recursive=True)
    for round_ in range(ROUNDS):
        holders = _others(fs, root, claim.token, ttl=ttl)
        if holders:
            raise _refusal(uri, holders[0], ttl)
        _HELD_TOKENS.add(claim.token)
        _write_claim(fs, lease.path, claim)
        rivals = _others(fs, root, claim.token, ttl=ttl)
        if not rivals:
            threading.Thread(target=lease._beat, name=f"lease {uri}", daemon=True).start()
            return lease
        lease.withdraw()  # both of us arrived at once: withdraw, and look again after a random pause
        time.sleep(random.uniform(0.05, 0.5) * (round_ + 1))
    raise _refusal(uri, rivals[0], ttl)


def command_line() -> str:
    """What the holder is, for the refusal message: `dpo run --config x.yaml`, `jobs/run.py ...`."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
    return " ".join([name, *sys.argv[1:]])[:200]


@contextlib.contextmanager
def hold(
    fs: pafs.FileSystem, root: str, uri: str, *, command: str | None = None, on_first: Callable[[], None] | None = None
) -> Iterator[Lease]:
    """Hold the lease on the run directory for the duration of the block (re-entrant in this process).

    `on_first` is called once the lease is acquired, on the first hold only (not on a re-entrant one): the
    run directory removes the leftovers of crashed attempts there, which no other writer can be using.
    """
    with _LOCK:
        lease = _HELD.get(uri)
        first = lease is None
        if first:
            lease = _HELD[uri] = acquire(fs, root, uri, command=command or command_line())
        else:
            lease.holds += 1
    try:
        if first and on_first is not None:
            on_first()
        yield lease
    finally:
        with _LOCK:
            lease.holds -= 1
            if lease.holds == 0:
                _HELD.pop(uri, None)
                lease.release()


def held(uri: str) -> Lease | None:
    """This process's lease on `uri`, if it holds one."""
    return _HELD.get(uri)
