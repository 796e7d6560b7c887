"""The run directory under faults, without Ray: one writer at a time (on a local disk and on S3), a dead
writer not locking it forever, commits that a SIGKILL cannot leave half-done, manifests that list their
files, lost or duplicated rows named by count, credentials kept out of URIs, sweep members kept apart."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from pipeline.config import ConfigError, load_config
from pipeline.runtime.files import RowsLostError, check_same_ids
from pipeline.runtime.lease import LEASE_DIR, TTL_S, LeaseError
from pipeline.runtime.storage import RunDir
from pipeline.stages.base import execute
from tests.child_writer import letters_config, letters_stage

pytestmark = pytest.mark.unit
ROOT = Path(__file__).parent.parent
LETTERS_STAGE = letters_stage()


def child(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "tests.child_writer", *args],
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
def test_a_second_writer_is_refused_naming_the_holder_and_a_killed_holder_frees_the_directory(run_uri, tmp_path):
    ready = tmp_path / "ready"
    holder = child("hold", run_uri, str(ready))
    try:
        wait_for_file(ready, holder)
        t0 = time.monotonic()
        with pytest.raises(LeaseError) as refused:
            with RunDir(run_uri).lease():
                pass
        assert time.monotonic() - t0 < 5  # at once, not after a wait
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


def write_claim(run: RunDir, *, machine: str, heartbeat_age: float) -> None:
    now = time.time()
    claim = {
        "token": "elsewhere",
        "host": "node-7",
        "machine": machine,
        "pid": 1,
        "command": "dpo run",
        "started": now - 3600,
        "heartbeat": now - heartbeat_age,
    }
    run.write_text(f"{LEASE_DIR}/elsewhere.json", json.dumps(claim))


def test_a_holder_on_another_machine_holds_until_its_heartbeat_is_older_than_the_ttl(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    write_claim(run, machine="another-node", heartbeat_age=5)
    with pytest.raises(LeaseError, match=r"pid 1 on node-7 \(dpo run\).*last heartbeat 5 s ago"):
        with run.lease():
            pass
    write_claim(run, machine="another-node", heartbeat_age=TTL_S + 1)
    with run.lease():
        assert not run.exists(LEASE_DIR, "elsewhere.json")


def test_a_writer_whose_lease_was_taken_commits_nothing(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    with run.lease() as lease:
        writer = run.begin("letters")
        writer.write_text("x.txt", "x")
        run.fs.delete_file(lease.path)  # what a writer that took us for dead does
        assert not lease.beat()
        with pytest.raises(LeaseError, match="lost the run directory's lease"):
            writer.commit({"rows_out": 1})
    assert run.manifest("letters") is None


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


def test_a_truncated_manifest_is_not_finished_and_the_stage_is_redone(tmp_path):
    config = letters_config(str(tmp_path / "run"))
    first = execute(LETTERS_STAGE, config)
    run = RunDir(config.run_dir)
    text = run.read_text("letters/manifest.json")
    (tmp_path / "run" / "letters" / "manifest.json").write_text(text[: len(text) // 2])
    assert run.manifest("letters") is None
    again = execute(LETTERS_STAGE, config)  # redone: a skip would have returned the unreadable manifest's None
    assert again is not None and run.manifest("letters") == again and again["files"] == first["files"]
    (tmp_path / "run" / "letters" / "manifest.json").write_text("")
    assert execute(LETTERS_STAGE, config)["rows_out"] == 55


def test_the_manifest_lists_every_file_and_a_changed_file_unfinishes_the_stage(tmp_path):
    config = letters_config(str(tmp_path / "run"))
    manifest = execute(LETTERS_STAGE, config)
    assert manifest["files"]["shards/part-00003.parquet"]["rows"] == 4
    assert manifest["files"]["summary.txt"]["bytes"] == 11
    assert (
        manifest["files"]["summary.txt"]["sha256"]
        == hashlib.sha256((tmp_path / "run/letters/summary.txt").read_bytes()).hexdigest()
    )
    assert sum(f.get("rows", 0) for f in manifest["files"].values()) == manifest["rows_out"]
    run = RunDir(config.run_dir)
    finished = dict(config_hash=manifest["config_hash"], upstream_hash="letters-v1")
    assert run.is_finished("letters", **finished)
    stage = tmp_path / "run" / "letters"
    (stage / "shards" / "part-00009.parquet").unlink()
    assert run.damage("letters", manifest) == ["shards/part-00009.parquet: missing"]
    assert not run.is_finished("letters", **finished)
    execute(LETTERS_STAGE, config)
    (stage / "shards" / "part-00010.parquet").write_bytes((stage / "shards" / "part-00000.parquet").read_bytes())
    assert run.damage("letters", run.manifest("letters")) == ["shards/part-00010.parquet: not in the manifest"]
    (stage / "shards" / "part-00010.parquet").unlink()
    (stage / "summary.txt").write_text("abc\n")
    assert run.damage("letters", run.manifest("letters")) == ["summary.txt: 4 bytes, the manifest says 11"]


def test_a_stage_refuses_an_upstream_whose_files_do_not_match_its_manifest(tmp_path):
    from pipeline.stages.base import Stage

    config = letters_config(str(tmp_path / "run"))
    execute(LETTERS_STAGE, config)
    (tmp_path / "run" / "letters" / "shards" / "part-00002.parquet").unlink()
    reader = Stage(name="reader", sections=("train.beta",), body=lambda run: {}, upstream=lambda config: "letters")
    with pytest.raises(
        RuntimeError,
        match=r"reader reads .*letters, whose files do not match its manifest "
        r"\(shards/part-00002.parquet: missing\); redo it",
    ) as err:
        execute(reader, config)
    from pipeline.stages.base import failed_stage

    assert failed_stage(err.value) == "reader"


def test_a_failed_attempt_leaves_no_staging_folder(tmp_path):
    from pipeline.stages.base import Stage

    def broken(run):
        run.writer.write_text("half.txt", "half")
        raise RuntimeError("worker lost")

    config = letters_config(str(tmp_path / "run"))
    with pytest.raises(RuntimeError, match="worker lost"):
        execute(Stage(name="letters", sections=(), body=broken, input_hash=lambda c: "x"), config)
    assert not RunDir(config.run_dir).exists(".staging", "letters")
    assert list((tmp_path / "run" / ".staging").iterdir()) == []


# ---- rows, credentials, sweeps ---------------------------------------------------------------
def test_lost_and_duplicated_rows_are_counted():
    check_same_ids(["a", "b", "c"], ["c", "a", "b"], what="score/train")
    with pytest.raises(RowsLostError, match=r"score/train: 3 rows written for 4 expected: 2 lost, 1 duplicated"):
        check_same_ids(["a", "b", "c", "d"], ["a", "a", "b"], what="score/train")
    with pytest.raises(RowsLostError, match=r"1 duplicated or unexpected \(1 with an id the input never had\)"):
        check_same_ids(["a"], ["a", "z"], what="x")


@pytest.mark.parametrize(
    "key,value,env",
    [
        ("run_dir", "s3://AKIAEXAMPLE:wJalrXUtnFEMI@bucket/runs/x", "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"),
        ("data.path", "gs://token123@bucket/prefs.jsonl", "GOOGLE_APPLICATION_CREDENTIALS"),
        ("model.path", "s3://bucket/model?access_key=AKIA&secret_key=wJalrXUtnFEMI", "AWS_ACCESS_KEY_ID"),
        ("evaluate.judge_api", "{base_url: 'https://user:wJalrXUtnFEMI@api.example.com/v1'}", "api_key_env"),
    ],
)
def test_credentials_inside_a_uri_are_refused_without_repeating_them(key, value, env):
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"{key}={value}"])
    message = str(err.value)
    assert "carries credentials inside the URI" in message and env in message
    assert "wJalrXUtnFEMI" not in message and "AKIA" not in message and "token123" not in message
    with pytest.raises(ConfigError, match="run_dir: s3://\\*\\*\\*@bucket/x carries credentials"):
        RunDir("s3://KEY:SECRET@bucket/x")
    load_config(None, ["run_dir=s3://bucket/runs/x", "data.path=hf://datasets/org/name"])  # no credentials: fine


def test_sweep_values_that_name_one_member_are_refused(tmp_path):
    from pipeline.cli.sweep import members

    config = tmp_path / "c.yaml"
    config.write_text(f"run_dir: {tmp_path / 'run'}\n")
    with pytest.raises(
        ConfigError, match=r"two members would share .*/sweep/beta-0.1 \(their values are equal once read"
    ):
        members(str(config), ["train.beta=[0.1, 0.10]"])
    with pytest.raises(ConfigError, match="differ only in characters a directory name drops"):
        members(str(config), ["train.loss=[dpo, 'd/po']"])
    assert [m.name for m in members(str(config), ["train.beta=[0.1, 0.5]"])[1]] == ["beta-0.1", "beta-0.5"]


def test_a_second_dpo_on_a_run_dir_being_written_ends_in_one_error_line(tmp_path, tiny_model_dir, capsys):
    from conftest import write_pairs

    from pipeline.cli.main import main

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
