"""One declaration per stage, and one skeleton that runs any of them.

A stage is declared once (`Stage`): its name, the stage whose output it reads, the config sections that
decide its output, what it asks of the cluster, and the body that does its work. `execute` is the only
code that reads the upstream manifest, hashes the config, skips a finished stage, puts back one made
earlier with the same settings (pipeline/runtime/history.py), honours --force and commits the manifest:
the CLI, run planning, sweeps, the resource check and submission ids all read the same declarations. It
also holds the run directory's writer lease while the stage runs, refuses an upstream whose files no
longer match its manifest, drops a failed attempt's staging folder, and marks every failure with the
stage's name (`failed_stage`; the CLI prints `dpo: error: <stage>: ...`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from pipeline.config import Config, section_hash
from pipeline.runtime import history
from pipeline.runtime.resources import Request
from pipeline.runtime.storage import RunDir, StageWriter

log = logging.getLogger(__name__)


STAGE_ATTRIBUTE = "raydpo_stage"  # set on an exception that escapes a stage: the stage it escaped


def failed_stage(err: BaseException) -> str | None:
    """The stage an exception escaped from (the innermost, for a stage run inside another), else None."""
    return getattr(err, STAGE_ATTRIBUTE, None)


# A line of a traceback that names the exception raised: "ValueError: the tokenizer has no EOS token".
_RAISED = re.compile(r"^\s*(?:[A-Za-z_][\w.]*\.)?([A-Za-z_]\w*(?:Error|Exception|Reject)): (.+)$")
# Wrappers that say only that user code failed; the worker's traceback text says what failed.
_WRAPPERS = ("UserCodeException", "RayDataUserCodeException", "RayTaskError", "RayActorError")


def one_line(err: BaseException, *, limit: int = 600) -> str:
    """What happened, in one line: Ray's wrappers unwrapped to the error raised in the worker, the
    exception's type named unless it is one of the plain ones our own messages use. Where the innermost
    error is itself a wrapper (Ray Data's "UDF failed to process a data block": the original is no longer
    attached once it crossed processes), the worker's traceback names the original."""
    chain = [err]
    while True:  # RayTaskError and its kin carry the worker's exception in `cause`; Ray Data chains its own
        last = chain[-1]
        cause = getattr(last, "cause", None)
        if not isinstance(cause, BaseException):
            cause = last.__cause__ if type(last).__name__.startswith(_WRAPPERS) else None
        if cause is None or any(cause is seen for seen in chain):
            break
        chain.append(cause)
    err = chain[-1]
    if type(err).__name__.startswith(_WRAPPERS):
        text = "\n".join(getattr(e, "traceback_str", None) or str(e) for e in chain)
        raised = [m for m in map(_RAISED.match, text.splitlines()) if m and not m.group(1).startswith(_WRAPPERS)]
        if raised:
            name, message = raised[-1].groups()
            plain = name in ("ValueError", "RuntimeError", "OSError")
            return _limited(message if plain else f"{name}: {message}", limit)
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if lines and lines[0].startswith("Traceback"):
        lines = lines[-1:]  # a message that is a traceback: its last line says what happened
    text = " ".join(lines)
    if not isinstance(err, (ValueError, RuntimeError, OSError)) or not text:
        text = f"{type(err).__name__}: {text}".rstrip(": ")
    return _limited(text, limit)


