"""read_records: every supported source in, one record per input row out, unreadable inputs refused early."""

from __future__ import annotations

import gzip
import json
import sys
import types

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import pipeline.cli.schedule as plan
import pipeline.data.sources as sources
from pipeline.config import ConfigError, DataConfig, load_config
from pipeline.data.sources import RECORD_SCHEMA, InputError, hub_dataset, input_fingerprint, plan_inputs, read_records
from tests.helpers.datasets_on_disk import write_dataset_dict, write_save_to_disk

PAIR = {"prompt": "Q?", "chosen": "yes", "rejected": "no"}


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def records(table: pa.Table) -> list[dict]:
    assert table.schema.equals(RECORD_SCHEMA)
    return table.to_pylist()


def test_jsonl_rows_sources_and_raw(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [PAIR, {"prompt": "héllo 😀", "chosen": "a", "rejected": "b"}])
    rows = records(read_records(path))
    assert [r["source"] for r in rows] == [f"{path}:1", f"{path}:2"]
    assert [json.loads(r["raw"]) for r in rows] == [PAIR, {"prompt": "héllo 😀", "chosen": "a", "rejected": "b"}]
    assert "héllo 😀" in rows[1]["raw"]  # ensure_ascii=False: text stays readable
    assert all(r["read_error"] is None for r in rows)


def test_jsonl_bad_lines_are_rows_not_drops(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [
        json.dumps(PAIR).encode(),
        b"",  # blank: a malformed row, counted
        b"{not json",
        b'{"prompt": "\xff\xfe", "chosen": "a", "rejected": "b"}',  # invalid UTF-8
        b"[1, 2]",  # JSON, but not an object: read fine, rejected later as wrong_type
        b'{"score": NaN}',  # NaN is not JSON
        json.dumps(PAIR).encode() + b"\r",  # CRLF line ending
    ]
    path.write_bytes(b"\n".join(lines))  # no newline after the last line
    rows = records(read_records(str(path)))
    assert len(rows) == len(lines)
    assert [r["source"] for r in rows] == [f"{path}:{i}" for i in range(1, 8)]
    assert [r["read_error"] for r in rows] == [
        None,
        "malformed_json",
        "malformed_json",
        "invalid_utf8",
        None,
        "malformed_json",
        None,
    ]
    assert rows[1]["raw"] == ""
    assert rows[2]["raw"] == "{not json"
    assert "\\xff\\xfe" in rows[3]["raw"]
    assert json.loads(rows[4]["raw"]) == [1, 2]
    assert json.loads(rows[6]["raw"]) == PAIR


def test_trailing_newline_is_not_a_row_but_a_blank_line_is(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(PAIR) + "\n\n")
    rows = records(read_records(str(path)))
    assert [r["read_error"] for r in rows] == [None, "malformed_json"]


def test_utf8_bom_is_not_a_parse_error(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(PAIR).encode() + b"\n")
    assert records(read_records(str(path)))[0]["read_error"] is None


def test_lone_surrogate_escape_survives_as_valid_utf8_raw(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a\\ud800b", "chosen": "ü", "rejected": "n"}\n')
    (row,) = records(read_records(str(path)))
    assert row["read_error"] is None  # it parses; process_records rejects it as invalid_utf8
    row["raw"].encode("utf-8")
    assert json.loads(row["raw"])["prompt"] == "a\ud800b"
    assert "ü" in row["raw"]


@pytest.mark.parametrize("name", ["d.jsonl.gz", "d.json.gz"])
def test_gzip_jsonl(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(gzip.compress((json.dumps(PAIR) + "\n" + json.dumps(PAIR) + "\n").encode()))
    rows = records(read_records(str(path)))
    assert [r["source"] for r in rows] == [f"{path}:1", f"{path}:2"]
    assert json.loads(rows[0]["raw"]) == PAIR


def test_json_with_one_object_per_line(tmp_path):
    path = write_jsonl(tmp_path / "d.json", [PAIR, PAIR])
    assert len(read_records(path)) == 2


def test_json_array_file(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([PAIR, {"x": 1}], indent=2))
    rows = records(read_records(str(path)))
    assert [r["source"] for r in rows] == [f"{path}#0", f"{path}#1"]
    assert json.loads(rows[1]["raw"]) == {"x": 1}


def test_parquet_file(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"prompt": ["p1", "p2"], "chosen": ["c1", None], "rejected": ["r1", "r2"]}), path)
    rows = records(read_records(str(path)))
    assert [r["source"] for r in rows] == [f"{path}#0", f"{path}#1"]
    assert json.loads(rows[1]["raw"]) == {"prompt": "p2", "chosen": None, "rejected": "r2"}


def test_parquet_nested_columns_are_json(tmp_path):
    path = tmp_path / "d.parquet"
    messages = [[{"role": "user", "content": "hi"}]]
    scored = [[{"text": "a", "score": 1.5}]]
    pq.write_table(pa.table({"prompt": messages, "completions": scored, "meta": [{"k": 1}]}), path)
    (row,) = records(read_records(str(path)))
    assert json.loads(row["raw"]) == {"prompt": messages[0], "completions": scored[0], "meta": {"k": 1}}


def test_parquet_directory_in_name_order(tmp_path):
    directory = tmp_path / "shards"
    directory.mkdir()
    pq.write_table(pa.table({"prompt": ["second"]}), directory / "part-1.parquet")
    pq.write_table(pa.table({"prompt": ["first"]}), directory / "part-0.parquet")
    (directory / "_SUCCESS").write_text("")
    rows = records(read_records(str(directory)))
    assert [json.loads(r["raw"])["prompt"] for r in rows] == ["first", "second"]
    assert rows[0]["source"] == f"{directory}/part-0.parquet#0"


def test_parquet_invalid_utf8_string_is_a_row_error(tmp_path):
    good = pa.array([b"ok", b"\xffbad", b"fine"], pa.binary()).view(pa.string())  # no validation on view
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"prompt": good, "chosen": ["a", "b", "c"]}), path)
    rows = records(read_records(str(path)))
    assert [r["read_error"] for r in rows] == [None, "invalid_utf8", None]
    assert "\\xff" in rows[1]["raw"] and json.loads(rows[1]["raw"])["chosen"] == "b"


