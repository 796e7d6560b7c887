"""Stage 2, score: every pair through the reference model once -> shards of frozen reference log-probs.

A Ray Data actor pool holds the reference model (one GPU, or a fraction, per actor) in a
`pipeline.model.scoring.SequenceScorer`, whose log-probs come from the very function the trainer calls
on the policy. After this stage the reference model is never needed in training memory.

The work is cut into units (`pipeline.data.score_units`): runs of rows of tokenize's shards, the split a
unit belongs to being part of the unit. Each unit is read, scored and written by an actor, as a shard of its
own under a name the unit fixes, whole or not at all; the driver sees unit descriptions and per-shard counts,
never rows. A pool that lost a node starts again on the units whose shards are not written yet. The rows are
checked by counts and an order-independent checksum of their ids (`pipeline.data.checksums`), per shard
against what the actor read and per split against tokenize's manifest.

Unpaired (KTO) data also gets, per row, the next row's completion after this row's prompt and its reference
log-prob: KTO's reference point is estimated on such mismatched pairs (see pipeline.data.kto_pairs).
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from typing import cast

import pyarrow as pa
import pyarrow.fs as pafs
import ray

from pipeline.config import Config
from pipeline.data.checksums import checksum, combine
from pipeline.data.kto_pairs import with_kl_completions
from pipeline.data.schemas import SCORED, SCORED_KTO, SCORED_PREFIX
from pipeline.data.score_units import Unit, plan_units
from pipeline.model.scorer_options import scorer_options
from pipeline.runtime.files import RowsLostError
from pipeline.runtime.pools import LedgerBatches, pool_options, run_pool
from pipeline.runtime.resources import Request
from pipeline.runtime.shards import read_rows, shard_metadata
from pipeline.runtime.storage import RunDir, StageWriter
from pipeline.stages.base import Stage, StageRun
from pipeline.training.losses import needs_prefix_logps, needs_reference

log = logging.getLogger(__name__)

UPSTREAM = "tokenize"
SPLITS = ("train", "eval")
ID_SUM = "raydpo.id_sum"  # a score shard's footer: the checksum of its ids (pipeline.data.checksums)


def check_kto_splits(upstream: dict, unpaired: bool) -> None:
    """KTO pairs each prompt with another row's completion: a split of one row cannot be scored."""
    for split in SPLITS:
        if unpaired and upstream[f"rows_{split}"] == 1:
            raise ValueError(
                f"score/{split}: KTO pairs each prompt with another example's completion to estimate its "
                "reference point, so a split needs 0 or at least 2 rows; it has 1 "
                "(change data.eval_fraction or add data)"
            )


def scored_schema(config: Config, unpaired: bool) -> pa.Schema:
    """The score shards' schema: KTO's columns for unpaired rows; pairs also get the reference's log-probs
    over each response's first min(|y_w|, |y_l|) tokens when a loss reads them (LD-DPO's `ld_alpha`)."""
    if unpaired:
        return SCORED_KTO
    return SCORED_PREFIX if needs_prefix_logps(config.train) else SCORED


class ReferenceScorer(LedgerBatches):
    """Ray Data callable class: the reference model, loaded once per actor, scores units of work: each read
    from tokenize's shard, scored, checked and written as the unit's shard (its rows noted in the pool's
    ledger while in flight). A unit whose shard is written already is not scored again. Returns one row
    per unit: its name, rows and id checksum."""

    def __init__(
        self,
        *,
        ledger: str | None,
        passes: str,
        data: str,
        writer: StageWriter,
        max_length: int,
        unpaired: bool,
        schema: pa.Schema,
        **scorer_kwargs,
    ):
        super().__init__(ledger, key="id")
        self.passes = RunDir(passes)
        self.fs, self.root = RunDir(data).fs_and_root
        self.writer = writer
        self.max_length = max_length
        self.unpaired = unpaired
        self.schema = schema
        from pipeline.model.scoring import SequenceScorer  # torch: in the actor only, never in the driver

        self.scorer = SequenceScorer(**scorer_kwargs)

    def __call__(self, batch: pa.Table) -> pa.Table:
        done = [self.score_unit(unit_of(row)) for row in batch.to_pylist()]
        return pa.table({"name": [d[0] for d in done], "rows": [d[1] for d in done], "id_sum": [d[2] for d in done]})

    def score_unit(self, unit: Unit) -> tuple[str, int, str]:
        found = written(self.writer, unit.name)
        if found is not None:  # written by an attempt of this unit that died after its shard landed
            return unit.name, *found
        rows = read_rows(self.fs, f"{self.root}/{UPSTREAM}/{unit.source}", unit.start, unit.stop)
        if self.unpaired:
            after = read_rows(self.fs, f"{self.root}/{UPSTREAM}/{unit.after[0]}", unit.after[1], unit.after[1] + 1)
            rows = with_kl_completions(rows, max_length=self.max_length, following=after)
        self.passes.write_text(f"{unit.name.replace('/', '_')}.{uuid.uuid4().hex[:8]}", str(rows.num_rows))
        scored = self.noted(rows, lambda: self.scorer(rows))
        if scored["id"].to_pylist() != rows["id"].to_pylist():
            raise RowsLostError(f"score/{unit.name}: the scorer returned {scored.num_rows} rows for {rows.num_rows}")
        sums = checksum(cast("list[str]", rows["id"].to_pylist()))
        self.writer.write_table(
            unit.name,
            scored,
            self.schema,
            keep_extra=True,
            metadata={ID_SUM: sums["id_sum"]},
        )
        return unit.name, sums["rows"], sums["id_sum"]


