"""The sampler: a Ray actor that owns an inference engine (vLLM or transformers, on GPUs or the CPU).

The actor keeps the model loaded across calls, so one actor serves every temperature of a model. What it
asks Ray for depends on the engine (`sampler_placement`):

- hf: 1 CPU, and with use_gpu its GPUs (several: the model's layers spread over them).
- vllm on the CPU: 2 CPUs. vLLM runs the model outside the actor's process: an engine-core process
  (scheduling, detokenizing) and a worker process computing the model, each busy while sampling. The
  worker gets one OpenMP thread and no core binding: Ray does not pin actors to cores, and vLLM's own
  binding would put every sampler of a node on the same cores.
- vllm on GPUs: 1 GPU and 1 CPU; with k > 1 GPUs (evaluate.gpus_per_actor), a placement group of k bundles of
  {1 GPU, 1 CPU} on one node (a tensor-parallel group split across nodes would all-reduce over the
  network). The actor sits in the first bundle without a GPU of its own; vLLM finds the group through
  the actor and starts one worker per bundle.

Stop a sampler with `stop_sampler`, which also frees its placement group. Call `close` last (as the
evaluate stage does) to shut the engine's processes down in order before that.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from pipeline.runtime.actors import actor_options
from pipeline.runtime.model_copy import local_model

# Placement groups of running samplers, by actor id: stop_sampler removes them with the actor.
_GROUPS: dict[str, PlacementGroup] = {}


class Sampler:
    """Actor body: `generate` returns, per prompt, n completions as plain dicts (text, token_ids, token_logps)."""

    def __init__(
        self,
        kind: str,
        model_path: str,
        *,
        use_gpu: bool,
        dtype: str,
        trust_remote_code: bool,
        engine_kwargs: dict | None = None,
    ):
        # The engines pull in transformers (seconds to import): imported here, in the actor that loads the
        # model, so a driver that only starts samplers never pays for it.
        from pipeline.model.engines import make_engine

        if (engine_kwargs or {}).get("tensor_parallel_size", 1) > 1:
            # Ray hid every GPU from this GPU-less actor; vLLM's workers get theirs from the placement group.
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        # model_path may be a URI (a policy in an s3:// run directory): this actor copies it to its own node.
        with local_model(model_path) as path:
            self.engine = make_engine(
                kind,
                path,
                device="cuda" if use_gpu else "cpu",
                dtype=dtype,
                trust_remote_code=trust_remote_code,
                **(engine_kwargs or {}),
            )

    def engine_name(self) -> str:
        return self.engine.name

    def generate(self, prompt_ids: Sequence[Sequence[int]], params: dict) -> list[list[dict]]:
        from pipeline.model.engines import SamplingParams  # in the actor, as in __init__

        results = self.engine.generate(prompt_ids, SamplingParams(**params))
        return [[asdict(c) for c in completions] for completions in results]

    def close(self) -> str:
        """Free the model and stop the engine's processes (vLLM's engine core and workers); returns the
        engine's name. The actor is of no further use."""
        self.engine.close()
        return self.engine.name


@dataclass(frozen=True)
class SamplerPlacement:
    """What a sampler actor asks Ray for (see the module docstring)."""

    engine: str  # "hf" | "vllm": what `kind` resolves to on this device
    num_cpus: float
    num_gpus: float
    bundles: list[dict[str, float]] = field(default_factory=list)  # a placement group's, [] for none
    env: dict[str, str] = field(default_factory=dict)  # the actor's environment variables

    @property
    def total(self) -> dict[str, float]:
        """All the resources the sampler holds: its bundles', or the actor's own."""
        if self.bundles:
            return {r: sum(b.get(r, 0.0) for b in self.bundles) for r in ("CPU", "GPU")}
        return {"CPU": self.num_cpus, "GPU": self.num_gpus}


