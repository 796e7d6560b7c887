"""Stage 4, evaluate: sample policy and reference, then reward vs KL, judged win rates, held-out accuracy.

For every temperature, a sampler actor per model draws completions for held-out prompts. The models'
actors run side by side, up to `evaluate.max_actors` where the cluster has room (pipeline/runtime/actors.py).
The reference scorer (the same log-prob function as the score stage) gives log pi_ref of every sample, so
KL(pi || pi_ref) is estimated per sample as sum(log pi - log pi_ref) over its tokens. A judge compares
policy and reference samples in both orders; the win rate carries a bootstrap 95% interval.

Two baselines stand beside the reference's samples (pipeline/evaluation/baselines.py): best-of-N from the
reference (`evaluate.best_of_n`), a row of its own in every table and plot; and the held-out pairs' chosen
responses, against which every model is judged too (`win_rate_vs_chosen`).

Models are handed to actors by path or URI: each actor fetches an s3:// or gs:// model itself
(pipeline/runtime/model_copy.py), since on a multi-node cluster the driver's disk is not the actor's.

This module is the Ray layer: which actors run, and what goes in and out of the run directory. What is
computed from their results lives in pipeline/evaluation (samples, judging, summary, report).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from dataclasses import dataclass
from typing import cast

import numpy as np
import pyarrow as pa
import ray

from pipeline.config import Config, ConfigError, EvaluateConfig
from pipeline.data.schemas import JUDGMENTS, SAMPLES
from pipeline.evaluation.baselines import (
    best_of_n_kl_bounds,
    best_of_n_name,
    best_of_n_rows,
    judge_against_chosen,
    judgments_to_make,
    preferred_responses,
    reward_scorer,
)
from pipeline.evaluation.held_out import held_out_from_logps
from pipeline.evaluation.judges import Judge
from pipeline.evaluation.judgments import JudgeProgress, judge_against_reference
from pipeline.evaluation.model_card import CARD, with_evaluation
from pipeline.evaluation.plugins import Reward, check_judge, make_judge, make_reward
from pipeline.evaluation.report import report_notes, write_report_files
from pipeline.evaluation.samples import add_kl_and_reward, completions_to_score, sample_rows
from pipeline.evaluation.scope import describe_skipped, judged_by, skipped_judgments
from pipeline.evaluation.summary import evaluation_summary
from pipeline.model.pretrained import load_tokenizer
from pipeline.model.scorer_options import scorer_options
from pipeline.runtime.actors import ActorJobs, actor_options
from pipeline.runtime.model_copy import local_model
from pipeline.runtime.resources import Request
from pipeline.runtime.sampler import sampler_placement, start_sampler, stop_sampler
from pipeline.runtime.storage import RunDir, read_parquet_dir
from pipeline.runtime.tracking import Trackers, TrackingRun, summary_metrics
from pipeline.stages.base import Stage, StageRun

log = logging.getLogger(__name__)


def held_out_prompts(run_dir: RunDir, limit: int) -> list[list[int]]:
    """Distinct prompts of the eval split, in id order, at most `limit`."""
    table = read_parquet_dir(run_dir, "tokenize/eval")
    seen, prompts = set(), []
    for ids in cast("list[list[int]]", table["prompt_ids"].to_pylist()):
        key = tuple(ids)
        if key not in seen:
            seen.add(key)
            prompts.append(ids)
        if len(prompts) == limit:
            break
    if not prompts:
        raise ValueError("evaluate: the eval split is empty; raise data.eval_fraction")
    return prompts


@dataclass(frozen=True)
class Policy:
    """A trained policy to evaluate: where its run lives (model in train/final) and its beta."""

    name: str
    run_dir: RunDir
    beta: float


def sampling_job(
    model_path: str,
    prompts: list[list[int]],
    ev: EvaluateConfig,
    *,
    dtype: str,
    trust_remote_code: bool,
    best_of_n: int = 0,
    retries: int = 0,
):
    """An ActorJobs job (start, calls) for one model's sampler actor: per temperature, samples_per_prompt
    completions per prompt and, when best_of_n > 0, best_of_n * samples_per_prompt more (answer s owns
    candidates s*N .. s*N+N-1), drawn from seeds of their own so that no candidate is the very sample it
    will be judged against. The last call closes the engine (vLLM's processes stop as soon as the samples
    are in) and returns its name. `split_samples` turns the job's results into (samples, candidates, engine)."""

    def start():
        return start_sampler(
            ev.engine,
            model_path,
            use_gpu=ev.use_gpu,
            gpus=ev.gpus_per_actor,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            kv_cache_gib=ev.vllm_kv_cache_gib,
            retries=retries,
        )

    def calls(actor) -> list:
        refs = []
        for i, temperature in enumerate(ev.temperatures):
            params = dict(
                n=ev.samples_per_prompt,
                temperature=temperature,
                top_p=ev.top_p,
                max_tokens=ev.max_tokens,
                seed=ev.seed + i,
            )
            refs.append(actor.generate.remote(prompts, params))
            if best_of_n:
                params.update(n=ev.samples_per_prompt * best_of_n, seed=ev.seed + len(ev.temperatures) + i)
                refs.append(actor.generate.remote(prompts, params))
        return refs + [actor.close.remote()]

    return start, calls, stop_sampler


