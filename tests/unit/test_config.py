"""Configs: every shipped YAML loads; unknown keys and bad types fail naming the key's path."""

from pathlib import Path

import pytest

from pipeline.config import Config, ConfigError, load_config
from pipeline.stages import by_name


def stage_hash(config: Config, stage: str) -> str:
    return by_name(stage).config_hash(config)


CONFIGS = sorted(Path(__file__).resolve().parents[2].joinpath("configs").glob("*.yaml"))


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


@pytest.mark.parametrize(
    "old,new",
    [("train.chunked_logprobs", "train.chunked_logps"), ("score.logprob_chunk_size", "score.logps_chunk_size")],
)
def test_renamed_key_names_the_new_one(old, new):
    with pytest.raises(ConfigError, match=f"{old}: renamed to {new}"):
        load_config(None, [f"{old}=1"])


def test_scale_keys_load_typed():
    config = load_config(
        None,
        [
            "train.strategy=fsdp",
            "train.cpu_offload=true",
            "score.gpus_per_actor=4",
            "train.lora={r: 8, alpha: 16, dropout: 0.05, target_modules: [q_proj, v_proj]}",
            "evaluate.gpus_per_actor=2",
        ],
    )
    assert (config.train.strategy, config.train.cpu_offload) == ("fsdp", True)
    assert (
        config.train.lora.r == 8
        and config.train.lora.target_modules == ["q_proj", "v_proj"]
        and config.train.lora.merge
    )
    assert (config.score.gpus_per_actor, config.evaluate.gpus_per_actor) == (4.0, 2.0)
    assert load_config(None).train.lora is None  # absent: full fine-tuning
    assert load_config(None, ["train.lora={}"]).train.lora.target_modules == "all-linear"


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.strategy=zero3", r"^train\.strategy: 'zero3' is not one of ddp, fsdp"),
        ("train.cpu_offload=true", r"^train\.cpu_offload: .* needs train\.strategy: fsdp"),
        ("train.lora={r: 0}", r"^train\.lora\.r: 0; the rank must be at least 1"),
        ("train.lora={dropout: 1.0}", r"^train\.lora\.dropout: 1; must be in \[0, 1\)"),
        ("train.lora={target_modules: all}", r"^train\.lora\.target_modules: 'all'; give all-linear"),
        ("train.lora={rank: 8}", r"^train\.lora\.rank: unknown key"),
        ("score.gpus_per_actor=1.5", r"^score\.gpus_per_actor: 1\.5 GPUs; give a fraction up to 1 or a whole number"),
        ("evaluate.gpus_per_actor=0", r"^evaluate\.gpus_per_actor: 0 GPUs"),
    ],
)
def test_invalid_scale_keys_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])
