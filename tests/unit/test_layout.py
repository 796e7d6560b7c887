"""The package's dependency rule, read from the source with `ast` (nothing under pipeline/ is imported).

Every import counts: at module level or inside a function, `import x`, `from x import y`, relative.
A module may import its own sub-package and the sub-packages of lower tiers, nothing else:

    tier 0  config                       (pipeline/__init__.py is tier 0 too, and imports nothing)
    tier 1  data | model                 pure data (no torch, no Ray) | model mechanics: loading, log-probs,
                                         engines, scoring (no Ray)
    tier 2  training                     the algorithm: losses, objectives, the step, DDP/FSDP2/LoRA, export (no Ray)
    tier 3  runtime | evaluation | planning
                                         Ray plumbing | judges, statistics, reports (no Ray) | the memory plan (no Ray)
    tier 4  stages                       thin Ray layers over the pure parts
    tier 5  rounds                       on-policy rounds: the loop over the stages (`dpo iterate`)
    tier 6  demo | cli                   the demo task (a plug-in) | the command line

Packages on one tier never import each other, with one exception: cli may import demo. Nothing else
imports the demo (evaluation finds its reward and judge through entry points, see pyproject.toml).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "pipeline"

# The rule, in one place. TIERS: sub-package -> tier ("config" is pipeline/config/, the typed config).
TIERS = {
    "config": 0,
    "data": 1,
    "model": 1,
    "training": 2,
    "runtime": 3,
    "evaluation": 3,
    "planning": 3,
    "stages": 4,
    "rounds": 5,
    "demo": 6,
    "cli": 6,
}
SAME_TIER_ALLOWED = {("cli", "demo")}  # (importer, imported): the only import across packages of one tier
NO_RAY = {"config", "data", "model", "training", "evaluation", "planning"}  # ray imported nowhere in these
NO_TORCH = {"data"}  # torch imported nowhere in these
DEMO_IMPORTERS = {"demo", "cli"}  # the only packages that may import pipeline.demo
# `import pipeline`, the console script and jobs/*.py must not load these: their import costs seconds, and
# torch ~180 MB of every driver's memory (the stages' drivers only plan, start actors and write manifests).
HEAVY_ON_IMPORT = ("ray.train", "vllm", "torch", "transformers")


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, e.g. "pipeline.stages.train"
    target: str  # the most specific module named: "pipeline.training.losses", "torch", "ray.train"
    line: int


def module_files() -> dict[str, Path]:
    """Dotted name -> file for every module under pipeline/ (a package is named by its __init__.py)."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    return modules


MODULES = module_files()


def _imports_of(name: str, path: Path) -> list[Import]:
    """Every import in the file of module `name`; targets inside pipeline are resolved to a pipeline module."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [Import(name, _resolve(alias.name), node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
            base = node.module or ""
            if node.level:  # relative: climb level - 1 packages up from this module's package
                anchor = package
                for _ in range(node.level - 1):
                    anchor = anchor.rpartition(".")[0]
                base = f"{anchor}.{base}".rstrip(".")
            for alias in node.names:
                # `from pipeline.stages import train` names the module pipeline.stages.train.
                sub = f"{base}.{alias.name}"
                found.append(Import(name, sub if sub in MODULES else _resolve(base), node.lineno))
    return found


def _resolve(target: str) -> str:
    """A pipeline target as the longest prefix that is a module (`import pipeline.x.f` depends on pipeline.x)."""
    if target.split(".")[0] != "pipeline":
        return target
    while target not in MODULES and "." in target:
        target = target.rpartition(".")[0]
    return target


def all_imports() -> list[Import]:
    return [imp for name, path in MODULES.items() for imp in _imports_of(name, path)]


IMPORTS = all_imports()


def layer(module: str) -> str | None:
    """The sub-package a pipeline module belongs to ("config" for pipeline.config); None for pipeline itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def own_imports() -> list[Import]:
    return [i for i in IMPORTS if i.target.split(".")[0] == "pipeline" and i.target != i.module]


