"""Stage 1, tokenize: preference rows in any supported format -> token-id shards, every row accounted for.

One Ray Data pipeline from the source to the shards; the driver plans, adds up and writes the manifest:

    the input's pieces (files, row-group runs, a hub split; `pipeline.data.pieces`), read by Ray Data tasks
      -> an actor pool tokenizes record batches (`pipeline.data.encode.process_records`, pure) and routes
         each outcome to its shard (`pipeline.data.routing`: good rows by content hash, rejections by ordinal)
      -> Ray Data's hash shuffle gathers each shard (`groupby("shard")`)
      -> per shard, on a worker: deduplicate, sort by id, split train/eval (`pipeline.data.split`), write
         train/part-<s>.parquet, eval/part-<s>.parquet and rejected/part-<s>.jsonl, return a small summary
    driver: add the summaries up (`pipeline.data.accounting`): counts, reasons, checksums, the audit, and the
    proof that every input row came back.

The shard of a row depends on its content alone, so the shards are the same whatever the number of actors,
nodes or blocks, and the shards in name order are the whole set in content-hash order.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter

import pyarrow as pa
import ray

from pipeline.config import Config, ConfigError
from pipeline.data.accounting import SPLITS, add_up, missing_rows
from pipeline.data.audit import check_strict
from pipeline.data.encode import process_records
from pipeline.data.pieces import Piece
from pipeline.data.preview import explain_no_rows
from pipeline.data.records import InputError
from pipeline.data.routing import route_outcomes
from pipeline.data.schemas import TOKENIZED
from pipeline.data.sources import input_fingerprint, plan_inputs
from pipeline.data.split import finish_shard
from pipeline.model.locate import context_from_config
from pipeline.model.pretrained import context_length, load_tokenizer
from pipeline.runtime.datasource import PiecesDatasource
from pipeline.runtime.files import RowsLostError
from pipeline.runtime.pools import LedgerBatches, pool_options, run_pool, user_error
from pipeline.runtime.storage import RunDir, StageWriter
from pipeline.stages.base import Stage, StageRun

log = logging.getLogger(__name__)

SHARD_INPUT_BYTES = 64 << 20  # with tokenize.num_shards unset: one shard per 64 MiB of input
REJECTED = "rejected"
ROW_GROUP_ROWS = 1024  # score reads runs of rows of a shard: small row groups let it read little more than those


class TokenizeBatch(LedgerBatches):
    """Ray Data callable class: loads the tokenizer once per actor, then tokenizes record batches and routes
    their outcomes to shards (each batch noted in the pool's ledger while in flight)."""

    def __init__(self, model_path: str, trust_remote_code: bool, options: dict, routing: dict, ledger: str | None):
        super().__init__(ledger, key="source")
        self.tokenizer = load_tokenizer(model_path, trust_remote_code=trust_remote_code)
        self.options = options
        self.routing = routing

    def process(self, batch: pa.Table) -> pa.Table:
        return route_outcomes(batch, process_records(batch, self.tokenizer, **self.options), **self.routing)


def write_shard(rows: pa.Table, *, writer: StageWriter) -> pa.Table:
    """Ray Data `map_groups` function: one shard's outcomes -> its files, written from this worker; returns one
    row, the shard's summary as JSON."""
    shard = int(rows["shard"][0].as_py())
    done = finish_shard(rows)
    for split in SPLITS:
        table = getattr(done, split)
        if table.num_rows:
            writer.write_table(f"{split}/part-{shard:05d}.parquet", table, TOKENIZED, row_group_rows=ROW_GROUP_ROWS)
    if done.rejected.num_rows:
        lines = (
            json.dumps({"source": s, "reason": r, "raw": raw}, ensure_ascii=False) + "\n"
            for s, r, raw in zip(*(done.rejected[c].to_pylist() for c in ("source", "reason", "raw")))
        )
        writer.write_text(f"{REJECTED}/part-{shard:05d}.jsonl", "".join(lines))
    return pa.table({"shard": [shard], "summary": [json.dumps(done.summary)]})


def remove_outputs(writer: StageWriter) -> None:
    """What a failed pipeline wrote: a pool started again writes every shard anew."""
    for folder in (*SPLITS, REJECTED):
        writer.remove(folder)


def shard_count(config: Config, pieces: list[Piece]) -> int:
    """tokenize.num_shards, or one shard per SHARD_INPUT_BYTES of input (at least one)."""
    if config.tokenize.num_shards is not None:
        if config.tokenize.num_shards < 1:
            raise ConfigError(f"tokenize.num_shards: {config.tokenize.num_shards}; give at least 1 (or null)")
        return config.tokenize.num_shards
    return max(1, math.ceil(sum(p.size_bytes for p in pieces) / SHARD_INPUT_BYTES))


def tokenize_pipeline(config: Config, pieces: list[Piece], *, shards: int, writer: StageWriter, ledger: str):
    """The Ray Data pipeline from the pieces to the written shards; its rows are the shards' summaries."""
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
    routing = dict(
        shards=shards, eval_fraction=config.data.eval_fraction, named_eval=config.data.eval_split is not None
    )
    if tok.num_actors is not None:
        pool = ray.data.ActorPoolStrategy(size=tok.num_actors)
    else:
        pool = ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, int(ray.cluster_resources().get("CPU", 1)) - 1))
    outcomes = ray.data.read_datasource(PiecesDatasource(pieces)).map_batches(
        TokenizeBatch,
        fn_constructor_kwargs=dict(
            model_path=config.model.path,
            trust_remote_code=config.model.trust_remote_code,
            options=options,
            routing=routing,
            ledger=ledger,
        ),
        batch_size=tok.batch_size,
        batch_format="pyarrow",
        compute=pool,
        num_cpus=0.5,
        **pool_options(config.ray.max_retries),
    )
    return outcomes.groupby("shard", num_partitions=min(shards, 16)).map_groups(
        write_shard,  # type: ignore[arg-type]  # a keyword-only argument, passed in fn_kwargs
        fn_kwargs={"writer": writer},
        batch_format="pyarrow",
        num_cpus=0.5,
    )


