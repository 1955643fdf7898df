"""The tree is the architecture (docs/design.md, "Layout"): read from the source, not from imports.

- the import graph of ``planner/``, ``runtime/`` and ``kernels/`` has no cycle (imports inside
  ``if TYPE_CHECKING:`` aside; imports inside functions count);
- ``runtime/`` never imports ``planner/`` (plan.json and the generated code are the contract);
- ``kernels/`` imports from ``planner/`` only the op-registration API;
- inside ``planner/`` imports go down the pipeline: a stage imports only from earlier stages;
- no module of the project is over 500 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("planner", "runtime", "kernels")
REGISTRATION_API = {"dimshard.planner.ops.registry"}
# planner/'s stages in pipeline order; a module may import from its own stage and earlier ones.
# Top-level planner modules (the compile driver, its config, the package's exports) come last.
PLANNER_STAGES = ("ops", "graph", "plan", "cost", "search", "codegen")
MAX_LINES = 500


def module_name(path: Path) -> str:
    parts = ["dimshard", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    """Every module of planner/, runtime/ and kernels/ by its dotted name."""
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for child in node.body for n in ast.walk(child))
    return skipped


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules that ``name`` imports (a package's ``__init__`` when a name comes from it)."""
    tree = ast.parse(path.read_text())
    skipped = _type_checking_nodes(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source
                       for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of module names, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_graph_has_no_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_a_cycle_is_found_when_there_is_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_runtime_never_imports_the_planner():
    crossings = [(m, t) for m, targets in import_graph().items() if m.startswith("dimshard.runtime")
                 for t in targets if t.startswith("dimshard.planner")]
    assert not crossings, crossings


def test_kernels_import_only_the_op_registration_api():
    assert all(name in project_modules() for name in REGISTRATION_API), REGISTRATION_API
    crossings = [(m, t) for m, targets in import_graph().items() if m.startswith("dimshard.kernels")
                 for t in targets if t.startswith(("dimshard.planner", "dimshard.runtime"))
                 and t not in REGISTRATION_API]
    assert not crossings, crossings


def _stage(name: str) -> int:
    parts = name.split(".")
    if len(parts) > 3 and parts[2] in PLANNER_STAGES:
        return PLANNER_STAGES.index(parts[2])
    return len(PLANNER_STAGES)  # the driver modules at planner/'s top


def test_planner_imports_go_down_the_pipeline():
    assert all((ROOT / "planner" / stage / "__init__.py").is_file() for stage in PLANNER_STAGES)
    upward = [(m, t) for m, targets in import_graph().items() if m.startswith("dimshard.planner.")
              for t in targets if t.startswith("dimshard.planner.") and _stage(t) > _stage(m)]
    assert not upward, upward


def test_no_module_is_over_500_lines():
    folders = [*PACKAGES, "tools", "benchmarks", "examples"]
    files = [p for folder in folders for p in (ROOT / folder).rglob("*.py")] + list(ROOT.glob("*.py"))
    # Run outputs (the demo's generated rank code, ./runs) are written here but are not our modules.
    files = [p for p in files if not {"gencode", "demo_output", "runs"} & set(p.relative_to(ROOT).parts)]
    long = {str(p.relative_to(ROOT)): n for p in files if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_every_package_folder_ships_in_the_wheel():
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {module_name(p) for pkg in PACKAGES for p in (ROOT / pkg).rglob("__init__.py")}
    assert folders <= listed, f"add to pyproject.toml's packages: {sorted(folders - listed)}"