def _limited(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _nothing(config: Config) -> None:
    return None


def _no_requests(config: Config) -> list[Request]:
    return []


def _always(config: Config) -> bool:
    return True


def _no_derived(config: Config) -> dict:
    return {}


@dataclass(frozen=True)
class Stage:
    """What the pipeline knows of a stage.

    upstream(config): the stage whose manifest this one reads, or None for a stage that reads the input
    data; then input_hash(config) fingerprints that input (None: no fingerprint, as for the demo).
    sections: config sections or dotted fields whose change reruns this stage and what follows it.
    body(run): does the work, writing through `run.writer`, and returns the manifest's own fields.
    requests(config): the actors or workers it places on the cluster, checked before anything starts.
    enabled(config): False where the configured run has no use for the stage (score, for losses that
    never read a reference).
    check(config): refuses, by raising, what the cluster cannot run, before any stage starts (train: a
    GPU run whose memory plan does not fit the cluster's GPUs).
    derived(config): values derived from other sections that also decide the output (score: whether it
    writes the prefix log-probs a loss reads); hashed with the sections when not empty.
    """

    name: str
    sections: tuple[str, ...]
    body: Callable[[StageRun], dict]
    upstream: Callable[[Config], str | None] = _nothing
    input_hash: Callable[[Config], str | None] = _nothing
    requests: Callable[[Config], list[Request]] = _no_requests
    enabled: Callable[[Config], bool] = _always
    check: Callable[[Config], None] = _nothing
    derived: Callable[[Config], dict] = _no_derived

    def config_hash(self, config: Config) -> str:
        base, extra = section_hash(config, self.sections), self.derived(config)
        if not extra:
            return base
        return hashlib.sha256(f"{base}|{json.dumps(extra, sort_keys=True)}".encode()).hexdigest()[:16]

    def run(self, config: Config, *, force: bool = False, **where) -> dict:
        """`execute` this stage (see there for `where`: data_dir, out_dir, upstream_hash, body)."""
        return execute(self, config, force=force, **where)


@dataclass
class StageRun:
    """One attempt at a stage: where it reads and writes, and what it read from upstream."""

    stage: Stage
    config: Config
    run_dir: RunDir  # where the stage's output goes
    data_dir: RunDir  # where its upstream stage lives (a sweep's members share one)
    upstream: dict | None  # the upstream stage's manifest; None for a stage that reads the input
    force: bool  # redo work that a finished attempt left behind (train's checkpoints)
    _writer: StageWriter | None = field(default=None, repr=False)

    @property
    def writer(self) -> StageWriter:
        """The attempt's staging area, begun on first use: checks that fail before it leave a finished
        stage as it was."""
        if self._writer is None:
            self._writer = self.run_dir.begin(self.stage.name)
        return self._writer


def upstream_manifest(stage: Stage, config: Config, data_dir: RunDir) -> dict | None:
    """The manifest `stage` reads, or None for a stage that reads the input; an error if it is missing."""
    name = stage.upstream(config)
    if name is None:
        return None
    manifest = data_dir.manifest(name)
    if manifest is None:
        raise RuntimeError(
            f"{stage.name} needs a finished {name} stage under {data_dir.uri_of(name)}; run `dpo {name}` first"
        )
    damage = data_dir.damage(name, manifest)
    if damage:
        raise RuntimeError(
            f"{stage.name} reads {data_dir.uri_of(name)}, whose files do not match its manifest "
            f"({'; '.join(damage[:3])}); redo it with `dpo run --from-stage {name}`"
        )
    return manifest


def fingerprint(stage: Stage, config: Config, upstream: dict | None) -> str | None:
    """What ties a finished stage to its input: the upstream manifest's hash, or the input's fingerprint."""
    return upstream["manifest_hash"] if upstream is not None else stage.input_hash(config)


def is_current(stage: Stage, config: Config, run_dir: RunDir, upstream_hash: str | None) -> bool:
    """True when `stage` finished under `run_dir` for this config and this upstream."""
    return run_dir.is_finished(stage.name, config_hash=stage.config_hash(config), upstream_hash=upstream_hash)


def execute(
    stage: Stage,
    config: Config,
    *,
    force: bool = False,
    data_dir: RunDir | None = None,
    out_dir: RunDir | None = None,
    upstream_hash: str | None = None,
    body: Callable[[StageRun], dict] | None = None,
) -> dict:
    """Run `stage` unless it is finished for this config and upstream (or `force`); return its manifest.

    data_dir: where the upstream stage lives (default: the config's run_dir); out_dir: where this stage
    writes (default: the same). upstream_hash and body replace the declared ones for work whose input
    is not one upstream stage (a sweep's evaluate reads every member's train stage): no manifest is read.
    """
    run_dir = out_dir or RunDir(config.run_dir)
    data = data_dir or RunDir(config.run_dir)
    with named_errors(stage.name), run_dir.lease():
        return _attempt(
            stage, config, force=force, run_dir=run_dir, data=data, upstream_hash=upstream_hash, body=body or stage.body
        )


@contextlib.contextmanager
def named_errors(name: str):
    """Name stage `name` on an exception that escapes (unless an inner stage is named already)."""
    try:
        yield
    except Exception as err:
        if failed_stage(err) is None:
            # The error keeps its type (callers catch ValueError, LeaseError, ...); the CLI reads the name.
            with contextlib.suppress(AttributeError):
                setattr(err, STAGE_ATTRIBUTE, name)
        raise


def check(stage: Stage, config: Config) -> None:
    """`stage.check`, before anything runs: what it refuses is named after the stage, as in `execute`."""
    with named_errors(stage.name):
        stage.check(config)


def _attempt(
    stage: Stage,
    config: Config,
    *,
    force: bool,
    run_dir: RunDir,
    data: RunDir,
    upstream_hash: str | None,
    body: Callable[[StageRun], dict],
) -> dict:
    """One attempt under the lease: skip a finished stage, or run the body and commit; a failed attempt
    leaves no staging folder behind."""
    upstream = None if upstream_hash else upstream_manifest(stage, config, data)
    tied_to = upstream_hash or fingerprint(stage, config, upstream)
    if not force and is_current(stage, config, run_dir, tied_to):
        log.info("%s: finished already (%s), skipping", stage.name, run_dir.uri_of(stage.name))
        manifest = run_dir.manifest(stage.name)
        if manifest is None:  # is_current read it a moment ago
            raise RuntimeError(f"{stage.name}: its manifest went missing under {run_dir.uri_of(stage.name)}")
        return manifest
    if not force:  # made earlier with these settings and kept when they changed: put back, not recomputed
        kept = history.restore(run_dir, stage.name, config_hash=stage.config_hash(config), upstream_hash=tied_to)
        if kept is not None:
            return kept
    run = StageRun(stage, config, run_dir, data, upstream, force)
    try:
        fields = body(run)
        return run.writer.commit({"config_hash": stage.config_hash(config), "upstream_hash": tied_to, **fields})
    except BaseException:
        if run._writer is not None:
            run._writer.abort()
        raise
