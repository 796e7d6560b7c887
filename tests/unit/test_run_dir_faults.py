"""The run directory under faults, in this process alone: a dead writer on another machine not locking it
forever, a writer whose lease was taken committing nothing, manifests that list their files (a truncated or
changed one unfinishes its stage), lost or duplicated rows named by count, credentials kept out of URIs,
sweep members kept apart. (Writers in other processes, SIGKILLed ones among them, and S3: tests/stage/
test_run_dir_writers.py.)"""

from __future__ import annotations

import hashlib
import json
import time

import pytest

from pipeline.config import ConfigError, load_config
from pipeline.runtime.files import RowsLostError, check_same_ids
from pipeline.runtime.lease import LEASE_DIR, TTL_S, LeaseError
from pipeline.runtime.storage import RunDir
from pipeline.stages.base import execute
from tests.helpers.child_writer import letters_config, letters_stage

LETTERS_STAGE = letters_stage()


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


# ---- manifests ------------------------------------------------------------------------------
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
