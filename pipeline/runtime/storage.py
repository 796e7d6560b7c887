"""The run directory: stage folders, manifests, atomic commits, the writer lease, on any pyarrow filesystem.

A stage writes into a staging folder beside its final one and commits by moving it into place and then
writing `manifest.json` LAST, atomically, listing every file of the stage with its size (and rows, for a
Parquet shard). A stage is finished if and only if its manifest exists, matches the config and the
upstream manifest, and the folder still holds exactly the files it lists: output from a crashed attempt,
a truncated manifest or a lost shard is never taken for finished. One process writes a run directory at
a time (`RunDir.lease`, pipeline/runtime/lease.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.config import ConfigError, refuse_credentials
from pipeline.runtime import history
from pipeline.runtime.files import differences, list_files, move_dir, write_atomic
from pipeline.runtime.lease import Lease, held, hold
from pipeline.runtime.shards import conform

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
# The layout of a stage folder and its manifest. Raised when a stage's output changes shape, so that a run
# directory written by other code is refused by name (redo it with --force), not read as if it were this one's.
# 3: tokenize's rejected rows per shard, its checksums and label counts, score's units (format 2); files carry
# their SHA-256, the manifest hash is a content hash, model cards (README.md) are unlisted.
MANIFEST_FORMAT = 3


class OutdatedStageError(ConfigError):
    """A finished stage written by a raydpo whose stage layout differs from this one's."""


STAGING = ".staging"  # where attempts write before they commit: <run_dir>/.staging/<stage>-<id>/
SCRATCH = "_scratch"  # inside a staging folder: the attempt's bookkeeping, dropped at the commit


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for package in ("raydpo", "torch", "transformers", "ray", "pyarrow"):
        try:
            out[package] = md.version(package)
        except md.PackageNotFoundError:
            pass
    return out


