"""A model directory on the node that loads it.

transformers and vLLM load from a local directory or a hub id, not from s3:// or gs://. A policy trained
into a cloud run directory must therefore be copied, and by the process that loads it: on a multi-node
cluster the driver's disk is not the actor's. `local_model` is entered in an actor's constructor.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def local_model(uri: str) -> Iterator[str]:
    """A path to load `uri` from on THIS node, valid inside the block.

    A local path or a hub id is yielded as is. A URI (s3://, gs://, file://, anything pyarrow.fs knows) is
    copied into a fresh temporary directory, which is removed when the block exits: load the model inside it.
    """
    if "://" not in uri:
        yield uri
        return
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(uri)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"no model directory at {uri}")
    tmp = tempfile.mkdtemp(prefix="raydpo-model-")
    try:
        pafs.copy_files(root, tmp, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        yield tmp
    finally:
        # Weights are in memory (or mmapped, which outlives the unlink) once loaded: nothing stays on disk.
        shutil.rmtree(tmp, ignore_errors=True)
