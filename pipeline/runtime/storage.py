"""The run directory: stage folders, manifests, atomic commits, on any pyarrow filesystem.

A stage writes into a staging folder beside its final one and commits by moving it into place and then
writing `manifest.json` LAST. A stage is finished if and only if its manifest exists and matches the
config and the upstream manifest, so output from a crashed attempt is never taken for finished.
"""

from __future__ import annotations

import hashlib
import json
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

MANIFEST = "manifest.json"


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

    @property
    def fs_and_root(self) -> tuple[pafs.FileSystem, str]:
        if "://" in self.uri:
            fs, root = pafs.FileSystem.from_uri(self.uri)
        else:
            import os

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

    # ---- small files -------------------------------------------------------------------------
    def write_text(self, rel: str, text: str) -> None:
        fs = self.fs
        path = self.path(rel)
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(path) as out:
            out.write(text.encode("utf-8"))

    def read_text(self, rel: str) -> str:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read().decode("utf-8")

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_text(rel, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_text(rel))

    def upload_dir(self, local: str, rel: str) -> None:
        """Copy the local folder `local`, every file under it, to `rel` in the run directory."""
        fs = self.fs
        for root, _, files in os.walk(local):
            for name in files:
                src = os.path.join(root, name)
                dst = self.path(rel, os.path.relpath(src, local))
                fs.create_dir(dst.rsplit("/", 1)[0], recursive=True)
                with open(src, "rb") as f, fs.open_output_stream(dst) as out:
                    shutil.copyfileobj(f, out)

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
        """The stage's manifest, or None if the stage never finished."""
        if not self.exists(stage, MANIFEST):
            return None
        return self.read_json(f"{stage}/{MANIFEST}")

    def is_finished(self, stage: str, *, config_hash: str, upstream_hash: str | None) -> bool:
        manifest = self.manifest(stage)
        return (
            manifest is not None
            and manifest.get("config_hash") == config_hash
            and manifest.get("upstream_hash") == upstream_hash
        )

    def begin(self, stage: str) -> "StageWriter":
        """Start a fresh attempt at `stage`: the old manifest goes first, so nothing reads as finished."""
        fs = self.fs
        if self.exists(stage, MANIFEST):
            fs.delete_file(self.path(stage, MANIFEST))
        staging = f".staging/{stage}-{uuid.uuid4().hex[:8]}"
        fs.create_dir(self.path(staging), recursive=True)
        return StageWriter(run=self, stage=stage, staging=staging)

    def clean_staging(self) -> None:
        """Remove leftovers of crashed attempts (they were never committed)."""
        if self.exists(".staging"):
            self.fs.delete_dir(self.path(".staging"))


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

    def write_table(self, rel: str, table: pa.Table, schema: pa.Schema | None = None) -> None:
        """Write one Parquet shard, checked against the shard type's schema."""
        if schema is not None:
            check_schema(table, schema, what=f"{self.stage}/{rel}")
            table = table.select(schema.names).cast(schema)
        fs = self.run.fs
        path = self.path(rel)
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        pq.write_table(table, path, filesystem=fs)

    def write_text(self, rel: str, text: str) -> None:
        self.run.write_text(f"{self.staging}/{rel}", text)

    def write_json(self, rel: str, obj: Any) -> None:
        self.run.write_json(f"{self.staging}/{rel}", obj)

    def commit(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Move the staging folder into place, then write the manifest LAST."""
        fs = self.run.fs
        final = self.run.path(self.stage)
        if self.run.exists(self.stage):
            fs.delete_dir(final)
        _move_dir(fs, self.path(), final)
        staging_root = self.run.path(".staging")
        if not fs.get_file_info(pafs.FileSelector(staging_root, allow_not_found=True)):
            fs.delete_dir(staging_root)  # nothing else in flight: leave no empty folder behind
        manifest = {
            "stage": self.stage,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "versions": _versions(),
            **manifest,
        }
        manifest["manifest_hash"] = hashlib.sha256(
            json.dumps(manifest, sort_keys=True, default=str).encode()
        ).hexdigest()[:16]
        self.run.write_json(f"{self.stage}/{MANIFEST}", manifest)
        return manifest


def _move_dir(fs: pafs.FileSystem, src: str, dst: str) -> None:
    if isinstance(fs, pafs.LocalFileSystem):
        fs.move(src, dst)  # one rename: atomic on a local disk
        return
    # Object stores have no directory rename: copy every object, then drop the staging copy. The
    # manifest written after this is still the commit point.
    for info in fs.get_file_info(pafs.FileSelector(src, recursive=True)):
        if info.type == pafs.FileType.File:
            target = dst + info.path[len(src):]
            fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
            fs.copy_file(info.path, target)
    fs.delete_dir(src)


def check_schema(table: pa.Table, schema: pa.Schema, *, what: str) -> None:
    """Raise if `table` lacks a column of `schema` or has one of an incompatible type."""
    for f in schema:
        if f.name not in table.column_names:
            raise ValueError(f"{what}: missing column {f.name!r} (expected schema {schema})")
        got = table.schema.field(f.name).type
        if got != f.type and not _castable(got, f.type):
            raise ValueError(f"{what}: column {f.name!r} is {got}, expected {f.type}")


def _castable(src: pa.DataType, dst: pa.DataType) -> bool:
    if pa.types.is_null(src):
        return True
    if pa.types.is_integer(src) and pa.types.is_integer(dst):
        return True
    if pa.types.is_floating(src) and pa.types.is_floating(dst):
        return True
    if pa.types.is_list(src) or pa.types.is_large_list(src):
        return (pa.types.is_list(dst) or pa.types.is_large_list(dst)) and _castable(src.value_type, dst.value_type)
    if pa.types.is_string(src) or pa.types.is_large_string(src):
        return pa.types.is_string(dst) or pa.types.is_large_string(dst)
    return False


def read_parquet_dir(run: RunDir, rel: str) -> pa.Table:
    """All shards of a stage folder, in file-name order (the order the stage wrote them)."""
    fs = run.fs
    base = run.path(rel)
    infos = [i for i in fs.get_file_info(pafs.FileSelector(base)) if i.path.endswith(".parquet")]
    tables = [pq.read_table(i.path, filesystem=fs) for i in sorted(infos, key=lambda i: i.path)]
    if not tables:
        raise FileNotFoundError(f"no Parquet shards under {run.uri_of(rel)}")
    return pa.concat_tables(tables)