def test_parquet_binary_column_is_an_input_error(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"prompt": pa.array([b"p"], pa.binary()), "chosen": ["c"]}), path)
    with pytest.raises(InputError, match=r"d\.parquet.*'prompt'.*binary"):
        read_records(str(path))


def test_save_to_disk_directory(tmp_path):
    directory = tmp_path / "saved"
    write_save_to_disk(directory, [pa.table({"prompt": ["a", "b"]}), pa.table({"prompt": ["c"]})])
    rows = records(read_records(str(directory)))
    assert [json.loads(r["raw"])["prompt"] for r in rows] == ["a", "b", "c"]
    assert rows[2]["source"] == f"{directory}/data-00001-of-00002.arrow#0"


# Rows as TRL's dataset-format docs write a preference pair, explicit and implicit prompt.
TRAIN_ROWS = [{"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}]
TEST_ROWS = [
    {"chosen": "The sky is blue.", "rejected": "The sky is green."},
    {"chosen": "The grass is green.", "rejected": "The grass is red."},
]


def test_save_to_disk_dataset_dict_reads_the_named_split(tmp_path):
    directory = tmp_path / "dd"
    write_dataset_dict(directory, {"train": TRAIN_ROWS, "test": TEST_ROWS})
    rows = records(read_records(str(directory)))  # "train" unless told otherwise
    assert [json.loads(r["raw"]) for r in rows] == TRAIN_ROWS
    assert rows[0]["source"] == f"{directory}/train/data-00000-of-00001.arrow#0"
    rows = records(read_records(str(directory), split="test"))
    assert [json.loads(r["raw"]) for r in rows] == TEST_ROWS
    with pytest.raises(InputError, match=r"no split 'validation'; its splits are \['test', 'train'\]"):
        read_records(str(directory), split="validation")


def test_a_split_is_refused_where_there_are_none(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [PAIR])
    with pytest.raises(InputError, match=r"d\.jsonl: no split 'test'"):
        read_records(path, split="test")
    saved = tmp_path / "saved"
    write_save_to_disk(saved, [pa.table({"prompt": ["a"]})])  # its state.json says split "train"
    assert read_records(str(saved), split="train").num_rows == 1
    with pytest.raises(InputError, match=r"one saved dataset \(split 'train'\), so no split 'test'"):
        read_records(str(saved), split="test")


def test_save_to_disk_written_by_the_datasets_package(tmp_path):
    datasets = pytest.importorskip("datasets", reason="the `datasets` package (the hub extra) is not installed")
    implicit = [{"chosen": "The sky is blue.", "rejected": "The sky is green."}]
    conversational = [
        {
            "prompt": [{"role": "user", "content": "What color is the sky?"}],
            "chosen": [{"role": "assistant", "content": "It is blue."}],
            "rejected": [{"role": "assistant", "content": "It is green."}],
        }
    ]
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(implicit),
            "test": datasets.Dataset.from_list(conversational),
        }
    ).save_to_disk(str(tmp_path / "dd"))
    assert [json.loads(r["raw"]) for r in records(read_records(str(tmp_path / "dd")))] == implicit
    assert [json.loads(r["raw"]) for r in records(read_records(str(tmp_path / "dd"), split="test"))] == conversational
    datasets.Dataset.from_list(implicit).save_to_disk(str(tmp_path / "one"))
    assert [json.loads(r["raw"]) for r in records(read_records(str(tmp_path / "one")))] == implicit


