"""What a stage folder holds, written whole or not at all: atomic small files, file listings, row identity.

A manifest lists every file of its stage (`list_files`: path, bytes, content hash, and rows for a Parquet
shard), and a stage is finished only while the folder still holds exactly those files (`differences`). Row identity
(`check_same_ids`) is how a stage that keeps its upstream's rows proves it lost and duplicated none.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator

import pyarrow.fs as pafs
import pyarrow.parquet as pq


def write_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write `path` so that a reader sees the old file, no file, or the whole new one, never a part.

    On a local disk: a temporary file beside it, flushed to disk, renamed over it. On an object store an
    object becomes visible only when its upload completes, so one upload is already whole or absent.
    """
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return
    with fs.open_output_stream(path) as out:
        out.write(data)


# Files no manifest lists: model cards, which the evaluate stage rewrites after training
# (pipeline/evaluation/model_card.py) without unfinishing the stage that holds them.
UNLISTED_NAMES = frozenset({"README.md"})


def _files(fs: pafs.FileSystem, root: str, skip: Iterable[str]) -> Iterator[tuple[str, pafs.FileInfo]]:
    """(path relative to `root`, info) of every file under `root`, but `skip`, model cards and `.tmp-` leftovers."""
    skip = set(skip)
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True)):
        rel = info.path[len(root) :].lstrip("/")
        if (
            info.type == pafs.FileType.File
            and rel not in skip
            and info.base_name not in UNLISTED_NAMES
            and ".tmp-" not in info.base_name
        ):
            yield rel, info


def list_files(fs: pafs.FileSystem, root: str, *, skip: Iterable[str] = ()) -> dict[str, dict]:
    """Every file under `root` by path relative to it: {"bytes": size, "sha256": its content's hash} plus
    "rows" for a Parquet shard (read from its footer). `skip`: relative paths left out (the manifest itself)."""
    files = {}
    for rel, info in _files(fs, root, skip):
        entry = {"bytes": info.size, "sha256": sha256_of(fs, info.path)}
        if rel.endswith(".parquet"):
            entry["rows"] = pq.read_metadata(info.path, filesystem=fs).num_rows
        files[rel] = entry
    return dict(sorted(files.items()))


def sha256_of(fs: pafs.FileSystem, path: str, *, chunk: int = 8 << 20) -> str:
    """The SHA-256 of a file's bytes, read in chunks (a model's weights never sit in memory whole)."""
    digest = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def differences(expected: dict[str, dict], fs: pafs.FileSystem, root: str, *, skip: Iterable[str] = ()) -> list[str]:
    """How the files under `root` differ from a manifest's listing (sizes only: no file is read); [] if
    they agree."""
    found = {rel: info.size for rel, info in _files(fs, root, skip)}
    problems = [f"{rel}: missing" for rel in expected if rel not in found]
    problems += [
        f"{rel}: {found[rel]} bytes, the manifest says {entry['bytes']}"
        for rel, entry in expected.items()
        if rel in found and found[rel] != entry["bytes"]
    ]
    problems += [f"{rel}: not in the manifest" for rel in found if rel not in expected]
    return problems


def move_dir(fs: pafs.FileSystem, src: str, dst: str, *, drop_source: bool = True) -> None:
    """Move a folder: one rename on a local disk (atomic); on an object store, which has no folder rename,
    every object is copied, and then the source deleted unless `drop_source` is False (a stage's commit
    drops its staging copy only after the manifest, the commit point, is written)."""
    if isinstance(fs, pafs.LocalFileSystem):
        fs.move(src, dst)
        return
    for info in fs.get_file_info(pafs.FileSelector(src, recursive=True)):
        if info.type == pafs.FileType.File:
            target = dst + info.path[len(src) :]
            fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
            fs.copy_file(info.path, target)
    if drop_source:
        fs.delete_dir(src)


class RowsLostError(RuntimeError):
    """A stage's output does not hold exactly its input's rows; the message gives the counts."""


def check_same_ids(expected: Iterable[str], got: Iterable[str], *, what: str) -> None:
    """Raise RowsLostError unless `got` holds every id of `expected` exactly once and nothing else."""
    want, have = Counter(expected), Counter(got)
    lost = sum((want - have).values())
    duplicated = sum((have - want).values())
    if not lost and not duplicated:
        return
    unknown = sum(n for key, n in have.items() if key not in want)
    example = next(iter(want - have), None) or next(iter(have - want))
    raise RowsLostError(
        f"{what}: {sum(have.values())} rows written for {sum(want.values())} expected: {lost} lost, "
        f"{duplicated} duplicated or unexpected ({unknown} with an id the input never had); e.g. id {example}"
    )
