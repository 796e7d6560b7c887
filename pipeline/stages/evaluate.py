"""Stage 4, evaluate: sample policy and reference, then reward vs KL, judged win rates, held-out accuracy.

For every temperature, a sampler actor per model draws completions for held-out prompts. The models'
actors run side by side, up to `evaluate.max_actors` where the cluster has room (pipeline/runtime/actors.py). The
reference scorer (the same log-prob function as the score stage) gives log pi_ref of every sample, so
KL(pi || pi_ref) is estimated per sample as sum(log pi - log pi_ref) over its tokens. A judge compares
policy and reference samples in both orders; the win rate carries a bootstrap 95% interval.

Two baselines stand beside the reference's samples (pipeline/evaluation/baselines.py): best-of-N from the reference
(`evaluate.best_of_n`), a row of its own in every table and plot; and the held-out pairs' chosen
responses, against which every model is judged too (`win_rate_vs_chosen`).

Models are handed to actors by path or URI: each actor fetches an s3:// or gs:// model itself
(pipeline/runtime/model_copy.py), since on a multi-node cluster the driver's disk is not the actor's.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import ray

from pipeline.runtime.actors import ActorJobs
from pipeline.config import Config, EvaluateConfig
from pipeline.evaluation.held_out import describe, pair_accuracy, unpaired_separation
from pipeline.data.schemas import JUDGMENTS, SAMPLES
from pipeline.runtime.resources import Request
from pipeline.runtime.storage import RunDir, read_parquet_dir
from pipeline.stages.base import Stage, StageRun

log = logging.getLogger(__name__)



def make_reward(name: str | None) -> Callable[[list[str]], np.ndarray] | None:
    """A task reward by name: texts (prompt + completion) -> one float each."""
    if name is None:
        return None
    if name == "vader":
        from pipeline.demo.task import sentiment_reward

        return sentiment_reward
    raise ValueError(f"evaluate.reward: unknown reward {name!r} (known: vader, or null)")


def make_judge(ev: EvaluateConfig):
    if ev.judge == "vader":
        from pipeline.evaluation.judges import VaderJudge

        return VaderJudge()
    if ev.judge == "api":
        from pipeline.evaluation.api_judge import make_api_judge

        return make_api_judge(ev.judge_api, where="evaluate.judge_api")
    raise ValueError(f"evaluate.judge: unknown judge {ev.judge!r} (known: vader, api)")


def held_out_prompts(run_dir: RunDir, limit: int) -> list[list[int]]:
    """Distinct prompts of the eval split, in id order, at most `limit`."""
    table = read_parquet_dir(run_dir, "tokenize/eval")
    seen, prompts = set(), []
    for ids in table["prompt_ids"].to_pylist():
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


def sampling_job(model_path: str, prompts: list[list[int]], ev: EvaluateConfig, *, dtype: str, trust_remote_code: bool,
                 best_of_n: int = 0):
    """An ActorJobs job (start, calls) for one model's sampler actor: per temperature, samples_per_prompt
    completions per prompt and, when best_of_n > 0, best_of_n * samples_per_prompt more (answer s owns
    candidates s*N .. s*N+N-1), drawn from seeds of their own so that no candidate is the very sample it
    will be judged against. `split_samples` turns the job's results into (samples, candidates)."""
    from pipeline.runtime.sampler import start_sampler

    def start():
        return start_sampler(ev.engine, model_path, use_gpu=ev.use_gpu, dtype=dtype, trust_remote_code=trust_remote_code)

    def calls(actor) -> list:
        refs = []
        for i, temperature in enumerate(ev.temperatures):
            params = dict(n=ev.samples_per_prompt, temperature=temperature, top_p=ev.top_p, max_tokens=ev.max_tokens, seed=ev.seed + i)
            refs.append(actor.generate.remote(prompts, params))
            if best_of_n:
                params.update(n=ev.samples_per_prompt * best_of_n, seed=ev.seed + len(ev.temperatures) + i)
                refs.append(actor.generate.remote(prompts, params))
        return refs

    return start, calls


