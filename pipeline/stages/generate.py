"""Stage generate: prompts -> `rounds.samples_per_prompt` completions per prompt from a policy (`model.path`).

A Ray Data actor pool of samplers: each actor runs the sampler actor's body (pipeline/runtime/sampler.py) on
the engine `generate.engine` names (vLLM where asked and installed, transformers otherwise) and holds what
that engine asks of Ray (`sampler_placement`: transformers 1 CPU, vLLM on the CPU 2, on GPUs its GPUs, and
with `generate.gpus_per_actor` > 1 a placement group of one-GPU bundles per actor for tensor parallelism).
Seeds are the engines' (keyed by prompt content, pipeline/model/engines/seeding.py), with `generate.seed +
round`: a rerun draws the same completions on the same engine and machine.

In a round (`pipeline/rounds`), the prompts are the round's slice of the prompt set's pool (`round_positions`);
the output `<round>/generate/completions/part-*.parquet` holds one row per prompt with its completions (`GENERATED`).
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Iterator
from typing import cast

import numpy as np
import pyarrow as pa
import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from pipeline.config import Config
from pipeline.data.prompt_set import round_positions
from pipeline.data.schemas import GENERATED
from pipeline.runtime.files import check_same_ids
from pipeline.runtime.pools import LedgerBatches, pool_options, run_pool
from pipeline.runtime.resources import Request
from pipeline.runtime.sampler import Sampler, SamplerPlacement, sampler_engine_kwargs, sampler_placement
from pipeline.runtime.storage import read_parquet_dir
from pipeline.stages.base import Stage, StageRun, upstream_manifest

log = logging.getLogger(__name__)

UPSTREAM = "prompts"
OUTPUT = "completions"  # <round>/generate/completions/part-*.parquet
SHARD_ROWS = 10_000  # prompts per shard: each carries n completions


def with_completions(batch: pa.Table, results: list[list[dict]]) -> pa.Table:
    """The prompt rows with their completions appended (`GENERATED`); results[i]: prompt i's completions as
    the sampler returns them (text, token_ids, token_logps, finish_reason)."""
    columns = {
        "texts": [[c["text"] for c in row] for row in results],
        "completion_ids": [[c["token_ids"] for c in row] for row in results],
        "logps": [[float(np.sum(c["token_logps"])) for c in row] for row in results],
        "finish_reasons": [[c["finish_reason"] for c in row] for row in results],
    }
    for name, values in columns.items():
        batch = batch.append_column(name, pa.array(values, GENERATED.field(name).type))
    return batch


class GenerateBatch(LedgerBatches):
    """Ray Data callable class: the sampler actor's body, loaded once per actor, completes batches of prompts."""

    def __init__(self, kind: str, model_path: str, *, params: dict, ledger: str | None = None, **sampler_kwargs):
        super().__init__(ledger, key="id")
        self.sampler = Sampler(kind, model_path, **sampler_kwargs)
        self.params = params

    def process(self, batch: pa.Table) -> pa.Table:
        prompt_ids = cast("list[list[int]]", batch["prompt_ids"].to_pylist())
        return with_completions(batch, self.sampler.generate(prompt_ids, self.params))

    def __del__(self):
        # Ray Data lets go of a finished pool's actors gracefully: stop vLLM's engine processes in order.
        with contextlib.suppress(Exception):
            self.sampler.close()


class SamplerGroups:
    """One placement group per actor of a tensor-parallel pool (`ray_remote_args_fn`), removed on leaving."""

    def __init__(self, placement: SamplerPlacement):
        self.placement, self.groups = placement, []

    def __call__(self) -> dict:
        group = placement_group(self.placement.bundles, strategy="STRICT_PACK")
        self.groups.append(group)
        # capture_child_tasks: the workers vLLM starts from inside the actor land in the group's bundles.
        return {
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                group, placement_group_bundle_index=0, placement_group_capture_child_tasks=True
            )
        }

    def __enter__(self) -> SamplerGroups:
        return self

    def __exit__(self, *exc) -> None:
        for group in self.groups:
            remove_placement_group(group)


def sampling_pool(ds, config: Config, params: dict, ledger: str | None, groups: SamplerGroups):
    """The prompts through `generate.num_actors` samplers; a batch whose actor dies is retried `ray.max_retries`
    times."""
    g, model = config.generate, config.model
    placement = groups.placement
    remote: dict = dict(num_cpus=placement.num_cpus, num_gpus=placement.num_gpus)
    if placement.env:
        remote["runtime_env"] = {"env_vars": placement.env}
    if placement.bundles:
        remote["ray_remote_args_fn"] = groups
    return ds.map_batches(
        GenerateBatch,
        fn_constructor_kwargs=dict(
            kind=g.engine,
            model_path=model.path,
            params=params,
            ledger=ledger,
            use_gpu=g.use_gpu,
            dtype=model.dtype,
            trust_remote_code=model.trust_remote_code,
            engine_kwargs=sampler_engine_kwargs(
                placement, use_gpu=g.use_gpu, gpus=g.gpus_per_actor, kv_cache_gib=g.vllm_kv_cache_gib
            ),
        ),
        batch_size=g.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=g.num_actors),
        **remote,
        **pool_options(config.ray.max_retries),
    )


