"""Configs: every shipped YAML loads; unknown keys and bad types fail naming the key's path."""

from pathlib import Path

import pytest

from pipeline.config import Config, ConfigError, load_config
from pipeline.stages import by_name


def stage_hash(config: Config, stage: str) -> str:
    return by_name(stage).config_hash(config)

pytestmark = pytest.mark.unit
CONFIGS = sorted(Path(__file__).parent.parent.joinpath("configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    config = load_config(path)
    assert isinstance(config, Config)
    assert "${run_dir}" not in config.data.path + config.model.path


def test_unknown_key_names_its_path(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  bta: 0.1\n")
    with pytest.raises(ConfigError, match=r"^train\.bta: unknown key"):
        load_config(path)


def test_unknown_top_level_section(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("trian: {}\n")
    with pytest.raises(ConfigError, match=r"^trian: unknown key"):
        load_config(path)


def test_wrong_type_names_its_path():
    with pytest.raises(ConfigError, match=r"train\.beta: expected a number"):
        load_config(None, ["train.beta=high"])
    with pytest.raises(ConfigError, match=r"evaluate\.temperatures\[1\]: expected a number"):
        load_config(None, ["evaluate.temperatures=[0.0, hot]"])


def test_overrides_and_interpolation(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run_dir: runs/a\ndata:\n  path: ${run_dir}/pairs.jsonl\ntrain:\n  beta: 0.1\n")
    config = load_config(path, ["train.beta=0.5", "run_dir=runs/b", "train.loss={dpo: 1.0, sft: 0.1}"])
    assert config.train.beta == 0.5
    assert load_config(None, ["train.learning_rate=1e-6"]).train.learning_rate == 1e-6  # YAML 1.1 reads a string
    assert config.data.path == str(Path("runs/b/pairs.jsonl").absolute())  # workers have another cwd
    assert config.train.loss == {"dpo": 1.0, "sft": 0.1}


def test_config_is_read_only():
    config = load_config(None)
    with pytest.raises(AttributeError):
        config.train.beta = 1.0  # type: ignore[misc]


def test_stage_hash_follows_only_its_sections():
    base = load_config(None)
    assert stage_hash(base, "tokenize") == stage_hash(load_config(None, ["train.beta=0.3"]), "tokenize")
    assert stage_hash(base, "train") != stage_hash(load_config(None, ["train.beta=0.3"]), "train")
    assert stage_hash(base, "tokenize") != stage_hash(load_config(None, ["tokenize.max_length=99"]), "tokenize")


def test_resource_settings_do_not_invalidate_finished_stages():
    base = load_config(None)
    moved = load_config(None, ["train.cpus_per_worker=0.5", "train.torch_threads=1", "score.num_actors=4"])
    for stage in ("tokenize", "score", "train", "evaluate"):
        assert stage_hash(base, stage) == stage_hash(moved, stage)


@pytest.mark.parametrize("old,new", [("train.chunked_logprobs", "train.chunked_logps"),
                                     ("score.logprob_chunk_size", "score.logps_chunk_size")])
def test_renamed_key_names_the_new_one(old, new):
    with pytest.raises(ConfigError, match=f"{old}: renamed to {new}"):
        load_config(None, [f"{old}=1"])
