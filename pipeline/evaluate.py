"""Stage 4, evaluate: sample policy and reference, then reward vs KL, judged win rates, held-out accuracy.

For every temperature, a sampler actor per model draws completions for held-out prompts. The
reference scorer (the same log-prob function as the score stage) gives log pi_ref of every sample, so
KL(pi || pi_ref) is estimated per sample as sum(log pi - log pi_ref) over its tokens. A judge compares
policy and reference samples in both orders; the win rate carries a bootstrap 95% interval.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import ray

from pipeline.config import Config, EvaluateConfig, stage_hash
from pipeline.schemas import JUDGMENTS, SAMPLES
from pipeline.storage import RunDir, read_parquet_dir

log = logging.getLogger(__name__)

STAGE = "evaluate"


def make_reward(name: str | None) -> Callable[[list[str]], np.ndarray] | None:
    """A task reward by name: texts (prompt + completion) -> one float each."""
    if name is None:
        return None
    if name == "vader":
        from pipeline.demo_task import sentiment_reward

        return sentiment_reward
    raise ValueError(f"evaluate.reward: unknown reward {name!r} (known: vader, or null)")


def make_judge(ev: EvaluateConfig):
    if ev.judge == "vader":
        from pipeline.judges import VaderJudge

        return VaderJudge()
    if ev.judge == "api":
        from pipeline.api_judge import make_api_judge

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


def sample_model(model_path: str, prompts: list[list[int]], ev: EvaluateConfig, *, dtype: str, trust_remote_code: bool) -> dict[float, list[list[dict]]]:
    """Completions per temperature from one sampler actor, which is killed afterwards."""
    from pipeline.sample import start_sampler

    actor = start_sampler(ev.engine, model_path, use_gpu=ev.use_gpu, dtype=dtype, trust_remote_code=trust_remote_code)
    try:
        out = {}
        for i, temperature in enumerate(ev.temperatures):
            params = dict(n=ev.samples_per_prompt, temperature=temperature, top_p=ev.top_p, max_tokens=ev.max_tokens, seed=ev.seed + i)
            out[temperature] = ray.get(actor.generate.remote(prompts, params))
        return out
    finally:
        ray.kill(actor)


def sequence_logps_remote(model_path: str, table: pa.Table, *, config: Config) -> np.ndarray:
    """log p(chosen | prompt) under `model_path` for every row, computed by the score stage's scorer."""
    from pipeline.score import ReferenceScorer

    actor = ray.remote(num_cpus=1, num_gpus=1 if config.evaluate.use_gpu else 0)(ReferenceScorer).remote(
        model_path, dtype=config.model.dtype, use_gpu=config.evaluate.use_gpu, micro_batch=config.score.batch_size,
        trust_remote_code=config.model.trust_remote_code,
    )
    try:
        scored = ray.get(actor.__call__.remote(table.select(["prompt_ids", "chosen_ids", "rejected_ids"])))
    finally:
        ray.kill(actor)
    return scored["ref_chosen_logp"].to_numpy(), scored["ref_rejected_logp"].to_numpy()


def implicit_reward_accuracy(policy_chosen, policy_rejected, ref_chosen, ref_rejected, *, beta: float) -> dict:
    """How often the trained policy's implicit reward ranks held-out pairs as the data does."""
    margins = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    return {"pairs": int(len(margins)), "accuracy": float((margins > 0).mean()), "margin_mean": float(margins.mean())}


def summarize(samples: pa.Table, judgments: pa.Table, temperatures: list[float], *, n_boot: int, seed: int) -> list[dict]:
    """One row per (model, temperature): n, reward_mean, kl_mean, win_rate with its 95% interval."""
    from pipeline.length_control import length_controlled_win_rate
    from pipeline.stats import win_rate

    rows = []
    models = list(dict.fromkeys(samples["model"].to_pylist()))
    frame = samples.to_pandas()
    verdicts = judgments.to_pandas()
    for model in models:
        for t in temperatures:
            part = frame[(frame.model == model) & (frame.temperature == t)]
            judged = verdicts[(verdicts.model == model) & (verdicts.temperature == t)]
            row = {
                "model": model,
                "temperature": t,
                "n": int(len(part)),
                "reward_mean": float(part.reward.mean()) if part.reward.notna().any() else None,
                "kl_mean": float(part.kl.mean()),
                "win_rate": None,
                "win_rate_ci_low": None,
                "win_rate_ci_high": None,
                "lc_win_rate": None,
                "lc_win_rate_ci_low": None,
                "lc_win_rate_ci_high": None,
                "length_slope": None,
            }
            if len(judged):
                row.update(win_rate(judged.score.to_numpy(), n_boot=n_boot, seed=seed))
                # DPO is known to lengthen answers: the judge's preference with length regressed out.
                lc = length_controlled_win_rate(judged.score.to_numpy(), judged.length_diff.to_numpy(dtype=float), n_boot=n_boot, seed=seed)
                row.update({k: lc[k] for k in ("lc_win_rate", "lc_win_rate_ci_low", "lc_win_rate_ci_high", "length_slope")})
            rows.append(row)
    return rows


