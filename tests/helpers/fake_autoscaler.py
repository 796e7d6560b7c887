"""Test helper: a Ray head of our own under Ray's fake autoscaler (provider `fake_multinode`), and a watch on
the nodes it adds and removes.

Ray's `ray.cluster_utils.AutoscalingCluster` cannot be used here: it reads a fake_multi_node/example.yaml
that Ray's wheel does not ship, and it runs `ray stop --force`, which ends every Ray on the machine. So the
provider's config is written here (after Ray's example) and the head is a `ray start --head --block` under
RAY_FAKE_CLUSTER=1 with its own temp dir, ports and token, stopped by its own processes only: its process
group, and whatever names its temp dir (the nodes the provider starts live in the head's session).

The provider starts each worker node in the autoscaler's process and points it at `provider.gcs_address`
(Ray's example leaves it out, and the nodes then join whatever listens on port 6379 of this machine: another
Ray, on a shared machine). Here it is the head's own free port, so this cluster never touches port 6379.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BIN = Path(sys.executable).parent
WORKER_TYPE = "ray.worker.cpu"

# Printed once a second by the watcher: how many worker nodes (nodes with CPUs) are alive.
WATCH = """
import json, sys, time, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
while True:
    alive = [n for n in ray.nodes() if n["Alive"]]
    print(json.dumps({"t": time.time(), "workers": sum(n["Resources"].get("CPU", 0) > 0 for n in alive)}), flush=True)
    time.sleep(1)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def provider_config(*, gcs_address: str, worker_cpus: int, max_workers: int, idle_timeout_s: float) -> dict:
    """The fake provider's cluster config: a head with no CPUs, one worker type from 0 to `max_workers`."""
    return {
        "cluster_name": "raydpo-fake",
        "max_workers": max_workers,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_timeout_s / 60.0,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": gcs_address,
        },
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            WORKER_TYPE: {
                "resources": {"CPU": worker_cpus, "object_store_memory": 256 * 1024**2},
                "node_config": {},
                "min_workers": 0,
                "max_workers": max_workers,
            },
        },
        "head_node_type": "ray.head.default",
        "docker": {},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


class FakeAutoscalingHead:
    """`ray start --head` with 0 CPUs and the fake autoscaler; `env` is what a driver on it needs."""

    def __init__(self, *, worker_cpus: int = 2, max_workers: int = 2, idle_timeout_s: float = 20.0) -> None:
        self.temp_dir = tempfile.mkdtemp(prefix="rdas", dir="/tmp")  # short: Ray's socket paths are limited
        token = Path(self.temp_dir) / "auth_token"
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        import ray

        port = free_port()
        self.address = f"{ray.util.get_node_ip_address()}:{port}"  # the address every node of this machine joins
        config = Path(self.temp_dir) / "autoscaler.yaml"
        config.write_text(
            json.dumps(  # JSON is YAML
                provider_config(
                    gcs_address=self.address,
                    worker_cpus=worker_cpus,
                    max_workers=max_workers,
                    idle_timeout_s=idle_timeout_s,
                )
            )
        )
        self.env = {
            **{k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")},
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "RAY_FAKE_CLUSTER": "1",  # the fake provider refuses to start without it
            "AUTOSCALER_UPDATE_INTERVAL_S": "1",  # the autoscaler looks at demand every second
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token),
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
            # A raylet waits this long for its dashboard agent's ports and dies without them: on a loaded
            # machine the agent's start (a Python process importing much of Ray) takes longer than the default.
            "RAY_agent_register_timeout_ms": "300000",
            "RAYDPO_AUTOSCALING": "1",  # the stages ask the autoscaler for what they need and wait for it
        }
        self.log = open(Path(self.temp_dir) / "ray_start.log", "w")
        dashboard, agent, agent_grpc, runtime_env, metrics, client = (free_port() for _ in range(6))
        self.process = subprocess.Popen(
            [
                str(BIN / "ray"),
                "start",
                "--head",
                "--block",
                f"--port={port}",
                f"--autoscaling-config={config}",
                "--num-cpus=0",
                "--num-gpus=0",
                "--object-store-memory=200000000",
                "--include-dashboard=false",
                f"--dashboard-port={dashboard}",  # not served, but its default (8265) is probed and may be taken
                f"--dashboard-agent-listen-port={agent}",
                f"--dashboard-agent-grpc-port={agent_grpc}",
                f"--runtime-env-agent-port={runtime_env}",
                f"--metrics-export-port={metrics}",
                f"--ray-client-server-port={client}",
                f"--temp-dir={self.temp_dir}",
                "--disable-usage-stats",
            ],
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def running(self) -> bool:
        return self.process.poll() is None

    def start_log(self) -> str:
        return (Path(self.temp_dir) / "ray_start.log").read_text()[-3000:]

    def monitor_log(self) -> str:
        logs = sorted(Path(self.temp_dir).glob("session_*/logs/monitor.*"))
        return "".join(p.read_text(errors="replace")[-3000:] for p in logs)

    def stop(self) -> None:
        """Stop this head and the nodes its autoscaler started, nothing else (never `ray stop`)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        for pid in self.own_processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def own_processes(self) -> list[int]:
        """Processes of this cluster only: in the head's process group, or naming its unique temp dir."""
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                in_group = os.getpgid(int(entry.name)) == self.process.pid
            except (OSError, ProcessLookupError):
                continue
            if in_group or self.temp_dir in cmdline:
                pids.append(int(entry.name))
        return pids


class NodeWatch:
    """A driver of its own on the cluster that notes, once a second, how many worker nodes are alive."""

    def __init__(self, head: FakeAutoscalingHead) -> None:
        self.samples: list[dict] = []
        self.process = subprocess.Popen(
            [sys.executable, "-c", WATCH, head.address],
            env=head.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            try:
                self.samples.append(json.loads(line))
            except ValueError:
                pass  # anything Ray prints on its own

    def workers(self) -> int | None:
        """Worker nodes alive at the last sample (None before the first)."""
        return self.samples[-1]["workers"] if self.samples else None

    def wait(self, condition, *, timeout: float, alive=lambda: True) -> bool:
        """Whether `condition(worker nodes alive)` held within `timeout` (False at once when `alive()` is not)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and alive():
            if self.samples and condition(self.samples[-1]["workers"]):
                return True
            time.sleep(1)
        return False

    def stop(self) -> None:
        self.process.kill()
        self.process.wait(timeout=10)
