"""A round's first stages on a local Ray with tiny models: the prompt set with its rejections counted,
generate (seeded: a rerun draws the same completions), label by a reward model in an actor pool (the scores
are the model's own) and by a local judge model (its unreadable replies counted), and tokenize making best
vs worst pairs from the labels."""

from __future__ import annotations

import dataclasses
import functools
import json

import pyarrow.parquet as pq
import pytest

from pipeline.config import load_config
from pipeline.model.pretrained import load_tokenizer
from pipeline.model.reward_model import RewardModel
from pipeline.rounds.layout import chain_hash, round_config
from pipeline.runtime.storage import RunDir, read_parquet_dir
from pipeline.stages import TOKENIZE
from pipeline.stages.generate import GENERATE, generate_body
from pipeline.stages.label import LABEL
from pipeline.stages.prompts import PROMPTS_STAGE
from tests.helpers.rounds import make_tiny_reward_model_dir, write_prompt_set


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from pipeline.config import RayConfig
    from pipeline.runtime.ray_setup import init_ray

    init_ray(RayConfig(num_cpus=2))
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def config(tmp_path_factory, tiny_model_dir, ray_local):
    root = tmp_path_factory.mktemp("round_stages")
    prompts = write_prompt_set(root / "prompts.jsonl", 14)
    first = json.loads(prompts.read_text().splitlines()[0])
    bad = [{"prompt": " "}, first, {"prompt": "wonderful " * 20}, {"instruction": "x"}]
    with prompts.open("a") as f:
        f.writelines(json.dumps(row) + "\n" for row in bad)
    reward_model = make_tiny_reward_model_dir(root / "rm")
    return load_config(
        None,
        [
            f"run_dir={root / 'run'}",
            f"data.path={prompts}",
            f"model.path={tiny_model_dir}",
            "tokenize.max_prompt_length=16",
            "tokenize.max_length=64",  # room for a completion whose text tokenizes longer again
            "rounds.count=1",
            "rounds.prompts=8",
            "rounds.samples_per_prompt=4",
            "rounds.eval_prompts=4",
            "generate.max_tokens=10",
            "generate.batch_size=3",
            "label.kind=reward_model",
            f"label.model={reward_model}",
            "label.batch_size=5",
        ],
    )


def generate(config, *, force: bool = False) -> dict:
    here = round_config(config, 1)
    return GENERATE.run(
        here,
        force=force,
        data_dir=RunDir(config.run_dir),
        out_dir=RunDir(here.run_dir),
        upstream_hash=chain_hash("test", 1),
        body=functools.partial(generate_body, round_index=1),
    )


@pytest.fixture(scope="module")
def generated(config):
    prompts = PROMPTS_STAGE.run(config)
    return prompts, generate(config)


def completions(config) -> dict[str, list]:
    table = read_parquet_dir(RunDir(round_config(config, 1).run_dir), "generate/completions")
    return {row["id"]: row for row in table.to_pylist()}


def test_the_prompt_set_counts_what_it_refuses_and_holds_prompts_out(generated, config):
    prompts, _ = generated
    assert prompts["rows_in"] == 18
    assert prompts["dropped"] == {"duplicate_prompt": 1, "empty_prompt": 1, "missing_field": 1, "prompt_too_long": 1}
    assert (prompts["rows_eval"], prompts["rows_pool"]) == (4, 10)
    rejected = RunDir(config.run_dir).read_text("prompts/rejected.jsonl").splitlines()
    assert sorted(json.loads(line)["reason"] for line in rejected) == sorted(prompts["dropped"])
    held = set(read_parquet_dir(RunDir(config.run_dir), "prompts/eval")["prompt_text"].to_pylist())
    rows = completions(config).values()
    assert len(rows) == 8 and not held & {r["prompt_text"] for r in rows}  # no round samples a held-out prompt


def test_generate_draws_n_completions_per_prompt_and_the_same_ones_again(generated, config):
    _, manifest = generated
    assert (manifest["rows_out"], manifest["completions"]) == (8, 32)
    tokenizer = load_tokenizer(config.model.path)
    first = completions(config)
    for row in first.values():
        assert len(row["texts"]) == len(row["completion_ids"]) == len(row["logps"]) == 4
        for text, ids in zip(row["texts"], row["completion_ids"]):
            assert 1 <= len(ids) <= 10 and text == tokenizer.decode(ids, skip_special_tokens=True)
    assert generate(config)["manifest_hash"] == manifest["manifest_hash"]  # finished: skipped
    generate(config, force=True)
    again = completions(config)
    assert {k: v["completion_ids"] for k, v in again.items()} == {k: v["completion_ids"] for k, v in first.items()}


@pytest.fixture(scope="module")
def labelled(generated, config):
    here = round_config(config, 1)
    return LABEL.run(here), TOKENIZE.run(here)


def scored_rows(config) -> list[dict]:
    here = RunDir(round_config(config, 1).run_dir)
    return [json.loads(line) for line in here.read_text("label/scored/part-00000.jsonl").splitlines()]


def test_the_reward_model_labels_every_completion_with_its_own_output(labelled, config):
    label, _ = labelled
    assert (label["rows_out"], label["completions"]) == (8, 32) and label["labeller"].startswith("reward model")
    rows = scored_rows(config)
    rm = RewardModel(config.label.model)
    for row in rows:
        texts = [c["text"] for c in row["completions"]]
        assert [c["score"] for c in row["completions"]] == pytest.approx(
            rm.score([row["prompt"]] * 4, texts).tolist(), abs=1e-5
        )


def test_tokenize_pairs_each_prompts_best_completion_with_its_worst(labelled, config):
    _, tokenized = labelled
    rows = scored_rows(config)
    here = RunDir(round_config(config, 1).run_dir)
    pairs = pq.read_table(here.path("tokenize", "train", "part-00000.parquet")).to_pylist()
    assert tokenized["rows_in"] == 8 and tokenized["rows_out"] + sum(tokenized["dropped"].values()) == 8
    tokenizer = load_tokenizer(config.model.path)
    for pair in pairs:
        line = int(pair["source"].rsplit(":", 1)[1])
        row = rows[line - 1]
        best = max(row["completions"], key=lambda c: c["score"])["text"]
        worst = min(row["completions"], key=lambda c: c["score"])["text"]
        decode = functools.partial(tokenizer.decode, skip_special_tokens=True)
        assert decode(pair["prompt_ids"] + pair["chosen_ids"]) == row["prompt"] + best
        assert decode(pair["prompt_ids"] + pair["rejected_ids"]) == row["prompt"] + worst


def test_a_local_judge_model_s_unreadable_replies_are_counted_and_rank_nothing(labelled, config, tiny_model_dir):
    judged = round_config(config, 1)
    judged = judged.replace(
        label=dataclasses.replace(
            judged.label, kind="judge", judge="local", model=str(tiny_model_dir), judge_max_tokens=6
        )
    )
    manifest = LABEL.run(judged)
    counts = manifest["judge"]
    # An untrained model never writes "Preferred: A": every comparison it was asked is unparsed, a tie.
    assert counts["comparisons"] + counts["identical"] == 8 * 6
    assert counts["unparsed"] == counts["comparisons"] and counts["decided"] == 0
    assert manifest["prompts_without_spread"] == 8
    assert all(c["score"] == 0.5 for row in scored_rows(config) for c in row["completions"])
