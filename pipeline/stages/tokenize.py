"""Stage 1, tokenize: preference rows in any supported format -> token-id shards, every row accounted for.

Reading happens on the driver (so an unreadable input fails before any Ray work); tokenizing runs as a
Ray Data actor pool over record batches (`pipeline.data.encode.process_records`, a pure function);
deduplication, the train/eval split and the audit (`pipeline.data.split`, `pipeline.data.audit`) need the
whole set and run on the driver.
"""

from __future__ import annotations

import json
import logging
from collections import Counter

import pyarrow as pa
import ray

from pipeline.config import Config
from pipeline.data.audit import audit, check_strict
from pipeline.data.encode import process_records
from pipeline.data.schemas import TOKENIZED
from pipeline.data.sources import input_fingerprint, read_inputs
from pipeline.data.split import finish_outcomes, held_out_rows, with_lengths
from pipeline.stages.base import Stage, StageRun

log = logging.getLogger(__name__)

SHARD_ROWS = 50_000


class TokenizeBatch:
    """Ray Data callable class: loads the tokenizer once per actor, then tokenizes record batches."""

    def __init__(self, model_path: str, trust_remote_code: bool, options: dict):
        from pipeline.model.loading import load_tokenizer

        self.tokenizer = load_tokenizer(model_path, trust_remote_code=trust_remote_code)
        self.options = options

    def __call__(self, batch: pa.Table) -> pa.Table:
        return process_records(batch, self.tokenizer, **self.options)


def tokenize_rows(config: Config, records: pa.Table) -> pa.Table:
    """Every record through the tokenizer in a Ray Data actor pool: one outcome row per pair or rejection."""
    tok = config.tokenize
    options = dict(
        format=config.data.format,
        columns=dict(config.data.columns),
        chat_template=config.data.chat_template,
        max_prompt_length=tok.max_prompt_length,
        max_length=tok.max_length,
        pairing=config.data.pairing,
        min_score_gap=config.data.min_score_gap,
    )
    ds = ray.data.from_arrow(records).map_batches(
        TokenizeBatch,
        fn_constructor_kwargs=dict(model_path=config.model.path, trust_remote_code=config.model.trust_remote_code, options=options),
        batch_size=tok.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, int(ray.cluster_resources().get("CPU", 1)) - 1)),
        num_cpus=0.5,
    )
    return pa.concat_tables([ray.get(ref) for ref in ds.to_arrow_refs()])


def write_outputs(writer, splits: dict[str, pa.Table], rejected: pa.Table) -> None:
    """Shards of each split, and every rejected row with its source and reason."""
    for split, table in splits.items():
        for i, start in enumerate(range(0, max(table.num_rows, 1), SHARD_ROWS)):
            writer.write_table(f"{split}/part-{i:05d}.parquet", table.slice(start, SHARD_ROWS), TOKENIZED)
    writer.write_text("rejected.jsonl", "".join(
        json.dumps({"source": s, "reason": r, "raw": raw}, ensure_ascii=False) + "\n"
        for s, r, raw in zip(rejected["source"].to_pylist(), rejected["reason"].to_pylist(), rejected["raw"].to_pylist())
    ))


def tokenize(run: StageRun) -> dict:
    """Tokenize `data.path` into `<run_dir>/tokenize/{train,eval}`, rejected rows kept with their reasons."""
    config = run.config
    records, eval_sources = read_inputs(config.data)
    good, rejected = finish_outcomes(tokenize_rows(config, records))
    reasons = Counter(rejected["reason"].to_pylist())
    check_strict(config.tokenize.strict, reasons)
    good = with_lengths(good)
    held_out = held_out_rows(good, rejected, eval_sources=eval_sources, fraction=config.data.eval_fraction)
    splits = {"train": good.filter(pa.array(~held_out)), "eval": good.filter(pa.array(held_out))}
    write_outputs(run.writer, splits, rejected)
    rows_in, rows_out = records.num_rows, good.num_rows
    produced_extra = rows_out + len(rejected) - rows_in  # scored rows can yield several pairs each
    log.info("tokenize: %d rows in, %d pairs out, dropped %s", rows_in, rows_out, dict(reasons))
    return {
        "input": config.data.path,
        "rows_in": rows_in,
        "rows_out": rows_out,
        "rows_train": splits["train"].num_rows,
        "rows_eval": splits["eval"].num_rows,
        "dropped": dict(sorted(reasons.items())),
        "pairs_from_multi_completion_rows": max(produced_extra, 0),
        "audit": audit(good, reasons),
    }


TOKENIZE = Stage(
    name="tokenize",
    sections=("data", "tokenize", "model.path", "model.trust_remote_code"),
    body=tokenize,
    input_hash=lambda config: input_fingerprint(config.data.path),  # raises InputError naming a missing input
)
