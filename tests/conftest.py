"""The tiers, and the fixtures every tier shares.

A test module's tier is the folder it lives in: tests/unit (pure: no Ray, no vLLM, no `dpo` process; the
whole tier runs in a couple of minutes), tests/stage (one stage or component on a local Ray, vLLM engines,
processes over gloo, anything heavier), tests/e2e (the `dpo` CLI end to end, cluster jobs) and tests/chaos
(faults injected into real runs). Each test gets its folder's marker (`pytest -m unit` equals
`pytest tests/unit`); a test module outside those folders is a collection error. Helpers that are not
fixtures live in tests/helpers, imported as `tests.helpers.<module>`.

Fixtures: a tiny tokenizer and GPT-2 (and Llama) built offline, saved as Hugging Face directories.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers.tiny import make_tiny_llama_dir, make_tiny_model_dir

TESTS = Path(__file__).resolve().parent
TIERS = ("unit", "stage", "e2e", "chaos")  # the folders, and the markers declared in pyproject.toml

# torch.compile in the tests compiles in this process: inductor's default pool of compile workers (a
# subprocess and a reader thread) buys nothing on 2 cores and is one more thing alive at interpreter exit.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> str:
    """A 2-layer Llama (width 64, untied output layer) with the tests' tokenizer, saved as safetensors."""
    return str(make_tiny_llama_dir(tmp_path_factory.mktemp("tiny_llama")))


def _tier(path: Path) -> str | None:
    """The tier folder a test file sits in, directly; None for one anywhere else."""
    try:
        folder, *rest = path.resolve().relative_to(TESTS).parts
    except ValueError:
        return None
    return folder if folder in TIERS and len(rest) == 1 else None


class _OutsideTheTiers(pytest.File):
    def collect(self):
        raise self.CollectError(
            f"{self.path.relative_to(TESTS.parent)}: a test module outside the tier folders; move it to one of "
            + ", ".join(f"tests/{tier}/" for tier in TIERS)
        )


def pytest_collect_file(file_path: Path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("test_") and _tier(file_path) is None:
        return _OutsideTheTiers.from_parent(parent, path=file_path)
    return None


def pytest_collection_modifyitems(config, items):
    for item in items:
        tier = _tier(item.path)
        if tier is not None:
            item.add_marker(getattr(pytest.mark, tier))
