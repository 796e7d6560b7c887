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

from pipeline.config import Config, ConfigError
from pipeline.data.audit import audit, check_strict
from pipeline.data.encode import process_records
from pipeline.data.preview import explain_no_rows
from pipeline.data.schemas import TOKENIZED
from pipeline.data.sources import InputError, input_fingerprint, read_inputs
from pipeline.data.split import finish_outcomes, held_out_rows, with_lengths
from pipeline.model.pretrained import context_length, load_tokenizer
from pipeline.runtime.files import RowsLostError
from pipeline.runtime.pools import LedgerBatches, pool_options, run_pool
from pipeline.stages.base import Stage, StageRun

log = logging.getLogger(__name__)

SHARD_ROWS = 50_000


class TokenizeBatch(LedgerBatches):
    """Ray Data callable class: loads the tokenizer once per actor, then tokenizes record batches (each
    noted in the pool's ledger while in flight)."""

    def __init__(self, model_path: str, trust_remote_code: bool, options: dict, ledger: str | None = None):
        super().__init__(ledger, key="source")
        self.tokenizer = load_tokenizer(model_path, trust_remote_code=trust_remote_code)
        self.options = options

    def process(self, batch: pa.Table) -> pa.Table:
        return process_records(batch, self.tokenizer, **self.options)


def tokenize_rows(config: Config, records: pa.Table, ledger: str | None = None) -> pa.Table:
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
        fn_constructor_kwargs=dict(
            model_path=config.model.path,
            trust_remote_code=config.model.trust_remote_code,
            options=options,
            ledger=ledger,
        ),
        batch_size=tok.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, int(ray.cluster_resources().get("CPU", 1)) - 1)),
        num_cpus=0.5,
        **pool_options(config.ray.max_retries),
    )
    return pa.concat_tables([ray.get(ref) for ref in ds.to_arrow_refs()])


def extra_outcomes(records: pa.Table, outcomes: pa.Table) -> int:
    """Check that every input row came back from the pool; return how many outcomes there are beyond one
    per row (a scored row can give several pairs). A row with no outcome is an error giving the count; a
    batch that came back twice cannot slip through either: its pairs repeat ids, and repeated ids are
    rejected as duplicate_pair."""
    want = Counter(records["source"].to_pylist())
    have = Counter(outcomes["source"].to_pylist())
    lost = [source for source in want if source not in have]
    unknown = [source for source in have if source not in want]
    if lost or unknown:
        raise RowsLostError(
            f"tokenize: {len(lost)} of {len(want)} input rows came back from the tokenizer pool with no outcome"
            f" and {len(unknown)} outcomes name no input row (e.g. {(lost or unknown)[0]})"
        )
    return sum(have.values()) - len(want)


def write_outputs(writer, splits: dict[str, pa.Table], rejected: pa.Table) -> None:
    """Shards of each split, and every rejected row with its source and reason."""
    for split, table in splits.items():
        for i, start in enumerate(range(0, max(table.num_rows, 1), SHARD_ROWS)):
            writer.write_table(f"{split}/part-{i:05d}.parquet", table.slice(start, SHARD_ROWS), TOKENIZED)
    writer.write_text(
        "rejected.jsonl",
        "".join(
            json.dumps({"source": s, "reason": r, "raw": raw}, ensure_ascii=False) + "\n"
            for s, r, raw in zip(
                rejected["source"].to_pylist(), rejected["reason"].to_pylist(), rejected["raw"].to_pylist()
            )
        ),
    )


def check_context(config: Config) -> None:
    """A pair longer than the model's context cannot be scored or trained: refuse such a max_length."""
    found = context_length(config.model.path, trust_remote_code=config.model.trust_remote_code)
    if found and config.tokenize.max_length > found[0]:
        raise ConfigError(
            f"tokenize.max_length ({config.tokenize.max_length}) is beyond the context of the model "
            f"at {config.model.path} "
            f"({found[0]} positions, its config's {found[1]}); set tokenize.max_length to at most {found[0]}"
        )


def tokenize(run: StageRun) -> dict:
    """Tokenize `data.path` into `<run_dir>/tokenize/{train,eval}`, rejected rows kept with their reasons."""
    config = run.config
    check_context(config)
    records, eval_sources = read_inputs(config.data)
    ledger = run.writer.scratch("in_flight")
    outcomes = run_pool(
        lambda: tokenize_rows(config, records, ledger),
        ledger=ledger,
        what="tokenize",
        retries=config.ray.max_retries,
        reset=lambda: None,
    )
    produced_extra = extra_outcomes(records, outcomes)
    good, rejected = finish_outcomes(outcomes)
    reasons = Counter(rejected["reason"].to_pylist())
    if not good.num_rows:  # a stage that yields nothing fails here, not in the stage that reads it
        raise InputError(explain_no_rows(records.num_rows, reasons))
    check_strict(config.tokenize.strict, reasons)
    good = with_lengths(good)
    held_out = held_out_rows(good, rejected, eval_sources=eval_sources, fraction=config.data.eval_fraction)
    splits = {"train": good.filter(pa.array(~held_out)), "eval": good.filter(pa.array(held_out))}
    write_outputs(run.writer, splits, rejected)
    rows_in, rows_out = records.num_rows, good.num_rows
    log.info("tokenize: %d rows in, %d pairs out, dropped %s", rows_in, rows_out, dict(reasons))
    return {
        "input": config.data.path,
        "rows_in": rows_in,
        "rows_out": rows_out,
        "rows_train": splits["train"].num_rows,
        "rows_eval": splits["eval"].num_rows,
        "dropped": dict(sorted(reasons.items())),
        "pairs_from_multi_completion_rows": produced_extra,
        "audit": audit(good, reasons),
    }


TOKENIZE = Stage(
    name="tokenize",
    sections=("data", "tokenize", "model.path", "model.trust_remote_code"),
    body=tokenize,
    input_hash=lambda config: input_fingerprint(config.data.path),  # never raises for a missing input: reading does
)
