"""`dpo init <data file>`: a starter config whose format, columns, loss and sizes fit the file, which loads as
a config, and which names no judge; columns that fit no format are refused naming what was found."""

from __future__ import annotations

import json

import pytest
import yaml

from pipeline.cli.starter import starter_config, write_starter
from pipeline.config import ConfigError, load_config


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def written(tmp_path, rows, **kwargs) -> tuple[dict, str]:
    text, summary = starter_config(str(jsonl(tmp_path / "mine.jsonl", rows)), **kwargs)
    (tmp_path / "mine.yaml").write_text(text)
    load_config(tmp_path / "mine.yaml")  # every key known, every value of its type
    return yaml.safe_load(text), summary


def test_pairs_under_our_names(tmp_path):
    config, summary = written(
        tmp_path, [{"prompt": f"q{i}", "chosen": " a", "rejected": " b"} for i in range(300)], model="my-org/sft"
    )
    assert summary == "format standard, 300 rows, loss dpo"
    assert config["data"]["format"] == "standard" and config["data"]["columns"] == {}
    assert config["model"]["path"] == "my-org/sft" and config["train"]["loss"] == "dpo"
    assert config["data"]["eval_fraction"] == 0.07  # about 20 of 300 held out
    assert config["train"]["batch_size"] == 32 and config["evaluate"]["judge"] is None


def test_columns_under_other_names_get_the_mapping_that_fits(tmp_path):
    rows = [{"question": f"q{i}", "preferred": " a", "dispreferred": " b"} for i in range(12)]
    config, summary = written(tmp_path, rows)
    assert config["data"]["columns"] == {"prompt": "question", "chosen": "preferred", "rejected": "dispreferred"}
    assert config["data"]["eval_fraction"] == 0.2 and config["train"]["batch_size"] == 4  # small data, small batch
    assert config["model"]["path"] == ""  # to be set: `dpo run` then says model.path is not set
    assert "columns {prompt: question, chosen: preferred, rejected: dispreferred}" in summary


def test_messages_and_unpaired_rows(tmp_path):
    chat = [{"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "a"}],
             "rejected": [{"role": "assistant", "content": "b"}]}] * 5  # fmt: skip
    assert written(tmp_path, chat)[0]["data"]["format"] == "conversational"
    unpaired = [{"prompt": "q", "completion": " a", "label": i % 2 == 0} for i in range(40)]
    config, _ = written(tmp_path, unpaired)
    assert config["data"]["format"] == "unpaired" and config["train"]["loss"] == "kto"


def test_columns_that_fit_nothing_are_refused_naming_them(tmp_path):
    path = jsonl(tmp_path / "odd.jsonl", [{"text": "x", "score": 1}] * 3)
    with pytest.raises(ConfigError, match=r"lack the fields of any format \(columns found: text, score\)"):
        starter_config(str(path))


def test_an_existing_file_is_not_overwritten(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    jsonl(tmp_path / "prefs.jsonl", [{"prompt": "q", "chosen": " a", "rejected": " b"}] * 3)
    assert write_starter("prefs.jsonl", output=None, model=None, force=False).startswith("wrote prefs.yaml: ")
    with pytest.raises(ConfigError, match=r"prefs\.yaml exists; name another with --output, or --force"):
        write_starter("prefs.jsonl", output=None, model=None, force=False)
