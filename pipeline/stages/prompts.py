"""The prompt set of on-policy rounds: `data.path` -> rendered, tokenized prompts, held-out ones apart.

Reading happens on the driver (an unreadable input fails before any Ray work, as in tokenize); rendering and
tokenizing run in a Ray Data actor pool over record batches (`pipeline.data.prompt_set.prompt_outcomes`, a pure
function); deduplication and the seeded order need the whole set and run on the driver. Output under
`<run_dir>/prompts/`: `eval/` (the `rounds.eval_prompts` held out of every round), `pool/` (the prompts rounds
take theirs from, in order), and `rejected.jsonl` with each refused row's source and reason.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from typing import Any, cast

import pyarrow as pa
import ray

from pipeline.config import Config, ConfigError
from pipeline.data.prompt_set import kept_in_order, prompt_outcomes
from pipeline.data.schemas import PROMPTS
from pipeline.data.sources import input_fingerprint, read_records
from pipeline.model.pretrained import load_tokenizer
from pipeline.runtime.pools import LedgerBatches, pool_options, run_pool
from pipeline.stages.base import Stage, StageRun

log = logging.getLogger(__name__)

SHARD_ROWS = 50_000


class RenderPrompts(LedgerBatches):
    """Ray Data callable class: loads the tokenizer once per actor, then renders and tokenizes record batches."""

    def __init__(self, model_path: str, trust_remote_code: bool, options: dict, ledger: str | None = None):
        super().__init__(ledger, key="source")
        self.tokenizer = load_tokenizer(model_path, trust_remote_code=trust_remote_code)
        self.options = options

    def process(self, batch: pa.Table) -> pa.Table:
        return prompt_outcomes(batch, self.tokenizer, **self.options)


def render_all(config: Config, records: pa.Table, ledger: str | None) -> pa.Table:
    """Every record through the pool, one outcome each, in input order."""
    options = dict(
        columns=dict(config.data.columns),
        chat_template=config.data.chat_template,
        max_prompt_length=config.tokenize.max_prompt_length,
    )
    ds = ray.data.from_arrow(records).map_batches(
        RenderPrompts,
        fn_constructor_kwargs=dict(
            model_path=config.model.path,
            trust_remote_code=config.model.trust_remote_code,
            options=options,
            ledger=ledger,
        ),
        batch_size=config.tokenize.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, int(ray.cluster_resources().get("CPU", 1)) - 1)),
        num_cpus=0.5,
        **pool_options(config.ray.max_retries),
    )
    outcomes = pa.concat_tables(ray.get(cast(Any, ds.to_arrow_refs())))
    # The pool may hand batches back in any order: put the rows back in input order (sources are unique).
    position = {source: i for i, source in enumerate(records["source"].to_pylist())}
    sources = outcomes["source"].to_pylist()
    order = sorted(range(outcomes.num_rows), key=lambda i: position[sources[i]])
    return outcomes.take(pa.array(order, pa.int64()))


def prompts_stage(run: StageRun) -> dict:
    """Read, render, tokenize and order the prompt set; hold out `rounds.eval_prompts` of it."""
    config = run.config
    records = read_records(config.data.path, split=config.data.split)
    ledger = run.writer.scratch("in_flight")
    outcomes = run_pool(
        lambda: render_all(config, records, ledger),
        ledger=ledger,
        what="prompts",
        retries=config.ray.max_retries,
        reset=lambda: None,
    )
    if outcomes.num_rows != records.num_rows:
        raise RuntimeError(f"prompts: {outcomes.num_rows} outcomes for {records.num_rows} input rows")
    kept, reasons = kept_in_order(outcomes, seed=config.rounds.seed)
    held = config.rounds.eval_prompts
    if kept.num_rows <= held:
        raise ConfigError(
            f"rounds.eval_prompts: {held} prompts to hold out, but the prompt set {config.data.path} has "
            f"{kept.num_rows} usable ones (after {sum(r is not None for r in reasons)} rejections); lower "
            "rounds.eval_prompts or give more prompts"
        )
    splits = {"eval": kept.slice(0, held), "pool": kept.slice(held)}
    splits["pool"] = splits["pool"].set_column(1, "position", pa.array(range(splits["pool"].num_rows), pa.int64()))
    for split, table in splits.items():
        for i, start in enumerate(range(0, table.num_rows, SHARD_ROWS)):
            run.writer.write_table(f"{split}/part-{i:05d}.parquet", table.slice(start, SHARD_ROWS), PROMPTS)
    rejected = [
        json.dumps({"source": s, "reason": r, "raw": raw}, ensure_ascii=False) + "\n"
        for s, r, raw in zip(outcomes["source"].to_pylist(), reasons, outcomes["raw"].to_pylist())
        if r is not None
    ]
    run.writer.write_text("rejected.jsonl", "".join(rejected))
    dropped = dict(sorted(Counter(r for r in reasons if r is not None).items()))
    log.info("prompts: %d rows in, %d held out, %d in the pool, dropped %s", records.num_rows, held, len(kept), dropped)
    return {
        "input": config.data.path,
        "rows_in": records.num_rows,
        "rows_out": kept.num_rows,
        "rows_eval": splits["eval"].num_rows,
        "rows_pool": splits["pool"].num_rows,
        "dropped": dropped,
    }


PROMPTS_STAGE = Stage(
    name="prompts",
    sections=(
        "data.path",
        "data.split",
        "data.columns",
        "data.chat_template",
        "model.path",
        "model.trust_remote_code",
        "tokenize.max_prompt_length",
        "rounds.eval_prompts",
        "rounds.seed",
    ),
    body=prompts_stage,
    input_hash=lambda config: input_fingerprint(config.data.path),
)
