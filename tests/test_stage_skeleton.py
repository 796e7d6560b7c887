"""The one skeleton every stage runs through: upstream, hash, skip, force, commit (no Ray, no model)."""

from __future__ import annotations

import pytest

from pipeline.config import load_config
from pipeline.runtime.storage import RunDir
from pipeline.stages import STAGE_NAMES, STAGES, by_name, enabled_stages
from pipeline.stages.base import Stage, execute

pytestmark = pytest.mark.unit


def counting_stage(name: str, upstream: str | None, calls: list) -> Stage:
    def body(run):
        calls.append(name)
        run.writer.write_text("out.txt", f"{name} of {run.config.train.beta}\n")
        return {"rows_out": 1, "attempt": len(calls)}  # a redo is a new manifest

    return Stage(
        name=name,
        sections=("train.beta",),
        body=body,
        upstream=lambda config: upstream,
        input_hash=lambda config: "input-v1",
    )


@pytest.fixture
def config(tmp_path):
    return load_config(None, [f"run_dir={tmp_path / 'run'}"])


def test_a_finished_stage_is_skipped_and_force_redoes_it(config):
    calls: list = []
    first = counting_stage("first", None, calls)
    manifest = execute(first, config)
    assert calls == ["first"] and manifest["upstream_hash"] == "input-v1" and manifest["rows_out"] == 1
    assert execute(first, config) == manifest and calls == ["first"]  # finished: skipped
    execute(first, config, force=True)
    assert calls == ["first", "first"]


def test_a_changed_section_or_upstream_reruns_what_follows(config):
    calls: list = []
    first, second = counting_stage("first", None, calls), counting_stage("second", "first", calls)
    execute(first, config)
    execute(second, config)
    execute(second, config)
    assert calls == ["first", "second"]
    execute(first, config, force=True)  # a redone upstream has a new manifest hash
    execute(second, config)
    assert calls == ["first", "second", "first", "second"]
    changed = load_config(None, [f"run_dir={config.run_dir}", "train.beta=0.5"])
    execute(first, changed)
    assert calls[-1] == "first"
    run = RunDir(config.run_dir)
    assert run.read_text("first/out.txt") == "first of 0.5\n"


def test_a_missing_upstream_is_named(config):
    with pytest.raises(RuntimeError, match=r"second needs a finished first stage .*run `dpo first` first"):
        execute(counting_stage("second", "first", []), config)


def test_a_failed_attempt_leaves_no_finished_stage(config):
    calls: list = []
    execute(counting_stage("first", None, calls), config)

    def broken(run):
        run.writer.write_text("half.txt", "half")
        raise RuntimeError("worker lost")

    stage = Stage(name="first", sections=("train.beta",), body=broken, input_hash=lambda config: "input-v1")
    with pytest.raises(RuntimeError, match="worker lost"):
        execute(stage, config, force=True)
    assert RunDir(config.run_dir).manifest("first") is None


def test_the_declarations_name_the_pipeline_in_order(config):
    assert STAGE_NAMES == ("tokenize", "score", "train", "evaluate")
    assert [by_name(n) for n in STAGE_NAMES] == list(STAGES)
    assert [s.name for s in enabled_stages(config)] == list(STAGE_NAMES)  # dpo reads a reference
    simpo = load_config(None, ["train.loss=simpo"])
    assert [s.name for s in enabled_stages(simpo)] == ["tokenize", "train", "evaluate"]
    assert by_name("train").upstream(simpo) == "tokenize" and by_name("train").upstream(config) == "score"


def test_a_stage_written_by_another_version_is_refused_naming_force(config):
    """A manifest of another stage format (here: none, as pre-release code wrote) is never read as this
    code's output: the stage is refused by name until it is redone with --force."""
    from pipeline.runtime.storage import OutdatedStageError

    calls: list = []
    first = counting_stage("first", None, calls)
    manifest = execute(first, config)
    run = RunDir(config.run_dir)
    run.write_json("first/manifest.json", {k: v for k, v in manifest.items() if k != "format"})
    with pytest.raises(OutdatedStageError, match=r"first: written by another version of raydpo.*--force"):
        execute(first, config)
    assert calls == ["first"]
    execute(first, config, force=True)
    assert calls == ["first", "first"] and run.manifest("first")["format"] == manifest["format"]