@dataclass(frozen=True)
class RunDir:
    """A run directory on a pyarrow filesystem (local path, file://, s3://, gs://)."""

    uri: str

    def __post_init__(self) -> None:
        refuse_credentials(self.uri, where="run_dir")

    @property
    def fs_and_root(self) -> tuple[pafs.FileSystem, str]:
        if "://" in self.uri:
            fs, root = pafs.FileSystem.from_uri(self.uri)
        else:
            fs, root = pafs.LocalFileSystem(), os.path.abspath(self.uri)
        return fs, root.rstrip("/")

    @property
    def fs(self) -> pafs.FileSystem:
        return self.fs_and_root[0]

    @property
    def root(self) -> str:
        return self.fs_and_root[1]

    def path(self, *parts: str) -> str:
        """A path inside the run directory, as the filesystem sees it (no scheme)."""
        return "/".join([self.root, *parts])

    def uri_of(self, *parts: str) -> str:
        """A path inside the run directory as a URI (with scheme when the run dir has one)."""
        if "://" in self.uri:
            return "/".join([self.uri.rstrip("/"), *parts])
        return self.path(*parts)

    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def writable_problem(self) -> str | None:
        """Why this run directory cannot be written, in one line naming run_dir; None when it can (or when only
        the first write can tell: an object store answers with its own error, naming the bucket)."""
        if "://" in self.uri:
            return None
        path = self.root
        while not os.path.exists(path):
            path = os.path.dirname(path)
        if not os.path.isdir(path):
            return f"run_dir: {self.uri} cannot be made: {path} is a file, not a folder; set run_dir to another path"
        try:
            # A real write: access() says yes to root on a read-only file system's folders.
            with tempfile.NamedTemporaryFile(dir=path, prefix=".raydpo-write-check-"):
                pass
        except OSError as err:
            return (
                f"run_dir: {self.uri} is not writable ({err.strerror} in {path}); set run_dir to a folder you can write"
            )
        return None

    # ---- small files -------------------------------------------------------------------------
    def write_text(self, rel: str, text: str) -> None:
        write_atomic(self.fs, self.path(rel), text.encode("utf-8"))

    def read_text(self, rel: str) -> str:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read().decode("utf-8")

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_text(rel, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_text(rel))

    def upload_dir(self, local: str, rel: str) -> None:
        """Copy the local folder `local`, every file under it, to `rel` in the run directory."""
        self.fs.create_dir(self.path(rel), recursive=True)  # copy_files makes the folders under it, not it
        pafs.copy_files(local, self.path(rel), source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs)

    @contextmanager
    def local_file(self, rel: str) -> Iterator[str]:
        """A local path for the file `rel`, for a library that opens files by path (SQLite).

        On a local run directory it is the file itself. Elsewhere (s3://, gs://) it is a temporary copy,
        fetched on entry if the file exists and written back on exit, after an error too, if it exists then.
        """
        if "://" not in self.uri:
            os.makedirs(os.path.dirname(self.path(rel)), exist_ok=True)
            yield self.path(rel)
            return
        fs = self.fs
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, os.path.basename(rel))
            if self.exists(rel):
                with fs.open_input_stream(self.path(rel)) as src, open(local, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            try:
                yield local
            finally:
                if os.path.exists(local):
                    fs.create_dir(self.path(rel).rsplit("/", 1)[0], recursive=True)
                    with open(local, "rb") as src, fs.open_output_stream(self.path(rel)) as dst:
                        shutil.copyfileobj(src, dst)

    # ---- stages ------------------------------------------------------------------------------
    def manifest(self, stage: str) -> dict | None:
        """The stage's manifest, or None if the stage never finished (or its manifest cannot be read)."""
        if not self.exists(stage, MANIFEST):
            return None
        try:
            manifest = self.read_json(f"{stage}/{MANIFEST}")
        except ValueError as err:  # empty or truncated: whatever wrote it did not finish
            log.warning(
                "%s: unreadable manifest (%s): the stage counts as not finished", self.uri_of(stage, MANIFEST), err
            )
            return None
        if not isinstance(manifest, dict):
            return None
        if manifest.get("format") != MANIFEST_FORMAT:
            raise OutdatedStageError(
                f"{self.uri_of(stage)}: written by another version of raydpo (stage format "
                f"{manifest.get('format', 'none')}, this one reads {MANIFEST_FORMAT}); redo it with "
                f"`dpo {stage} --force` or `dpo run --from-stage {stage}`, or use a new run_dir"
            )
        return manifest

    def damage(self, stage: str, manifest: dict) -> list[str]:
        """How the stage folder differs from the files its manifest lists; [] when they agree."""
        return differences(manifest["files"], self.fs, self.path(stage), skip=(MANIFEST,))

    def is_finished(self, stage: str, *, config_hash: str, upstream_hash: str | None) -> bool:
        manifest = self.manifest(stage)
        if (
            manifest is None
            or manifest.get("config_hash") != config_hash
            or manifest.get("upstream_hash") != upstream_hash
        ):
            return False
        damage = self.damage(stage, manifest)
        if damage:
            log.warning(
                "%s: its files do not match its manifest (%s): the stage counts as not finished",
                self.uri_of(stage),
                "; ".join(damage[:3]),
            )
        return not damage

    @contextlib.contextmanager
    def lease(self, *, command: str | None = None) -> Iterator[Lease]:
        """Hold this run directory's writer lease for the block (re-entrant); LeaseError if another has it.

        On the first hold, leftovers of crashed attempts (`.staging/`) are removed (`clean_staging`).
        """
        with hold(self.fs, self.root, self.uri_of(), command=command, on_first=self.clean_staging) as holding:
            yield holding

    def clean_staging(self) -> None:
        """Remove the staging folders of earlier attempts that never committed. Only under the lease: with
        it held, no other writer can be using them."""
        entries = self.fs.get_file_info(pafs.FileSelector(self.path(STAGING), allow_not_found=True))
        if entries:
            log.info(
                "%s: removing %d staging folder(s) of earlier attempts that never committed",
                self.uri_of(),
                len(entries),
            )
            self.fs.delete_dir(self.path(STAGING))

    def begin(self, stage: str) -> StageWriter:
        """Start a fresh attempt at `stage`. Its finished result moves to history/ first (kept, and no longer
        read as finished); an unfinished one loses its manifest, so nothing reads as finished."""
        fs = self.fs
        try:
            manifest = self.manifest(stage)
        except OutdatedStageError:
            manifest = None  # another version's output, redone by request (--force): not kept
        if manifest is not None and not self.damage(stage, manifest):
            history.keep(self, stage, manifest)
        elif self.exists(stage, MANIFEST):
            fs.delete_file(self.path(stage, MANIFEST))
        staging = f"{STAGING}/{stage}-{uuid.uuid4().hex[:8]}"
        fs.create_dir(self.path(staging), recursive=True)
        return StageWriter(run=self, stage=stage, staging=staging)


@dataclass
class StageWriter:
    """Where one attempt of a stage writes; `commit` makes it the stage's output."""

    run: RunDir
    stage: str
    staging: str

    def path(self, *parts: str) -> str:
        return self.run.path(self.staging, *parts)

    def uri(self, *parts: str) -> str:
        return self.run.uri_of(self.staging, *parts)

    def write_table(
        self,
        rel: str,
        table: pa.Table,
        schema: pa.Schema | None = None,
        *,
        keep_extra: bool = False,
        metadata: dict[str, str] | None = None,
        row_group_rows: int | None = None,
    ) -> None:
        """Write one Parquet shard, checked against the shard type's schema, whole or not at all (a reader
        never sees part of it: see `write_atomic`).

        keep_extra: columns beyond `schema` are kept (after its own), e.g. what a scorer adds that this
        package does not know of; otherwise the shard holds the schema's columns only. `metadata` goes into
        the file's footer (read back with `pipeline.runtime.shards.shard_metadata`); `row_group_rows` caps
        its row groups, so a reader of a few rows reads little more than those.
        """
        if schema is not None:
            table = conform(table, schema, what=f"{self.stage}/{rel}", keep_extra=keep_extra)
        if metadata:
            # the footer's bytes keys and our str keys in one dict: pyarrow takes both, its stubs one kind a dict
            merged: dict[Any, Any] = {**(table.schema.metadata or {}), **metadata}
            table = table.replace_schema_metadata(merged)
        fs = self.run.fs
        path = self.path(rel)
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        if not isinstance(fs, pafs.LocalFileSystem):  # an object appears only once its upload completes
            pq.write_table(table, path, filesystem=fs, row_group_size=row_group_rows)
            return
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        pq.write_table(table, tmp, filesystem=fs, row_group_size=row_group_rows)
        fs.move(tmp, path)

    def write_text(self, rel: str, text: str) -> None:
        self.run.write_text(f"{self.staging}/{rel}", text)

    def remove(self, rel: str) -> None:
        """Drop a file or folder the attempt wrote (a pool that starts again writes its shards anew)."""
        info = self.run.fs.get_file_info(self.path(rel))
        if info.type == pafs.FileType.Directory:
            self.run.fs.delete_dir(self.path(rel))
        elif info.type == pafs.FileType.File:
            self.run.fs.delete_file(self.path(rel))

    def scratch(self, name: str) -> str:
        """The URI of a folder for the attempt's own bookkeeping (a pool's ledger): never committed."""
        self.run.fs.create_dir(self.path(SCRATCH, name), recursive=True)
        return self.uri(SCRATCH, name)

    def write_json(self, rel: str, obj: Any) -> None:
        self.run.write_json(f"{self.staging}/{rel}", obj)

    def commit(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Move the staging folder into place, then write the manifest, listing every file, LAST."""
        holding = held(self.run.uri_of())
        if holding is not None:
            holding.check()  # a writer that lost its lease commits nothing
        fs = self.run.fs
        if fs.get_file_info(self.path(SCRATCH)).type != pafs.FileType.NotFound:
            fs.delete_dir(self.path(SCRATCH))
        for info in fs.get_file_info(pafs.FileSelector(self.path(), recursive=True)):
            if info.type == pafs.FileType.File and ".tmp-" in info.base_name:
                fs.delete_file(info.path)  # left by a worker that died writing it: never part of the stage
        final = self.run.path(self.stage)
        if self.run.exists(self.stage):
            fs.delete_dir(final)
        move_dir(fs, self.path(), final, drop_source=False)
        manifest = {
            "format": MANIFEST_FORMAT,
            "stage": self.stage,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "versions": _versions(),
            **manifest,
            "files": list_files(fs, final, skip=(MANIFEST,)),
        }
        manifest["manifest_hash"] = content_hash(manifest)
        self.run.write_json(f"{self.stage}/{MANIFEST}", manifest)
        if fs.get_file_info(self.path()).type != pafs.FileType.NotFound:
            fs.delete_dir(self.path())  # an object store's staging copy, dropped once the commit stands
        history.drop(self.run, self.stage, manifest["manifest_hash"])  # the same bytes as a kept copy: one is enough
        return manifest

    def abort(self) -> None:
        """Drop this attempt's staging folder (a failed attempt leaves nothing behind)."""
        if self.run.exists(self.staging):
            self.run.fs.delete_dir(self.path())


def content_hash(manifest: dict) -> str:
    """What ties the stages after this one to it: a hash of what it was made from (its settings' hash and its
    upstream's) and of its files' bytes; not of when it was written, nor of counters such as throughput. A
    redo that comes out byte-identical has the same hash, so the stages after it stay finished."""
    content = {
        "stage": manifest["stage"],
        "config_hash": manifest.get("config_hash"),
        "upstream_hash": manifest.get("upstream_hash"),
        "files": {rel: [entry["bytes"], entry.get("sha256")] for rel, entry in manifest["files"].items()},
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def read_parquet_dir(run: RunDir, rel: str, *, columns: list[str] | None = None) -> pa.Table:
    """All shards of a stage folder (or only `columns` of them), in file-name order (the order the stage
    wrote them)."""
    fs = run.fs
    base = run.path(rel)
    infos = [i for i in fs.get_file_info(pafs.FileSelector(base)) if i.path.endswith(".parquet")]
    tables = [pq.read_table(i.path, filesystem=fs, columns=columns) for i in sorted(infos, key=lambda i: i.path)]
    if not tables:
        raise FileNotFoundError(f"no Parquet shards under {run.uri_of(rel)}")
    return pa.concat_tables(tables)