def split_samples(results: list, temperatures: list[float], *, best_of_n: int) -> tuple[dict, dict]:
    """A sampling job's results as ({temperature: samples}, {temperature: best-of-N candidates})."""
    per_temperature = 2 if best_of_n else 1
    samples = {t: results[i * per_temperature] for i, t in enumerate(temperatures)}
    candidates = {t: results[i * per_temperature + 1] for i, t in enumerate(temperatures)} if best_of_n else {}
    return samples, candidates


class ModelScorer:
    """Actor body: the score stage's scorer over a model given by path, hub id or URI (fetched on this node)."""

    def __init__(self, model_uri: str, **scorer_kwargs):
        from pipeline.runtime.model_copy import local_model
        from pipeline.model.scoring import SequenceScorer

        with local_model(model_uri) as path:
            self.scorer = SequenceScorer(path, **scorer_kwargs)

    def score(self, table: pa.Table) -> pa.Table:
        return self.scorer(table)


def scoring_job(model_path: str, table: pa.Table, *, config: Config):
    """An ActorJobs job for log p(chosen | prompt) and log p(rejected | prompt) under `model_path` for every
    row, by the score stage's scorer in an actor (which fetches `model_path` itself when it is a URI).
    `logps` turns the job's results into the two arrays."""
    from pipeline.model.scoring import scorer_options

    def start():
        return ray.remote(num_cpus=1, num_gpus=1 if config.evaluate.use_gpu else 0)(ModelScorer).remote(
            model_path, **scorer_options(config, use_gpu=config.evaluate.use_gpu))

    return start, lambda actor: [actor.score.remote(table.select(["prompt_ids", "chosen_ids", "rejected_ids"]))]


def logps(results: list) -> tuple[np.ndarray, np.ndarray]:
    scored = results[0]
    return scored["chosen_logps"].to_numpy(), scored["rejected_logps"].to_numpy()


def held_out_split(data_dir: RunDir) -> tuple[pa.Table | None, str | None]:
    """The scored held-out split and its data kind ("pairs" or "unpaired"); (None, None) without one."""
    manifest = data_dir.manifest("score")
    held = read_parquet_dir(data_dir, "score/eval") if manifest is not None else None
    if held is None or not held.num_rows:
        return None, None
    return held, manifest.get("data_kind", "pairs")


def held_out_from_logps(held: pa.Table, kind: str, policies: list[Policy], policy_logps: dict[str, tuple]) -> dict[str, dict]:
    """Per policy, how its implicit reward sorts the held-out split (pipeline.evaluation.held_out): pair accuracy, or
    for unpaired (KTO) data how it separates desirable from undesirable completions."""
    out = {}
    for p in policies:
        chosen, rejected = policy_logps[p.name]
        if kind == "unpaired":  # a completion and its label; `rejected` is a sum over nothing
            labels = held["label"].to_numpy(zero_copy_only=False)
            out[p.name] = unpaired_separation(chosen, held["ref_chosen_logps"].to_numpy(), labels, beta=p.beta)
        else:
            out[p.name] = pair_accuracy(chosen, rejected, held["ref_chosen_logps"].to_numpy(),
                                        held["ref_rejected_logps"].to_numpy(), beta=p.beta)
    return out


def held_out_measures(data_dir: RunDir, policies: list[Policy], *, config: Config) -> dict[str, dict]:
    """held_out_from_logps over the scored held-out split, every policy scored side by side. {} without a
    score stage."""
    held, kind = held_out_split(data_dir)
    if held is None:
        return {}
    with ActorJobs(config.evaluate.max_actors) as jobs:
        for p in policies:
            jobs.submit(p.name, *scoring_job(p.run_dir.uri_of("train/final"), held, config=config))
        results = jobs.wait_for([p.name for p in policies])
    return held_out_from_logps(held, kind, policies, {name: logps(r) for name, r in results.items()})


