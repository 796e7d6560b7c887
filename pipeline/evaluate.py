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


def make_judge(name: str):
    if name == "vader":
        from pipeline.judges import VaderJudge

        return VaderJudge()
    raise ValueError(f"evaluate.judge: unknown judge {name!r} (known: vader)")


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
            }
            if len(judged):
                row.update(win_rate(judged.score.to_numpy(), n_boot=n_boot, seed=seed))
            rows.append(row)
    return rows


def run(config: Config, *, force: bool = False) -> dict:
    """Evaluate `<run_dir>/train/final` against the reference into `<run_dir>/evaluate/`."""
    from pipeline.judges import judge_both_orders
    from pipeline.modeling import load_tokenizer
    from pipeline.report import plot_reward_vs_kl, plot_training_curves, plot_win_rate_vs_temperature, write_report_md
    from pipeline.score import reference_path

    run_dir = RunDir(config.run_dir)
    upstream = run_dir.manifest("train")
    if upstream is None:
        raise RuntimeError(f"evaluate needs a finished train stage under {run_dir.uri_of('train')}; run `dpo train` first")
    config_hash = stage_hash(config, STAGE)
    if not force and run_dir.is_finished(STAGE, config_hash=config_hash, upstream_hash=upstream["manifest_hash"]):
        log.info("evaluate: finished already (%s), skipping", run_dir.uri_of(STAGE))
        return run_dir.manifest(STAGE)

    ev = config.evaluate
    reward_fn, judge = make_reward(ev.reward), make_judge(ev.judge)
    tokenizer = load_tokenizer(reference_path(config), trust_remote_code=config.model.trust_remote_code)
    prompts = held_out_prompts(run_dir, ev.num_prompts)
    prompt_texts = tokenizer.batch_decode(prompts, skip_special_tokens=True)
    with tempfile.TemporaryDirectory() as tmp:
        policy_path = _local_copy(run_dir, "train/final", tmp)
        models = {"policy": policy_path, "reference": reference_path(config)}
        sampled = {
            name: sample_model(path, prompts, ev, dtype=config.model.dtype, trust_remote_code=config.model.trust_remote_code)
            for name, path in models.items()
        }
        rows = []
        for model, by_temp in sampled.items():
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

        judgments = []
        for t in ev.temperatures:
            pol = [r for r in rows if r["model"] == "policy" and r["temperature"] == t]
            ref = [r for r in rows if r["model"] == "reference" and r["temperature"] == t]
            result = judge_both_orders(judge, [r["prompt"] for r in pol], [r["completion"] for r in pol], [r["completion"] for r in ref])
            for r, a, b, score in zip(pol, result.verdicts_ab, result.verdicts_ba, result.scores):
                judgments.append({"model": "policy", "baseline": "reference", "temperature": float(t), "prompt_index": r["prompt_index"],
                                  "verdict_first": a, "verdict_second": b, "score": float(score)})
        judgments = pa.Table.from_pylist(judgments, schema=JUDGMENTS)

        accuracy = None
        if run_dir.manifest("score") is not None and upstream.get("upstream_stage") == "score":
            held = read_parquet_dir(run_dir, "score/eval")
            if held.num_rows:
                pc_, pr_ = sequence_logps_remote(policy_path, held, config=config)
                accuracy = implicit_reward_accuracy(pc_, pr_, held["ref_chosen_logp"].to_numpy(), held["ref_rejected_logp"].to_numpy(), beta=config.train.beta)

    summary_rows = summarize(samples, judgments, ev.temperatures, n_boot=ev.bootstrap_samples, seed=ev.seed)
    unparsed = int(sum(v == "unparsed" for col in ("verdict_first", "verdict_second") for v in judgments[col].to_pylist()))
    summary = {"rows": summary_rows, "implicit_reward_accuracy": accuracy, "judge": ev.judge, "reward": ev.reward,
               "engine": ev.engine, "unparsed_verdicts": unparsed, "num_prompts": len(prompts)}

    writer = run_dir.begin(STAGE)
    writer.write_table("samples.parquet", samples, SAMPLES)
    writer.write_table("judgments.parquet", judgments, JUDGMENTS)
    writer.write_json("summary.json", summary)
    metrics = [json.loads(line) for line in run_dir.read_text("train/metrics.jsonl").splitlines() if line.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        figures = {
            "Training curves": "training_curves.png",
            "Reward vs KL": "reward_vs_kl.png",
            "Win rate vs temperature": "win_rate_vs_temperature.png",
        }
        plot_training_curves(metrics, os.path.join(tmp, figures["Training curves"]))
        plot_reward_vs_kl(summary_rows, os.path.join(tmp, figures["Reward vs KL"]))
        plot_win_rate_vs_temperature(summary_rows, os.path.join(tmp, figures["Win rate vs temperature"]))
        notes = [f"Judge: {ev.judge}; reward: {ev.reward}; {len(prompts)} held-out prompts x {ev.samples_per_prompt} samples.",
                 f"Unparsed judge verdicts: {unparsed}."]
        if accuracy:
            notes.append(f"Implicit-reward accuracy on {accuracy['pairs']} held-out pairs: {accuracy['accuracy']:.3f}.")
        write_report_md(os.path.join(tmp, "report.md"), title=f"Evaluation of {config.run_dir}", summary_rows=summary_rows, figures=figures, notes=notes)
        for name in [*figures.values(), "report.md"]:
            with open(os.path.join(tmp, name), "rb") as f, run_dir.fs.open_output_stream(writer.path(name)) as out:
                out.write(f.read())
    manifest = writer.commit({"config_hash": config_hash, "upstream_hash": upstream["manifest_hash"],
                              "rows_in": len(prompts), "rows_out": samples.num_rows, "dropped": {}})
    log.info("evaluate: report in %s", run_dir.uri_of(STAGE, "report.md"))
    return manifest


def _local_copy(run_dir: RunDir, rel: str, tmp: str) -> str:
    """A local directory with the model at `rel` (engines load from local paths)."""
    if "://" not in run_dir.uri:
        return run_dir.path(rel)
    import pyarrow.fs as pafs

    dest = os.path.join(tmp, os.path.basename(rel))
    pafs.copy_files(run_dir.path(rel), dest, source_filesystem=run_dir.fs, destination_filesystem=pafs.LocalFileSystem())
    return dest
