"""The path users take on a cluster, against one loopback `ray start --head` and one moto S3 server:

1. `ray job submit` of jobs/run.py with run_dir on S3 (s3://, through AWS_ENDPOINT_URL), followed to
   SUCCEEDED; the upload honours .gitignore; a second submission of the same work under its derived id
   (`dpo submission-id`) is refused by Ray while the first runs; rerunning the finished run is a no-op.
2. A job stopped with `ray job stop` during train, deleted and submitted again under the same id, resumes
   from its last checkpoint on S3 and ends with the metrics of the uninterrupted run of test 1 (1e-5).

The head is a real `ray start` with its dashboard (the job API) on loopback and token auth on, and
everything about it is private to this test: its own free ports, its own --temp-dir, its own token
file (RAY_AUTH_TOKEN_PATH), so it can neither join nor disturb another Ray on the machine.
`ray stop` is never called: it stops every Ray on the machine. Instead the head runs with `--block` in
a session of its own; teardown sends SIGTERM to that `ray start`, which takes down the processes it
started, then SIGKILLs whatever is left in its process group or names this test's temp dir.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from tests.helpers.tiny import write_pairs

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the venv's `ray` and `python`
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
BUCKET = "raydpo-test"
STEPS = 40


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class Head:
    """A `ray start --head --block` of our own, and the CLI environment that talks to it."""

    def __init__(self, extra_env: dict[str, str]) -> None:
        # Short: Ray puts unix sockets under it, and their paths are limited to ~100 characters.
        self.temp_dir = tempfile.mkdtemp(prefix="rdj", dir="/tmp")
        token = Path(self.temp_dir) / "auth_token"
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        gcs, dash, agent, agent_grpc, runtime_env, metrics, client = _free_ports(7)
        self.address = f"http://127.0.0.1:{dash}"
        self.env = {
            **os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # the entrypoint's `python`
            # Token auth, as cluster.yaml sets it: the CLI sends the token only when the mode is set.
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token),
            "RAY_USAGE_STATS_ENABLED": "0",
            # SIGTERM to `ray start --block` stops its processes at once instead of draining the node.
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
            **extra_env,  # as a node's environment: job drivers and workers inherit it
        }
        for name in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "RAYDPO_AUTOSCALING"):
            self.env.pop(name, None)  # never a cluster or token of the caller's; .gitignore honoured
        self.log = open(Path(self.temp_dir) / "ray_start.log", "w")
        self.process = subprocess.Popen(
            [
                str(BIN / "ray"),
                "start",
                "--head",
                "--block",
                f"--port={gcs}",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dash}",
                f"--dashboard-agent-listen-port={agent}",
                f"--dashboard-agent-grpc-port={agent_grpc}",
                f"--runtime-env-agent-port={runtime_env}",
                f"--metrics-export-port={metrics}",
                f"--ray-client-server-port={client}",
                "--num-cpus=2",
                f"--temp-dir={self.temp_dir}",
                "--disable-usage-stats",
            ],
            cwd=ROOT,
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def ray(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "ray"), *args], cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"ray start exited {self.process.returncode}: {self.start_log()}")
            if self.ray("job", "list", "--address", self.address, timeout=30).returncode == 0:
                return
            time.sleep(2)
        pytest.fail(f"the head's job API did not answer within {timeout} s: {self.start_log()}")

    def start_log(self) -> str:
        return (Path(self.temp_dir) / "ray_start.log").read_text()[-3000:]

    def stop(self) -> None:
        """Stop this head and nothing else."""
        pgid = self.process.pid  # start_new_session: the group id is the leader's pid
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        for pid in self._leftover_pids(pgid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def _leftover_pids(self, pgid: int) -> list[int]:
        """Processes of this head only: in its process group, or naming its unique temp dir."""
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                group = os.getpgid(int(entry.name))
            except (OSError, ProcessLookupError):
                continue
            if group == pgid or self.temp_dir in cmdline:
                pids.append(int(entry.name))
        return pids


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on loopback, and the environment variables that point pyarrow (and Ray) at it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=_free_ports(1)[0], verbose=False)
    server.start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{server.get_host_and_port()[1]}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        pafs.S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL"], allow_bucket_creation=True).create_dir(BUCKET)
        try:
            yield env
        finally:
            server.stop()


@pytest.fixture(scope="module")
def head(s3):
    head = Head(s3)
    try:
        head.wait_ready()
        yield head
    finally:
        head.stop()


@pytest.fixture(scope="module")
def config_file(tmp_path_factory, tiny_model_dir) -> Path:
    """A small DPO run on the tiny model: enough steps and checkpoints that a stop lands mid-training."""
    tmp = tmp_path_factory.mktemp("cluster")
    data = write_pairs(tmp / "pairs.jsonl", 80)
    path = tmp / "cluster_test.yaml"
    path.write_text(
        json.dumps(
            {  # JSON is YAML
                "data": {"path": str(data), "eval_fraction": 0.2},
                "model": {"path": str(tiny_model_dir)},
                "tokenize": {"max_prompt_length": 16, "max_length": 40},
                "score": {"batch_size": 32, "cpus_per_actor": 0.5},
                "train": {
                    "learning_rate": 1e-3,
                    "max_steps": STEPS,
                    "checkpoint_steps": 4,
                    "batch_size": 8,
                    "micro_batch_size": 8,
                    "cpus_per_worker": 0.5,
                },
                "evaluate": {
                    "num_prompts": 3,
                    "samples_per_prompt": 1,
                    "temperatures": [1.0],
                    "max_tokens": 6,
                    "reward": "vader",
                    "judge": "vader",
                    "bootstrap_samples": 20,
                    "best_of_n": 0,
                },
            }
        )
    )
    return path


def dpo(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env
    )


def submit(head: Head, submission_id: str, config: Path, run_dir: str) -> subprocess.CompletedProcess:
    return head.ray(
        "job",
        "submit",
        "--address",
        head.address,
        "--working-dir",
        ".",
        "--submission-id",
        submission_id,
        "--no-wait",
        "--",
        "python",
        "jobs/run.py",
        "--config",
        str(config),
        "--set",
        f"run_dir={run_dir}",
        "--to-stage",
        "train",  # evaluate runs from the laptop side in the first test
    )


def _status(submission_id: str, text: str) -> str | None:
    """The status `ray job status` printed: "Job 'x' succeeded" at the end, "Status for job 'x': RUNNING" before."""
    job = re.escape(submission_id)
    ended = re.search(rf"Job '{job}' (succeeded|failed|was stopped)", text)
    if ended:
        return {"succeeded": "SUCCEEDED", "failed": "FAILED", "was stopped": "STOPPED"}[ended.group(1)]
    running = re.search(rf"Status for job '{job}': (\w+)", text)
    return running.group(1) if running else None


def status(head: Head, submission_id: str) -> str | None:
    done = head.ray("job", "status", "--address", head.address, submission_id, timeout=60)
    return _status(submission_id, done.stdout + done.stderr)


def follow(head: Head, submission_id: str, *, timeout: float) -> tuple[str, str]:
    """Poll `ray job status` until the job ends; return its status and its logs."""
    deadline = time.monotonic() + timeout
    state = "UNKNOWN"
    while time.monotonic() < deadline:
        state = status(head, submission_id) or state
        if state in TERMINAL:
            break
        time.sleep(2)
    logs = head.ray("job", "logs", "--address", head.address, submission_id, timeout=60)
    return state, logs.stdout + logs.stderr


def s3_fs() -> pafs.FileSystem:
    """As the pipeline gets it: from a URI, which (unlike S3FileSystem()) reads AWS_ENDPOINT_URL."""
    return pafs.FileSystem.from_uri(f"s3://{BUCKET}")[0]


def s3_files(prefix: str) -> list[str]:
    fs = s3_fs()
    infos = fs.get_file_info(pafs.FileSelector(f"{BUCKET}/{prefix}", recursive=True, allow_not_found=True))
    return [i.path for i in infos if i.type == pafs.FileType.File]


def s3_text(key: str) -> str:
    with s3_fs().open_input_stream(f"{BUCKET}/{key}") as f:
        return f.read().decode()


def metrics(run: str) -> list[dict]:
    return [json.loads(line) for line in s3_text(f"{run}/train/metrics.jsonl").splitlines()]


def test_submit_on_s3_refuses_a_duplicate_and_a_finished_rerun_is_a_no_op(head, config_file):
    run_dir = f"s3://{BUCKET}/straight"
    derived = dpo("submission-id", "--config", str(config_file), "--set", f"run_dir={run_dir}")
    assert derived.returncode == 0, derived.stderr[-3000:]
    job_id = derived.stdout.strip()
    assert re.fullmatch(r"raydpo-[0-9a-f]{12}-run", job_id), job_id

    submitted = submit(head, job_id, config_file, run_dir)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    # The upload honoured .gitignore: .venv (GBs) and runs/ stay home, the package is small.
    assert "Ignoring upload to cluster for these files" in submitted.stdout + submitted.stderr
    # The same work submitted again while it runs: Ray refuses the id, nothing runs twice.
    twice = submit(head, job_id, config_file, run_dir)
    assert twice.returncode != 0
    assert "already exists" in twice.stdout + twice.stderr
    listed = head.ray("job", "list", "--address", head.address)
    assert listed.stdout.count(f"submission_id='{job_id}'") == 1, listed.stdout[-3000:]

    state, logs = follow(head, job_id, timeout=600)
    assert state == "SUCCEEDED", logs[-6000:]
    for stage in ("tokenize", "score", "train"):
        assert f"straight/{stage}/manifest.json" in " ".join(s3_files(f"straight/{stage}")), stage
    assert [m["step"] for m in metrics("straight")] == list(range(1, STEPS + 1))
    assert any("straight/tensorboard/" in p and "tfevents" in p for p in s3_files("straight/tensorboard"))
    assert not (ROOT / "s3:").exists()  # nothing landed on local disk under a mangled URI

    # Run again (here, from the laptop side: no Ray needed to see it is finished).
    again = dpo("run", "--config", str(config_file), "--set", f"run_dir={run_dir}", "--to-stage", "train")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"run {run_dir}: every stage finished (tokenize, score, train); nothing to do." in again.stdout

    # Evaluate the S3 policy: its sampler and scorer actors fetch it from the URI themselves.
    evaluated = dpo("evaluate", "--config", str(config_file), "--set", f"run_dir={run_dir}")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    summary = json.loads(s3_text("straight/evaluate/summary.json"))
    assert {row["model"] for row in summary["rows"]} == {"policy", "reference"}
    assert not (ROOT / "s3:").exists()


def test_a_stopped_job_resumes_on_s3_and_matches_the_uninterrupted_run(head, config_file):
    # The same data for both runs: manifests hash contents, not the folder.
    fs = s3_fs()
    for path in s3_files("straight/tokenize") + s3_files("straight/score"):
        fs.copy_file(path, path.replace("/straight/", "/stopped/", 1))
    run_dir = f"s3://{BUCKET}/stopped"
    job_id = dpo("submission-id", "--config", str(config_file), "--set", f"run_dir={run_dir}").stdout.strip()

    assert submit(head, job_id, config_file, run_dir).returncode == 0
    deadline = time.monotonic() + 300
    polls = 0
    while not any("/step-" in p for p in s3_files("stopped/train.work")):
        assert time.monotonic() < deadline, "no checkpoint on S3 within 5 minutes"
        polls += 1
        if polls % 25 == 0:  # `ray job status` is a second or more: not on every poll, or the stop lands late
            assert status(head, job_id) not in TERMINAL, follow(head, job_id, timeout=1)[1][-4000:]
        time.sleep(0.2)
    stopped = head.ray("job", "stop", "--address", head.address, job_id)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    state, logs = follow(head, job_id, timeout=120)
    assert state == "STOPPED", logs[-4000:]
    assert not s3_files("stopped/train/manifest.json"), "training finished before the stop landed"
    # The stopped run kept its curve, at least up to its last checkpoint (written before the checkpoint).
    (live,) = [p for p in s3_files("stopped/train.work") if p.endswith("/metrics.jsonl")]
    kept = [json.loads(line)["step"] for line in s3_text(live.split("/", 1)[1]).splitlines()]
    assert kept == list(range(1, len(kept) + 1)) and len(kept) >= 4, kept

    # The id is still taken; `ray job delete` frees it, and the same submission resumes the work.
    again = submit(head, job_id, config_file, run_dir)
    assert "already exists" in again.stdout + again.stderr
    deleted = head.ray("job", "delete", "--address", head.address, job_id)
    assert deleted.returncode == 0, deleted.stdout + deleted.stderr
    assert submit(head, job_id, config_file, run_dir).returncode == 0
    state, logs = follow(head, job_id, timeout=600)
    assert state == "SUCCEEDED", logs[-6000:]
    assert "finished already: tokenize, score" in logs
    resumed = re.search(r"train: resuming at step (\d+) from checkpoint \S*stopped/train.work/\S+/step-(\d+)", logs)
    assert resumed and int(resumed.group(1)) == int(resumed.group(2)) >= 4, logs[-6000:]
    print(f"stopped and resumed at step {resumed.group(1)} of {STEPS}")

    first, second = metrics("straight"), metrics("stopped")
    assert [m["step"] for m in second] == list(range(1, STEPS + 1))  # the history before the stop came back
    assert json.loads(s3_text("stopped/train/manifest.json"))["final_metrics"]["step"] == STEPS
    for a, b in zip(first, second):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["rewards/margins"] - b["rewards/margins"]) < 1e-5