@dataclass(frozen=True)
class Policy:
    """A trained policy to evaluate: where its run lives (model in train/final) and its beta."""

    name: str
    run_dir: RunDir
    beta: float


def run(config: Config, *, force: bool = False) -> dict:
    """Evaluate `<run_dir>/train/final` against the reference into `<run_dir>/evaluate/`."""
    run_dir = RunDir(config.run_dir)
    upstream = run_dir.manifest("train")
    if upstream is None:
        raise RuntimeError(f"evaluate needs a finished train stage under {run_dir.uri_of('train')}; run `dpo train` first")
    return evaluate_policies(
        config, [Policy("policy", run_dir, config.train.beta)], data_dir=run_dir, out_dir=run_dir,
        upstream_hash=upstream["manifest_hash"], force=force,
    )


def evaluate_policies(config: Config, policies: list[Policy], *, data_dir: RunDir, out_dir: RunDir, upstream_hash: str, force: bool) -> dict:
    """Sample every policy and the reference, judge each policy against the reference, write the report.

    data_dir holds the tokenize/score stages (held-out prompts and pairs); the report goes to
    `<out_dir>/evaluate/`.
    """
    from pipeline.score import reference_path

    config_hash = stage_hash(config, STAGE)
    if not force and out_dir.is_finished(STAGE, config_hash=config_hash, upstream_hash=upstream_hash):
        log.info("evaluate: finished already (%s), skipping", out_dir.uri_of(STAGE))
        return out_dir.manifest(STAGE)

    from pipeline.modeling import load_tokenizer

    ev = config.evaluate
    reward_fn, judge = make_reward(ev.reward), make_judge(ev)
    tokenizer = load_tokenizer(reference_path(config), trust_remote_code=config.model.trust_remote_code)
    prompts = held_out_prompts(data_dir, ev.num_prompts)
    prompt_texts = tokenizer.batch_decode(prompts, skip_special_tokens=True)
    with tempfile.TemporaryDirectory() as tmp:
        paths = {p.name: _local_copy(p.run_dir, "train/final", os.path.join(tmp, p.name)) for p in policies}
        paths["reference"] = reference_path(config)
        rows = []
        for model, path in paths.items():
            by_temp = sample_model(path, prompts, ev, dtype=config.model.dtype, trust_remote_code=config.model.trust_remote_code)
            for t, per_prompt in by_temp.items():
                for p, completions in enumerate(per_prompt):
                    for s, c in enumerate(completions):
                        rows.append({"model": model, "temperature": float(t), "prompt_index": p, "sample_index": s,
                                     "prompt": prompt_texts[p], "completion": c["text"], "completion_ids": c["token_ids"],
                                     "logp": float(np.sum(c["logprobs"]))})
        # log pi_ref of every sample from the scorer: the KL estimate's second term.
        table = pa.table({
            "prompt_ids": [prompts[r["prompt_index"]] for r in rows],
            "chosen_ids": [r["completion_ids"] for r in rows],
            "rejected_ids": [[] for _ in rows],
        })
        ref_logp, _ = sequence_logps_remote(reference_path(config), table, config=config)
        rewards = reward_fn([r["prompt"] + r["completion"] for r in rows]) if reward_fn else [None] * len(rows)
        for r, lp, rw in zip(rows, ref_logp, rewards):
            r["ref_logp"] = float(lp)
            r["kl"] = r["logp"] - float(lp)
            r["reward"] = None if rw is None else float(rw)
        samples = pa.Table.from_pylist(rows, schema=SAMPLES)
        judgments = judge_against_reference(judge, rows, [p.name for p in policies], ev.temperatures)

        accuracy = {}
        if data_dir.manifest("score") is not None:
            held = read_parquet_dir(data_dir, "score/eval")
            if held.num_rows:
                for p in policies:
                    chosen, rejected = sequence_logps_remote(paths[p.name], held, config=config)
                    accuracy[p.name] = implicit_reward_accuracy(
                        chosen, rejected, held["ref_chosen_logp"].to_numpy(), held["ref_rejected_logp"].to_numpy(), beta=p.beta)

    summary_rows = summarize(samples, judgments, ev.temperatures, n_boot=ev.bootstrap_samples, seed=ev.seed)
    unparsed = int(sum(v == "unparsed" for col in ("verdict_first", "verdict_second") for v in judgments[col].to_pylist()))
    summary = {
        "rows": summary_rows,
        "implicit_reward_accuracy": accuracy.get(policies[0].name) if len(policies) == 1 else accuracy,
        "judge": ev.judge, "reward": ev.reward, "engine": ev.engine,
        "unparsed_verdicts": unparsed, "num_prompts": len(prompts),
    }
    writer = out_dir.begin(STAGE)
    writer.write_table("samples.parquet", samples, SAMPLES)
    writer.write_table("judgments.parquet", judgments, JUDGMENTS)
    writer.write_json("summary.json", summary)
    _write_report(config, writer, policies, summary_rows, accuracy, unparsed, len(prompts))
    manifest = writer.commit({"config_hash": config_hash, "upstream_hash": upstream_hash,
                              "rows_in": len(prompts), "rows_out": samples.num_rows, "dropped": {}})
    log.info("evaluate: report in %s", out_dir.uri_of(STAGE, "report.md"))
    return manifest


