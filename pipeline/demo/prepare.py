"""The built-in demo: an offline analogue of the DPO paper's IMDb sentiment experiment.

The paper fine-tuned GPT-2 on IMDb reviews (the SFT model, which is also pi_ref), sampled 4
completions per review prefix, labelled pairs with a sentiment classifier, trained DPO on them and
plotted sentiment reward against KL to the SFT model. Here:

1. review-like texts whose words carry sentiment as VADER scores it (pipeline.demo.task);
2. a byte-level BPE tokenizer trained on them and a tiny GPT-2 trained on them by OUR train stage
   with the sft loss: a sub-run of the pipeline under <run_dir>/demo_sft (its final model is pi_ref);
3. 4 samples per review prefix from that model through the sampler actor, labelled into pairs by
   VADER's compound score, committed to <run_dir>/demo/pairs.jsonl.

After `prepare`, the demo config's data.path and model.path point at those files and the ordinary
pipeline runs: tokenize, score, train (dpo), evaluate with VADER as reward and judge.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import ray

from pipeline.config import Config, DataConfig, ModelConfig
from pipeline.demo import task
from pipeline.demo.tiny_model import TinyShape, build_tiny_model, train_tokenizer
from pipeline.model.pretrained import load_tokenizer, save_pretrained
from pipeline.runtime.sampler import start_sampler, stop_sampler
from pipeline.runtime.storage import RunDir
from pipeline.stages import TOKENIZE, TRAIN
from pipeline.stages.base import Stage, StageRun

log = logging.getLogger(__name__)


def sft_config(config: Config, base_model: str, sft_data: str) -> Config:
    """The sub-run that makes the reference model: the same pipeline, with the sft loss."""
    d = config.demo
    return config.replace(
        run_dir=f"{config.run_dir}/demo_sft",
        data=DataConfig(path=sft_data, eval_fraction=0.0),
        model=ModelConfig(path=base_model),
        train=dataclasses.replace(
            config.train,
            loss="sft",
            learning_rate=d.sft_learning_rate,
            max_steps=d.sft_steps,
            batch_size=d.sft_batch_size,
            micro_batch_size=d.sft_batch_size // config.train.num_workers,
            warmup_steps=d.sft_steps // 20,
            lr_schedule="cosine",
            checkpoint_steps=0,
        ),
    )


def reference_model(config: Config, run_dir: RunDir, *, force: bool) -> str:
    """A tokenizer and a tiny GPT-2 trained on review texts, then SFT by our own tokenize and train stages;
    returns the SFT model's directory (the demo's pi_ref)."""
    d = config.demo
    sft_dir = run_dir.path("demo_sft")
    os.makedirs(sft_dir, exist_ok=True)
    tokenizer = train_tokenizer(task.generate_reviews(d.num_reviews, seed=0), vocab_size=d.vocab_size)
    shape = TinyShape(n_layer=d.n_layer, n_embd=d.n_embd, n_head=d.n_head, n_positions=128)
    base = os.path.join(sft_dir, "base_model")
    if not os.path.exists(os.path.join(base, "config.json")):
        save_pretrained(build_tiny_model(tokenizer, shape, seed=0), tokenizer, base)
    sft_data = os.path.join(sft_dir, "sft.jsonl")
    _write_if_changed(sft_data, task.sft_rows(d.num_reviews, seed=1))
    sft = sft_config(config, base, sft_data)
    TOKENIZE.run(sft, force=force)
    TRAIN.run(sft, force=force)
    return RunDir(sft.run_dir).path("train", "final")


def preference_pairs(config: Config, reference: str) -> tuple[list[str], list[dict]]:
    """samples_per_prompt completions per review prefix from the sampler actor, labelled into pairs by VADER."""
    d = config.demo
    prompts = task.review_prompts(d.num_prompts, seed=2)
    tokenizer = load_tokenizer(reference)
    prompt_ids = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    actor = start_sampler("hf", reference)
    try:
        params = dict(n=d.samples_per_prompt, temperature=1.0, top_p=1.0, max_tokens=d.max_new_tokens, seed=3)
        completions = ray.get(actor.generate.remote(prompt_ids, params))
    finally:
        stop_sampler(actor)
    pairs = []
    for prompt, samples in zip(prompts, completions):
        pairs += task.label_pairs(prompt, [s["text"] for s in samples], min_gap=d.min_reward_gap)
    return prompts, pairs


def prepare(run: StageRun) -> dict:
    """Make the demo's reference model and preference pairs under <run_dir>/demo."""
    if "://" in run.config.run_dir:
        raise ValueError("the demo writes its model locally: use a local run_dir for it")
    reference = reference_model(run.config, run.run_dir, force=run.force)
    prompts, pairs = preference_pairs(run.config, reference)
    run.writer.write_text("pairs.jsonl", "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in pairs))
    log.info("demo: %d preference pairs from %d prompts, reference model %s", len(pairs), len(prompts), reference)
    return {"reference_model": reference, "rows_out": len(pairs), "prompts": len(prompts), "dropped": {}}


# The demo's own stage: before tokenize, it makes the data and the model that configs/demo.yaml points at.
# Its output depends on the demo section and on how many workers trained the SFT model.
DEMO = Stage(name="demo", sections=("demo", "train.num_workers"), body=prepare)


def _write_if_changed(path: str, rows: list[dict]) -> None:
    """Rewrite only on change: the file's mtime is part of the tokenize stage's input fingerprint."""
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    if os.path.exists(path) and open(path, encoding="utf-8").read() == text:
        return
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
