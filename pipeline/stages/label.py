"""Stage label: every completion of generate gets a score; the rows come out in the `scored` format.

The labeller is `label.kind`:
- reward: a registered task reward (pipeline/evaluation/plugins.py; the demo's vader) over prompt text +
  completion, in Ray Data tasks;
- reward_model: a Hugging Face sequence-classification model (pipeline/model/reward_model.py) in a Ray Data
  actor pool of `label.num_actors`, on the CPU or GPUs;
- judge: a pairwise judge ranks each prompt's completions by comparisons in both orders
  (pipeline/evaluation/ranking.py): the API judge, a registered one, or `local`, a chat model of our own
  served by a sampler actor. Judging runs on the driver, batch after batch; ties and unparsed verdicts are
  counted in the manifest.

Output: `<round>/label/scored/part-*.jsonl`, one row per prompt, {"id", "prompt", "completions": [{"text",
"score", "finish_reason"}, ...]}: what tokenize reads as `scored` rows, pairing them by `data.pairing` and
`data.min_score_gap` (best_vs_worst by default) and counting a prompt with no pair as "no_pair".
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict
from typing import cast

import numpy as np
import pyarrow as pa
import ray

from pipeline.config import Config, ConfigError, EvaluateConfig
from pipeline.config.rounds import LOCAL_JUDGE
from pipeline.evaluation.api_judge import make_api_judge
from pipeline.evaluation.generative_judge import GenerativeJudge
from pipeline.evaluation.judges import Judge
from pipeline.evaluation.plugins import API_JUDGE, check_judge, make_judge, make_reward
from pipeline.evaluation.ranking import RankCounts, rank_by_judge
from pipeline.model.pretrained import context_length, load_tokenizer, pick_device
from pipeline.runtime.model_copy import local_model
from pipeline.runtime.pools import LedgerBatches, pool_options, run_pool
from pipeline.runtime.resources import Request
from pipeline.runtime.sampler import start_sampler, stop_sampler
from pipeline.stages.base import Stage, StageRun
from pipeline.stages.generate import arrow_batches

log = logging.getLogger(__name__)

UPSTREAM = "generate"
OUTPUT = "scored"  # <round>/label/scored/part-*.jsonl
SHARD_ROWS = 10_000
JUDGE_CACHE = "label_judge_cache.sqlite"  # the API judge's replies, beside the round's stages


def prompt_of(row: dict):
    """The prompt as the prompt set gave it (a string or a message list)."""
    return json.loads(row["prompt_json"])


def task_reward_scores(batch: pa.Table, reward: str) -> pa.Table:
    """Ray Data task: the batch with a `scores` column, the task reward of prompt text + each completion."""
    reward_fn = make_reward(reward)
    assert reward_fn is not None
    texts = cast("list[list[str]]", batch["texts"].to_pylist())
    flat = [p + t for p, ts in zip(cast("list[str]", batch["prompt_text"].to_pylist()), texts) for t in ts]
    return with_scores(batch, np.asarray(reward_fn(flat), dtype=np.float64) if flat else np.zeros(0))


def with_scores(batch: pa.Table, flat: np.ndarray) -> pa.Table:
    """`flat` (one score per completion, in row then sample order) as a list column `scores`."""
    sizes = [len(ts) for ts in cast("list[list[str]]", batch["texts"].to_pylist())]
    if flat.shape != (sum(sizes),):
        raise ValueError(f"label: {flat.shape} scores for {sum(sizes)} completions")
    if not np.all(np.isfinite(flat)):
        raise ValueError("label: the labeller gave a NaN or infinite score")
    bounds = np.cumsum([0, *sizes])
    scores = [flat[a:b].tolist() for a, b in itertools.pairwise(bounds)]
    return batch.append_column("scores", pa.array(scores, pa.list_(pa.float64())))


class RewardModelBatch(LedgerBatches):
    """Ray Data callable class: the reward model, loaded once per actor, scores batches of prompts' completions."""

    def __init__(self, model_uri: str, *, use_gpu: bool, ledger: str | None = None, **model_kwargs):
        super().__init__(ledger, key="id")
        from pipeline.model.reward_model import RewardModel  # torch: in the actor only, never in the driver

        with local_model(model_uri) as path:
            self.model = RewardModel(path, device=pick_device(use_gpu), **model_kwargs)

    def process(self, batch: pa.Table) -> pa.Table:
        rows = batch.select(["prompt_json", "texts"]).to_pylist()
        prompts = [prompt_of(r) for r in rows for _ in r["texts"]]
        ids, cut = self.model.encode(prompts, [t for r in rows for t in r["texts"]])
        bounds = np.cumsum([0, *(len(r["texts"]) for r in rows)])
        truncated = [int(cut[a:b].sum()) for a, b in itertools.pairwise(bounds)]  # texts cut, per prompt
        return with_scores(batch, self.model.score_ids(ids)).append_column("truncated", pa.array(truncated, pa.int64()))