def judge_against_reference(judge, rows: list[dict], policies: list[str], temperatures: list[float]) -> pa.Table:
    """Each policy's sample against the reference's sample of the same prompt, index and temperature."""
    from pipeline.judges import judge_both_orders

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


def _write_report(config: Config, writer, policies: list[Policy], summary_rows, accuracy, unparsed: int, num_prompts: int) -> None:
    from pipeline.report import plot_reward_vs_kl, plot_training_curves, plot_win_rate_vs_temperature, write_report_md

    ev = config.evaluate
    figures = {"Reward vs KL": "reward_vs_kl.png", "Win rate vs temperature": "win_rate_vs_temperature.png"}
    with tempfile.TemporaryDirectory() as tmp:
        plot_reward_vs_kl(summary_rows, os.path.join(tmp, figures["Reward vs KL"]))
        plot_win_rate_vs_temperature(summary_rows, os.path.join(tmp, figures["Win rate vs temperature"]))
        for p in policies:
            name = "training_curves.png" if len(policies) == 1 else f"training_curves_{p.name}.png"
            lines = p.run_dir.read_text("train/metrics.jsonl").splitlines()
            plot_training_curves([json.loads(line) for line in lines if line.strip()], os.path.join(tmp, name))
            figures[f"Training curves ({p.name})"] = name
        notes = [f"Judge: {ev.judge}; reward: {ev.reward}; {num_prompts} held-out prompts x {ev.samples_per_prompt} samples.",
                 f"Unparsed judge verdicts: {unparsed}."]
        for name, acc in accuracy.items():
            notes.append(f"Implicit-reward accuracy of {name} on {acc['pairs']} held-out pairs: {acc['accuracy']:.3f}.")
        write_report_md(os.path.join(tmp, "report.md"), title=f"Evaluation of {config.run_dir}", summary_rows=summary_rows, figures=figures, notes=notes)
        for name in [*figures.values(), "report.md"]:
            with open(os.path.join(tmp, name), "rb") as f, writer.run.fs.open_output_stream(writer.path(name)) as out:
                out.write(f.read())


def _local_copy(run_dir: RunDir, rel: str, tmp: str) -> str:
    """A local directory with the model at `rel` (engines load from local paths)."""
    if "://" not in run_dir.uri:
        return run_dir.path(rel)
    import pyarrow.fs as pafs

    dest = tmp
    pafs.copy_files(run_dir.path(rel), dest, source_filesystem=run_dir.fs, destination_filesystem=pafs.LocalFileSystem())
    return dest
