"""The package's import arrows point down (docs/development.md, "Layers").

Read from the source with ast, so lazy imports inside functions count as arrows too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "sorai"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, top_level_only: bool) -> set[str]:
    """The sorai modules `path` imports; top_level_only: those at module level (type-only
    imports included: a cycle of types is still a knot in the design), not the lazy ones
    inside functions, which load on use."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if top_level_only and isinstance(
                child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)
            ):
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names if a.name.split(".")[0] == "sorai")
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - child.level + 1])
                    base = f"{base}.{child.module}" if child.module else base
                if base.split(".")[0] == "sorai":
                    found.add(base)
                    # `from sorai.engine import llm` imports the module sorai.engine.llm
                    found.update(f"{base}.{a.name}" for a in child.names)
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return found


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _arrows(source_layer: str, top_level_only: bool = False) -> list[tuple[str, str]]:
    return sorted(
        (name, target)
        for name, path in MODULES.items()
        if _layer(name) == source_layer
        for target in _imports(path, top_level_only)
        if target in MODULES or target.rpartition(".")[0] in MODULES
    )


@pytest.mark.parametrize(
    ("layer", "forbidden"),
    [
        ("model", {"engine", "server", "train", "apps", "cli", "console", "hosted_tools"}),
        ("engine", {"server", "train", "apps", "cli", "console", "hosted_tools"}),
        ("train", {"engine", "server", "apps", "console", "hosted_tools"}),
        ("server", {"train", "apps", "cli", "console", "hosted_tools"}),
        ("apps", {"console", "cli", "hosted_tools"}),
        ("console", {"cli"}),
        ("hosted_tools", {"cli", "console"}),
        ("hub", {"model", "engine", "server", "train", "apps", "cli"}),
        ("hf", {"hub", "model", "engine", "server", "train", "apps", "cli"}),
        ("registry", {"hf", "hub", "model", "engine", "server", "train", "apps", "cli"}),
        ("errors", {"hub", "model", "engine", "server", "train", "apps", "cli"}),
        ("vision", {"hub", "model", "engine", "server", "train", "apps", "cli"}),
    ],
)
def test_a_layer_imports_nothing_above_it(layer: str, forbidden: set[str]) -> None:
    wrong = [(a, b) for a, b in _arrows(layer) if _layer(b) in forbidden]
    assert not wrong, f"{layer}/ imports what sits above it: {wrong}"


def test_apps_reach_models_only_through_the_client() -> None:
    below = {"model", "engine", "server", "train"}
    wrong = [(a, b) for a, b in _arrows("apps") if _layer(b) in below and a != "sorai.apps.client"]
    assert not wrong, f"apps import model/engine/server/train outside apps/client.py: {wrong}"


def test_the_package_has_no_import_cycle() -> None:
    graph = {
        name: {t for t in _imports(path, top_level_only=True) if t in MODULES and t != name}
        for name, path in MODULES.items()
    }
    # A package's __init__ running its children is not a cycle back into it.
    for name in graph:
        graph[name] = {t for t in graph[name] if not name.startswith(t + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return stack[stack.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_the_checker_sees_lazy_and_relative_imports(tmp_path: Path) -> None:
    # Guards the test itself: an arrow hidden in a function still counts.
    source = PACKAGE / "engine" / "llm.py"
    assert "sorai.model.loader" in _imports(source, top_level_only=False)
    assert "sorai.engine.llm" in _imports(PACKAGE / "__init__.py", top_level_only=False)
    assert "sorai.engine.llm" in _imports(PACKAGE / "__init__.py", top_level_only=True)  # types
    assert "sorai.engine.llm" not in _imports(PACKAGE / "cli.py", top_level_only=True)


def test_checking_flags_pulls_in_no_torch() -> None:
    # The CLI validates sampling flags before it loads anything, and `chat --url` never
    # needs torch: the engine package loads its heavy modules on first use.
    import subprocess
    import sys

    code = "import sys, sorai.cli, sorai.engine.params; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
