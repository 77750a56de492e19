"""The layout's import rule, read from the source (every import counts: top level, inside functions
and under TYPE_CHECKING):

  models    imports nothing of ours (the contract, and the torch modules both halves agree on);
  service   imports only models (the online half: no torch, no training code);
  training  imports models and service (the offline half; service for torch-free decoding and serving);
  deploy    imports models and service (scale-out wraps the online half);
  lab       may import all of them (the research harness);
  dede      imports nothing of ours (the client: httpx only; `training`'s CLI may import it);
  nothing   imports the lab (the `dede` command line finds the lab's commands through entry points);
  and no package module takes part in an import cycle.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
OURS = ("models", "training", "lab", "service", "deploy", "dede", "benchmarks")
ALLOWED = {
    "models": {"models"},
    "service": {"models", "service"},
    "training": {"models", "service", "training", "dede"},
    "deploy": {"models", "service", "deploy"},
    "lab": {"models", "service", "training", "lab"},
    "dede": {"dede"},
    "benchmarks": set(OURS),  # measurements may use anything, and nothing imports them
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {
        _module_name(path): path
        for package in OURS
        for path in sorted((REPO / package).rglob("*.py"))
        if "__pycache__" not in path.parts
    }


def _imports(path: Path, known: set[str]) -> set[str]:
    """Our modules that `path` imports: `from a.b import c` is `a.b.c` when that is a module."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [
                f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in known else node.module
                for alias in node.names
            ]
        else:
            continue
        found.update(name for name in names if name.split(".")[0] in OURS)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(path, known) for name, path in modules.items()}


def test_imports_run_one_way() -> None:
    wrong = [
        f"{module} imports {target}"
        for module, targets in _graph().items()
        for target in sorted(targets)
        if target.split(".")[0] not in ALLOWED[module.split(".")[0]]
    ]
    assert not wrong, "imports against the layout's rule:\n" + "\n".join(wrong)


def test_nothing_outside_the_lab_imports_it() -> None:
    importers = sorted(
        module
        for module, targets in _graph().items()
        if module.split(".")[0] not in ("lab", "benchmarks")
        and any(t.split(".")[0] == "lab" for t in targets)
    )
    assert importers == []


def test_no_import_cycles() -> None:
    graph = _graph()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if target not in graph:
                continue  # a package's name imported for one of its modules
            if state.get(target) == 1:
                cycles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_cli_finds_the_lab_through_entry_points_only() -> None:
    """The one way the product reaches the lab, and it resolves to real objects."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    groups = project["entry-points"]
    assert groups["dede.commands"] == {"lab": "lab.commands:register"}
    assert groups["dede.demo"] == {"builder": "lab.demo"}
    from training.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices  # noqa: SLF001
    assert {"fit", "calibrate", "export", "score", "serve", "lab", "demo", "attack"} <= set(commands)


@pytest.mark.parametrize("package", ["models", "training", "lab", "service", "deploy", "dede"])
def test_every_package_says_which_room_it_is(package: str) -> None:
    init = REPO / package / "__init__.py"
    doc = ast.get_docstring(ast.parse(init.read_text())) if init.is_file() else None
    assert doc, f"{package}/__init__.py needs a docstring that says what the package is for"


def test_the_rule_sees_a_violation(tmp_path: Path) -> None:
    """The walker finds lazy and TYPE_CHECKING imports (a rule that cannot fail proves nothing)."""
    source = tmp_path / "sample.py"
    source.write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from lab.suite import Lab\n"
        "def f():\n    import training.fit\n    from models import bundle\n"
    )
    assert _imports(source, {"models.bundle"}) == {"lab.suite", "training.fit", "models.bundle"}