def test_plan_inputs_puts_the_eval_split_after_the_training_split(tmp_path):
    from pipeline.data.pieces import piece_tables

    directory = tmp_path / "dd"
    write_dataset_dict(directory, {"train": TRAIN_ROWS, "test": TEST_ROWS})
    train, held_out = plan_inputs(DataConfig(path=str(directory), eval_split="test"))
    tables = [t for piece in train + held_out for t in piece_tables(piece)]
    assert [json.loads(raw) for t in tables for raw in t["raw"].to_pylist()] == TRAIN_ROWS + TEST_ROWS
    assert [t["source"].to_pylist() for p in held_out for t in piece_tables(p)] == [
        [f"{directory}/test/data-00000-of-00001.arrow#{i}" for i in range(2)]
    ]
    ordinals = [o for t in tables for o in t["ordinal"].to_pylist()]
    assert ordinals == sorted(ordinals)  # the eval split's rows follow the training split's
    train, held_out = plan_inputs(DataConfig(path=str(directory), split="test"))
    assert sum(t.num_rows for p in train for t in piece_tables(p)) == 2 and held_out == []
    with pytest.raises(ConfigError, match=r"data\.eval_split: 'train' is the split trained on"):
        plan_inputs(DataConfig(path=str(directory), eval_split="train"))


def test_directory_of_jsonl_files_sorted(tmp_path):
    directory = tmp_path / "d"
    directory.mkdir()
    write_jsonl(directory / "b.jsonl", [{"n": 2}, {"n": 3}])
    write_jsonl(directory / "a.jsonl", [{"n": 1}])
    (directory / ".hidden.jsonl").write_text("junk\n")
    rows = records(read_records(str(directory)))
    assert [json.loads(r["raw"])["n"] for r in rows] == [1, 2, 3]
    assert [r["source"] for r in rows] == [f"{directory}/a.jsonl:1", f"{directory}/b.jsonl:1", f"{directory}/b.jsonl:2"]


def test_file_uri(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [PAIR])
    rows = records(read_records(f"file://{path}"))
    assert rows[0]["source"] == f"file://{path}:1"
    assert read_records(f"file://{tmp_path}")["raw"].to_pylist() == read_records(path)["raw"].to_pylist()


def test_explicit_filesystem(tmp_path):
    import pyarrow.fs as pafs

    path = write_jsonl(tmp_path / "d.jsonl", [PAIR])
    assert read_records(path, filesystem=pafs.LocalFileSystem()).num_rows == 1


def test_rereading_gives_identical_tables(tmp_path):
    directory = tmp_path / "d"
    directory.mkdir()
    write_jsonl(directory / "a.jsonl", [PAIR, {"x": "é"}])
    pq.write_table(pa.table({"prompt": ["p"]}), directory / "b.parquet")
    assert read_records(str(directory)).equals(read_records(str(directory)))