def model_context(config: Config) -> tuple[int, str] | None:
    """The model's context and the config field that says so: read from its config.json where this process
    finds one (importing transformers added ~140 MB to the driver for this alone), else asked of
    transformers in a Ray task (a hub id not cached here, or a config that names no such field)."""
    found = context_from_config(config.model.path)
    if found is not None:
        return found
    ask = ray.remote(num_cpus=0)(_context_length)
    return ray.get(ask.remote(config.model.path, config.model.trust_remote_code))


def _context_length(path: str, trust_remote_code: bool) -> tuple[int, str] | None:
    return context_length(path, trust_remote_code=trust_remote_code)


def check_context(config: Config) -> None:
    """A pair longer than the model's context cannot be scored or trained: refuse such a max_length."""
    refuse_beyond_context(config, model_context(config))


def refuse_beyond_context(config: Config, found: tuple[int, str] | None) -> None:
    """A ConfigError when tokenize.max_length passes `found`, the model's context (positions, config field)."""
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
    train_pieces, eval_pieces = plan_inputs(config.data)
    pieces = train_pieces + eval_pieces
    shards = shard_count(config, pieces)
    writer, ledger = run.writer, run.writer.scratch("in_flight")

    def tokenize_all() -> list[dict]:
        with user_error(InputError):  # an input that turns out unreadable midway is the user's to fix
            rows = tokenize_pipeline(config, pieces, shards=shards, writer=writer, ledger=ledger).take_all()
        return [json.loads(row["summary"]) for row in sorted(rows, key=lambda row: row["shard"])]

    summaries = run_pool(
        tokenize_all,
        ledger=ledger,
        what="tokenize",
        retries=config.ray.max_retries,
        reset=lambda: remove_outputs(writer),
    )
    total = add_up(summaries)
    problems = missing_rows(total["records"], {p.file_index: p.display for p in pieces})
    if problems:
        raise RowsLostError(f"tokenize: input rows lost or repeated on the way: {'; '.join(problems[:3])}")
    if total["rows_in"] == 0:
        raise InputError(f"{config.data.path}: no rows (the input is empty)")
    reasons = Counter(total["reasons"])
    if sum(total["checksums"][s]["rows"] for s in SPLITS) == 0:  # a stage that yields nothing fails here
        raise InputError(explain_no_rows(total["rows_in"], reasons))
    check_strict(config.tokenize.strict, reasons)
    for split in SPLITS:  # a split with no rows still has a (empty) shard, so that readers find the folder
        if total["checksums"][split]["rows"] == 0:
            writer.write_table(f"{split}/part-00000.parquet", TOKENIZED.empty_table(), TOKENIZED)
    rows_out = sum(total["checksums"][s]["rows"] for s in SPLITS)
    log.info("tokenize: %d rows in, %d pairs out, dropped %s", total["rows_in"], rows_out, dict(reasons))
    return {
        "input": config.data.path,
        "rows_in": total["rows_in"],
        "rows_out": rows_out,
        "rows_train": total["checksums"]["train"]["rows"],
        "rows_eval": total["checksums"]["eval"]["rows"],
        "dropped": dict(sorted(reasons.items())),
        "pairs_from_multi_completion_rows": total["outcomes"] - total["rows_in"],
        "checksums": total["checksums"],
        "labels": total["labels"],
        "shards": shards,
        "audit": total["audit"],
    }


def rejected_rows(run_dir: RunDir, stage: str = "tokenize") -> list[dict]:
    """Every rejected row of a finished tokenize stage ({"source", "reason", "raw"}), shard by shard: for a
    person or a test looking at them, not for a pipeline (it reads them all into this process)."""
    manifest = run_dir.manifest(stage) or {}
    names = sorted(f for f in manifest.get("files", {}) if f.startswith(f"{REJECTED}/"))
    return [json.loads(line) for name in names for line in run_dir.read_text(f"{stage}/{name}").splitlines()]


TOKENIZE = Stage(
    name="tokenize",
    sections=("data", "tokenize", "model.path", "model.trust_remote_code"),
    body=tokenize,
    input_hash=lambda config: input_fingerprint(config.data.path),  # never raises for a missing input: reading does
)
