"""The test tiers are folders, read from the source with `ast` (no test module is imported here).

Every test module sits directly in one tier folder, its basename used once (pytest's default import mode
imports test modules by basename); the tiers are the markers pyproject.toml declares, and the root
conftest.py gives each test its folder's marker, so no module sets one itself. The unit tier stays pure:
none of its modules imports Ray or vLLM or runs the `dpo` CLI in a subprocess. Test modules share code
through tests/helpers and conftest fixtures only: none imports another test module or a conftest.
"""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent
TIERS = ("unit", "stage", "e2e", "chaos")
HEAVY = {"ray", "vllm"}  # not imported by any unit test module
SUBPROCESS_CALLS = {"run", "Popen", "call", "check_call", "check_output"}


def all_test_modules() -> list[Path]:
    return sorted(p for p in TESTS.rglob("test_*.py") if "__pycache__" not in p.parts)


def python_files() -> list[Path]:
    """Every .py file under tests/: test modules, conftest files, helpers."""
    return sorted(p for p in TESTS.rglob("*.py") if "__pycache__" not in p.parts)


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def imported_modules(tree: ast.Module) -> list[tuple[str, int]]:
    """(dotted module name, line) of every import, at module level or inside a function; `from a import b`
    counts a.b as well as a, since b may be a module. A relative import is named with its leading dots."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
            base = "." * node.level + (node.module or "")
            found.append((base, node.lineno))
            found += [(f"{base.rstrip('.')}.{alias.name}".lstrip("."), node.lineno) for alias in node.names]
    return found


def subprocess_names(tree: ast.Module) -> set[str]:
    """The names under which this module can call subprocess's process starters: `subprocess.run` etc.,
    and whatever `from subprocess import ...` bound."""
    names = {f"subprocess.{call}" for call in SUBPROCESS_CALLS}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "subprocess":
            names |= {alias.asname or alias.name for alias in node.names if alias.name in SUBPROCESS_CALLS}
    return names


def dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = dotted(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def cli_subprocesses(tree: ast.Module) -> list[int]:
    """Lines of subprocess calls whose arguments name the CLI: "dpo" (or a path ending in /dpo) or
    `-m pipeline.cli` (any string constant naming pipeline.cli)."""
    starters = subprocess_names(tree)
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and dotted(node.func) in starters:
            strings = [
                c.value
                for arg in [*node.args, *(k.value for k in node.keywords)]
                for c in ast.walk(arg)
                if isinstance(c, ast.Constant) and isinstance(c.value, str)
            ]
            if any(s == "dpo" or s.endswith("/dpo") or s.startswith("pipeline.cli") for s in strings):
                lines.append(node.lineno)
    return lines


def is_test_module_or_conftest(module: str) -> bool:
    """A test module or conftest of ours, by the name it is imported under: `test_x` or `conftest` (found
    through the folder pytest puts on sys.path), `tests.<tier>.test_x`, or anything relative."""
    first, *rest = module.split(".")
    ours = [first] if first != "tests" else rest
    return module.startswith(".") or any(p == "conftest" or p.startswith("test_") for p in ours)


def tier_markers(tree: ast.Module) -> list[int]:
    """Lines that name a tier's marker: `pytest.mark.unit` and the like."""
    return [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and node.attr in TIERS and dotted(node.value) == "pytest.mark"
    ]


def test_the_readers_see_what_they_look_for(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import os, ray.data\n"
        "from subprocess import run as go\n"
        "import subprocess, sys\n"
        "from tests.helpers import tiny\n"
        "from conftest import CORPUS\n"
        "from test_engines import needs_vllm\n"
        "from tests.unit.test_api_judge import pairs\n"
        "from ray._common.test_utils import wait_for_condition\n"
        "from . import sibling\n"
        "pytestmark = pytest.mark.stage\n"
        "def f():\n"
        "    from vllm import LLM\n"
        "    subprocess.run([sys.executable, '-m', 'pipeline.cli', 'run'])\n"
        "    go(['dpo', 'train'], check=True)\n"
        "    subprocess.Popen(args=[str(BIN / 'dpo')])\n"
        "    subprocess.run([sys.executable, '-c', 'print(1)'])\n"
        "    subprocess.run(['ray', 'start', '--head'])\n"
    )
    tree = parse(probe)
    modules = imported_modules(tree)
    assert {m.split(".")[0] for m, _ in modules} & HEAVY == {"ray", "vllm"}
    assert sorted({line for m, line in modules if is_test_module_or_conftest(m)}) == [5, 6, 7, 9]
    assert cli_subprocesses(tree) == [13, 14, 15]
    assert tier_markers(tree) == [10]


def test_tiers_are_the_markers_pyproject_declares():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    options = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    declared = {line.split(":")[0].strip() for line in options["markers"]}
    assert set(TIERS) <= declared
    folders = {p.name for p in TESTS.iterdir() if p.is_dir() and p.name not in ("helpers", "__pycache__")}
    assert folders == set(TIERS), f"folders under tests/ that are not a tier (or tiers without one): {folders}"


def test_every_test_module_sits_directly_in_one_tier_folder():
    misplaced = [rel(p) for p in all_test_modules() if p.parent.parent != TESTS or p.parent.name not in TIERS]
    assert not misplaced, (
        "test modules outside tests/<tier>/ (tiers: " + ", ".join(TIERS) + "):\n" + "\n".join(misplaced)
    )


def test_test_module_basenames_are_unique_and_tier_folders_are_not_packages():
    counts = Counter(p.name for p in all_test_modules())
    assert not [name for name, n in counts.items() if n > 1], f"basenames used twice: {counts.most_common(3)}"
    packages = [rel(TESTS / tier / "__init__.py") for tier in TIERS if (TESTS / tier / "__init__.py").exists()]
    assert not packages, f"tier folders are plain folders, not packages: {packages}"


def test_no_module_sets_its_own_tier_marker():
    bad = [f"{rel(p)} (line {line})" for p in all_test_modules() for line in tier_markers(parse(p))]
    assert not bad, "the folder gives the tier's marker (tests/conftest.py); drop these:\n" + "\n".join(bad)


def test_the_unit_tier_imports_neither_ray_nor_vllm():
    bad = [
        f"{rel(p)} (line {line}) imports {module}"
        for p in sorted((TESTS / "unit").glob("*.py"))
        for module, line in imported_modules(parse(p))
        if module.split(".")[0] in HEAVY
    ]
    assert not bad, "unit tests are pure; move these to tests/stage:\n" + "\n".join(bad)


def test_the_unit_tier_runs_no_dpo_process():
    bad = [
        f"{rel(p)} (line {line})" for p in sorted((TESTS / "unit").glob("*.py")) for line in cli_subprocesses(parse(p))
    ]
    assert not bad, "unit tests call the CLI in this process (pipeline.cli.main), if at all:\n" + "\n".join(bad)


def test_no_module_imports_a_test_module_or_a_conftest():
    bad = [
        f"{rel(p)} (line {line}) imports {module}"
        for p in python_files()
        for module, line in imported_modules(parse(p))
        if is_test_module_or_conftest(module)
    ]
    assert not bad, "share code through tests/helpers and fixtures through conftest.py:\n" + "\n".join(bad)
