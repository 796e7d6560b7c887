"""Stage 2, score: every pair through the reference model once -> shards of frozen reference log-probs.

A Ray Data actor pool holds the reference model (one GPU, or a fraction, per actor). The log-probs come
from `pipeline.model.batch_logps.batch_sequence_logps`, the very function the trainer calls on the policy. After this stage
the reference model is never needed in training memory.

Unpaired (KTO) data also gets, per row, another row's completion after this row's prompt and its
reference log-prob: KTO's reference point is estimated on such mismatched pairs (see pipeline.stages.kto).
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import torch

from pipeline.config import Config
from pipeline.stages.kto import with_kl_completions
from pipeline.model.batch_logps import batch_sequence_logps
from pipeline.data.schemas import SCORED, SCORED_KTO
from pipeline.runtime.resources import Request
from pipeline.runtime.storage import RunDir, read_parquet_dir
from pipeline.stages.base import Stage, StageRun
from pipeline.stages.train import needs_reference

log = logging.getLogger(__name__)

UPSTREAM = "tokenize"
SPLITS = ("train", "eval")
SHARD_ROWS = 50_000


def _score_two(model, prompts: list, first: list, second: list, *, pad_id: int, micro_batch: int, device: str,
               packing: bool = False, chunk_size: int | None = None):
    """Reference log-probs (float64 sums) of prompt + first[i] and prompt + second[i], each (n,).

    Rows are scored in micro-batches of similar length (sorted by length, then put back in order) so
    little compute goes to padding; `packing` removes the padding altogether and `chunk_size` makes
    output-layer logits only at response positions (see `pipeline.model.batch_logps.batch_sequence_logps`).
    """
    n = len(prompts)
    first_logp = np.zeros(n, dtype=np.float64)
    second_logp = np.zeros(n, dtype=np.float64)
    total = np.array([len(p) + max(len(a), len(b)) for p, a, b in zip(prompts, first, second)])
    order = np.argsort(total, kind="stable")
    with torch.inference_mode():
        for start in range(0, n, micro_batch):
            idx = order[start : start + micro_batch]
            batch_prompts = [prompts[i] for i in idx]
            logps, _, _ = batch_sequence_logps(
                model, batch_prompts + batch_prompts, [first[i] for i in idx] + [second[i] for i in idx],
                pad_id=pad_id, device=device, packing=packing, chunk_size=chunk_size,
            )
            logps = logps.double().cpu().numpy()
            first_logp[idx], second_logp[idx] = logps[: len(idx)], logps[len(idx) :]
    return first_logp, second_logp


def score_pairs(model, table: pa.Table, *, pad_id: int, micro_batch: int, device: str, packing: bool = False,
                chunk_size: int | None = None) -> pa.Table:
    """Add ref_chosen_logps and ref_rejected_logps (float64 sums over response tokens) to `table`.

    Pure over an Arrow table: no Ray.
    """
    chosen_logp, rejected_logp = _score_two(
        model, table["prompt_ids"].to_pylist(), table["chosen_ids"].to_pylist(), table["rejected_ids"].to_pylist(),
        pad_id=pad_id, micro_batch=micro_batch, device=device, packing=packing, chunk_size=chunk_size,
    )
    # An unpaired (KTO) row has no rejected response: its log-prob is a sum over nothing.
    return table.append_column("ref_chosen_logps", pa.array(chosen_logp)).append_column("ref_rejected_logps", pa.array(rejected_logp))


def score_unpaired(model, table: pa.Table, *, pad_id: int, micro_batch: int, device: str, packing: bool = False,
                   chunk_size: int | None = None) -> pa.Table:
    """For KTO rows that carry kl_completion_ids (see pipeline.stages.kto): add ref_chosen_logps (the completion),
    ref_rejected_logps (0: there is no rejected response) and ref_kl_logps (the mismatched completion
    after this row's prompt). Both completions of a row share one forward pass. Pure: no Ray.
    """
    completion_logp, kl_logp = _score_two(
        model, table["prompt_ids"].to_pylist(), table["chosen_ids"].to_pylist(), table["kl_completion_ids"].to_pylist(),
        pad_id=pad_id, micro_batch=micro_batch, device=device, packing=packing, chunk_size=chunk_size,
    )
    return (
        table.append_column("ref_chosen_logps", pa.array(completion_logp))
        .append_column("ref_rejected_logps", pa.array(np.zeros(table.num_rows)))
        .append_column("ref_kl_logps", pa.array(kl_logp))
    )


def scorer_options(config: Config, *, use_gpu: bool) -> dict:
    """ReferenceScorer's keyword arguments for `config` (the score stage's, and evaluate's for its policy)."""
    sc = config.score
    return dict(
        dtype=config.model.dtype, use_gpu=use_gpu, micro_batch=sc.batch_size, trust_remote_code=config.model.trust_remote_code,
        attn_implementation=config.model.attn_implementation, packing=sc.packing,
        chunk_size=sc.logps_chunk_size if sc.chunked_logps else None, compile=sc.compile,
    )


class ReferenceScorer:
    """Ray Data callable class: loads the reference model once per actor, scores batches of pairs."""

    def __init__(self, model_path: str, *, dtype: str, use_gpu: bool, micro_batch: int, trust_remote_code: bool,
                 attn_implementation: str | None = None, packing: bool = False, chunk_size: int | None = None,
                 compile: bool = False):
        from pipeline.model.loading import compile_decoder_layers, load_model, load_tokenizer, pick_device

        self.device = pick_device(use_gpu)
        self.model = load_model(
            model_path, dtype=getattr(torch, dtype), device=self.device, trust_remote_code=trust_remote_code,
            attn_implementation=attn_implementation,
        ).eval()
        if compile:
            compile_decoder_layers(self.model)
        self.pad_id = load_tokenizer(model_path, trust_remote_code=trust_remote_code).pad_token_id
        self.options = dict(micro_batch=micro_batch, packing=packing, chunk_size=chunk_size)

    def __call__(self, batch: pa.Table) -> pa.Table:
        score = score_unpaired if "kl_completion_ids" in batch.column_names else score_pairs
        return score(self.model, batch, pad_id=self.pad_id, device=self.device, **self.options)


def check_kto_splits(upstream: dict, unpaired: bool) -> None:
    """KTO pairs each prompt with another row's completion: a split of one row cannot be scored."""
    for split in SPLITS:
        if unpaired and upstream[f"rows_{split}"] == 1:
            raise ValueError(
                f"score/{split}: KTO pairs each prompt with another example's completion to estimate its "
                "reference point, so a split needs 0 or at least 2 rows; it has 1 (change data.eval_fraction or add data)"
            )


def scoring_input(run: StageRun, splits: list[str], unpaired: bool):
    """Both splits as ONE Ray dataset (one model load per actor); a `path` column tells them apart."""
    data = run.data_dir
    if not unpaired:
        return ray.data.read_parquet([data.uri_of(UPSTREAM, s) for s in splits], include_paths=True), SCORED
    # KTO: the mismatched pairs are fixed here, per split, so the trainer can form the same ones.
    tables = []
    for split in splits:
        table = with_kl_completions(read_parquet_dir(data, f"{UPSTREAM}/{split}"), max_length=run.config.tokenize.max_length)
        tables.append(table.append_column("path", pa.array([data.uri_of(UPSTREAM, split) + "/"] * table.num_rows)))
    return ray.data.from_arrow(tables), SCORED_KTO


def write_scored(writer, scored, schema: pa.Schema, upstream: dict) -> dict[str, int]:
    """Stream results back in order into fixed-size shards per split; returns rows per split.

    The pool does the heavy work, the driver only writes, so memory stays bounded and shards are
    deterministic. Every row of tokenize's splits must come back.
    """
    rows = {s: 0 for s in SPLITS}
    shard = {s: 0 for s in SPLITS}
    for batch in scored.iter_batches(batch_size=SHARD_ROWS, batch_format="pyarrow"):
        in_eval = pc.match_substring(batch["path"], f"/{UPSTREAM}/eval/")
        for split, mask in (("train", pc.invert(in_eval)), ("eval", in_eval)):
            part = batch.filter(mask)
            if part.num_rows:
                writer.write_table(f"{split}/part-{shard[split]:05d}.parquet", part, schema)
                shard[split] += 1
                rows[split] += part.num_rows
    for split in SPLITS:
        if shard[split] == 0:
            writer.write_table(f"{split}/part-00000.parquet", schema.empty_table(), schema)
        if rows[split] != upstream[f"rows_{split}"]:
            raise RuntimeError(f"score/{split}: {rows[split]} rows scored but tokenize wrote {upstream[f'rows_{split}']}")
    return rows


def score(run: StageRun) -> dict:
    """Score `<run_dir>/tokenize/{train,eval}` into `<run_dir>/score/{train,eval}`."""
    config, upstream, sc = run.config, run.upstream, run.config.score
    splits = [s for s in SPLITS if upstream[f"rows_{s}"] > 0]
    labels = {s: label_counts(run.data_dir, s) for s in SPLITS}
    unpaired = is_unpaired(labels)
    check_kto_splits(upstream, unpaired)  # before the writer begins: a refusal leaves a finished stage as it was
    ds, schema = scoring_input(run, splits, unpaired)
    scored = ds.map_batches(
        ReferenceScorer,
        fn_constructor_kwargs=dict(model_path=config.model.reference, **scorer_options(config, use_gpu=sc.use_gpu)),
        batch_size=sc.batch_size * 8,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=sc.num_actors),
        num_gpus=sc.gpus_per_actor if sc.use_gpu else 0,
        num_cpus=sc.cpus_per_actor,
    )
    rows = write_scored(run.writer, scored, schema, upstream)
    log.info("score: %d train + %d eval pairs scored with %s", rows["train"], rows["eval"], config.model.reference)
    return {
        "reference": config.model.reference,
        "rows_in": upstream["rows_out"],
        "rows_out": rows["train"] + rows["eval"],
        "rows_train": rows["train"],
        "rows_eval": rows["eval"],
        "dropped": {},
        "data_kind": "unpaired" if unpaired else "pairs",
        **({"labels": {s: {k: labels[s][k] for k in ("desirable", "undesirable")} for s in SPLITS}} if unpaired else {}),
    }