def split_samples(results: list, temperatures: list[float], *, best_of_n: int) -> tuple[dict, dict, str]:
    """A sampling job's results as ({temperature: samples}, {temperature: best-of-N candidates}, engine name)."""
    per_temperature = 2 if best_of_n else 1
    samples = {t: results[i * per_temperature] for i, t in enumerate(temperatures)}
    candidates = {t: results[i * per_temperature + 1] for i, t in enumerate(temperatures)} if best_of_n else {}
    return samples, candidates, results[-1]


class ModelScorer:
    """Actor body: the score stage's scorer over a model given by path, hub id or URI (fetched on this node)."""

    def __init__(self, model_uri: str, **scorer_kwargs):
        from pipeline.model.scoring import SequenceScorer  # torch: in the actor only, never in the driver

        with local_model(model_uri) as path:
            self.scorer = SequenceScorer(path, **scorer_kwargs)

    def score(self, table: pa.Table) -> pa.Table:
        return self.scorer(table)


def scoring_job(model_path: str, table: pa.Table, *, config: Config):
    """An ActorJobs job for log p(chosen | prompt) and log p(rejected | prompt) under `model_path` for every
    row, by the score stage's scorer in an actor (which fetches `model_path` itself when it is a URI).
    `logps` turns the job's results into the two arrays."""
    ev = config.evaluate

    def start():
        options = actor_options(config.ray.max_retries)  # a lost scorer redoes its own table, nothing else
        return ray.remote(num_cpus=1, num_gpus=ev.gpus_per_actor if ev.use_gpu else 0, **options)(ModelScorer).remote(
            model_path, **scorer_options(config, use_gpu=ev.use_gpu, gpus=ev.gpus_per_actor)
        )

    return start, lambda actor: [actor.score.remote(table.select(["prompt_ids", "chosen_ids", "rejected_ids"]))]


def logps(results: list) -> tuple[np.ndarray, np.ndarray]:
    scored = results[0]
    return scored["chosen_logps"].to_numpy(), scored["rejected_logps"].to_numpy()


def held_out_split(data_dir: RunDir) -> tuple[pa.Table | None, str | None]:
    """The scored held-out split and its data kind ("pairs" or "unpaired"); (None, None) without one."""
    manifest = data_dir.manifest("score")
    if manifest is None:
        return None, None
    held = read_parquet_dir(data_dir, "score/eval")
    if not held.num_rows:
        return None, None
    return held, manifest["data_kind"]


def held_out_measures(data_dir: RunDir, policies: list[Policy], *, config: Config) -> dict[str, dict]:
    """held_out_from_logps over the scored held-out split, every policy scored side by side. {} without a
    score stage."""
    held, kind = held_out_split(data_dir)
    if held is None or kind is None:  # both or neither
        return {}
    with ActorJobs(config.evaluate.max_actors, label="evaluate") as jobs:
        for p in policies:
            jobs.submit(p.name, *scoring_job(p.run_dir.uri_of("train/final"), held, config=config))
        results = jobs.wait_for([p.name for p in policies])
    return held_out_from_logps(
        held,
        kind,
        betas={p.name: p.beta for p in policies},
        policy_logps={p.name: logps(results[p.name]) for p in policies},  # results: in this order
    )


def evaluate_stage(run: StageRun) -> dict:
    """Evaluate `<run_dir>/train/final` against the reference into `<run_dir>/evaluate/`."""
    return evaluate_policies(run, [Policy("policy", run.run_dir, run.config.train.beta)])