def test_input_errors_name_the_file(tmp_path, monkeypatch):
    with pytest.raises(InputError, match=r"nope\.jsonl"):
        read_records(str(tmp_path / "nope.jsonl"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match=r"data/nope\.jsonl: no such file"):
        read_records("data/nope.jsonl")  # looks like owner/name, but names a data file: not the hub
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(InputError, match=r"d\.csv.*unknown file type"):
        read_records(str(tmp_path / "d.csv"))
    (tmp_path / "empty.jsonl").write_bytes(b"")
    with pytest.raises(InputError, match=r"empty\.jsonl.*empty"):
        read_records(str(tmp_path / "empty.jsonl"))
    (tmp_path / "empty.jsonl.gz").write_bytes(gzip.compress(b""))
    with pytest.raises(InputError, match=r"empty\.jsonl\.gz"):
        read_records(str(tmp_path / "empty.jsonl.gz"))
    (tmp_path / "fake.parquet").write_bytes(b"this is not parquet")
    with pytest.raises(InputError, match=r"fake\.parquet"):
        read_records(str(tmp_path / "fake.parquet"))
    (tmp_path / "broken.jsonl.gz").write_bytes(b"not gzip at all")
    with pytest.raises(InputError, match=r"broken\.jsonl\.gz"):
        read_records(str(tmp_path / "broken.jsonl.gz"))
    (tmp_path / "bad.json").write_text('[{"a": 1},')
    with pytest.raises(InputError, match=r"bad\.json"):
        read_records(str(tmp_path / "bad.json"))
    with pytest.raises(InputError, match="foo://"):
        read_records("foo://bucket/d.jsonl")


def test_directory_input_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no data files"):
        read_records(str(empty))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    write_jsonl(mixed / "a.jsonl", [PAIR])
    (mixed / "notes.txt").write_text("x")
    with pytest.raises(InputError, match=r"notes\.txt"):
        read_records(str(mixed))
    nested = tmp_path / "nested"
    (nested / "train").mkdir(parents=True)
    with pytest.raises(InputError, match="subdirectories"):
        read_records(str(nested))
    dataset_dict = tmp_path / "dd"
    (dataset_dict / "train").mkdir(parents=True)
    (dataset_dict / "dataset_dict.json").write_text('{"splits": ["train"]}')
    with pytest.raises(InputError, match=r"no split 'test'; its splits are \['train'\]"):
        read_records(str(dataset_dict), split="test")
    with pytest.raises(InputError, match=r"dd/train: not a saved dataset"):
        read_records(str(dataset_dict))


def test_hub_name_goes_through_datasets_load_dataset(tmp_path, monkeypatch):
    """A bare owner/name that is not a local path is a hub dataset. The fake stands in for `datasets`."""
    calls = []
    table = pa.table({"prompt": ["p0", "p1"], "chosen": ["c", "c"], "rejected": ["r", "r"]})

    class FakeDataset:
        data = table

        def with_format(self, kind):
            assert kind == "arrow"
            return self

        def iter(self, batch_size):
            for start in range(0, table.num_rows, 1):
                yield table.slice(start, 1)

    def load_dataset(name, split):
        calls.append((name, split))
        return FakeDataset()

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.chdir(tmp_path)
    rows = records(read_records("someone/prefs", split="test"))
    assert calls == [("someone/prefs", "test")]
    assert [r["source"] for r in rows] == ["hf://datasets/someone/prefs:test#0", "hf://datasets/someone/prefs:test#1"]
    assert json.loads(rows[1]["raw"])["prompt"] == "p1"
    read_records("hf://datasets/someone/prefs")
    assert calls[-1] == ("someone/prefs", "train")


def test_hub_split_that_is_not_there_names_the_ones_that_are(tmp_path, monkeypatch):
    def load_dataset(name, split):
        raise ValueError(f"Unknown split \"{split}\". Should be one of ['train_prefs', 'test_prefs'].")

    fake = types.SimpleNamespace(
        load_dataset=load_dataset, get_dataset_split_names=lambda name: ["train_prefs", "test_prefs"]
    )
    monkeypatch.setitem(sys.modules, "datasets", fake)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match=r"no split 'train'; its splits are \['train_prefs', 'test_prefs'\]"):
        read_records("someone/prefs")


def test_hub_without_datasets_package_is_an_input_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match="datasets"):
        read_records("someone/prefs")


def test_hub_dataset_is_one_rule_for_what_names_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert hub_dataset("hf://datasets/someone/prefs") == "someone/prefs"
    assert hub_dataset("hf://datasets/someone/prefs/") == "someone/prefs"
    assert hub_dataset("someone/prefs") == "someone/prefs"  # no such local path
    for not_hub in (
        "hf://datasets/",
        "hf://models/x/y",
        "s3://b/k",
        "data/train.jsonl",
        "some/dir/train.jsonl",
        "Data/Train.PARQUET",
        "prefs",
        "/abs/prefs",
    ):
        assert hub_dataset(not_hub) is None, not_hub
    (tmp_path / "someone" / "prefs").mkdir(parents=True)
    assert hub_dataset("someone/prefs") is None  # a local path wins


def test_a_missing_data_file_is_refused_before_ray_starts(tmp_path, monkeypatch):
    """ "data/train.jsonl" has the shape of owner/name, but names a data file: missing, not a hub dataset."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(plan, "init_ray", lambda *a, **k: pytest.fail("Ray started before the input was checked"))
    for missing in ("data/train.jsonl", "some/dir/train.jsonl"):
        config = load_config(None, [f"run_dir={tmp_path / 'run'}", f"data.path={missing}"])
        with pytest.raises(InputError, match=f"{missing}: no such file or directory"):
            plan.run_stages(config, ("tokenize",), force=False)
    for present in ("someone/prefs", "hf://datasets/someone/prefs"):  # hub datasets: read later, by `datasets`
        plan.check_input(present)


def test_fingerprint_of_a_hub_dataset_is_its_name_with_no_network(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sources, "pafs", None)  # any pyarrow filesystem (hf:// lists over the network) fails
    monkeypatch.setitem(sys.modules, "datasets", None)
    by_uri = input_fingerprint("hf://datasets/someone/prefs")
    assert by_uri == input_fingerprint("someone/prefs")  # the same dataset, the same name hashed
    assert by_uri != input_fingerprint("hf://datasets/someone/other")