def score_requests(config: Config) -> list[Request]:
    sc = config.score
    bundle = {"CPU": sc.cpus_per_actor, **({"GPU": sc.gpus_per_actor} if sc.use_gpu else {})}
    return [Request("score", "actor", sc.num_actors, bundle,
                    {"CPU": "score.cpus_per_actor", "GPU": "score.use_gpu"}, "score.num_actors")]


SCORE = Stage(
    name="score",
    sections=("model",),
    body=score,
    upstream=lambda config: UPSTREAM,
    requests=score_requests,
    enabled=needs_reference,  # reference-free losses never read what this stage writes
)


def label_counts(run_dir: RunDir, split: str) -> dict[str, int]:
    """{"pairs", "desirable", "undesirable"} row counts of a tokenized split, from its label column only."""
    fs = run_dir.fs
    infos = fs.get_file_info(pafs.FileSelector(run_dir.path(UPSTREAM, split), allow_not_found=True))
    counts = {"pairs": 0, "desirable": 0, "undesirable": 0}
    for info in infos:
        if info.path.endswith(".parquet"):
            label = pq.read_table(info.path, columns=["label"], filesystem=fs)["label"]
            desirable = int(pc.sum(label).as_py() or 0)
            counts["pairs"] += label.null_count
            counts["desirable"] += desirable
            counts["undesirable"] += len(label) - label.null_count - desirable
    return counts


def is_unpaired(labels: dict[str, dict[str, int]]) -> bool:
    """True when every row is unpaired (KTO), False when every row is a pair; mixed data is refused."""
    paired = sum(c["pairs"] for c in labels.values())
    unpaired = sum(c["desirable"] + c["undesirable"] for c in labels.values())
    if paired and unpaired:
        raise ValueError(
            f"score: the tokenized data mixes {paired} pairs with {unpaired} unpaired (prompt, completion, label) rows; "
            "pair losses and KTO each train on one kind, so split the data or set data.format"
        )
    return unpaired > 0
