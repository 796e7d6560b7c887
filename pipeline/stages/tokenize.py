"""Stage 1, tokenize: preference rows in any supported format -> token-id shards, every row accounted for.

Reading happens on the driver (so an unreadable input fails before any Ray work); tokenizing runs as a
Ray Data actor pool over record batches (`pipeline.data.encode.process_records`, a pure function);
deduplication, the train/eval split and the audit need the whole set and run on the driver.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from pipeline.config import Config
from pipeline.data.schemas import TOKENIZED
from pipeline.data.sources import read_records
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
        from pipeline.data.encode import process_records

        return process_records(batch, self.tokenizer, **self.options)


def input_fingerprint(path: str) -> str:
    """Hash of the input files' names, sizes and modification times: a changed input reruns the stage.

    A name that is neither a local path nor a URI is taken as a hub dataset and hashed by name.
    """
    import os

    import pyarrow.fs as pafs

    if "://" in path:
        fs, root = pafs.FileSystem.from_uri(path)
    elif os.path.exists(path):
        fs, root = pafs.LocalFileSystem(), os.path.abspath(path)
    else:
        return hashlib.sha256(path.encode()).hexdigest()[:16]
    info = fs.get_file_info(root)
    infos = [info] if info.type == pafs.FileType.File else fs.get_file_info(pafs.FileSelector(root, recursive=True))
    blob = json.dumps(sorted([i.path, i.size, str(i.mtime)] for i in infos if i.type == pafs.FileType.File))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def is_eval(prompt_ids: pa.Array, fraction: float) -> np.ndarray:
    """Held-out membership from a hash of the prompt alone.

    Hashing the prompt (not the pair) keeps every pair of a held-out prompt out of training, and
    adding rows never moves an old row across the split.
    """
    def bucket(ids: list[int]) -> int:
        return int(hashlib.sha256(np.asarray(ids, dtype=np.int32).tobytes()).hexdigest()[:8], 16)

    buckets = np.array([bucket(ids) for ids in prompt_ids.to_pylist()], dtype=np.float64)
    return buckets / 2**32 < fraction


def finish_outcomes(outcomes: pa.Table) -> tuple[pa.Table, pa.Table]:
    """Split good rows from rejected ones and reject later copies of an already seen pair.

    Returns (good rows sorted by id, rejected rows with source, reason and raw text). Sorting by the
    content hash gives a stable order that is also well mixed for training.
    """
    bad_mask = pc.is_valid(outcomes["reason"])
    good = outcomes.filter(pc.invert(bad_mask))
    rejected = outcomes.filter(bad_mask)
    seen: set[str] = set()
    keep = np.ones(good.num_rows, dtype=bool)
    for i, row_id in enumerate(good["id"].to_pylist()):
        if row_id in seen:
            keep[i] = False
        seen.add(row_id)
    if not keep.all():
        dupes = good.filter(pa.array(~keep))
        dupes = dupes.set_column(dupes.schema.get_field_index("reason"), "reason", pa.array(["duplicate_pair"] * dupes.num_rows, pa.string()))
        rejected = pa.concat_tables([rejected, dupes])
        good = good.filter(pa.array(keep))
    good = good.take(pc.sort_indices(good, sort_keys=[("id", "ascending")]))
    return good, rejected


def with_lengths(good: pa.Table) -> pa.Table:
    for name in ("prompt", "chosen", "rejected"):
        good = good.append_column(f"{name}_len", pc.list_value_length(good[f"{name}_ids"]).cast(pa.int32()))
    return good


def audit(good: pa.Table, rejected_reasons: Counter) -> dict:
    """What a user should know about their data before training on it."""

    def histogram(values: np.ndarray) -> dict:
        if len(values) == 0:
            return {"edges": [], "counts": []}
        counts, edges = np.histogram(values, bins=min(20, max(1, len(np.unique(values)))))
        return {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts], "max": int(values.max()), "mean": float(values.mean())}

    lengths = {n: good[f"{n}_len"].to_numpy() for n in ("prompt", "chosen", "rejected")}
    paired = ~pc.is_valid(good["label"]).to_numpy(zero_copy_only=False) if good.num_rows else np.zeros(0, bool)
    chosen_longer = (lengths["chosen"] > lengths["rejected"])[paired]
    return {
        "length_histograms": {n: histogram(v) for n, v in lengths.items()},
        "prompt_truncated": int(pc.sum(good["prompt_truncated"]).as_py() or 0),
        "response_truncated": int(pc.sum(good["response_truncated"]).as_py() or 0),
        "boundary_mismatches": int(pc.sum(good["boundary_mismatch"]).as_py() or 0),
        # DPO learns length if the data rewards it: show the bias before training on it.
        "chosen_longer_share": float(chosen_longer.mean()) if len(chosen_longer) else None,
        "duplicates": int(rejected_reasons.get("duplicate_pair", 0)),
    }


def check_strict(strict: bool | list[str], reasons: Counter) -> None:
    fatal = set(reasons) if strict is True else set(strict or []) & set(reasons)
    if fatal:
        detail = ", ".join(f"{r}: {reasons[r]}" for r in sorted(fatal))
        raise ValueError(f"tokenize.strict: rejected rows ({detail}); see the reasons above or turn strict off")


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
    records = read_records(config.data.path)
    good, rejected = finish_outcomes(tokenize_rows(config, records))
    reasons = Counter(rejected["reason"].to_pylist())
    check_strict(config.tokenize.strict, reasons)
    good = with_lengths(good)
    held_out = is_eval(good["prompt_ids"], config.data.eval_fraction)
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