def summarize(samples: pa.Table, judgments: pa.Table, temperatures: list[float], *, n_boot: int, seed: int,
              costs: dict[tuple[str, float], dict] | None = None, kl_bounds: dict[tuple[str, float], float] | None = None) -> list[dict]:
    """One row per (model, temperature): n, reward_mean, kl_mean, win_rate with its 95% interval, and the
    same against the held-out chosen responses (win_rate_vs_chosen).

    costs[(model, t)]: samples_per_answer and tokens_per_answer (sampling cost of one kept answer);
    kl_bounds[(model, t)]: an analytic KL bound for a model without a per-sample estimate (best-of-N).
    """
    from pipeline.evaluation.length_control import length_controlled_win_rate
    from pipeline.evaluation.stats import win_rate

    costs, kl_bounds = costs or {}, kl_bounds or {}
    rows = []
    models = list(dict.fromkeys(samples["model"].to_pylist()))
    frame = samples.to_pandas()
    verdicts = judgments.to_pandas()
    for model in models:
        for t in temperatures:
            part = frame[(frame.model == model) & (frame.temperature == t)]
            mine = verdicts[(verdicts.model == model) & (verdicts.temperature == t)]
            judged = mine[mine.baseline == "reference"]
            vs_chosen = mine[mine.baseline == "chosen"]
            cost = costs.get((model, t), {})
            row = {
                "model": model,
                "temperature": t,
                "n": int(len(part)),
                "reward_mean": float(part.reward.mean()) if part.reward.notna().any() else None,
                "kl_mean": float(part.kl.mean()) if part.kl.notna().any() else None,
                "kl_bound": kl_bounds.get((model, t)),
                "samples_per_answer": cost.get("samples_per_answer"),
                "tokens_per_answer": cost.get("tokens_per_answer"),
                "win_rate": None,
                "win_rate_ci_low": None,
                "win_rate_ci_high": None,
                "lc_win_rate": None,
                "lc_win_rate_ci_low": None,
                "lc_win_rate_ci_high": None,
                "length_slope": None,
                "win_rate_vs_chosen": None,
                "win_rate_vs_chosen_ci_low": None,
                "win_rate_vs_chosen_ci_high": None,
                "judged_vs_chosen": int(len(vs_chosen)),
                "unparsed_vs_chosen": _unparsed(vs_chosen),
            }
            if len(vs_chosen):
                rate = win_rate(vs_chosen.score.to_numpy(), n_boot=n_boot, seed=seed)
                row.update({k.replace("win_rate", "win_rate_vs_chosen"): v for k, v in rate.items()})
            if len(judged):
                row.update(win_rate(judged.score.to_numpy(), n_boot=n_boot, seed=seed))
                # DPO is known to lengthen answers: the judge's preference with length regressed out.
                lc = length_controlled_win_rate(judged.score.to_numpy(), judged.length_diff.to_numpy(dtype=float), n_boot=n_boot, seed=seed)
                row.update({k: lc[k] for k in ("lc_win_rate", "lc_win_rate_ci_low", "lc_win_rate_ci_high", "length_slope")})
            rows.append(row)
    return rows


def _unparsed(verdicts) -> int:
    """Comparisons with at least one unparsed verdict (they score 0.5 and are counted, never dropped)."""
    return int(((verdicts.verdict_first == "unparsed") | (verdicts.verdict_second == "unparsed")).sum())


def sampling_costs(rows: list[dict]) -> dict[tuple[str, float], dict]:
    """Per (model, temperature): samples drawn and tokens generated per kept answer, on average."""
    groups: dict[tuple[str, float], list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["model"], r["temperature"])].append(r)
    return {
        key: {"samples_per_answer": float(np.mean([r["candidates"] for r in group])),
              "tokens_per_answer": float(np.mean([r["tokens_generated"] for r in group]))}
        for key, group in groups.items()
    }


def evaluate_stage(run: StageRun) -> dict:
    """Evaluate `<run_dir>/train/final` against the reference into `<run_dir>/evaluate/`."""
    return evaluate_policies(run, [Policy("policy", run.run_dir, run.config.train.beta)])


