"""The data plane on a local Ray: tokenize and score shards are the same bytes whatever the number of actors,
the batch boundaries and the run; every input row is accounted for; an input that breaks midway is the
user's error, named."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from pipeline.cli.main import main
from pipeline.config import load_config
from pipeline.runtime.storage import RunDir, read_parquet_dir
from pipeline.stages import SCORE, TOKENIZE
from pipeline.stages.tokenize import rejected_rows
from tests.helpers.tiny import write_pairs


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from pipeline.config import RayConfig
    from pipeline.runtime.ray_setup import init_ray

    init_ray(RayConfig(num_cpus=2))
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Two files: 90 pairs, then bad rows and copies of pairs, a copy across the files too."""
    root = tmp_path_factory.mktemp("plane")
    directory = root / "data"
    directory.mkdir()
    write_pairs(directory / "a.jsonl", 90)
    first = (directory / "a.jsonl").read_text().splitlines()[0]
    (directory / "b.jsonl").write_text(
        "\n".join([first, "{not json", json.dumps({"prompt": "p", "chosen": " x", "rejected": " x"}), first]) + "\n"
    )
    return directory


def overrides(run_dir: Path, data: Path, model: Path, *more: str) -> list[str]:
    return [
        f"run_dir={run_dir}",
        f"data.path={data}",
        f"model.path={model}",
        "data.eval_fraction=0.25",
        "tokenize.max_prompt_length=16",
        "tokenize.max_length=64",
        "tokenize.num_shards=3",
        "score.batch_size=4",
        *more,
    ]


def stage_files(run_dir: Path) -> dict[str, bytes]:
    """Every file the two stages wrote but their manifests (which hold the time of the commit)."""
    return {
        str(p.relative_to(run_dir)): p.read_bytes()
        for stage in ("tokenize", "score")
        for p in sorted((run_dir / stage).rglob("*"))
        if p.is_file() and p.name != "manifest.json"
    }


def test_shards_are_the_same_bytes_whatever_the_actors_the_batches_and_the_run(
    ray_local, data, tiny_model_dir, tmp_path
):
    one = load_config(
        None, overrides(tmp_path / "one", data, tiny_model_dir, "tokenize.num_actors=1", "score.shard_rows=16")
    )
    two = load_config(
        None,
        overrides(
            tmp_path / "two",
            data,
            tiny_model_dir,
            "tokenize.num_actors=2",
            "tokenize.batch_size=7",  # other batch boundaries
            "score.num_actors=2",
            "score.shard_rows=16",
        ),
    )
    manifests = {}
    for name, config in (("one", one), ("two", two)):
        manifests[name] = TOKENIZE.run(config), SCORE.run(config)
    files = stage_files(tmp_path / "one")
    assert any(name.startswith("tokenize/train/part-00002") for name in files)  # three shards a split
    assert sum(name.startswith("score/train/") for name in files) > 3  # several units of 16 rows
    assert files == stage_files(tmp_path / "two")
    TOKENIZE.run(one, force=True)
    assert stage_files(tmp_path / "one") == files  # and again, the same bytes

    tokenized, scored = manifests["one"]
    assert tokenized["rows_in"] == 94 == tokenized["rows_out"] + sum(tokenized["dropped"].values())
    assert tokenized["dropped"] == {"duplicate_pair": 2, "identical_responses": 1, "malformed_json": 1}
    assert scored["checksums"] == tokenized["checksums"]
    run = RunDir(str(tmp_path / "one"))
    assert sorted(r["source"].rsplit("/", 1)[1] for r in rejected_rows(run)) == [f"b.jsonl:{i}" for i in (1, 2, 3, 4)]
    for split in ("train", "eval"):
        ids = read_parquet_dir(run, f"tokenize/{split}")["id"].to_pylist()
        assert ids == sorted(ids) and len(ids) == tokenized[f"rows_{split}"]  # content-hash order across shards
        assert read_parquet_dir(run, f"score/{split}")["id"].to_pylist() == ids


def test_an_input_that_breaks_midway_is_one_error_line_naming_it(ray_local, tiny_model_dir, tmp_path, capsys):
    broken = tmp_path / "d.jsonl.gz"
    good = gzip.compress(
        b"".join(json.dumps({"prompt": f"p{i}", "chosen": " a", "rejected": " b"}).encode() + b"\n" for i in range(200))
    )
    broken.write_bytes(good[: len(good) // 2])  # a gzip stream cut short: only reading it shows
    code = main(
        [
            "tokenize",
            "--config",
            str(Path(__file__).parents[2] / "configs" / "demo_smoke.yaml"),
            "--set=demo.enabled=false",
            *(f"--set={o}" for o in overrides(tmp_path / "run", broken, tiny_model_dir)),
        ]
    )
    assert code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"dpo: error: tokenize: {broken}: cannot read"), last
    assert RunDir(str(tmp_path / "run")).manifest("tokenize") is None


def test_a_context_the_config_file_leaves_to_its_class_default_is_still_checked(ray_local, tiny_model_dir, tmp_path):
    """The driver reads the context from config.json; where the file names none (GPT-2's class default, 1024
    positions), transformers is asked in a Ray task, and a max_length beyond it is refused all the same."""
    import shutil

    from pipeline.config import ConfigError
    from pipeline.stages.tokenize import check_context, model_context

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    config_file = model / "config.json"
    fields = json.loads(config_file.read_text())
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):
        fields.pop(name, None)
    config_file.write_text(json.dumps(fields))
    config = load_config(None, [f"model.path={model}", "tokenize.max_length=2048"])
    assert model_context(config)[0] == 1024
    with pytest.raises(ConfigError, match=r"tokenize.max_length \(2048\) is beyond the context .* at most 1024"):
        check_context(config)
