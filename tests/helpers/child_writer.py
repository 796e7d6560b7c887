"""A second process that writes a run directory, for the fault tests: `python -m tests.helpers.child_writer MODE ...`.

    hold RUN_DIR READY             take the lease, touch READY, sleep until killed
    race RUN_DIR START_AT          at time START_AT (epoch s), try the lease; print "won" (and hold it
                                   until killed) or "refused" (and exit)
    commit RUN_DIR READY POINT     run the `letters` stage and stop inside its commit at POINT, touch
                                   READY and sleep until killed: POINT is "moved" (shards in place,
                                   no manifest yet) or "manifest" (the manifest written to a temporary
                                   file, not yet renamed into place)

The pause points wrap the standard library and our own listing function in this process only: the
commit code that runs is the pipeline's.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from pipeline.config import load_config
from pipeline.runtime import files
from pipeline.runtime.lease import LeaseError
from pipeline.runtime.storage import RunDir

LETTERS = "abcdefghij"


def letters_body(run) -> dict:
    """A small stage with several files: one shard per letter and a summary."""
    import pyarrow as pa

    for i, letter in enumerate(LETTERS):
        run.writer.write_table(f"shards/part-{i:05d}.parquet", pa.table({"id": [f"{letter}{n}" for n in range(i + 1)]}))
    run.writer.write_text("summary.txt", LETTERS + "\n")
    return {"rows_out": sum(range(1, len(LETTERS) + 1))}


def letters_stage():
    # pipeline.stages imports Ray (seconds): only the commit mode pays for it, so racers start together.
    from pipeline.stages.base import Stage

    return Stage(name="letters", sections=("train.beta",), body=letters_body, input_hash=lambda config: "letters-v1")


def letters_config(run_dir: str):
    return load_config(None, [f"run_dir={run_dir}"])


def _pause(ready: str) -> None:
    if ready != os.devnull:
        Path(ready).touch()
    while True:
        time.sleep(60)


def main(mode: str, run_dir: str, *rest: str) -> None:
    if mode == "hold":
        with RunDir(run_dir).lease(command="child_writer hold"):
            _pause(rest[0])
    elif mode == "race":
        time.sleep(max(0.0, float(rest[0]) - time.time()))
        late = time.time() - float(rest[0])
        try:
            with RunDir(run_dir).lease(command="child_writer race"):
                print(f"won {late:.3f}", flush=True)
                _pause(os.devnull)
        except LeaseError:
            print(f"refused {late:.3f}", flush=True)
    elif mode == "commit":
        ready, point = rest
        if point == "moved":
            listing = files.list_files

            def paused_listing(*args, **kwargs):
                _pause(ready)
                return listing(*args, **kwargs)

            import pipeline.runtime.storage as storage

            storage.list_files = paused_listing
        else:
            replace = os.replace

            def paused_replace(src, dst):
                if str(dst).endswith("manifest.json"):
                    _pause(ready)
                return replace(src, dst)

            os.replace = paused_replace
        from pipeline.stages.base import execute

        execute(letters_stage(), letters_config(run_dir), force=True)
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main(*sys.argv[1:])