def unit_items(units: list[Unit]) -> list[dict]:
    """The units as plain rows for Ray Data (`after` in two columns of their own)."""
    return [
        {**dataclasses.asdict(u), "after": None, "after_source": u.after[0], "after_row": u.after[1]} for u in units
    ]


def unit_of(row: dict) -> Unit:
    fields = {k: v for k, v in row.items() if k not in ("after", "after_source", "after_row")}
    return Unit(**fields, after=(row["after_source"], int(row["after_row"])))


def written(writer: StageWriter, name: str) -> tuple[int, str] | None:
    """(rows, id checksum) of a unit's shard that this attempt has written, or None."""
    fs = writer.run.fs
    if fs.get_file_info(writer.path(name)).type != pafs.FileType.File:
        return None
    rows, metadata = shard_metadata(fs, writer.path(name))
    return rows, metadata[ID_SUM]


def scoring_pool(units: list[Unit], run: StageRun, *, unpaired: bool, ledger: str, passes: str):
    """The units through a pool of `score.num_actors` reference scorers, one unit per call; a unit whose
    actor dies is retried `ray.max_retries` times."""
    config, sc = run.config, run.config.score
    items = unit_items(units)
    return ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        ReferenceScorer,
        fn_constructor_kwargs=dict(
            ledger=ledger,
            passes=passes,
            data=run.data_dir.uri,
            writer=run.writer,
            max_length=config.tokenize.max_length,
            unpaired=unpaired,
            schema=scored_schema(config, unpaired),
            model_path=config.model.reference,
            prefix="ref_",
            prefix_logps=needs_prefix_logps(config.train) and not unpaired,
            **scorer_options(config, use_gpu=sc.use_gpu, gpus=sc.gpus_per_actor),
        ),
        batch_size=1,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=sc.num_actors),
        num_gpus=sc.gpus_per_actor if sc.use_gpu else 0,
        num_cpus=sc.cpus_per_actor,
        **pool_options(config.ray.max_retries),
    )


def score_units(run: StageRun, units: list[Unit], *, unpaired: bool) -> tuple[list[dict], dict]:
    """Score every unit whose shard is not written yet (all of them, but in a pool started again after a lost
    node), through `run_pool`'s bounded restarts. Returns what each start of the pool left to do, and the rows
    the scorers began to score in all (`rows`) and a second time or more (`redone`: units whose actor died)."""
    writer, ledger, passes = run.writer, run.writer.scratch("in_flight"), run.writer.scratch("passes")
    starts: list[dict] = []

    def score_left() -> None:
        done = set(writer_files(writer))
        left = [u for u in units if u.name not in done]
        starts.append({"shards_left": len(left), "rows_left": sum(u.rows for u in left)})
        if starts[-1]["rows_left"] < sum(u.rows for u in units):
            log.info(
                "score: %d of %d shards are written already; scoring the other %d (%d of %d rows)",
                len(units) - len(left),
                len(units),
                len(left),
                starts[-1]["rows_left"],
                sum(u.rows for u in units),
            )
        if left:
            scoring_pool(left, run, unpaired=unpaired, ledger=ledger, passes=passes).take_all()  # a row per unit

    run_pool(score_left, ledger=ledger, what="score", retries=run.config.ray.max_retries, reset=lambda: None)
    return starts, scoring_passes(RunDir(passes))


def scoring_passes(passes: RunDir) -> dict[str, int]:
    """{"rows": rows the scorers began to score, "redone": of them, rows of units begun more than once}; each
    begun unit left a note of its rows in `passes`."""
    fs, root = passes.fs_and_root
    begun: dict[str, list[int]] = {}
    for info in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
        if info.type == pafs.FileType.File:
            begun.setdefault(info.base_name.rsplit(".", 1)[0], []).append(int(passes.read_text(info.base_name)))
    return {"rows": sum(sum(r) for r in begun.values()), "redone": sum(sum(r[1:]) for r in begun.values())}


