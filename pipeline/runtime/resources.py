"""Can this cluster ever run the configured stages? Checked before a stage starts, not after it hangs.

Ray waits forever for an actor or a placement group that no node can hold: a GPU request on a CPU-only
laptop, four GPU workers on a cluster of two. `check_resources` turns that silent wait into an error that
names the config key:

    score.use_gpu asks for 1 GPU per actor but this cluster has 0 GPUs

What a stage asks for (each stage declares its requests beside its code, pipeline/stages/):
    score     score.num_actors actors of {cpus_per_actor CPU, gpus_per_actor GPU if score.use_gpu}
    train     train.num_workers workers of {cpus_per_worker CPU, 1 GPU if train.use_gpu}
    evaluate  one sampler actor of {1 CPU, 1 GPU if evaluate.use_gpu}
Each request is checked twice: one actor/worker must fit on one node, and all of them must fit at once
(the score pool and the Train worker group are fixed-size: Ray starts none until it can start them all).
Totals are per stage, since stages run one after another.

What the cluster can provide, in order of what we trust:
1. Fixed cluster (the embedded local Ray, `ray start` by hand): the nodes alive now. An impossible request
   raises ResourceError at once.
2. Autoscaling cluster whose autoscaler reports its node groups to the GCS (KubeRay and autoscaler v2
   do; Ray Train uses the same record for its own check): the nodes alive now plus each group's maximum.
   Beyond that, ResourceError at once; within it, the stage's own request makes the autoscaler add nodes.
3. Autoscaling cluster that reports no node groups (the classic `ray up` autoscaler keeps them in its
   own YAML): nobody can say in advance, so we ask the autoscaler for the bundles
   (`ray.autoscaler.sdk.request_resources`) and wait up to `wait_s` for nodes to join, logging every
   ~10 s, then raise ResourceError. Ray exposes no public flag for "this cluster autoscales" in this
   case, so the operator says so: set RAYDPO_AUTOSCALING=1 in the environment of the head's
   `ray start` (cluster.yaml and deploy/rayjob.yaml do); job drivers inherit it.
RAYDPO_AUTOSCALING=0 forces case 1 (e.g. to fail fast on an autoscaling cluster).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from dataclasses import dataclass

import ray
from ray.autoscaler.sdk import request_resources

log = logging.getLogger(__name__)

AUTOSCALING_ENV = "RAYDPO_AUTOSCALING"
_EPS = 1e-6  # Ray stores resources in units of 1e-4; this only absorbs float noise


class ResourceError(ValueError):
    """The configured stages ask for more than this cluster can ever provide; the message says which key."""


@dataclass(frozen=True)
class Request:
    """`count` identical bundles that must be placed at the same time, each on one node."""

    stage: str
    unit: str  # "actor" | "worker"
    count: int
    bundle: dict[str, float]  # e.g. {"CPU": 1.0, "GPU": 1.0}
    keys: dict[str, str]  # resource -> the config key that asks for it, for messages
    count_key: str  # the config key that sets `count`


def check_resources(requests: list[Request], *, wait_s: float = 600.0, poll_s: float = 2.0) -> None:
    """Raise ResourceError if `requests` (the stages' declared ones) can never be scheduled on the connected cluster.

    Call after ray.init (pipeline.runtime.ray_setup.init_ray). On a fixed cluster this returns or raises at once;
    on an autoscaling cluster that does not report its maxima it may wait up to `wait_s` for nodes.
    """
    if not requests:
        return
    nodes = _alive_nodes()
    problems = [p for p in (_shortfall(r, nodes, where="this cluster") for r in requests) if p]
    if not problems:
        return
    mode = _autoscaling_mode()
    if mode == "fixed":
        raise ResourceError("; ".join(problems))
    if mode == "groups":
        ceiling = nodes + _group_maxima()
        beyond = [
            p for p in (_shortfall(r, ceiling, where="this cluster at its autoscaling maximum") for r in requests) if p
        ]
        if beyond:
            raise ResourceError("; ".join(beyond))
        log.info("resources: not here yet, within the autoscaler's maxima: %s", "; ".join(problems))
        return
    _wait_for_autoscaler(requests, wait_s=wait_s, poll_s=poll_s)


def _wait_for_autoscaler(requests: list[Request], *, wait_s: float, poll_s: float) -> None:
    """Ask the autoscaler for each request's bundles in turn and wait for nodes that hold them."""
    deadline = time.monotonic() + wait_s
    try:
        for request in requests:
            # One request at a time: stages run in turn, so asking for all at once would over-provision.
            request_resources(bundles=[dict(request.bundle)] * request.count)
            next_log = 0.0
            while True:
                problem = _shortfall(request, _alive_nodes(), where="this cluster")
                if problem is None:
                    break
                now = time.monotonic()
                if now >= deadline:
                    raise ResourceError(
                        f"{problem}, and the autoscaler added no node that fits within {wait_s:.0f} s "
                        f"(check the node types' max_workers, or set {AUTOSCALING_ENV}=0 to fail fast)"
                    )
                if now >= next_log:
                    log.info("resources: waiting for the autoscaler (%.0f s left): %s", deadline - now, problem)
                    next_log = now + 10.0
                time.sleep(min(poll_s, max(deadline - now, 0.0)))
    finally:
        # The request is persistent: clear it so idle nodes may scale down once the stages are done.
        try:
            request_resources(bundles=[])
        except Exception:
            log.debug("resources: could not clear the autoscaler request", exc_info=True)


def _shortfall(request: Request, nodes: list[dict[str, float]], *, where: str) -> str | None:
    """Why `request` cannot be placed on `nodes` (each a node's total resources), or None if it can."""
    for resource, amount in request.bundle.items():
        if amount <= _EPS:
            continue
        total = sum(node.get(resource, 0.0) for node in nodes)
        largest = max((node.get(resource, 0.0) for node in nodes), default=0.0)
        if largest + _EPS < amount:
            has = (
                f"has {_n(total)} {_plural(resource, total)}"
                if total + _EPS < amount
                else (f"has no node with {_n(amount)} {_plural(resource, amount)} (the largest has {_n(largest)})")
            )
            asks = f"{request.keys[resource]} asks for {_n(amount)} {_plural(resource, amount)} per {request.unit}"
            return f"{asks} but {where} {has}"
    fits = sum(_bundles_per_node(request.bundle, node) for node in nodes)
    if fits >= request.count:
        return None
    limiting = min(
        (r for r, a in request.bundle.items() if a > _EPS),
        key=lambda r: sum(math.floor(node.get(r, 0.0) / request.bundle[r] + _EPS) for node in nodes),
    )
    amount = request.bundle[limiting]
    total = sum(node.get(limiting, 0.0) for node in nodes)
    return (
        f"{request.count_key}={request.count} asks for {request.count} {request.unit}s of "
        f"{_n(amount)} {_plural(limiting, amount)} each ({_n(amount * request.count)} {limiting} in all, "
        f"{request.keys[limiting]}) but {where} fits {fits} ({_n(total)} {_plural(limiting, total)})"
    )


def _bundles_per_node(bundle: dict[str, float], node: dict[str, float]) -> int:
    counts = [math.floor(node.get(r, 0.0) / a + _EPS) for r, a in bundle.items() if a > _EPS]
    return min(counts) if counts else sys.maxsize


def _alive_nodes() -> list[dict[str, float]]:
    """Each alive node's total resources (not what is free now: busy resources come back)."""
    return [dict(n.get("Resources", {})) for n in ray.nodes() if n.get("Alive")]


def _autoscaling_mode() -> str:
    """'fixed', 'groups' (the autoscaler reported node groups with maxima) or 'unknown' (autoscales, no maxima)."""
    flag = os.environ.get(AUTOSCALING_ENV, "").strip()
    if flag == "0":
        return "fixed"
    if _group_maxima_config() is not None:
        return "groups"
    return "unknown" if flag == "1" else "fixed"


def _group_maxima_config():
    """The node groups the autoscaler reported to the GCS, if any group can grow; else None."""
    try:
        # Imported here so that a Ray without this private module only means "not reported".
        from ray._private.state import state

        cluster_config = state.get_cluster_config()
    except Exception:
        log.debug("resources: no cluster config from the GCS", exc_info=True)
        return None
    if not cluster_config or not cluster_config.node_group_configs:
        return None
    growable = [
        g for g in cluster_config.node_group_configs if g.resources and (g.max_count == -1 or g.max_count > g.min_count)
    ]
    return growable or None


def autoscaler_groups() -> list:
    """The node groups the autoscaler reported to the GCS that can grow (each with .resources); empty if none."""
    return _group_maxima_config() or []


def _group_maxima() -> list[dict[str, float]]:
    """Nodes the autoscaler may still add: max_count nodes of each group's shape (an upper bound, since
    nodes of that group already alive are counted again: we would rather let a stage wait than refuse it)."""
    nodes = []
    for group in _group_maxima_config() or []:
        shape = {k: float(v) for k, v in group.resources.items()}
        count = group.max_count if group.max_count >= 0 else 1_000_000  # -1: unbounded
        nodes.extend([shape] * min(count, 10_000))
    return nodes


def _n(x: float) -> str:
    return f"{x:g}"


def _plural(resource: str, amount: float) -> str:
    return resource if abs(amount - 1.0) < _EPS else resource + "s"