def evaluate_policies(run: StageRun, policies: list[Policy]) -> dict:
    """Sample every policy and the reference, judge each policy against the reference, write the report.

    run.data_dir holds the tokenize/score stages (held-out prompts and pairs); the report goes to
    `<run.run_dir>/evaluate/`.
    """
    config, data_dir = run.config, run.data_dir

    from pipeline.evaluation.baselines import (best_of_n_answers, best_of_n_kl_bound, best_of_n_name, judge_against_chosen,
                                    preferred_responses, reward_scorer)
    from pipeline.model.loading import load_tokenizer

    ev = config.evaluate
    if ev.max_actors < 1:
        raise ValueError(f"evaluate.max_actors must be at least 1, got {ev.max_actors}")
    reward_fn, judge = make_reward(ev.reward), make_judge(ev)
    reward_scorer(reward_fn, best_of_n=ev.best_of_n, reward_name=ev.reward)  # fails early on a config it cannot honour
    tokenizer = load_tokenizer(config.model.reference, trust_remote_code=config.model.trust_remote_code)
    prompts = held_out_prompts(data_dir, ev.num_prompts)
    prompt_texts = tokenizer.batch_decode(prompts, skip_special_tokens=True)
    # Actors get the policy's URI and fetch it themselves (an s3:// run dir is not on their node's disk).
    paths = {p.name: p.run_dir.uri_of("train/final") for p in policies}
    paths["reference"] = config.model.reference
    held, kind = held_out_split(data_dir)
    best_of = {model: ev.best_of_n if model == "reference" else 0 for model in paths}
    with ActorJobs(ev.max_actors) as jobs:
        # Every model's sampler and every policy's held-out scorer, side by side where the cluster has room.
        for model, path in paths.items():
            jobs.submit(("sample", model), *sampling_job(path, prompts, ev, dtype=config.model.dtype,
                                                         trust_remote_code=config.model.trust_remote_code, best_of_n=best_of[model]))
        if held is not None:
            for p in policies:
                jobs.submit(("held_out", p.name), *scoring_job(paths[p.name], held, config=config))
        sampled = jobs.wait_for([("sample", model) for model in paths])
        rows, candidates = [], []
        for model in paths:
            by_temp, cands = split_samples(sampled[("sample", model)], ev.temperatures, best_of_n=best_of[model])
            rows += _sample_rows(model, by_temp, prompt_texts, group=1)
            candidates += _sample_rows(best_of_n_name(ev.best_of_n), cands, prompt_texts, group=ev.best_of_n)
        # log pi_ref of every sample from the scorer: the KL estimate's second term.
        table = pa.table({
            "prompt_ids": [prompts[r["prompt_index"]] for r in rows],
            "chosen_ids": [r["completion_ids"] for r in rows],
            "rejected_ids": [[] for _ in rows],
        })
        jobs.submit("ref_logps", *scoring_job(config.model.reference, table, config=config))
        ref_logps, _ = logps(jobs.wait_for(["ref_logps"])["ref_logps"])
        held_logps = jobs.wait_for([("held_out", p.name) for p in policies]) if held is not None else {}
    rewards = reward_fn([r["prompt"] + r["completion"] for r in rows]) if reward_fn else [None] * len(rows)
    for r, lp, rw in zip(rows, ref_logps, rewards):
        r["ref_logps"] = float(lp)
        r["kl"] = r["logps"] - float(lp)
        r["reward"] = None if rw is None else float(rw)
    kl_bounds = {}
    if ev.best_of_n:
        # The task's reward picks the best of N (see pipeline/evaluation/baselines.py); the candidates come from the
        # reference, so their engine log-probs already are log pi_ref.
        for c in candidates:
            c["ref_logps"] = c["logps"]
        scores = reward_fn([c["prompt"] + c["completion"] for c in candidates])
        rows += best_of_n_answers(candidates, scores, ev.best_of_n, model=best_of_n_name(ev.best_of_n))
        kl_bounds = {(best_of_n_name(ev.best_of_n), float(t)): best_of_n_kl_bound(ev.best_of_n, greedy=t == 0)
                     for t in ev.temperatures}
    samples = pa.Table.from_pylist(rows, schema=SAMPLES)
    compared = [p.name for p in policies] + ([best_of_n_name(ev.best_of_n)] if ev.best_of_n else [])
    judged = judge_against_reference(judge, rows, compared, ev.temperatures).to_pylist()
    chosen_ids = preferred_responses(read_parquet_dir(data_dir, "tokenize/eval"), prompts) if ev.judge_vs_chosen else [None] * len(prompts)
    chosen_texts = [None if c is None else text for c, text in zip(chosen_ids, tokenizer.batch_decode([c or [] for c in chosen_ids], skip_special_tokens=True))]
    if ev.judge_vs_chosen:
        judged += judge_against_chosen(judge, rows, chosen_texts, [None if c is None else len(c) for c in chosen_ids],
                                       [*compared, "reference"])
    judgments = pa.Table.from_pylist(judged, schema=JUDGMENTS)

    accuracy = {} if held is None else held_out_from_logps(
        held, kind, policies, {p.name: logps(held_logps[("held_out", p.name)]) for p in policies})

    costs = sampling_costs(rows)
    summary_rows = summarize(samples, judgments, ev.temperatures, n_boot=ev.bootstrap_samples, seed=ev.seed,
                             costs=costs, kl_bounds=kl_bounds)
    verdicts = judgments.to_pandas()
    unparsed_by = {b: _unparsed(verdicts[verdicts.baseline == b]) for b in ("reference", "chosen")}
    unparsed = int(sum(v == "unparsed" for col in ("verdict_first", "verdict_second") for v in judgments[col].to_pylist()))
    summary = {
        "rows": summary_rows,
        "implicit_reward_accuracy": accuracy.get(policies[0].name) if len(policies) == 1 else accuracy,
        "judge": ev.judge, "reward": ev.reward, "engine": ev.engine,
        "unparsed_verdicts": unparsed, "unparsed_comparisons_by_baseline": unparsed_by, "num_prompts": len(prompts),
        "preferred_responses": {"judged": ev.judge_vs_chosen,
                                "prompts_with_chosen": sum(c is not None for c in chosen_texts) if ev.judge_vs_chosen else 0,
                                "prompts_without_chosen": sum(c is None for c in chosen_texts) if ev.judge_vs_chosen else 0},
        "best_of_n": None if not ev.best_of_n else {
            "n": ev.best_of_n, "model": best_of_n_name(ev.best_of_n), "picked_by": f"reward ({ev.reward})",
            "kl_bound": best_of_n_kl_bound(ev.best_of_n), "candidates_sampled": len(candidates),
            "tokens_generated": int(sum(len(c["completion_ids"]) for c in candidates)),
        },
    }
    writer = run.writer
    writer.write_table("samples.parquet", samples, SAMPLES)
    writer.write_table("judgments.parquet", judgments, JUDGMENTS)
    writer.write_json("summary.json", summary)
    _write_report(config, writer, policies, summary, accuracy)
    log.info("evaluate: report in %s", run.run_dir.uri_of("evaluate", "report.md"))
    return {"rows_in": len(prompts), "rows_out": samples.num_rows, "dropped": {}}


