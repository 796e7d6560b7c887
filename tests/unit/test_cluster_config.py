"""The shipped cluster configs: cluster.yaml keeps the choices its comments promise (GPUs scale from zero,
dashboard on loopback, token auth); deploy/rayjob.yaml has what KubeRay needs and no secret in it. (Ray's
own autoscaler checks cluster.yaml in tests/stage/test_cluster_schema.py: that imports Ray.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return yaml.safe_load((ROOT / "deploy" / "rayjob.yaml").read_text())


def _start_commands(cluster: dict) -> list[str]:
    return cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"]


def test_gpu_workers_scale_from_zero(cluster):
    types = cluster["available_node_types"]
    head = cluster["head_node_type"]
    gpu_types = {name: t for name, t in types.items() if name != head}
    assert gpu_types, "no worker type"
    for name, node_type in gpu_types.items():
        assert node_type["min_workers"] == 0, name
        assert 1 <= node_type["max_workers"] <= cluster["max_workers"], name
        assert re.match(r"(g4dn|g5|g6|p3|p4d|p5)\.", node_type["node_config"]["InstanceType"]), name
    head_type = types[head]["node_config"]["InstanceType"]
    assert not re.match(r"(g\d|p\d)", head_type), "the head should be a CPU instance"


def test_a_worker_type_fits_the_8b_config(cluster):
    """configs/llama8b.yaml's 8 FSDP workers fit one node of the 8-GPU type, and the plan fits its GPUs."""
    from pipeline.config import load_config
    from pipeline.planning.memory import configured_setup, estimate, for_run, usable_bytes

    config = load_config(ROOT / "configs" / "llama8b.yaml", [f"model.path={ROOT / 'docs/shapes/llama-3.1-8b'}"])
    types = cluster["available_node_types"]
    (gpu8,) = [t for t in types.values() if t["node_config"]["InstanceType"] == "p4d.24xlarge"]
    assert gpu8["min_workers"] == 0 and config.train.num_workers == 8 == config.score.num_actors
    assert cluster["max_workers"] == sum(
        t.get("max_workers", 0) for name, t in types.items() if name != cluster["head_node_type"]
    )
    shape, work = for_run(config)
    assert estimate(shape, configured_setup(config.train), work, workers=8).peak <= usable_bytes(40)  # A100 40 GB
    assert config.train.cpus_per_worker * 8 <= 96  # p4d.24xlarge's vCPUs


def test_dashboard_stays_on_loopback(cluster):
    (head_start,) = [c for c in cluster["head_start_ray_commands"] if "ray start" in c]
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "0.0.0.0" not in yaml.safe_dump(cluster)


def test_token_auth_is_on_everywhere(cluster):
    for command in (c for c in _start_commands(cluster) if "ray start" in c):
        assert "RAY_AUTH_MODE=token" in command, command
    # The token reaches every node by file mount, not written into the config.
    assert "~/.ray/auth_token" in cluster["file_mounts"]
    assert "RAYDPO_AUTOSCALING=1" in " ".join(cluster["head_start_ray_commands"])


def test_setup_installs_torch_then_this_package(cluster):
    commands = cluster["setup_commands"]
    torch_at = next(i for i, c in enumerate(commands) if "torch" in c)
    package_at = next(i for i, c in enumerate(commands) if "pip install" in c and "~/raydpo" in c)
    assert torch_at < package_at
    assert cluster["file_mounts"]["~/raydpo"] == "."


def test_rayjob_has_what_kuberay_needs(rayjob):
    assert rayjob["apiVersion"] == "ray.io/v1"
    assert rayjob["kind"] == "RayJob"
    spec = rayjob["spec"]
    assert spec["entrypoint"].startswith("python jobs/run.py --config configs/")
    assert "--set run_dir=s3://" in spec["entrypoint"]
    assert spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"]
    assert cluster.get("authOptions", {}).get("mode") == "token"
    gpus = {}
    for group in cluster["workerGroupSpecs"]:
        assert group["minReplicas"] == 0, group["groupName"]  # no GPU billed at rest
        (worker,) = group["template"]["spec"]["containers"]
        gpus[group["groupName"]] = str(worker["resources"]["limits"]["nvidia.com/gpu"])
    assert gpus == {"gpu": "1", "gpu8": "8"}  # one-GPU workers, and a node for an 8B run (configs/llama8b.yaml)
    yaml.safe_load(spec["runtimeEnvYAML"])  # a runtime env, parsed by Ray from this string


def test_rayjob_takes_credentials_from_secrets_only(rayjob):
    containers = [rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]]
    for group in rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        containers += group["template"]["spec"]["containers"]
    secretish = re.compile(r"SECRET|TOKEN|PASSWORD|ACCESS_KEY|CREDENTIAL", re.I)
    for container in containers:
        env = {e["name"]: e for e in container.get("env", [])}
        assert "AWS_SECRET_ACCESS_KEY" in env
        for name, entry in env.items():
            if secretish.search(name):
                assert "value" not in entry, f"{name} is written inline"
                assert "secretKeyRef" in entry["valueFrom"], name
    text = (ROOT / "deploy" / "rayjob.yaml").read_text()
    assert not re.search(r"AKIA[0-9A-Z]{16}", text)  # an AWS access key id
    assert not re.search(r"\b[0-9a-f]{64}\b", text)  # a Ray auth token
    assert not re.search(r"\b[A-Za-z0-9/+]{40}\b", text)  # an AWS secret key
