"""The path users take on a cluster: `ray start --head`, then `ray job submit --working-dir .` of
jobs/run.py, followed to SUCCEEDED; a resubmission resumes (every stage "finished already"); a reused
submission id is refused.

The head is a real `ray start` with its dashboard (the job API) on loopback and token auth on, and
everything about it is private to this test: its own free ports, its own --temp-dir, its own token
file (RAY_AUTH_TOKEN_PATH), so it can neither join nor disturb another Ray on the machine (the stage
tests' embedded Ray, another session's).
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
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).parent.parent
BIN = Path(sys.executable).parent  # the venv's `ray` and `python`
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


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

    def __init__(self) -> None:
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
        }
        for name in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "RAYDPO_AUTOSCALING"):
            self.env.pop(name, None)  # never a cluster or token of the caller's; .gitignore honoured
        self.log = open(Path(self.temp_dir) / "ray_start.log", "w")
        self.process = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
             f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
             f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
             f"--ray-client-server-port={client}", "--num-cpus=2", f"--temp-dir={self.temp_dir}",
             "--disable-usage-stats"],
            cwd=ROOT, env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def ray(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "ray"), *args], cwd=ROOT, env=self.env, capture_output=True,
                              text=True, timeout=timeout)

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
def head():
    head = Head()
    try:
        head.wait_ready()
        yield head
    finally:
        head.stop()


@pytest.fixture(scope="module")
def run_dir():
    path = Path(tempfile.mkdtemp(prefix="raydpo_job_")) / "run"
    yield path
    shutil.rmtree(path.parent, ignore_errors=True)


def submit(head: Head, submission_id: str, run_dir: Path) -> subprocess.CompletedProcess:
    return head.ray(
        "job", "submit", "--address", head.address, "--working-dir", ".", "--submission-id", submission_id,
        "--no-wait", "--", "python", "jobs/run.py", "--config", "configs/demo_smoke.yaml",
        "--set", f"run_dir={run_dir}",
    )


def _status(submission_id: str, text: str) -> str | None:
    """The status `ray job status` printed: "Job 'x' succeeded" at the end, "Status for job 'x': RUNNING" before."""
    job = re.escape(submission_id)
    ended = re.search(rf"Job '{job}' (succeeded|failed|was stopped)", text)
    if ended:
        return {"succeeded": "SUCCEEDED", "failed": "FAILED", "was stopped": "STOPPED"}[ended.group(1)]
    running = re.search(rf"Status for job '{job}': (\w+)", text)
    return running.group(1) if running else None


def follow(head: Head, submission_id: str, *, timeout: float) -> tuple[str, str]:
    """Poll `ray job status` until the job ends; return its status and its logs."""
    deadline = time.monotonic() + timeout
    status = "UNKNOWN"
    while time.monotonic() < deadline:
        done = head.ray("job", "status", "--address", head.address, submission_id, timeout=60)
        status = _status(submission_id, done.stdout + done.stderr) or status
        if status in TERMINAL:
            break
        time.sleep(3)
    logs = head.ray("job", "logs", "--address", head.address, submission_id, timeout=60)
    return status, logs.stdout + logs.stderr


def test_submit_resubmit_and_a_reused_id(head, run_dir):
    first = f"raydpo-{uuid.uuid4().hex[:8]}"
    submitted = submit(head, first, run_dir)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    # The upload honoured .gitignore: .venv (GBs) and runs/ stay home, the package is small.
    assert "Ignoring upload to cluster for these files" in submitted.stdout + submitted.stderr
    status, logs = follow(head, first, timeout=900)  # ~2.5 min on 2 idle cores
    assert status == "SUCCEEDED", logs[-6000:]
    summary = json.loads((run_dir / "evaluate" / "summary.json").read_text())
    assert summary["rows"]

    second = f"{first}-again"
    submitted = submit(head, second, run_dir)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    status, logs = follow(head, second, timeout=300)
    assert status == "SUCCEEDED", logs[-6000:]
    for stage in ("tokenize", "score", "train", "evaluate"):
        assert any(stage in line and "finished already" in line for line in logs.splitlines()), (stage, logs[-4000:])

    refused = submit(head, first, run_dir)
    assert refused.returncode != 0
    assert "already exists" in refused.stdout + refused.stderr
