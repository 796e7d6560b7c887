"""Runs keep their history: a change of settings never destroys the previous result, the settings asked for
again put it back without recomputing, and a forced redo that comes out byte-identical keeps the stages
after it finished (manifests are tied by content hashes, not timestamps). Through the one stage skeleton."""

from __future__ import annotations

import pytest

from pipeline.config import load_config
from pipeline.runtime.storage import RunDir
from pipeline.stages.base import Stage, execute, is_current


def stage(name: str, upstream: str | None, calls: list, *, salt: list | None = None) -> Stage:
    """A stage whose output is its settings (and `salt[0]`, to make a redo come out different)."""

    def body(run):
        calls.append(name)
        extra = salt[0] if salt else ""
        run.writer.write_text("out.txt", f"{name} with beta {run.config.train.beta}{extra}\n")
        return {"rows_out": 1}

    return Stage(
        name=name, sections=("train.beta",), body=body, upstream=lambda c: upstream, input_hash=lambda c: "in-1"
    )


def config_with(tmp_path, beta: float):
    return load_config(None, [f"run_dir={tmp_path / 'run'}", f"train.beta={beta}"])


def test_changed_settings_keep_the_previous_result_and_going_back_puts_it_back(tmp_path):
    calls: list = []
    first = stage("first", None, calls)
    run = RunDir(str(tmp_path / "run"))
    old = execute(first, config_with(tmp_path, 0.1))
    new = execute(first, config_with(tmp_path, 0.5))
    assert calls == ["first", "first"]
    assert run.read_text("first/out.txt") == "first with beta 0.5\n"  # the latest is where readers look
    kept = f"history/first/{old['manifest_hash']}"
    assert run.read_text(f"{kept}/out.txt") == "first with beta 0.1\n" and run.manifest(kept) == old
    back = execute(first, config_with(tmp_path, 0.1))
    assert calls == ["first", "first"]  # put back, not recomputed
    assert back == old and run.read_text("first/out.txt") == "first with beta 0.1\n"
    assert run.manifest(f"history/first/{new['manifest_hash']}") == new  # and the 0.5 result is kept in turn
    assert not run.exists(kept)


def test_a_forced_byte_identical_redo_keeps_what_follows_finished(tmp_path):
    calls: list = []
    salt = [""]
    first, second = stage("first", None, calls, salt=salt), stage("second", "first", calls)
    config = config_with(tmp_path, 0.1)
    run = RunDir(config.run_dir)
    before = execute(first, config)
    execute(second, config)
    again = execute(first, config, force=True)
    assert calls == ["first", "second", "first"]
    assert again["manifest_hash"] == before["manifest_hash"]  # same bytes: same content hash
    assert again["finished_at"] >= before["finished_at"]  # written anew, which does not count
    assert not run.exists("history", "first", before["manifest_hash"])  # no copy of identical bytes
    assert is_current(second, config, run, again["manifest_hash"])
    execute(second, config)
    assert calls == ["first", "second", "first"]  # still finished: not redone
    salt[0] = " (a different redo)"
    changed = execute(first, config, force=True)
    assert changed["manifest_hash"] != before["manifest_hash"]
    assert run.read_text(f"history/first/{before['manifest_hash']}/out.txt") == "first with beta 0.1\n"
    assert not is_current(second, config, run, changed["manifest_hash"])


def test_a_failed_attempt_after_a_change_leaves_the_old_result_in_history(tmp_path):
    calls: list = []
    old = execute(stage("first", None, calls), config_with(tmp_path, 0.1))

    def broken(run):
        run.writer.write_text("half.txt", "half")
        raise RuntimeError("worker lost")

    failing = Stage(name="first", sections=("train.beta",), body=broken, input_hash=lambda c: "in-1")
    with pytest.raises(RuntimeError, match="worker lost"):
        execute(failing, config_with(tmp_path, 0.5))
    run = RunDir(str(tmp_path / "run"))
    assert run.manifest("first") is None  # nothing reads as finished
    assert run.read_text(f"history/first/{old['manifest_hash']}/out.txt") == "first with beta 0.1\n"
    assert execute(stage("first", None, calls), config_with(tmp_path, 0.1)) == old and calls == ["first"]
