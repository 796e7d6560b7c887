"""Stage 2, score: every pair through the reference model once -> shards of frozen reference log-probs.

A Ray Data actor pool holds the reference model (one GPU, or a fraction, per actor) in a
`pipeline.model.scoring.SequenceScorer`, whose log-probs come from the very function the trainer calls
on the policy. After this stage the reference model is never needed in training memory.

Unpaired (KTO) data also gets, per row, another row's completion after this row's prompt and its
reference log-prob: KTO's reference point is estimated on such mismatched pairs (see pipeline.data.kto_pairs).
"""

from __future__ import annotations

import logging

import pyarrow as pa
import pyarrow.compute as pc
import ray

from pipeline.config import Config
from pipeline.data.kto_pairs import with_kl_completions
from pipeline.data.schemas import SCORED, SCORED_KTO, SCORED_PREFIX
from pipeline.model.scoring import SequenceScorer, scorer_options
from pipeline.runtime.files import check_same_ids
from pipeline.runtime.pools import LedgerBatches, pool_options, run_pool
from pipeline.runtime.resources import Request
from pipeline.runtime.storage import read_parquet_dir
from pipeline.stages.base import Stage, StageRun
from pipeline.training.losses import needs_prefix_logps, needs_reference

log = logging.getLogger(__name__)

UPSTREAM = "tokenize"
SPLITS = ("train", "eval")
SHARD_ROWS = 50_000


def check_kto_splits(upstream: dict, unpaired: bool) -> None:
    """KTO pairs each prompt with another row's completion: a split of one row cannot be scored."""
    for split in SPLITS:
        if unpaired and upstream[f"rows_{split}"] == 1:
            raise ValueError(
                f"score/{split}: KTO pairs each prompt with another example's completion to estimate its "
                "reference point, so a split needs 0 or at least 2 rows; it has 1 "
                "(change data.eval_fraction or add data)"
            )


def scoring_input(run: StageRun, splits: list[str], unpaired: bool):
    """Both splits as ONE Ray dataset (one model load per actor); a `path` column tells them apart."""
    data = run.data_dir
    if not unpaired:
        schema = SCORED_PREFIX if needs_prefix_logps(run.config.train) else SCORED
        return ray.data.read_parquet([data.uri_of(UPSTREAM, s) for s in splits], include_paths=True), schema
    # KTO: the mismatched pairs are fixed here, per split, so the trainer can form the same ones.
    tables = []
    for split in splits:
        table = with_kl_completions(
            read_parquet_dir(data, f"{UPSTREAM}/{split}"), max_length=run.config.tokenize.max_length
        )
        tables.append(table.append_column("path", pa.array([data.uri_of(UPSTREAM, split) + "/"] * table.num_rows)))
    return ray.data.from_arrow(tables), SCORED_KTO


class ReferenceScorer(LedgerBatches):
    """Ray Data callable class: the reference model, loaded once per actor, scores batches of rows (each
    noted in the pool's ledger while in flight)."""

    def __init__(self, ledger: str | None = None, **scorer_kwargs):
        super().__init__(ledger, key="id")
        self.scorer = SequenceScorer(**scorer_kwargs)

    def process(self, batch: pa.Table) -> pa.Table:
        return self.scorer(batch)


def scoring_pool(ds, config: Config, ledger: str | None):
    """The dataset through a pool of `score.num_actors` reference scorers; a batch whose actor dies is
    retried `ray.max_retries` times."""
    sc = config.score
    return ds.map_batches(
        ReferenceScorer,
        fn_constructor_kwargs=dict(
            ledger=ledger,
            model_path=config.model.reference,
            prefix="ref_",
            prefix_logps=needs_prefix_logps(config.train),
            **scorer_options(config, use_gpu=sc.use_gpu, gpus=sc.gpus_per_actor),
        ),
        batch_size=sc.batch_size * 8,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=sc.num_actors),
        num_gpus=sc.gpus_per_actor if sc.use_gpu else 0,
        num_cpus=sc.cpus_per_actor,
        **pool_options(config.ray.max_retries),
    )


def write_scored(writer, scored, schema: pa.Schema, expected: dict[str, list[str]]) -> dict[str, int]:
    """Stream results back in order into fixed-size shards per split; returns rows per split.

    The pool does the heavy work, the driver only writes, so memory stays bounded and shards are
    deterministic. Every row of tokenize's splits must come back exactly once: the ids written are
    checked against tokenize's (`expected`, per split), and a lost or repeated row is an error giving the counts.
    """
    ids: dict[str, list[str]] = {s: [] for s in SPLITS}
    shard = dict.fromkeys(SPLITS, 0)
    for batch in scored.iter_batches(batch_size=SHARD_ROWS, batch_format="pyarrow"):
        in_eval = pc.match_substring(batch["path"], f"/{UPSTREAM}/eval/")
        for split, mask in (("train", pc.invert(in_eval)), ("eval", in_eval)):
            part = batch.filter(mask)
            if part.num_rows:
                writer.write_table(f"{split}/part-{shard[split]:05d}.parquet", part, schema)
                shard[split] += 1
                ids[split] += part["id"].to_pylist()
    for split in SPLITS:
        if shard[split] == 0:
            writer.write_table(f"{split}/part-00000.parquet", schema.empty_table(), schema)
        check_same_ids(expected[split], ids[split], what=f"score/{split} (against tokenize/{split})")
    return {split: len(ids[split]) for split in SPLITS}


def score(run: StageRun) -> dict:
    """Score `<run_dir>/tokenize/{train,eval}` into `<run_dir>/score/{train,eval}`."""
    config, upstream = run.config, run.upstream
    splits = [s for s in SPLITS if upstream[f"rows_{s}"] > 0]
    tokenized = {s: read_parquet_dir(run.data_dir, f"{UPSTREAM}/{s}", columns=["id", "label"]) for s in SPLITS}
    labels = {s: label_counts(tokenized[s]) for s in SPLITS}
    expected = {s: tokenized[s]["id"].to_pylist() for s in SPLITS}
    del tokenized  # only the ids stay, to check the scored rows against
    unpaired = is_unpaired(labels)
    check_kto_splits(upstream, unpaired)  # before the writer begins: a refusal leaves a finished stage as it was
    writer, ledger = run.writer, run.writer.scratch("in_flight")

    def score_all() -> dict[str, int]:
        ds, schema = scoring_input(run, splits, unpaired)  # anew for each pool: nothing of a lost one is reused
        return write_scored(writer, scoring_pool(ds, config, ledger), schema, expected)

    rows = run_pool(
        score_all,
        ledger=ledger,
        what="score",
        retries=config.ray.max_retries,
        reset=lambda: [writer.remove(split) for split in SPLITS],
    )
    log.info("score: %d train + %d eval pairs scored with %s", rows["train"], rows["eval"], config.model.reference)
    return {
        "reference": config.model.reference,
        "rows_in": upstream["rows_out"],
        "rows_out": rows["train"] + rows["eval"],
        "rows_train": rows["train"],
        "rows_eval": rows["eval"],
        "dropped": {},
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


def label_counts(split: pa.Table) -> dict[str, int]:
    """{"pairs", "desirable", "undesirable"} row counts of a tokenized split, from its label column only
    (null for a pair, true or false for an unpaired row)."""
    label = split["label"]
    desirable = int(pc.sum(label).as_py() or 0)
    return {"pairs": label.null_count, "desirable": desirable, "undesirable": len(label) - label.null_count - desirable}


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
