"""Which stages `dpo run` executes (--from-stage, --only, --to-stage) and the submission id, without Ray."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.cli.schedule import current_stages, make_plan, plan_run, submission_id
from pipeline.config import ConfigError, load_config
from pipeline.data.sources import input_fingerprint
from pipeline.runtime.storage import RunDir
from pipeline.stages import STAGE_NAMES as STAGES
from pipeline.stages import by_name
from tests.helpers.tiny import write_pairs

NO_SCORE = ("tokenize", "train", "evaluate")
SMOKE = str(Path(__file__).resolve().parents[2] / "configs" / "demo_smoke.yaml")


# ---- the pure plan ---------------------------------------------------------------------------
def test_a_plain_run_starts_at_the_first_stage_not_finished():
    assert make_plan(STAGES, ()).run == STAGES
    plan = make_plan(STAGES, ("tokenize", "score"))
    assert plan.run == ("train", "evaluate") and plan.force == frozenset()
    assert make_plan(STAGES, STAGES).run == ()


def test_from_stage_redoes_that_stage_and_what_follows_and_runs_stale_ones_before_it():
    plan = make_plan(STAGES, STAGES, from_stage="train")
    assert plan.run == ("train", "evaluate") and plan.force == {"train", "evaluate"}
    plan = make_plan(STAGES, ("tokenize",), from_stage="train")
    assert plan.run == ("score", "train", "evaluate") and plan.force == {"train", "evaluate"}


def test_only_redoes_one_stage_and_needs_its_upstream_finished():
    plan = make_plan(STAGES, STAGES, only="score")
    assert plan.run == ("score",) and plan.force == {"score"}
    with pytest.raises(ConfigError, match="--only train: the stage before it, score, is not finished"):
        make_plan(STAGES, ("tokenize",), only="train")
    assert make_plan(STAGES, (), only="tokenize").run == ("tokenize",)  # nothing upstream


def test_to_stage_stops_early():
    assert make_plan(STAGES, (), to_stage="train").run == ("tokenize", "score", "train")
    assert make_plan(STAGES, ("tokenize", "score", "train"), to_stage="train").run == ()
    assert make_plan(STAGES, STAGES, from_stage="score", to_stage="train").run == ("score", "train")
    with pytest.raises(ConfigError, match="comes after --to-stage"):
        make_plan(STAGES, STAGES, from_stage="evaluate", to_stage="train")


def test_bad_combinations_are_errors_naming_the_flag():
    with pytest.raises(ConfigError, match="give one of them"):
        make_plan(STAGES, (), from_stage="train", only="train")
    with pytest.raises(ConfigError, match="--force"):
        make_plan(STAGES, (), from_stage="train", force=True)
    with pytest.raises(
        ConfigError, match=r"--only score: not a stage of this run \(the configured loss needs no reference"
    ):
        make_plan(NO_SCORE, NO_SCORE, only="score")
    assert make_plan(STAGES, STAGES, force=True).force == set(STAGES)


def test_the_nothing_to_do_line_names_the_stages():
    line = make_plan(STAGES, STAGES).describe("s3://b/run")
    assert line == (
        "run s3://b/run: every stage finished (tokenize, score, train, evaluate); nothing to do. "
        "Use --from-stage to redo."
    )
    assert "every stage finished (tokenize, score, train);" in make_plan(STAGES, STAGES, to_stage="train").describe("r")
    assert (
        make_plan(STAGES, ("tokenize",)).describe("r")
        == "run r: running score, train, evaluate; finished already: tokenize"
    )


# ---- the plan read from a run directory ------------------------------------------------------
def fake_finished_run(config, stages=STAGES) -> None:
    """Manifests as the stages commit them (same hashes), without running the stages."""
    run = RunDir(config.run_dir)
    upstream = input_fingerprint(config.data.path)
    for stage in stages:
        writer = run.begin(stage)
        writer.write_text("part.txt", stage)
        upstream = writer.commit(
            {
                "config_hash": by_name(stage).config_hash(config),
                "upstream_hash": upstream,
                "rows_train": 8,
                "rows_eval": 0,
                "rows_out": 8,
            }
        )["manifest_hash"]


@pytest.fixture
def config(tmp_path, tiny_model_dir):
    data = write_pairs(tmp_path / "pairs.jsonl", 8)
    return load_config(None, [f"run_dir={tmp_path / 'run'}", f"data.path={data}", f"model.path={tiny_model_dir}"])


def test_current_stages_follow_the_manifest_chain(config, tmp_path):
    fake_finished_run(config)
    assert current_stages(config, STAGES) == STAGES
    changed = load_config(
        None,
        [
            f"run_dir={config.run_dir}",
            f"data.path={config.data.path}",
            f"model.path={config.model.path}",
            "train.beta=0.5",
        ],
    )
    assert current_stages(changed, STAGES) == ("tokenize", "score")
    assert plan_run(changed).run == ("train", "evaluate")
    # A resource field is not part of the work: still finished.
    moved = load_config(
        None,
        [
            f"run_dir={config.run_dir}",
            f"data.path={config.data.path}",
            f"model.path={config.model.path}",
            "train.cpus_per_worker=0.25",
            "evaluate.max_actors=1",
        ],
    )
    assert plan_run(moved).run == ()
    # A redone upstream stage (new manifest hash) makes everything after it stale.
    RunDir(config.run_dir).fs.delete_file(RunDir(config.run_dir).path("score", "manifest.json"))
    assert current_stages(config, STAGES) == ("tokenize",)
    # So does a changed input file.
    write_pairs(tmp_path / "pairs.jsonl", 9)
    assert current_stages(config, STAGES) == ()


def test_a_finished_run_is_a_quick_no_op_that_says_so_and_starts_no_ray(config, capsys, monkeypatch):
    import pipeline.cli.schedule as schedule
    from pipeline.cli.main import main

    monkeypatch.setattr(schedule, "init_ray", lambda *a, **k: pytest.fail("Ray started for a finished run"))

    overrides = [
        "demo.enabled=false",
        f"run_dir={config.run_dir}",
        f"data.path={config.data.path}",
        f"model.path={config.model.path}",
    ]
    fake_finished_run(load_config(SMOKE, overrides))
    argv = ["run", "--config", SMOKE, *(f"--set={o}" for o in overrides)]
    assert main(argv) == 0  # quick: no Ray starts (init_ray, patched above, would fail the test)
    out = capsys.readouterr().out
    assert (
        f"run {config.run_dir}: every stage finished (tokenize, score, train, evaluate); nothing to do. "
        "Use --from-stage to redo."
    ) in out
    assert main([*argv, "--only", "evaluate", "--from-stage", "train"]) == 2
    assert "give one of them" in capsys.readouterr().err
    assert main(["train", *argv[1:], "--from-stage", "train"]) == 2
    assert "go with `dpo run`" in capsys.readouterr().err


# ---- submission ids --------------------------------------------------------------------------
def test_submission_id_is_stable_and_changes_with_the_work(config):
    base = [f"run_dir={config.run_dir}", f"data.path={config.data.path}", f"model.path={config.model.path}"]
    same = load_config(None, base)
    assert submission_id(config, "train") == submission_id(same, "train")
    assert submission_id(config, "train").startswith("raydpo-") and submission_id(config, "train").endswith("-train")
    assert submission_id(config, "train") != submission_id(config, "score")
    beta = load_config(None, [*base, "train.beta=0.5"])
    assert submission_id(beta, "train") != submission_id(config, "train")
    assert submission_id(beta, "score") == submission_id(config, "score")  # train config: not score's work
    assert submission_id(load_config(None, [*base, "train.cpus_per_worker=0.25"]), "train") == submission_id(
        config, "train"
    )
    assert submission_id(load_config(None, [*base, "run_dir=/elsewhere"]), "train") != submission_id(config, "train")
    with pytest.raises(ConfigError, match="--stage sample"):
        submission_id(config, "sample")


def test_a_job_api_address_in_ray_address_is_a_clear_error(monkeypatch):
    import pipeline.runtime.ray_setup as ray_setup
    from pipeline.config import RayConfig

    monkeypatch.setattr(ray_setup.ray, "init", lambda *a, **k: pytest.fail("ray.init called with a job API address"))
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    with pytest.raises(ConfigError, match="job API address: use it with `ray job submit`"):
        ray_setup.init_ray(RayConfig())
