"""The sampler: a Ray actor that owns an inference engine (vLLM on GPUs, transformers otherwise).

The actor keeps the model loaded across calls, so one actor serves every temperature of a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict

import ray

from pipeline.runtime.actors import actor_options
from pipeline.runtime.model_copy import local_model


class Sampler:
    """Actor body: `generate` returns, per prompt, n completions as plain dicts (text, token_ids, token_logps)."""

    def __init__(self, kind: str, model_path: str, *, use_gpu: bool, dtype: str, trust_remote_code: bool):
        # The engines pull in transformers (seconds to import): imported here, in the actor that loads the
        # model, so a driver that only starts samplers never pays for it.
        from pipeline.model.engines import make_engine

        # model_path may be a URI (a policy in an s3:// run directory): this actor copies it to its own node.
        with local_model(model_path) as path:
            self.engine = make_engine(
                kind, path, device="cuda" if use_gpu else "cpu", dtype=dtype, trust_remote_code=trust_remote_code
            )

    def engine_name(self) -> str:
        return self.engine.name

    def generate(self, prompt_ids: Sequence[Sequence[int]], params: dict) -> list[list[dict]]:
        from pipeline.model.engines import SamplingParams  # in the actor, as in __init__

        results = self.engine.generate(prompt_ids, SamplingParams(**params))
        return [[asdict(c) for c in completions] for completions in results]


def start_sampler(kind: str, model_path: str, *, use_gpu: bool = False, dtype: str = "float32", trust_remote_code: bool = False,
                  retries: int = 0):
    """Start a sampler actor holding `model_path` (a directory, hub id, or URI such as s3://bucket/run/train/final,
    which the actor fetches itself); kill it with ray.kill when done to free its GPU. `retries`: how often Ray
    restarts it after its process dies, redoing only the calls in flight (pipeline.runtime.actors)."""
    actor_class = ray.remote(num_cpus=1, num_gpus=1 if use_gpu else 0, **actor_options(retries))(Sampler)
    return actor_class.remote(kind, model_path, use_gpu=use_gpu, dtype=dtype, trust_remote_code=trust_remote_code)
