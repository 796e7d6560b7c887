"""A round's evaluate stage: pi_t on the held-out prompts, against pi_0 and against pi_{t-1}.

`<run_dir>/rounds/<t>/evaluate/` holds the round's samples (every held-out prompt at every
`evaluate.temperatures`, `evaluate.samples_per_prompt` each, with the seeds of every other round, so that
answers line up prompt by prompt), their reward and KL to pi_0, the judgments against round 0's samples
(pi_0's: "initial") and round t-1's ("previous"), and summary.json with one row per temperature
(pipeline/evaluation/rounds_summary.py). Round 0 samples pi_0 itself: the baseline the others are judged
against, with a KL of zero up to float noise (its samples are scored under pi_0 like any round's).

Sampling and scoring reuse evaluate's actors (pipeline/stages/evaluate.py): a sampler per model, the score
stage's scorer for log pi_0.
"""

from __future__ import annotations

import logging
from typing import cast

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import Config
from pipeline.data.schemas import JUDGMENTS, SAMPLES
from pipeline.evaluation.judgments import judge_samples
from pipeline.evaluation.plugins import make_judge, make_reward
from pipeline.evaluation.rounds_summary import round_rows
from pipeline.evaluation.samples import add_kl_and_reward, completions_to_score, sample_rows
from pipeline.runtime.actors import ActorJobs
from pipeline.runtime.storage import RunDir, read_parquet_dir
from pipeline.stages.base import Stage, StageRun
from pipeline.stages.evaluate import JUDGE_CACHE, check_evaluate, logps, sampling_job, scoring_job, split_samples

log = logging.getLogger(__name__)


def round_name(round_index: int) -> str:
    return f"round {round_index}"


def sample_policy(
    config: Config, policy: str, prompts: list[list[int]], texts: list[str], name: str
) -> tuple[list, str]:
    """(sample rows of `policy` at every temperature, each with its log pi_0, the engine that sampled them)."""
    ev = config.evaluate
    with ActorJobs(ev.max_actors, label="evaluate") as jobs:
        start, calls, stop = sampling_job(
            policy,
            prompts,
            ev,
            dtype=config.model.dtype,
            trust_remote_code=config.model.trust_remote_code,
            retries=config.ray.max_retries,
        )
        jobs.submit("sample", start, calls, stop)
        by_temp, _, engine = split_samples(jobs.wait_for(["sample"])["sample"], ev.temperatures, best_of_n=0)
        rows = sample_rows(name, by_temp, texts, group=1)
        # log pi_0 of every sample from the scorer: the KL estimate's second term.
        jobs.submit(
            "initial_logps", *scoring_job(config.model.reference, completions_to_score(prompts, rows), config=config)
        )
        initial_logps, _ = logps(jobs.wait_for(["initial_logps"])["initial_logps"])
    reward_fn = make_reward(ev.reward)
    rewards = list(reward_fn([r["prompt"] + r["completion"] for r in rows])) if reward_fn else [None] * len(rows)
    add_kl_and_reward(rows, initial_logps, rewards)
    return rows, engine


def judge_against(judge, rows: list[dict], baseline: str, theirs: pa.Table) -> list[dict]:
    """Each sample against the baseline's sample of the same (temperature, prompt, sample index)."""
    by_key = {(r["temperature"], r["prompt_index"], r["sample_index"]): r for r in theirs.to_pylist()}
    missing = [r for r in rows if (r["temperature"], r["prompt_index"], r["sample_index"]) not in by_key]
    if missing:
        raise RuntimeError(
            f"evaluate: {len(missing)} samples have no {baseline} sample to be judged against; "
            "the rounds' evaluate settings differ: redo them with `dpo iterate --from-round 1`"
        )
    out = []
    for t in dict.fromkeys(r["temperature"] for r in rows):
        mine = [r for r in rows if r["temperature"] == t]
        other = [by_key[(r["temperature"], r["prompt_index"], r["sample_index"])] for r in mine]
        out += judge_samples(
            judge, mine, baseline, [o["completion"] for o in other], [len(o["completion_ids"]) for o in other]
        )
    return out


def evaluate_round(
    run: StageRun, *, round_index: int, policy: str, prompts_dir: RunDir, baselines: dict[str, RunDir]
) -> dict:
    """Sample `policy` (pi_t) on the held-out prompts under `prompts_dir`, judge it against each baseline
    round's samples ({"initial": round 0, "previous": round t-1}; none for round 0), and write the results."""
    config, ev = run.config, run.config.evaluate
    check_evaluate(config)
    held = read_parquet_dir(prompts_dir, "prompts/eval")
    prompts = cast("list[list[int]]", held["prompt_ids"].to_pylist())
    texts = cast("list[str]", held["prompt_text"].to_pylist())
    rows, engine = sample_policy(config, policy, prompts, texts, round_name(round_index))
    judged: list[dict] = []
    if ev.judge is not None and baselines:
        with run.run_dir.local_file(JUDGE_CACHE) as cache:
            judge = make_judge(ev, api_cache_path=cache)
            for baseline, where in baselines.items():
                judged += judge_against(judge, rows, baseline, samples_of(where))
    samples = pa.Table.from_pylist(rows, schema=SAMPLES)
    judgments = pa.Table.from_pylist(judged, schema=JUDGMENTS)
    summary_rows = round_rows(
        round_index, samples, judgments, ev.temperatures, n_boot=ev.bootstrap_samples, seed=ev.seed
    )
    run.writer.write_table("samples.parquet", samples, SAMPLES)
    run.writer.write_table("judgments.parquet", judgments, JUDGMENTS)
    run.writer.write_json(
        "summary.json",
        {
            "round": round_index,
            "policy": policy,
            "kl_to": config.model.reference,
            "engine": engine,
            "judge": ev.judge,
            "reward": ev.reward,
            "num_prompts": len(prompts),
            "baselines": sorted(baselines),
            "rows": summary_rows,
        },
    )
    log.info(
        "evaluate: round %d: %s",
        round_index,
        [(r["temperature"], r["reward_mean"], r["kl_mean"]) for r in summary_rows],
    )
    return {"round": round_index, "rows_in": len(prompts), "rows_out": samples.num_rows, "dropped": {}}


def samples_of(round_dir: RunDir) -> pa.Table:
    """A finished round's evaluate samples."""
    return pq.read_table(round_dir.path("evaluate", "samples.parquet"), filesystem=round_dir.fs)


def inside_iterate(run: StageRun) -> dict:
    raise RuntimeError("a round's evaluate runs inside `dpo iterate`, which names the round and its baselines")


# Run by the rounds with the body `evaluate_round` and an upstream hash that ties it to the round's policy and
# baselines (pipeline/rounds/loop.py). Its config is the run's own, so `model` is pi_0's for every round.
ROUND_EVALUATE = Stage(name="evaluate", sections=("evaluate", "model"), body=inside_iterate)
