"""How much memory the cluster's GPUs have, asked before any model is loaded.

Ray counts GPUs but not their memory. Each alive node with GPUs is asked with a zero-CPU task pinned
to it, which runs `nvidia-smi` (NVML sees every GPU of the node, busy or not, so no GPU is reserved).
A node that cannot answer, and an autoscaler node group with no node up yet, is known by its
`accelerator_type:<name>` resource where the name says the memory (KNOWN_GPU_GIB). Where neither
works the answer is None, and the caller says that it could not check.
"""

from __future__ import annotations

import logging
import subprocess
from dataclasses import dataclass

import ray
import ray.exceptions
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pipeline.runtime.resources import autoscaler_groups

log = logging.getLogger(__name__)

# Memory as nvidia-smi reports it (MiB / 1024), for the accelerator types whose name fixes it. Plain
# "A100" (40 or 80 GB) and "V100" (16 or 32 GB) do not, so they are left out.
KNOWN_GPU_GIB = {
    "T4": 15.0,
    "A10G": 22.49,
    "L4": 22.49,
    "L40S": 44.99,
    "A100-40G": 40.0,
    "A100-80G": 80.0,
    "H100": 79.65,
    "H200": 140.4,
}
ACCELERATOR_PREFIX = "accelerator_type:"


@dataclass(frozen=True)
class GpuMemory:
    gib: float  # the smallest GPU's memory
    source: str  # how it was learnt, for messages: "nvidia-smi on 2 nodes", "accelerator_type H100"


def _nvidia_smi_gib() -> float | None:
    """The smallest GPU memory on this node in GiB, from nvidia-smi; None where it is missing or fails."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        sizes = [float(line) / 1024 for line in out.split() if line.strip()]
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return min(sizes) if sizes else None


def _from_label(resources: dict[str, float]) -> tuple[float, str] | None:
    for name in resources:
        if name.startswith(ACCELERATOR_PREFIX):
            kind = name[len(ACCELERATOR_PREFIX) :]
            if kind in KNOWN_GPU_GIB:
                return KNOWN_GPU_GIB[kind], f"accelerator_type {kind}"
    return None


def cluster_gpu_memory(*, timeout_s: float = 60.0) -> GpuMemory | None:
    """The memory of the smallest GPU a train worker may be placed on, or None when no one can say."""
    nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("GPU", 0) > 0]
    probe = ray.remote(num_cpus=0)(_nvidia_smi_gib)
    pending = [
        probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote()
        for n in nodes
    ]
    try:
        measured = ray.get(pending, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        log.warning("gpus: nvidia-smi on the GPU nodes did not answer within %.0f s", timeout_s)
        measured = [None] * len(nodes)
    found: list[tuple[float, str]] = []
    for node, gib in zip(nodes, measured):
        if gib is not None:
            found.append((gib, "nvidia-smi"))
            continue
        label = _from_label(node["Resources"])
        if label is None:
            return None  # a GPU node of unknown size: the smallest GPU is unknown too
        found.append(label)
    for group in autoscaler_groups():
        shape = {k: float(v) for k, v in group.resources.items()}
        if shape.get("GPU", 0) > 0:
            label = _from_label(shape)
            if label is None:
                return None
            found.append(label)
    if not found:
        return None
    gib = min(size for size, _ in found)
    sources = sorted({source for size, source in found if size == gib})
    return GpuMemory(gib, ", ".join(sources))