def sampler_placement(kind: str, *, use_gpu: bool, gpus: float = 1.0) -> SamplerPlacement:
    """The resources of a sampler running engine `kind` ("hf", "vllm" or "auto") on `gpus` GPUs (with use_gpu)."""
    # The engines module imports torch; deferred like the rest of the engine code (see Sampler).
    from pipeline.model.engines import resolve_engine

    engine = resolve_engine(kind, device="cuda" if use_gpu else "cpu")
    if engine == "hf":  # transformers spreads the model's layers over the actor's GPUs
        return SamplerPlacement("hf", num_cpus=1, num_gpus=gpus if use_gpu else 0)
    if not use_gpu:
        return SamplerPlacement(
            "vllm", num_cpus=2, num_gpus=0, env={"VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1"}
        )
    if gpus <= 1:
        return SamplerPlacement("vllm", num_cpus=1, num_gpus=gpus)
    return SamplerPlacement(
        "vllm", num_cpus=1, num_gpus=0, bundles=[{"GPU": 1.0, "CPU": 1.0} for _ in range(int(gpus))]
    )


def start_sampler(
    kind: str,
    model_path: str,
    *,
    use_gpu: bool = False,
    gpus: float = 1.0,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    kv_cache_gib: float | None = None,
    retries: int = 0,
):
    """Start a sampler actor holding `model_path` (a directory, hub id, or URI such as s3://bucket/run/train/final,
    which the actor fetches itself) on `gpus` GPUs when use_gpu; stop it with `stop_sampler` when done, to
    free its CPUs or GPUs.

    Several GPUs: transformers spreads the model's layers over them; vLLM splits the model by tensor
    parallelism in a placement group of that many GPU bundles, which waits until one node has them free.
    kv_cache_gib is vLLM's (see VLLMEngine). `retries`: how often Ray restarts the actor after its process
    dies, redoing only the calls in flight (pipeline.runtime.actors)."""
    placement = sampler_placement(kind, use_gpu=use_gpu, gpus=gpus)
    return start_placed(
        Sampler,
        placement,
        kind,
        model_path,
        use_gpu=use_gpu,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        engine_kwargs=sampler_engine_kwargs(placement, use_gpu=use_gpu, gpus=gpus, kv_cache_gib=kv_cache_gib),
        retries=retries,
    )


def sampler_engine_kwargs(
    placement: SamplerPlacement, *, use_gpu: bool, gpus: float, kv_cache_gib: float | None
) -> dict:
    """The engine's own arguments for a sampler placed by `placement` (see `start_sampler`)."""
    engine_kwargs: dict = {} if placement.engine == "hf" else {"kv_cache_gib": kv_cache_gib}
    if use_gpu and gpus > 1:
        engine_kwargs.update(
            {"gpus": int(gpus)}
            if placement.engine == "hf"
            else {"tensor_parallel_size": int(gpus), "distributed_executor_backend": "ray"}
        )
    return engine_kwargs


def start_placed(actor_body: type, placement: SamplerPlacement, *args, retries: int = 0, **kwargs):
    """Start `actor_body(*args, **kwargs)` as an actor holding `placement`: in a new placement group of its
    bundles when it has any (the actor in the first one, and every task or actor it starts inside the group),
    else with its own CPUs and GPUs. `stop_sampler` kills it and removes the group."""
    options: dict[str, Any] = dict(num_cpus=placement.num_cpus, num_gpus=placement.num_gpus, **actor_options(retries))
    if placement.env:
        options["runtime_env"] = {"env_vars": placement.env}
    group = None
    if placement.bundles:
        group = placement_group(placement.bundles, strategy="STRICT_PACK")
        # capture_child_tasks: the workers vLLM starts from inside the actor land in the group's bundles.
        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            group, placement_group_bundle_index=0, placement_group_capture_child_tasks=True
        )
    actor = ray.remote(**options)(actor_body).remote(*args, **kwargs)
    if group is not None:
        _GROUPS[actor._actor_id.hex()] = group
    return actor


def stop_sampler(actor) -> None:
    """Kill a sampler actor and remove the placement group it was started in, if any."""
    ray.kill(actor)
    group = _GROUPS.pop(actor._actor_id.hex(), None)
    if group is not None:
        remove_placement_group(group)