def _sample_rows(model: str, by_temp: dict[float, list[list[dict]]], prompt_texts: list[str], *, group: int) -> list[dict]:
    """Sample rows from an engine's output; with group > 1, each `group` consecutive completions of a prompt
    are the candidates of one answer (sample_index = completion index // group)."""
    rows = []
    for t, per_prompt in by_temp.items():
        for p, completions in enumerate(per_prompt):
            for s, c in enumerate(completions):
                rows.append({"model": model, "temperature": float(t), "prompt_index": p, "sample_index": s // group,
                             "prompt": prompt_texts[p], "completion": c["text"], "completion_ids": c["token_ids"],
                             "logps": float(np.sum(c["token_logps"])), "candidates": 1, "tokens_generated": len(c["token_ids"])})
    return rows


def judge_against_reference(judge, rows: list[dict], policies: list[str], temperatures: list[float]) -> pa.Table:
    """Each policy's sample against the reference's sample of the same prompt, index and temperature."""
    from pipeline.evaluation.judges import judge_both_orders

    reference = {(r["temperature"], r["prompt_index"], r["sample_index"]): r for r in rows if r["model"] == "reference"}
    out = []
    for name in policies:
        for t in temperatures:
            mine = [r for r in rows if r["model"] == name and r["temperature"] == t]
            theirs = [reference[(r["temperature"], r["prompt_index"], r["sample_index"])] for r in mine]
            result = judge_both_orders(judge, [r["prompt"] for r in mine], [r["completion"] for r in mine], [r["completion"] for r in theirs])
            for r, ref, a, b, score in zip(mine, theirs, result.verdicts_ab, result.verdicts_ba, result.scores):
                out.append({"model": name, "baseline": "reference", "temperature": float(t), "prompt_index": r["prompt_index"],
                            "verdict_first": a, "verdict_second": b, "score": float(score),
                            "length_diff": len(r["completion_ids"]) - len(ref["completion_ids"])})
    return pa.Table.from_pylist(out, schema=JUDGMENTS)