JUDGE_CACHE = "judge_cache.sqlite"  # the API judge's replies, beside the stages: a rerun never pays twice


def check_evaluate(config: Config) -> None:
    """What evaluate cannot honour, refused before any stage runs (not after training): an unknown
    reward or judge, API judge settings that do not parse, best_of_n without a reward, no actors."""
    ev = config.evaluate
    if ev.max_actors < 1:
        raise ConfigError(f"evaluate.max_actors must be at least 1, got {ev.max_actors}")
    reward_scorer(make_reward(ev.reward), best_of_n=ev.best_of_n, reward_name=ev.reward)
    check_judge(ev)


def evaluate_policies(run: StageRun, policies: list[Policy]) -> dict:
    """Sample every policy and the reference, judge each policy against the reference, write the report.

    run.data_dir holds the tokenize/score stages (held-out prompts and pairs); the report goes to
    `<run.run_dir>/evaluate/`, and the API judge's cache to `<run.run_dir>/judge_cache.sqlite` unless
    `evaluate.judge_api.cache_path` says otherwise.
    """
    config, data_dir = run.config, run.data_dir
    ev = config.evaluate
    check_evaluate(config)  # a sweep comes here without the planner's checks
    with run.run_dir.local_file(JUDGE_CACHE) as judge_cache:
        reward_fn, judge = make_reward(ev.reward), make_judge(ev, api_cache_path=judge_cache)
        tokenizer = load_tokenizer(config.model.reference, trust_remote_code=config.model.trust_remote_code)
        prompts = held_out_prompts(data_dir, ev.num_prompts)
        held, kind = held_out_split(data_dir)
        skipped = skipped_judgments(ev, held_out_scored=data_dir.manifest("score") is not None)
        for item in skipped:
            log.info("evaluate: %s", describe_skipped(item))

        sampled = sample_all_models(
            config, policies, prompts, tokenizer.batch_decode(prompts, skip_special_tokens=True), held=held
        )
        rows, kl_bounds = score_samples(sampled, reward_fn, ev)
        chosen = preferred(data_dir, prompts, tokenizer) if ev.judge_vs_chosen and judge is not None else None
        compared = [p.name for p in policies] + ([best_of_n_name(ev.best_of_n)] if ev.best_of_n else [])
        judgments = (
            judge_all(judge, rows, compared, chosen, ev.temperatures)
            if judge is not None
            else JUDGMENTS.empty_table()  # nothing judged: no judge was asked for
        )
    accuracy = (
        {}
        if held is None or kind is None  # both or neither
        else held_out_from_logps(
            held, kind, betas={p.name: p.beta for p in policies}, policy_logps=sampled.held_out_logps
        )
    )
    samples = pa.Table.from_pylist(rows, schema=SAMPLES)
    summary = evaluation_summary(
        rows,
        samples,
        judgments,
        ev,
        kl_bounds=kl_bounds,
        accuracy=accuracy,
        engines=sampled.engines,
        policy_names=[p.name for p in policies],
        num_prompts=len(prompts),
        chosen_texts=chosen.texts if chosen else None,
        candidates=sampled.candidates,
        skipped=skipped,
        judge_name=judge.name if judge is not None else None,
    )

    write_results(
        run.writer, config, policies, samples=samples, judgments=judgments, summary=summary, accuracy=accuracy
    )
    log_to_trackers(policies, summary["rows"], baselines=["reference", *compared[len(policies) :]])
    add_to_model_cards(policies, summary)
    log.info("evaluate: report in %s", run.run_dir.uri_of("evaluate", "report.md"))
    stats = getattr(judge, "stats", None)  # the API judge's requests, cache hits, parse failures, spend
    return {
        "rows_in": len(prompts),
        "rows_out": samples.num_rows,
        "dropped": {},
        **({"judge_stats": dataclasses.asdict(stats)} if stats is not None else {}),
    }


@dataclass
class Sampled:
    """What the actors return for an evaluation.

    rows: a sample row per completion of every model, the reference's included (evaluation/samples.py);
    candidates: the best-of-N candidates drawn from the reference (empty without that baseline);
    ref_logps: log pi_ref of each row's completion, shape (len(rows),);
    held_out_logps: per policy, (chosen, rejected) log-probs of the held-out split's rows, {} without one;
    engines: the engine that sampled each model ("hf" or "vllm").
    """

    rows: list[dict]
    candidates: list[dict]
    ref_logps: np.ndarray
    held_out_logps: dict[str, tuple[np.ndarray, np.ndarray]]
    engines: dict[str, str]


