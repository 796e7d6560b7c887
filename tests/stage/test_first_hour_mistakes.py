"""A new user's mistakes, each refused before Ray starts with one line naming the key to change, exit 2.

Every row of the table is a real `dpo` command (in this process, through `pipeline.cli.main`) on a tiny local
model and a small data file, with one thing wrong. The test asserts the error line, the exit code, and that
no Ray was started. How fast the line comes is measured in docs/first-hour.md, not asserted here.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import ray

from pipeline.cli.main import main
from tests.helpers.tiny import write_pairs


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("first_hour")
    pairs = write_pairs(root / "prefs.jsonl", 48)
    renamed = root / "renamed.jsonl"
    renamed.write_text(
        "".join(
            json.dumps({"question": r["prompt"], "preferred": r["chosen"], "dispreferred": r["rejected"]}) + "\n"
            for r in map(json.loads, pairs.read_text().splitlines())
        )
    )
    chat = root / "chat.jsonl"
    chat.write_text(
        "".join(
            json.dumps(
                {
                    "prompt": [{"role": "user", "content": f"review {i}"}],
                    "chosen": [{"role": "assistant", "content": "great"}],
                    "rejected": [{"role": "assistant", "content": "awful"}],
                }
            )
            + "\n"
            for i in range(20)
        )
    )
    not_a_model = root / "not_a_model"
    not_a_model.mkdir()
    (not_a_model / "notes.txt").write_text("weights elsewhere")
    config = root / "mine.yaml"
    config.write_text(
        json.dumps(  # JSON is YAML
            {
                "run_dir": str(root / "run"),
                "data": {"path": str(pairs), "eval_fraction": 0.2},
                "model": {"path": str(tiny_model_dir)},
                "tokenize": {"max_prompt_length": 16, "max_length": 64},
                "train": {"loss": "dpo", "batch_size": 8, "micro_batch_size": 4, "max_steps": 2},
                "ray": {"num_cpus": 2},
            }
        )
    )
    return {
        "config": config,
        "pairs": pairs,
        "renamed": renamed,
        "chat": chat,
        "not_a_model": not_a_model,
        "root": root,
        "model": Path(tiny_model_dir),
    }


# (name, command and overrides with {placeholders} from `files`, the error line expected: a regex)
MISTAKES = [
    ("missing --config file", "run --config {root}/nope.yaml", r"run: --config .*/nope\.yaml: no such file"),
    ("train before score", "train", r"train: needs a finished score stage under .*/run/score; run `dpo score` first"),
    (
        "a folder that is not a model",
        "run --set model.path={not_a_model}",
        r"tokenize: model\.path: .*/not_a_model is a folder but not a Hugging Face model \(no config\.json in it\); "
        r"set model\.path",
    ),
    (
        "one CPU for the local Ray",
        "tokenize --set ray.num_cpus=1",
        r"tokenize: ray\.num_cpus: 1: a local Ray needs 2 CPUs or more .*; set ray\.num_cpus: 2",
    ),
    (
        "a hub id, offline",
        "run --set model.path=my-org/my-sft-model",
        r"tokenize: model\.path: my-org/my-sft-model is not found locally and the hub is unreachable; set model\.path",
    ),
    (
        "a reference that is not there",
        "run --set model.ref_path={root}/missing_ref",
        r"score: model\.ref_path: .*/missing_ref: no such folder .*; set model\.ref_path",
    ),
    (
        "columns under other names",
        "run --set data.path={renamed}",
        r"tokenize: the first 48 rows of .*renamed\.jsonl lack the fields of any format \(columns found: question, "
        r"preferred, dispreferred\); set data\.columns: "
        r"\{prompt: question, chosen: preferred, rejected: dispreferred\}",
    ),
    (
        "a mapping to a column that is not there",
        "run --set data.path={renamed} --set 'data.columns={{chosen: better}}'",
        r"tokenize: data\.columns maps chosen: 'better', which is not a column of .*renamed\.jsonl \(columns found: "
        r"question, preferred, dispreferred\)",
    ),
    (
        "conversational rows, no chat template",
        "run --set data.path={chat}",
        r"tokenize: rows of .*chat\.jsonl hold message lists \(conversational\), but the tokenizer at .* has no chat "
        r"template; set data\.chat_template",
    ),
    (
        "a data file that is not there",
        "run --set data.path={root}/prefs.jsonl.gz",
        r"tokenize: data\.path: .*: no such file",
    ),
    (
        "kto on pairs",
        "run --set train.loss=kto",
        r"train: train\.loss: kto trains on unpaired \(prompt, completion, label\) rows, "
        r"but .*prefs\.jsonl holds pairs",
    ),
    (
        "eval_fraction 0",
        "run --set data.eval_fraction=0",
        r"evaluate: data\.eval_fraction is 0 and data\.eval_split is not set: no prompt is held out.*"
        r"set data\.eval_fraction",
    ),
    (
        "run_dir that cannot be written",
        "run --set run_dir={pairs}/run",
        r"run: run_dir: .*prefs\.jsonl/run cannot be made: .*prefs\.jsonl is a file, not a folder; set run_dir",
    ),
    ("lr schedule", "run --set train.lr_schedule=cosin", r"train: train\.lr_schedule: 'cosin' is not one of cosine"),
    ("nonfinite", "run --set train.nonfinite=ignore", r"train: train\.nonfinite: 'ignore' is not one of error, skip"),
    ("strategy", "run --set train.strategy=zero3", r"run: train\.strategy: 'zero3' is not one of ddp, fsdp"),
    ("unknown loss", "run --set train.loss=dpoo", r"train: train\.loss: unknown loss 'dpoo'; known losses: "),
    ("beta of a loss", "run --set train.beta=0", r"train: train\.beta: 0(\.0)?; dpo needs 0 < beta"),
    (
        "batch layout",
        "run --set train.micro_batch_size=3",
        r"train: train\.batch_size \(8\) must be num_workers \(1\) x micro_batch_size \(3\)",
    ),
    ("unknown judge", "run --set evaluate.judge=gpt4", r"evaluate: evaluate\.judge: unknown judge 'gpt4' \(known: api"),
    (
        "judge settings without the judge",
        "run --set 'evaluate.judge_api={{base_url: http://127.0.0.1:9/v1, model: m}}'",
        r"evaluate: evaluate\.judge_api is set but evaluate\.judge is not set; set evaluate\.judge: api",
    ),
    (
        "best-of-N without a reward",
        "run --set evaluate.best_of_n=4",
        r"evaluate: evaluate\.best_of_n needs evaluate\.reward",
    ),
    (
        "a context longer than the model's",
        "run --set tokenize.max_length=512",
        r"tokenize: tokenize\.max_length \(512\) is beyond the context of the model at .* \(128 positions",
    ),
    ("an unknown data format", "run --set data.format=sharegpt", r"tokenize: data\.format must be one of auto, "),
    ("an unknown tracker", "run --set train.report_to=[comet]", r"train: train\.report_to: unknown tracker 'comet'"),
]


@pytest.mark.parametrize(("name", "command", "expected"), MISTAKES, ids=[m[0] for m in MISTAKES])
def test_a_mistake_is_one_line_naming_the_key_exit_2_and_no_ray(files, capsys, monkeypatch, name, command, expected):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network here either way; this makes "offline" certain
    monkeypatch.setenv("HF_HOME", str(files["root"] / "hf_home"))  # an empty hub cache
    argv = shlex.split(command.format(**{k: str(v) for k, v in files.items()}))
    if "--config" not in argv:
        argv[1:1] = ["--config", str(files["config"])]
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1, err  # one line: no traceback, no chatter
    assert re.fullmatch(r"dpo: error: " + expected + r".*", lines[0]), lines[0]
    assert not ray.is_initialized()
