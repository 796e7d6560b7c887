"""Stage 2, score: every pair through the reference model once -> shards of frozen reference log-probs.

A Ray Data actor pool holds the reference model (one GPU, or a fraction, per actor). The log-probs come
from `pipeline.logprobs.pair_logps`, the very function the trainer calls on the policy. After this stage
the reference model is never needed in training memory.
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from pipeline.config import Config, stage_hash
from pipeline.logprobs import collate_pairs, pair_logps
from pipeline.schemas import SCORED
from pipeline.storage import RunDir, read_parquet_dir

log = logging.getLogger(__name__)

STAGE = "score"
UPSTREAM = "tokenize"
SPLITS = ("train", "eval")
SHARD_ROWS = 50_000


def reference_path(config: Config) -> str:
    return config.model.ref_path or config.model.path


def score_pairs(model, table: pa.Table, *, pad_id: int, micro_batch: int, device: str) -> pa.Table:
    """Add ref_chosen_logp and ref_rejected_logp (float64 sums over response tokens) to `table`.

    Pure over an Arrow table: no Ray. Pairs are scored in micro-batches of similar length (sorted by
    length, then put back in order) so little compute goes to padding.
    """
    n = table.num_rows
    chosen_logp = np.zeros(n, dtype=np.float64)
    rejected_logp = np.zeros(n, dtype=np.float64)
    prompts = table["prompt_ids"].to_pylist()
    chosen = table["chosen_ids"].to_pylist()
    rejected = table["rejected_ids"].to_pylist()
    total = np.array([len(p) + max(len(c), len(r)) for p, c, r in zip(prompts, chosen, rejected)])
    order = np.argsort(total, kind="stable")
    with torch.inference_mode():
        for start in range(0, n, micro_batch):
            idx = order[start : start + micro_batch]
            batch = collate_pairs([prompts[i] for i in idx], [chosen[i] for i in idx], [rejected[i] for i in idx], pad_id=pad_id)
            c, r, _, _ = pair_logps(model, batch.to(device))
            chosen_logp[idx] = c.double().cpu().numpy()
            rejected_logp[idx] = r.double().cpu().numpy()
    # An unpaired (KTO) row has no rejected response: its log-prob is a sum over nothing.
    return table.append_column("ref_chosen_logp", pa.array(chosen_logp)).append_column("ref_rejected_logp", pa.array(rejected_logp))


class ReferenceScorer:
    """Ray Data callable class: loads the reference model once per actor, scores batches of pairs."""

    def __init__(self, model_path: str, *, dtype: str, use_gpu: bool, micro_batch: int, trust_remote_code: bool):
        from pipeline.modeling import load_model, load_tokenizer, pick_device

        self.device = pick_device(use_gpu)
        self.model = load_model(model_path, dtype=getattr(torch, dtype), device=self.device, trust_remote_code=trust_remote_code).eval()
        self.pad_id = load_tokenizer(model_path, trust_remote_code=trust_remote_code).pad_token_id
        self.micro_batch = micro_batch

    def __call__(self, batch: pa.Table) -> pa.Table:
        return score_pairs(self.model, batch, pad_id=self.pad_id, micro_batch=self.micro_batch, device=self.device)


def run(config: Config, *, force: bool = False) -> dict:
    """Score `<run_dir>/tokenize/{train,eval}` into `<run_dir>/score/{train,eval}`."""
    import ray

    run_dir = RunDir(config.run_dir)
    upstream = run_dir.manifest(UPSTREAM)
    if upstream is None:
        raise RuntimeError(f"score needs a finished tokenize stage under {run_dir.uri_of(UPSTREAM)}; run `dpo tokenize` first")
    config_hash = stage_hash(config, STAGE)
    if not force and run_dir.is_finished(STAGE, config_hash=config_hash, upstream_hash=upstream["manifest_hash"]):
        log.info("score: finished already (%s), skipping", run_dir.uri_of(STAGE))
        return run_dir.manifest(STAGE)

    sc = config.score
    writer = run_dir.begin(STAGE)
    # Both splits go through ONE actor pool (one model load per actor); `path` tells them apart.
    splits = [s for s in SPLITS if upstream[f"rows_{s}"] > 0]
    ds = ray.data.read_parquet([run_dir.uri_of(UPSTREAM, s) for s in splits], include_paths=True)
    scored = ds.map_batches(
        ReferenceScorer,
        fn_constructor_kwargs=dict(
            model_path=reference_path(config),
            dtype=config.model.dtype,
            use_gpu=sc.use_gpu,
            micro_batch=sc.batch_size,
            trust_remote_code=config.model.trust_remote_code,
        ),
        batch_size=sc.batch_size * 8,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=sc.num_actors),
        num_gpus=sc.gpus_per_actor if sc.use_gpu else 0,
        num_cpus=sc.cpus_per_actor,
    )
    # Stream results back in order and write fixed-size shards: the pool does the heavy work, the
    # driver only writes, so memory stays bounded and shards are deterministic.
    rows = {s: 0 for s in SPLITS}
    shard = {s: 0 for s in SPLITS}
    for batch in scored.iter_batches(batch_size=SHARD_ROWS, batch_format="pyarrow"):
        in_eval = pc.match_substring(batch["path"], f"/{UPSTREAM}/eval/")
        for split, mask in (("train", pc.invert(in_eval)), ("eval", in_eval)):
            part = batch.filter(mask)
            if part.num_rows:
                writer.write_table(f"{split}/part-{shard[split]:05d}.parquet", part, SCORED)
                shard[split] += 1
                rows[split] += part.num_rows
    for split in SPLITS:
        if shard[split] == 0:
            writer.write_table(f"{split}/part-00000.parquet", SCORED.empty_table(), SCORED)
        if rows[split] != upstream[f"rows_{split}"]:
            raise RuntimeError(f"score/{split}: {rows[split]} rows scored but tokenize wrote {upstream[f'rows_{split}']}")
    manifest = writer.commit({
        "config_hash": config_hash,
        "upstream_hash": upstream["manifest_hash"],
        "reference": reference_path(config),
        "rows_in": upstream["rows_out"],
        "rows_out": rows["train"] + rows["eval"],
        "rows_train": rows["train"],
        "rows_eval": rows["eval"],
        "dropped": {},
    })
    log.info("score: %d train + %d eval pairs scored with %s", rows["train"], rows["eval"], reference_path(config))
    return manifest


def read_split(run_dir: RunDir, split: str) -> pa.Table:
    return read_parquet_dir(run_dir, f"{STAGE}/{split}")