def scored_batches(run: StageRun) -> Iterator[pa.Table]:
    """generate's rows with a `scores` column, by the configured labeller (reward and reward_model: a Ray Data
    pool; the judge kinds: on the driver, see `judged_batches`)."""
    config, lab = run.config, run.config.label
    ds = ray.data.read_parquet(run.data_dir.uri_of(UPSTREAM, "completions"))
    if lab.kind == "reward":
        assert lab.reward is not None  # check_label refused a reward kind without one
        out = ds.map_batches(
            # Ray types fn as taking any batch format; batch_format="pyarrow" hands it a Table
            functools.partial(task_reward_scores, reward=lab.reward),  # pyright: ignore[reportArgumentType]
            batch_format="pyarrow",
            batch_size=256,
            num_cpus=0.5,
        )
    else:
        ledger = run.writer.scratch("in_flight")  # the same folder run_pool reads (scratch is idempotent)
        out = ds.map_batches(
            RewardModelBatch,
            fn_constructor_kwargs=dict(
                model_uri=lab.model,
                use_gpu=lab.use_gpu,
                ledger=ledger,
                dtype=lab.dtype,
                chat_template=lab.chat_template,
                max_length=lab.max_length,
                batch_size=lab.batch_size,
                trust_remote_code=config.model.trust_remote_code,
            ),
            batch_size=max(1, lab.batch_size // config.rounds.samples_per_prompt) * 4,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=lab.num_actors),
            num_gpus=lab.gpus_per_actor if lab.use_gpu else 0,
            num_cpus=1,
            **pool_options(config.ray.max_retries),
        )
    yield from arrow_batches(out, SHARD_ROWS)


def make_label_judge(config: Config, *, cache_path: str | None) -> tuple[Judge, object | None]:
    """The judge `label.judge` names, and the sampler actor serving it (local) or None."""
    lab = config.label
    if lab.judge == API_JUDGE:
        return make_api_judge(lab.judge_api, where="label.judge_api", default_cache_path=cache_path), None
    if lab.judge != LOCAL_JUDGE:
        judge = make_judge(EvaluateConfig(judge=lab.judge, judge_api=dict(lab.judge_api)))
        if judge is None:  # check_label refuses a judge kind without a judge before any stage runs
            raise ConfigError("label.judge: not set; a judge labeller needs one")
        return judge, None
    assert lab.model is not None
    actor = start_sampler(
        lab.judge_engine,
        lab.model,
        use_gpu=lab.use_gpu,
        gpus=lab.gpus_per_actor,
        trust_remote_code=config.model.trust_remote_code,
        retries=config.ray.max_retries,
    )
    params = dict(n=1, temperature=0.0, max_tokens=lab.judge_max_tokens)

    def generate(prompt_ids: list[list[int]]) -> list[str]:
        return [c[0]["text"] for c in ray.get(actor.generate.remote(prompt_ids, params))]

    found = context_length(lab.model, trust_remote_code=config.model.trust_remote_code)
    room = found[0] - lab.judge_max_tokens if found else None
    tokenizer = load_tokenizer(lab.model, trust_remote_code=config.model.trust_remote_code)
    judge = GenerativeJudge(
        tokenizer, generate, task=lab.judge_task, chat_template=lab.chat_template, max_prompt_tokens=room
    )
    return judge, actor


def judged_batches(run: StageRun, judge: Judge, counts: RankCounts) -> Iterator[pa.Table]:
    """generate's rows with `scores` from ranking each prompt's completions with `judge`, counting its verdicts."""
    ds = ray.data.read_parquet(run.data_dir.uri_of(UPSTREAM, "completions"))
    for batch in arrow_batches(ds, 64):
        prompts = cast("list[str]", batch["prompt_text"].to_pylist())
        scores, batch_counts = rank_by_judge(judge, prompts, cast("list[list[str]]", batch["texts"].to_pylist()))
        counts.add(batch_counts)
        yield with_scores(batch, np.array([s for row in scores for s in row], dtype=np.float64))


def scored_rows(batch: pa.Table) -> str:
    """JSON Lines of `scored` rows, one per prompt of the batch."""
    lines = []
    for row in batch.select(["id", "prompt_json", "texts", "scores", "finish_reasons"]).to_pylist():
        completions = [
            {"text": t, "score": s, "finish_reason": f}
            for t, s, f in zip(row["texts"], row["scores"], row["finish_reasons"])
        ]
        lines.append(
            json.dumps({"id": row["id"], "prompt": prompt_of(row), "completions": completions}, ensure_ascii=False)
        )
    return "".join(line + "\n" for line in lines)


def label_body(run: StageRun) -> dict:
    """Score every completion under `<round>/generate` into `<round>/label/scored` (see the module docstring)."""
    config, lab = run.config, run.config.label
    check_label(config)
    writer = run.writer
    counts, stats, gaps = RankCounts(), Counter(), []  # gaps: best minus worst score, per prompt

    def write_all(batches: Iterator[pa.Table]) -> None:
        for i, batch in enumerate(batches):
            writer.write_text(f"{OUTPUT}/part-{i:05d}.jsonl", scored_rows(batch))
            stats["rows"] += batch.num_rows
            for scores in cast("list[list[float]]", batch["scores"].to_pylist()):
                stats["completions"] += len(scores)
                gaps.append(max(scores) - min(scores))
                stats["no_spread"] += max(scores) == min(scores)
            if "truncated" in batch.column_names:
                stats["truncated"] += sum(cast("list[int]", batch["truncated"].to_pylist()))

    def start_again() -> None:  # a pool started again writes every shard, and counts every row, anew
        writer.remove(OUTPUT)
        stats.clear()
        gaps.clear()

    if lab.kind == "judge":
        with run.run_dir.local_file(JUDGE_CACHE) as cache:
            judge, actor = make_label_judge(config, cache_path=cache)
            try:
                write_all(judged_batches(run, judge, counts))
            finally:
                if actor is not None:
                    stop_sampler(actor)
    else:
        run_pool(
            lambda: write_all(scored_batches(run)),
            ledger=writer.scratch("in_flight"),
            what="label",
            retries=config.ray.max_retries,
            reset=start_again,
        )
    upstream = run.upstream or {}
    if upstream and stats["rows"] != upstream.get("rows_out"):
        raise RuntimeError(f"label: {stats['rows']} rows labelled of generate's {upstream.get('rows_out')}")
    log.info("label: %d completions of %d prompts scored by %s", stats["completions"], stats["rows"], labeller(config))
    return {
        "labeller": labeller(config),
        "rows_in": stats["rows"],
        "rows_out": stats["rows"],
        "completions": stats["completions"],
        # Prompts whose completions all scored the same: tokenize finds no pair there ("no_pair").
        "prompts_without_spread": stats["no_spread"],
        "mean_best_minus_worst": float(np.mean(gaps)) if gaps else None,
        **({"truncated": stats["truncated"]} if lab.kind == "reward_model" else {}),
        **({"judge": asdict(counts)} if lab.kind == "judge" else {}),
        "dropped": {},
    }


def labeller(config: Config) -> str:
    """The labeller in words, for manifests and logs."""
    lab = config.label
    if lab.kind == "reward":
        return f"reward {lab.reward}"
    if lab.kind == "reward_model":
        return f"reward model {lab.model}"
    return f"judge {lab.judge}" + (f" ({lab.model})" if lab.judge == LOCAL_JUDGE else "")


def check_label(config: Config) -> None:
    """What the labeller needs, refused before any stage runs: a registered reward, a model, judge settings."""
    lab = config.label
    if lab.kind == "reward":
        if lab.reward is None:
            raise ConfigError("label.reward: label.kind reward needs a registered reward's name (e.g. vader)")
        make_reward(lab.reward, setting="label.reward")
    elif lab.kind == "reward_model" or (lab.kind == "judge" and lab.judge == LOCAL_JUDGE):
        if not lab.model:
            what = "a sequence-classification reward model" if lab.kind == "reward_model" else "the judging chat model"
            raise ConfigError(f"label.model: name {what} (hub id or directory)")
    elif lab.judge == API_JUDGE:
        make_api_judge(lab.judge_api, where="label.judge_api")  # settings only: no request, no cache
    else:
        check_judge(EvaluateConfig(judge=lab.judge, judge_api=dict(lab.judge_api)), section="label")


def label_requests(config: Config) -> list[Request]:
    """The reward model's actor pool, or the local judge's sampler; nothing for a task reward or an API judge."""
    lab = config.label
    if lab.kind == "reward_model" or (lab.kind == "judge" and lab.judge == LOCAL_JUDGE):
        count = lab.num_actors if lab.kind == "reward_model" else 1
        bundle = {**({"GPU": lab.gpus_per_actor} if lab.use_gpu else {}), "CPU": 1.0}
        keys = {"CPU": "label.kind (its actors)", "GPU": "label.use_gpu"}
        return [Request("label", "actor", count, bundle, keys, "label.num_actors")]
    return []


LABEL = Stage(
    name="label",
    sections=("label", "model.trust_remote_code"),
    body=label_body,
    upstream=lambda config: UPSTREAM,
    requests=label_requests,
    check=check_label,
)
