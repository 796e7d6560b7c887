"""A run directory's history: every finished result a stage replaces is kept, by its content hash, and one
made earlier with the settings asked for again is put back instead of being recomputed.

    <run_dir>/<stage>/                        the latest result (what every reader reads)
    <run_dir>/history/<stage>/<manifest hash>/   each result it replaced, whole, with its manifest

Why versions kept aside rather than a refusal that names --force: changing a setting and rerunning is the
ordinary way to work (`dpo train --set train.beta=0.5`, then back to 0.1), and a refusal would make every such
step two commands while the redo it asks for still destroys the old result. Kept versions make going back
free (the old policy is moved back, not retrained) and keep the one place every reader looks, `<stage>/`.
The price is disk: delete `history/<stage>/<hash>` folders you no longer want. A forced redo whose output
is byte-identical keeps no copy (its content hash is the same), and does not invalidate the stages after
it: manifests are tied together by content hashes, not by when they were written.
"""

from __future__ import annotations

import logging
from typing import Protocol

import pyarrow.fs as pafs

from pipeline.config import ConfigError
from pipeline.runtime.files import differences, move_dir


class RunDir(Protocol):
    """What of pipeline.runtime.storage.RunDir this module uses (storage imports this module, not back)."""

    @property
    def fs(self) -> pafs.FileSystem: ...
    def path(self, *parts: str) -> str: ...
    def uri_of(self, *parts: str) -> str: ...
    def exists(self, *parts: str) -> bool: ...
    def manifest(self, stage: str) -> dict | None: ...
    def damage(self, stage: str, manifest: dict) -> list[str]: ...


log = logging.getLogger(__name__)

HISTORY = "history"
MANIFEST = "manifest.json"


def keep(run: RunDir, stage: str, manifest: dict) -> str:
    """Move the finished result of `stage` (its manifest given) to history/<stage>/<hash>; its path there."""
    rel = f"{HISTORY}/{stage}/{manifest['manifest_hash']}"
    if run.exists(rel):
        run.fs.delete_dir(run.path(rel))  # the same content kept before: one copy is enough
    run.fs.create_dir(run.path(HISTORY, stage), recursive=True)
    move_dir(run.fs, run.path(stage), run.path(rel))
    log.info("%s: the previous result is kept in %s", stage, run.uri_of(rel))
    return rel


def drop(run: RunDir, stage: str, manifest_hash: str) -> None:
    """Forget the kept copy of a result that is the latest again (a redo that came out byte-identical)."""
    rel = f"{HISTORY}/{stage}/{manifest_hash}"
    if run.exists(rel):
        run.fs.delete_dir(run.path(rel))
        log.info("%s: byte-identical to the previous result (%s): the stages after it stay finished", stage, rel)


def versions(run: RunDir, stage: str) -> list[tuple[str, dict]]:
    """(path, manifest) of every kept result of `stage` whose files still match its manifest."""
    found = []
    for entry in run.fs.get_file_info(pafs.FileSelector(run.path(HISTORY, stage), allow_not_found=True)):
        rel = f"{HISTORY}/{stage}/{entry.base_name}"
        try:
            manifest = run.manifest(rel)
        except ConfigError:  # OutdatedStageError: kept by another version of raydpo, never put back as this one's
            continue
        if manifest is not None and not differences(manifest["files"], run.fs, run.path(rel), skip=(MANIFEST,)):
            found.append((rel, manifest))
    return found


def restore(run: RunDir, stage: str, *, config_hash: str, upstream_hash: str | None) -> dict | None:
    """Put back a kept result of `stage` made with these settings from this upstream (the latest one goes
    to history in its place); its manifest, or None when there is none."""
    for rel, manifest in versions(run, stage):
        if manifest.get("config_hash") == config_hash and manifest.get("upstream_hash") == upstream_hash:
            current = run.manifest(stage)
            if current is not None and not run.damage(stage, current):
                keep(run, stage, current)
            elif run.exists(stage):
                run.fs.delete_dir(run.path(stage))  # unfinished leftovers: nothing to keep
            move_dir(run.fs, run.path(rel), run.path(stage))
            log.info("%s: put back the result made earlier with these settings (%s)", stage, rel)
            return manifest
    return None
