"""An input read as pieces on many workers: the same records as one reader, numbered so that a lost or repeated
piece shows, and the score stage's units of work planned from row counts alone."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

import pipeline.data.readers as readers
from pipeline.data.pieces import piece_tables, plan_pieces, split_ordinals
from pipeline.data.score_units import plan_units
from pipeline.data.sources import read_records

PAIR = {"prompt": "Q?", "chosen": "yes", "rejected": "no"}


def all_tables(path: str) -> list[pa.Table]:
    return [table for piece in plan_pieces(path) for table in piece_tables(piece, rows=3)]


def test_a_parquet_file_is_read_in_runs_of_row_groups_numbered_as_one_file(tmp_path, monkeypatch):
    monkeypatch.setattr("pipeline.data.pieces.PIECE_ROWS", 4)
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"prompt": [f"p{i}" for i in range(10)]}), path, row_group_size=2)
    pieces = plan_pieces(str(path))
    assert [p.row_groups for p in pieces] == [(0, 1), (2, 3), (4,)]
    assert [p.first_row for p in pieces] == [0, 4, 8] and [p.last for p in pieces] == [False, False, True]
    tables = all_tables(str(path))
    rows = pa.concat_tables(tables)
    assert rows["source"].to_pylist() == [f"{path}#{i}" for i in range(10)]
    assert rows.select(["source", "raw", "read_error"]).equals(read_records(str(path)))  # as one reader reads it
    files, numbers = split_ordinals(rows["ordinal"].to_numpy())
    assert files.tolist() == [0] * 10 and numbers.tolist() == list(range(10))
    assert rows["last_in_file"].to_pylist() == [False] * 9 + [True]  # only the file's last row, in the last piece


def test_jsonl_read_in_chunks_keeps_every_line_across_chunk_boundaries(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "CHUNK_BYTES", 7)  # lines straddle the chunks
    directory = tmp_path / "d"
    directory.mkdir()
    lines = [json.dumps({**PAIR, "prompt": f"q{i}"}) for i in range(8)] + ["", "{not json"]
    (directory / "a.jsonl").write_text("\n".join(lines) + "\n")
    (directory / "b.jsonl").write_text(json.dumps(PAIR))  # no newline after the last line
    rows = pa.concat_tables(all_tables(str(directory)))
    assert [json.loads(r) for r in rows["raw"].to_pylist()[:8]] == [json.loads(line) for line in lines[:8]]
    assert rows["read_error"].to_pylist()[8:] == ["malformed_json", "malformed_json", None]
    assert rows["source"].to_pylist()[-1] == f"{directory}/b.jsonl:1"
    files, numbers = split_ordinals(rows["ordinal"].to_numpy())
    assert files.tolist() == [0] * 10 + [1] and numbers.tolist() == [*range(10), 0]
    assert rows["last_in_file"].to_pylist() == [False] * 9 + [True, True]


def test_units_cut_the_shards_of_each_split_in_order_and_each_knows_the_row_after_it():
    files = {
        "train/part-00000.parquet": {"rows": 5},
        "train/part-00002.parquet": {"rows": 3},
        "train/part-00001.parquet": {"rows": 0},  # an empty shard gives no unit
        "eval/part-00000.parquet": {"rows": 2},
        "rejected/part-00000.jsonl": {"bytes": 10},
    }
    units = plan_units(files, split="train", shard_rows=2)
    assert [(u.source, u.start, u.stop) for u in units] == [
        ("train/part-00000.parquet", 0, 2),
        ("train/part-00000.parquet", 2, 4),
        ("train/part-00000.parquet", 4, 5),
        ("train/part-00002.parquet", 0, 2),
        ("train/part-00002.parquet", 2, 3),
    ]
    assert [u.name for u in units] == sorted(u.name for u in units)  # name order is the split's order
    assert [u.after for u in units] == [
        ("train/part-00000.parquet", 2),
        ("train/part-00000.parquet", 4),
        ("train/part-00002.parquet", 0),
        ("train/part-00002.parquet", 2),
        ("train/part-00000.parquet", 0),  # the last unit's next row is the split's first
    ]
    assert [u.name for u in plan_units(files, split="eval", shard_rows=4)] == ["eval/part-00000-00000.parquet"]