def _write_report(config: Config, writer, policies: list[Policy], summary: dict, accuracy: dict) -> None:
    from pipeline.evaluation.report import plot_reward_vs_kl, plot_training_curves, plot_win_rate_vs_temperature, write_report_md

    ev = config.evaluate
    summary_rows = summary["rows"]
    figures = {"Reward vs KL": "reward_vs_kl.png", "Win rate vs temperature": "win_rate_vs_temperature.png"}
    with tempfile.TemporaryDirectory() as tmp:
        plot_reward_vs_kl(summary_rows, os.path.join(tmp, figures["Reward vs KL"]))
        plot_win_rate_vs_temperature(summary_rows, os.path.join(tmp, figures["Win rate vs temperature"]))
        for p in policies:
            name = "training_curves.png" if len(policies) == 1 else f"training_curves_{p.name}.png"
            lines = p.run_dir.read_text("train/metrics.jsonl").splitlines()
            plot_training_curves([json.loads(line) for line in lines if line.strip()], os.path.join(tmp, name))
            figures[f"Training curves ({p.name})"] = name
        notes = [f"Judge: {ev.judge}; reward: {ev.reward}; {summary['num_prompts']} held-out prompts x {ev.samples_per_prompt} samples.",
                 f"Unparsed judge verdicts: {summary['unparsed_verdicts']} (comparisons with one, by baseline: "
                 f"{summary['unparsed_comparisons_by_baseline']}); they score 0.5 and are never dropped.",
                 "win_rate: against the reference's sample of the same prompt; win_rate_vs_chosen: against the held-out "
                 "pair's chosen response for that prompt. Both judged in both orders, ties and inconsistent verdicts 0.5."]
        pref = summary["preferred_responses"]
        if pref["judged"]:
            notes.append(f"Preferred responses: {pref['prompts_with_chosen']} prompts have one, "
                         f"{pref['prompts_without_chosen']} have none (their samples are not judged against one).")
        bon = summary["best_of_n"]
        if bon:
            notes.append(f"{bon['model']}: {bon['n']} reference samples per answer, the one with the highest {bon['picked_by']} kept; "
                         f"cost {bon['candidates_sampled']} samples, {bon['tokens_generated']} tokens generated in all "
                         "(samples_per_answer, tokens_per_answer columns). Its KL is the analytic bound "
                         f"log N - (N-1)/N = {bon['kl_bound']:.3f} nats (kl_bound; 0 at T = 0, where the N candidates "
                         "coincide): best-of-N has no density to take a per-sample log-ratio of.")
        notes += [describe(name, acc) for name, acc in accuracy.items()]
        write_report_md(os.path.join(tmp, "report.md"), title=f"Evaluation of {config.run_dir}", summary_rows=summary_rows, figures=figures, notes=notes)
        for name in [*figures.values(), "report.md"]:
            with open(os.path.join(tmp, name), "rb") as f, writer.run.fs.open_output_stream(writer.path(name)) as out:
                out.write(f.read())


def evaluate_requests(config: Config) -> list[Request]:
    bundle = {"CPU": 1.0, **({"GPU": 1.0} if config.evaluate.use_gpu else {})}
    return [Request("evaluate", "actor", 1, bundle, {"CPU": "evaluate (its sampler actor)", "GPU": "evaluate.use_gpu"}, "evaluate")]


EVALUATE = Stage(
    name="evaluate",
    sections=("model", "evaluate"),
    body=evaluate_stage,
    upstream=lambda config: "train",
    requests=evaluate_requests,
)
