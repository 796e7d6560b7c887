"""The run directory against writers in other processes, without Ray: one writer at a time (on a local disk
and on S3, a moto server on loopback), a SIGKILLed holder freeing it at once, of writers starting together
exactly one winning, commits that a SIGKILL cannot leave half-done, and a second `dpo run` refused in one
line. The other process is tests/helpers/child_writer.py. (The faults one process can show: tests/unit/
test_run_dir_faults.py.)"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest

import pipeline.runtime.lease as lease_module
from pipeline.runtime.lease import LEASE_DIR, LeaseError
from pipeline.runtime.storage import RunDir
from pipeline.stages.base import execute
from tests.helpers.child_writer import letters_config, letters_stage

ROOT = Path(__file__).resolve().parents[2]
LETTERS_STAGE = letters_stage()


def child(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "tests.helpers.child_writer", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def wait_for_file(path: Path, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def sigkill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def s3_run_dir():
    """A moto S3 server on loopback, and a run directory URI on it (pyarrow reads AWS_ENDPOINT_URL)."""
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        pafs.S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL"], allow_bucket_creation=True).create_dir("leases")
        try:
            yield "s3://leases"
        finally:
            server.stop()


@pytest.fixture(params=["local", "s3"])
def run_uri(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "run")
    return f"{request.getfixturevalue('s3_run_dir')}/{tmp_path.name}"


# ---- one writer ------------------------------------------------------------------------------
def test_a_second_writer_is_refused_naming_the_holder_and_a_killed_holder_frees_the_directory(
    run_uri, tmp_path, monkeypatch
):
    ready = tmp_path / "ready"
    holder = child("hold", run_uri, str(ready))
    claims = []  # the claims this process writes
    write_claim = lease_module._write_claim
    monkeypatch.setattr(
        lease_module, "_write_claim", lambda fs, path, claim: claims.append(path) or write_claim(fs, path, claim)
    )
    try:
        wait_for_file(ready, holder)
        with pytest.raises(LeaseError) as refused:
            with RunDir(run_uri).lease():
                pass
        # At once, not after a wait: refused on its first look, before writing a claim of its own (a writer
        # that finds a rival only after writing its claim withdraws it, pauses and looks again).
        assert claims == []
        message = str(refused.value)
        assert f"pid {holder.pid} on {socket.gethostname()} (child_writer hold)" in message
        assert "is being written by another process" in message
    finally:
        sigkill(holder)
    # Its claim is still there, but its process is gone: the directory is free at once.
    with RunDir(run_uri).lease() as lease:
        assert lease.claim.pid == os.getpid()
    claims = RunDir(run_uri).fs.get_file_info(pafs.FileSelector(RunDir(run_uri).path(LEASE_DIR), allow_not_found=True))
    assert claims == []  # released, and the dead holder's claim was removed


def test_of_writers_starting_together_exactly_one_wins(run_uri):
    start_at = time.time() + 5  # after every child has imported the package
    racers = [child("race", run_uri, f"{start_at:.3f}") for _ in range(3)]
    try:
        lines = [p.stdout.readline().split() for p in racers]  # the winner holds on: read, don't wait
    finally:
        for p in racers:
            sigkill(p)
    assert sorted(outcome for outcome, _ in lines) == ["refused", "refused", "won"], lines
    print("racers arrived", [f"{float(late):+.3f} s" for _, late in lines], "after the start")


# ---- crash-consistent commits ----------------------------------------------------------------
@pytest.mark.parametrize("point", ["moved", "manifest"])
def test_a_writer_killed_inside_a_commit_leaves_an_unfinished_stage_that_is_redone(point, tmp_path):
    uri = str(tmp_path / "run")
    config = letters_config(uri)
    first = execute(LETTERS_STAGE, config)
    shards = sorted(first["files"])
    ready = tmp_path / "ready"
    writer = child("commit", uri, str(ready), point)
    try:
        wait_for_file(ready, writer)
    finally:
        sigkill(writer)
    run = RunDir(uri)
    assert run.manifest("letters") is None  # the old manifest went first; the new one never landed
    assert not run.is_finished("letters", config_hash=first["config_hash"], upstream_hash="letters-v1")
    assert run.exists(".staging") or point == "manifest"
    again = execute(LETTERS_STAGE, config)
    assert sorted(again["files"]) == shards and again["files"] == first["files"]
    # The killed attempt's leftovers (its staging folder, its half-written manifest) are gone.
    assert list((tmp_path / "run" / ".staging").iterdir()) == []
    assert [p.name for p in (tmp_path / "run" / "letters").iterdir() if p.name.startswith("manifest.json.tmp")] == []


# ---- the CLI ---------------------------------------------------------------------------------
def test_a_second_dpo_on_a_run_dir_being_written_ends_in_one_error_line(tmp_path, tiny_model_dir, capsys):
    from pipeline.cli.main import main
    from tests.helpers.tiny import write_pairs

    run_dir = tmp_path / "run"
    ready = tmp_path / "ready"
    holder = child("hold", str(run_dir), str(ready))
    try:
        wait_for_file(ready, holder)
        data = write_pairs(tmp_path / "pairs.jsonl", 8)
        code = main(
            [
                "run",
                "--config",
                str(ROOT / "configs" / "demo_smoke.yaml"),
                "--set",
                "demo.enabled=false",
                "--set",
                f"run_dir={run_dir}",
                "--set",
                f"data.path={data}",
                "--set",
                f"model.path={tiny_model_dir}",
            ]
        )
    finally:
        sigkill(holder)
    assert code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"dpo: error: run: {run_dir} is being written by another process: pid {holder.pid}")