def where(imp: Import) -> str:
    return f"{imp.module} (line {imp.line}) imports {imp.target}"


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a -> ... -> a) through each group of mutually importing modules (Tarjan's components)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
            if len(component) > 1:
                components.append(set(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return [_cycle_through(min(c), c, edges) for c in components]


def _cycle_through(start: str, component: set[str], edges: dict[str, set[str]]) -> list[str]:
    """The shortest path start -> ... -> start inside `component` (breadth first)."""
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(edges[v] & component):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start}")


def test_the_reader_sees_every_kind_of_import(tmp_path):
    source = tmp_path / "probe.py"
    source.write_text(
        "import os, ray.data\n"
        "from . import train\n"
        "from .. import config\n"
        "from ..model.engines import SamplingParams\n"
        "def f():\n"
        "    import torch.nn\n"
        "    from pipeline.demo import task\n"
        "    from pipeline.model import engines, nothing_here\n"
    )
    found = [(i.target, i.line) for i in _imports_of("pipeline.stages.probe", source)]
    assert sorted(found) == sorted(
        [
            ("os", 1),
            ("ray.data", 1),
            ("pipeline.stages.train", 2),
            ("pipeline.config", 3),
            ("pipeline.model.engines", 4),
            ("torch.nn", 6),
            ("pipeline.demo.task", 7),
            ("pipeline.model.engines", 8),
            ("pipeline.model", 8),
        ]
    )


def test_the_cycle_finder_names_one_cycle_per_tangle():
    edges = {"a": {"b"}, "b": {"c", "a"}, "c": {"a"}, "d": {"a", "e"}, "e": {"d"}, "f": set()}
    assert sorted(find_cycles(edges)) == [["a", "b", "a"], ["d", "e", "d"]]


def test_every_subpackage_has_a_tier():
    subpackages = {layer(m) for m in MODULES} - {None}
    assert subpackages == set(TIERS), f"sub-packages without a tier (add them to TIERS): {subpackages ^ set(TIERS)}"


def test_no_import_cycles():
    edges: dict[str, set[str]] = defaultdict(set)
    for imp in own_imports():
        edges[imp.module].add(imp.target)
        edges[imp.target]  # every module is a node
    cycles = find_cycles(edges)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_modules_import_only_their_own_package_and_lower_tiers():
    bad = []
    for imp in own_imports():
        mine, theirs = layer(imp.module), layer(imp.target)
        if mine is None or theirs is None or mine == theirs:
            continue  # pipeline/__init__.py has its own test; `import pipeline` loads nothing else
        if TIERS[theirs] > TIERS[mine]:
            bad.append(f"{where(imp)}: {theirs} (tier {TIERS[theirs]}) is above {mine} (tier {TIERS[mine]})")
        elif TIERS[theirs] == TIERS[mine] and (mine, theirs) not in SAME_TIER_ALLOWED:
            bad.append(f"{where(imp)}: {mine} and {theirs} share tier {TIERS[mine]} and never import each other")
    assert not bad, "imports against the layers:\n" + "\n".join(bad)


def test_package_root_imports_nothing():
    imports = [where(i) for i in IMPORTS if i.module == "pipeline"]
    assert not imports, "pipeline/__init__.py must stay import-free: " + "; ".join(imports)


def test_ray_stays_out_of_the_pure_layers():
    bad = [where(i) for i in IMPORTS if layer(i.module) in NO_RAY and i.target.split(".")[0] == "ray"]
    assert not bad, f"ray imported in {sorted(NO_RAY)}:\n" + "\n".join(bad)


def test_torch_stays_out_of_data():
    bad = [where(i) for i in IMPORTS if layer(i.module) in NO_TORCH and i.target.split(".")[0] == "torch"]
    assert not bad, f"torch imported in {sorted(NO_TORCH)}:\n" + "\n".join(bad)


def test_only_the_cli_imports_the_demo():
    bad = [where(i) for i in own_imports() if layer(i.target) == "demo" and layer(i.module) not in DEMO_IMPORTERS]
    assert not bad, "the demo is a plug-in, imported only by pipeline.cli:\n" + "\n".join(bad)


def _console_scripts() -> list[str]:
    """The modules of pyproject's [project.scripts] targets ("pipeline.cli:main" -> "pipeline.cli")."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    return sorted({target.split(":")[0] for target in scripts.values()})


# Run in a fresh interpreter: imports each target in turn and prints which heavy modules each one loaded first.
_PROBE = """
import importlib, importlib.util, json, os, sys
heavy, added = {heavy!r}, {{}}
for kind, target in {targets!r}:
    if kind == "module":
        importlib.import_module(target)
    else:  # a job script, loaded under another name than __main__ so it does not run
        name = "job_" + os.path.splitext(os.path.basename(target))[0]
        spec = importlib.util.spec_from_file_location(name, target)
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    added[target] = [m for m in heavy if m in sys.modules and not any(m in seen for seen in added.values())]
print(json.dumps({{"pipeline": sys.modules["pipeline"].__file__, "added": added}}))
"""


def test_package_console_script_and_jobs_import_without_torch_transformers_ray_train_or_vllm():
    targets = [("module", "pipeline")] + [("module", m) for m in _console_scripts()]
    targets += [("file", str(path.relative_to(ROOT))) for path in sorted((ROOT / "jobs").glob("*.py"))]
    assert len(targets) > 2, "no console script or job found"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    probe = _PROBE.format(heavy=HEAVY_ON_IMPORT, targets=targets)
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"an entry point failed to import:\n{done.stderr[-3000:]}"
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(report["pipeline"]).resolve() == PACKAGE / "__init__.py", (
        f"imported another pipeline: {report['pipeline']}"
    )
    loaded = {target: mods for target, mods in report["added"].items() if mods}
    assert not loaded, f"importing these loaded what should wait until a stage runs: {loaded}"


def test_no_two_modules_share_a_file_name():
    """One name, one concept: a module's file name says what it holds, wherever it lives (an `__init__.py`
    aside), so `checks.py` or `report.py` in two packages would be two concepts under one name."""
    where = defaultdict(list)
    for path in (ROOT / "pipeline").rglob("*.py"):
        if path.name != "__init__.py":
            where[path.name].append(str(path.relative_to(ROOT)))
    assert {name: paths for name, paths in where.items() if len(paths) > 1} == {}