def sample_all_models(
    config: Config, policies: list[Policy], prompts: list[list[int]], prompt_texts: list[str], *, held: pa.Table | None
) -> Sampled:
    """Sample every policy and the reference, score the samples under the reference, and score the
    held-out split (when there is one) under every policy: all on actors, side by side."""
    ev = config.evaluate
    # Actors get the policy's URI and fetch it themselves (an s3:// run dir is not on their node's disk).
    paths = {p.name: p.run_dir.uri_of("train/final") for p in policies}
    paths["reference"] = config.model.reference
    best_of = {model: ev.best_of_n if model == "reference" else 0 for model in paths}
    with ActorJobs(ev.max_actors, label="evaluate") as jobs:
        # Every model's sampler and every policy's held-out scorer, side by side where the cluster has room.
        for model, path in paths.items():
            jobs.submit(
                ("sample", model),
                *sampling_job(
                    path,
                    prompts,
                    ev,
                    dtype=config.model.dtype,
                    trust_remote_code=config.model.trust_remote_code,
                    best_of_n=best_of[model],
                    retries=config.ray.max_retries,
                ),
            )
        if held is not None:
            for p in policies:
                jobs.submit(("held_out", p.name), *scoring_job(paths[p.name], held, config=config))
        sampled = jobs.wait_for([("sample", model) for model in paths])
        rows, candidates, engines = [], [], {}
        for model in paths:
            by_temp, cands, engines[model] = split_samples(
                sampled[("sample", model)], ev.temperatures, best_of_n=best_of[model]
            )
            rows += sample_rows(model, by_temp, prompt_texts, group=1)
            candidates += sample_rows(best_of_n_name(ev.best_of_n), cands, prompt_texts, group=ev.best_of_n)
        log.info(
            "evaluate: sampled %d completions (%d models x %d temperatures x %d prompts x %d each)%s",
            len(rows),
            len(paths),
            len(ev.temperatures),
            len(prompts),
            ev.samples_per_prompt,
            f" and {len(candidates)} best-of-{ev.best_of_n} candidates" if candidates else "",
        )
        # log pi_ref of every sample from the scorer: the KL estimate's second term.
        jobs.submit(
            "ref_logps", *scoring_job(config.model.reference, completions_to_score(prompts, rows), config=config)
        )
        ref_logps, _ = logps(jobs.wait_for(["ref_logps"])["ref_logps"])
        held_logps = jobs.wait_for([("held_out", p.name) for p in policies]) if held is not None else {}
    return Sampled(
        rows,
        candidates,
        ref_logps,
        {p.name: logps(held_logps[("held_out", p.name)]) for p in policies} if held is not None else {},
        engines,
    )


def score_samples(sampled: Sampled, reward_fn: Reward | None, ev: EvaluateConfig) -> tuple[list[dict], dict]:
    """Every sample row with its KL estimate and reward, then the best-of-N baseline's rows; and the
    analytic KL bounds by (model, temperature) of the models that have no per-sample estimate."""
    rows = sampled.rows
    rewards = reward_fn([r["prompt"] + r["completion"] for r in rows]) if reward_fn else [None] * len(rows)
    add_kl_and_reward(rows, sampled.ref_logps, rewards)
    if not ev.best_of_n:
        return rows, {}
    # The task's reward picks the best of N (see pipeline/evaluation/baselines.py).
    if reward_fn is None:  # check_evaluate refuses this before any stage runs
        raise ConfigError("evaluate.best_of_n needs evaluate.reward: the task's reward picks the best of N")
    rows = rows + best_of_n_rows(sampled.candidates, reward_fn, ev.best_of_n)
    return rows, best_of_n_kl_bounds(ev.best_of_n, ev.temperatures)


@dataclass(frozen=True)
class Preferred:
    """Each held-out prompt's preferred response in the data (decoded, and its token count), None where
    the data has none."""

    texts: list[str | None]
    lengths: list[int | None]


def preferred(data_dir: RunDir, prompts: list[list[int]], tokenizer) -> Preferred:
    """The held-out data's preferred responses to `prompts` (`preferred_responses`), decoded."""
    chosen_ids = preferred_responses(read_parquet_dir(data_dir, "tokenize/eval"), prompts)
    texts = tokenizer.batch_decode([c or [] for c in chosen_ids], skip_special_tokens=True)
    return Preferred(
        texts=[None if c is None else text for c, text in zip(chosen_ids, texts)],
        lengths=[None if c is None else len(c) for c in chosen_ids],
    )