def arrow_batches(ds, size: int) -> Iterator[pa.Table]:
    """A dataset's rows as Arrow tables of `size` rows (the last one shorter), in order."""
    return cast(Iterator[pa.Table], ds.iter_batches(batch_size=size, batch_format="pyarrow"))


def round_prompts(pool: pa.Table, *, round_index: int | None, per_round: int) -> tuple[pa.Table, int]:
    """(the prompts of round `round_index`, how many of them an earlier round had too); None: the whole pool."""
    if round_index is None:
        return pool, 0
    positions = round_positions(pool.num_rows, round_index=round_index, per_round=per_round)
    used_before = (round_index - 1) * per_round  # positions the earlier rounds took, before wrapping around
    reused = len(positions) if used_before >= pool.num_rows else int(np.sum(positions < used_before))
    return pool.take(pa.array(positions, pa.int64())), reused


def generate_body(run: StageRun, *, round_index: int | None = None) -> dict:
    """Sample the prompts of round `round_index` (None: every prompt of the pool) from `model.path`."""
    config, g = run.config, run.config.generate
    upstream = run.upstream or upstream_manifest(GENERATE, config, run.data_dir)
    assert upstream is not None  # generate reads the prompts stage
    pool = read_parquet_dir(run.data_dir, f"{UPSTREAM}/pool")
    prompts, reused = round_prompts(pool, round_index=round_index, per_round=config.rounds.prompts)
    if reused:
        log.warning("generate: the pool has %d prompts; %d of this round's were in an earlier round", len(pool), reused)
    n = config.rounds.samples_per_prompt
    params = dict(
        n=n, temperature=g.temperature, top_p=g.top_p, max_tokens=g.max_tokens, seed=g.seed + (round_index or 0)
    )
    writer, ledger = run.writer, run.writer.scratch("in_flight")
    placement = sampler_placement(g.engine, use_gpu=g.use_gpu, gpus=g.gpus_per_actor)

    def sample_all() -> dict:
        counts: Counter = Counter()
        ids: list[str] = []
        with SamplerGroups(placement) as groups:
            out = sampling_pool(ray.data.from_arrow(prompts), config, params, ledger, groups)
            for i, batch in enumerate(arrow_batches(out, SHARD_ROWS)):
                writer.write_table(f"{OUTPUT}/part-{i:05d}.parquet", batch, GENERATED)
                ids += cast("list[str]", batch["id"].to_pylist())
                finish_reasons = cast("list[list[str]]", batch["finish_reasons"].to_pylist())
                counts.update(r for reasons in finish_reasons for r in reasons)
                completion_ids = cast("list[list[list[int]]]", batch["completion_ids"].to_pylist())
                counts["tokens"] += sum(len(c) for row in completion_ids for c in row)
        expected = cast("list[str]", prompts["id"].to_pylist())
        check_same_ids(expected, ids, what="generate (against the round's prompts)")
        return dict(counts)

    counts = run_pool(
        sample_all,
        ledger=ledger,
        what="generate",
        retries=config.ray.max_retries,
        reset=lambda: writer.remove(OUTPUT),  # a pool started again writes every shard anew
    )
    log.info("generate: %d prompts x %d completions from %s (%s)", prompts.num_rows, n, config.model.path, dict(counts))
    return {
        "policy": config.model.path,
        "engine": placement.engine,
        "round": round_index,
        "seed": params["seed"],
        "prompts_manifest": upstream["manifest_hash"],
        "rows_in": prompts.num_rows,
        "rows_out": prompts.num_rows,
        "completions": prompts.num_rows * n,
        "prompts_reused": reused,
        "finish_reasons": {k: v for k, v in counts.items() if k != "tokens"},
        "tokens_generated": counts.get("tokens", 0),
        "dropped": {},
    }


def generate_requests(config: Config) -> list[Request]:
    """`generate.num_actors` samplers, each holding what its engine asks for (pipeline/runtime/sampler.py)."""
    g = config.generate
    held = sampler_placement(g.engine, use_gpu=g.use_gpu, gpus=g.gpus_per_actor).total
    bundle = {**({"GPU": held["GPU"]} if g.use_gpu else {}), "CPU": held["CPU"]}
    gpu_key = "generate.gpus_per_actor" if g.gpus_per_actor > 1 else "generate.use_gpu"
    keys = {"CPU": f"generate.engine={g.engine} (its sampler actors)", "GPU": gpu_key}
    return [Request("generate", "actor", g.num_actors, bundle, keys, "generate.num_actors")]


GENERATE = Stage(
    name="generate",
    sections=(
        "model.path",
        "model.dtype",
        "model.trust_remote_code",
        "generate",
        "rounds.prompts",
        "rounds.samples_per_prompt",
    ),
    body=generate_body,
    upstream=lambda config: UPSTREAM,
    requests=generate_requests,
)
