"""The library's shape, read from its source: concept packages imported only downward, no import
cycle (function-level imports included), no oversized module, pipelines that wire only their own
nodes, one place for every gradient step and for the strategies' names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from transfer_learning.core.strategies import STRATEGY_FACTS

LIBRARY = Path(__file__).resolve().parents[1] / "src" / "transfer_learning"
# Lowest first: a package may import itself and any package before it, never one after.
LAYERS = (
    "core",
    "data",
    "models",
    "training",
    "features",
    "adaptation",
    "reporting",
    "serving",
    "kedro_io",
)
COMPOSITION = ("pipelines", "pipeline_registry", "strategies", "settings", "__main__", "__init__")
MAX_LINES = 600


def module_name(path: Path) -> str:
    parts = path.relative_to(LIBRARY.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(LIBRARY.rglob("*.py"))}


def imported_modules(path: Path) -> set[str]:
    """Every project module `path` imports, anywhere in the file (functions included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            package = module_name(path).split(".")
            if path.name != "__init__.py":
                package = package[:-1]
            base = ".".join(package[: len(package) - node.level + 1])
            names = [f"{base}.{node.module}" if node.module else base]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in MODULES)
    return found - {module_name(path)}


IMPORTS = {name: imported_modules(path) for name, path in MODULES.items()}


def package_of(module: str) -> str:
    return module.split(".")[1] if "." in module else "__init__"


def test_there_are_at_least_five_concept_packages_beside_the_pipelines():
    packages = {path.parent.name for path in LIBRARY.glob("*/__init__.py")} - {"pipelines"}
    assert set(LAYERS) == packages
    assert len(packages) >= 5


def test_every_module_is_in_a_concept_package_or_composes_kedro():
    for module in MODULES:
        assert package_of(module) in LAYERS + COMPOSITION, module


def test_packages_import_only_downward():
    wrong = [
        f"{module} imports {target}"
        for module, targets in IMPORTS.items()
        if package_of(module) in LAYERS
        for target in targets
        if package_of(target) not in LAYERS
        or LAYERS.index(package_of(target)) > LAYERS.index(package_of(module))
    ]
    assert not wrong


def test_no_import_cycle():
    state: dict[str, int] = {}
    cycles = []

    def visit(module: str, stack: list[str]) -> None:
        state[module] = 1
        stack.append(module)
        for target in sorted(IMPORTS[module]):
            if state.get(target) == 1:
                cycles.append(stack[stack.index(target) :] + [target])
            elif target not in state:
                visit(target, stack)
        stack.pop()
        state[module] = 2

    for module in MODULES:
        if module not in state:
            visit(module, [])
    assert not cycles


def test_the_import_reader_sees_function_level_and_relative_imports():
    # kedro_io.datasets imports serving.packaging inside a method; the pipeline its nodes relatively.
    assert "transfer_learning.serving.packaging" in IMPORTS["transfer_learning.kedro_io.datasets"]
    assert (
        "transfer_learning.pipelines.comparison.nodes"
        in (IMPORTS["transfer_learning.pipelines.comparison.pipeline"])
    )


def test_no_module_over_600_lines():
    long = {
        name: lines
        for name, path in MODULES.items()
        if (lines := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not long


PIPELINES = sorted(
    p.name for p in (LIBRARY / "pipelines").iterdir() if (p / "pipeline.py").exists()
)


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_no_pipeline_imports_another_pipelines_code(pipeline):
    own = f"transfer_learning.pipelines.{pipeline}"
    shared = ("transfer_learning.pipelines", "transfer_learning.pipelines.templates")
    for module, targets in IMPORTS.items():
        if module == own or module.startswith(own + "."):
            foreign = [
                target
                for target in targets
                if target.startswith("transfer_learning.pipelines")
                and target not in shared
                and not target.startswith(own)
                and not target.startswith("transfer_learning.pipelines.templates.")
            ]
            assert not foreign, f"{module} imports {foreign}"


def library_files_containing(text: str) -> list[str]:
    return sorted(
        name
        for name, path in MODULES.items()
        if not name.startswith("transfer_learning.pipelines.") and text in path.read_text()
    )


def test_every_gradient_step_is_in_the_trainer():
    assert library_files_containing(".backward(") == ["transfer_learning.training.trainer"]


@pytest.mark.parametrize("strategy", [facts.name for facts in STRATEGY_FACTS])
def test_a_strategy_is_named_only_by_its_registry_outside_its_pipeline(strategy):
    assert library_files_containing(strategy) == [
        "transfer_learning.core.strategies",
        "transfer_learning.strategies",
    ]