def judge_all(
    judge: Judge, rows: list[dict], compared: list[str], chosen: Preferred | None, temperatures: list[float]
) -> pa.Table:
    """The judgments table: every compared model against the reference, and with `chosen` every model,
    the reference included, against the held-out preferred responses. Logs its progress as it goes."""
    judge = JudgeProgress(judge, judgments_to_make(rows, compared, chosen.texts if chosen else None))
    judged = judge_against_reference(judge, rows, compared, temperatures)
    if chosen is not None:
        judged += judge_against_chosen(judge, rows, chosen.texts, chosen.lengths, [*compared, "reference"])
    return pa.Table.from_pylist(judged, schema=JUDGMENTS)


def write_results(
    writer,
    config: Config,
    policies: list[Policy],
    *,
    samples: pa.Table,
    judgments: pa.Table,
    summary: dict,
    accuracy: dict,
) -> None:
    """samples.parquet, judgments.parquet, summary.json, the figures and report.md, through the stage's
    writer. The figures and report are drawn in a scratch folder and copied over."""
    writer.write_table("samples.parquet", samples, SAMPLES)
    writer.write_table("judgments.parquet", judgments, JUDGMENTS)
    writer.write_json("summary.json", summary)
    training_metrics = {}
    for p in policies:
        lines = p.run_dir.read_text("train/metrics.jsonl").splitlines()
        training_metrics[p.name] = [json.loads(line) for line in lines if line.strip()]
    notes = report_notes(summary, samples_per_prompt=config.evaluate.samples_per_prompt, accuracy=accuracy)
    with tempfile.TemporaryDirectory() as tmp:
        write_report_files(
            tmp,
            title=f"Evaluation of {config.run_dir}",
            summary_rows=summary["rows"],
            training_metrics=training_metrics,
            notes=notes,
            header=[judged_by(config.evaluate, summary["judge_name"]), *map(describe_skipped, summary["skipped"])],
            samples=samples.to_pylist(),
        )
        writer.run.upload_dir(tmp, writer.staging)


def log_to_trackers(policies: list[Policy], rows: list[dict], *, baselines: list[str]) -> None:
    """Each policy's summary rows, with the baselines', into the tracking run of its training (the train
    manifest names it), at its last training step."""
    for p in policies:
        manifest = p.run_dir.manifest("train") or {}
        tracking = manifest.get("tracking")
        if not tracking or not tracking["report_to"]:
            continue  # trained without trackers
        trackers = Trackers(TrackingRun.from_dict(tracking))
        try:
            trackers.log(summary_metrics(rows, [p.name, *baselines]), step=manifest["steps"])
        finally:
            trackers.close()


def add_to_model_cards(policies: list[Policy], summary: dict) -> None:
    """Each policy's model card (train/final/README.md) with this evaluation's summary for it. Cards are
    listed in no manifest, so the train stage stays finished."""
    for p in policies:
        rel = f"train/final/{CARD}"
        if p.run_dir.exists(rel):  # a policy trained before cards were written has none to add to
            p.run_dir.write_text(rel, with_evaluation(p.run_dir.read_text(rel), summary, policy=p.name))


def evaluate_requests(config: Config) -> list[Request]:
    """One sampler actor: what its engine holds (pipeline/runtime/sampler.py), all on one node."""
    ev = config.evaluate
    held = sampler_placement(ev.engine, use_gpu=ev.use_gpu, gpus=ev.gpus_per_actor).total
    bundle = {**({"GPU": held["GPU"]} if ev.use_gpu else {}), "CPU": held["CPU"]}  # the scarcer one named first
    gpu_key = "evaluate.gpus_per_actor" if ev.gpus_per_actor > 1 else "evaluate.use_gpu"
    return [
        Request(
            "evaluate",
            "actor",
            1,
            bundle,
            {"CPU": f"evaluate.engine={ev.engine} (its sampler actor)", "GPU": gpu_key},
            "evaluate",
        )
    ]


EVALUATE = Stage(
    name="evaluate",
    sections=("model", "evaluate"),
    body=evaluate_stage,
    upstream=lambda config: "train",
    requests=evaluate_requests,
    check=check_evaluate,
)