def writer_files(writer: StageWriter) -> list[str]:
    """The Parquet shards the attempt has written so far, relative to its folder."""
    fs, base = writer.run.fs, writer.path()
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    return [
        i.path[len(base) :].lstrip("/")
        for i in infos
        if i.base_name.endswith(".parquet") and ".tmp-" not in i.base_name
    ]


def check_against_upstream(writer: StageWriter, units: list[Unit], upstream: dict) -> dict[str, int]:
    """Per split: the shards' footers (rows, id checksum) added up must be tokenize's; returns rows per split."""
    rows = {}
    for split in SPLITS:
        parts = []
        for unit in (u for u in units if u.split == split):
            found = written(writer, unit.name)
            if found is None:
                raise RowsLostError(f"score/{unit.name}: missing after the pool finished ({unit.rows} rows lost)")
            parts.append({"rows": found[0], "id_sum": found[1]})
        got, want = combine(parts), upstream["checksums"][split]
        if got != want:
            raise RowsLostError(
                f"score/{split} (against {UPSTREAM}/{split}): {got['rows']} rows written for {want['rows']} expected, "
                f"id checksum {got['id_sum']} against {want['id_sum']}: rows lost, repeated or not tokenize's"
            )
        rows[split] = got["rows"]
    return rows


def score(run: StageRun) -> dict:
    """Score `<run_dir>/tokenize/{train,eval}` into `<run_dir>/score/{train,eval}`."""
    config, upstream = run.config, run.upstream
    assert upstream is not None  # score has an upstream stage: the skeleton read its manifest
    labels = upstream["labels"]
    unpaired = is_unpaired(labels)
    check_kto_splits(upstream, unpaired)  # before the writer begins: a refusal leaves a finished stage as it was
    units = [u for s in SPLITS for u in plan_units(upstream["files"], split=s, shard_rows=config.score.shard_rows)]
    starts, passes = score_units(run, units, unpaired=unpaired)
    rows = check_against_upstream(run.writer, units, upstream)
    schema = scored_schema(config, unpaired)
    for split in SPLITS:  # a split with no rows still has a (empty) shard, so that readers find the folder
        if rows[split] == 0:
            run.writer.write_table(f"{split}/part-00000.parquet", schema.empty_table(), schema)
    log.info("score: %d train + %d eval pairs scored with %s", rows["train"], rows["eval"], config.model.reference)
    return {
        "reference": config.model.reference,
        "rows_in": upstream["rows_out"],
        "rows_out": rows["train"] + rows["eval"],
        "rows_train": rows["train"],
        "rows_eval": rows["eval"],
        "dropped": {},
        "checksums": {s: upstream["checksums"][s] for s in SPLITS},
        "pool_starts": starts,
        "scoring_passes": passes,
        "data_kind": "unpaired" if unpaired else "pairs",
        "prefix_logps": needs_prefix_logps(config.train) and not unpaired,
        **(
            {"labels": {s: {k: labels[s][k] for k in ("desirable", "undesirable")} for s in SPLITS}} if unpaired else {}
        ),
    }


def score_requests(config: Config) -> list[Request]:
    sc = config.score
    bundle = {"CPU": sc.cpus_per_actor, **({"GPU": sc.gpus_per_actor} if sc.use_gpu else {})}
    return [
        Request(
            "score",
            "actor",
            sc.num_actors,
            bundle,
            {"CPU": "score.cpus_per_actor", "GPU": "score.use_gpu"},
            "score.num_actors",
        )
    ]


def score_columns(config: Config) -> dict:
    """What decides the stage's columns beyond its sections: the prefix log-probs, when a loss reads them."""
    return {"prefix_logps": True} if needs_prefix_logps(config.train) else {}


SCORE = Stage(
    name="score",
    sections=("model",),
    derived=score_columns,
    body=score,
    upstream=lambda config: UPSTREAM,
    requests=score_requests,
    enabled=lambda config: needs_reference(
        config.train.loss
    ),  # reference-free losses never read what this stage writes
)


def is_unpaired(labels: dict[str, dict[str, int]]) -> bool:
    """True when every row is unpaired (KTO), False when every row is a pair; mixed data is refused."""
    paired = sum(c["pairs"] for c in labels.values())
    unpaired = sum(c["desirable"] + c["undesirable"] for c in labels.values())
    if paired and unpaired:
        raise ValueError(
            f"score: the tokenized data mixes {paired} pairs with {unpaired} unpaired "
            "(prompt, completion, label) rows; "
            "pair losses and KTO each train on one kind, so split the data or set data.format"
        )
    return unpaired > 0
