"""The rooms of docs/ARCHITECTURE.md and the directions imports may take between them.

kedit_core (the domain) imports nothing from storage, flows or connectors; connectors (fetching)
import nothing from storage or flows; storage imports nothing from flows or connectors. Inside
flows/, the application services (flows/services) import neither the Prefect flows, the demo
nor the CLI (nor Prefect or typer), and the Prefect flows do not import the CLI. Every import
counts, at any depth (function-local ones included), read with ``ast`` so nothing is run.

The violations that exist today are written down in ALLOWED below (issue #22): the test fails
when a new one appears, and also when a listed one disappears, so the list only shrinks and
stays true.  A second group of tests imports every kedit_core module in a fresh interpreter
(in sorted and in reverse order) and checks that no module-level import cycle exists.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# room (a package or module, dotted) -> the packages/modules it must not import from
FORBIDDEN = {
    "kedit_core": {"storage", "flows", "connectors"},
    "connectors": {"storage", "flows"},
    "storage": {"flows", "connectors"},
    "flows.services": {"flows.prefect_flows", "flows.demo", "flows.cli", "flows.commands", "prefect", "typer"},
    "flows.prefect_flows": {"flows.cli", "flows.commands", "typer"},
}

# Known layer leaks (issue #22, "Layer leaks"); each entry is {module: {imported modules}}.
# Remove an entry when its leak is fixed: the test fails until the list matches the code.
ALLOWED: dict[str, set[str]] = {}


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules(room: str) -> list[tuple[str, Path]]:
    path = REPO.joinpath(*room.split("."))
    if not path.is_dir():
        return [(room, path.with_suffix(".py"))] if path.with_suffix(".py").is_file() else []
    return sorted((_module_name(p), p) for p in path.rglob("*.py") if "__pycache__" not in p.parts)


def _is_in(name: str, rooms: set[str]) -> bool:
    return any(name == room or name.startswith(room + ".") for room in rooms)


def _imported(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every module named by an import statement anywhere in the source (relative imports resolved)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                base = package[: len(package) - (node.level - 1)]
                names.add(".".join(base + ([node.module] if node.module else [])))
            elif node.module:
                names.add(node.module)
    return names


def _violations() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for room, forbidden in FORBIDDEN.items():
        for module, path in _modules(room):
            bad = {name for name in _imported(path.read_text(encoding="utf-8"), module, path.name == "__init__.py") if _is_in(name, forbidden)}
            if bad:
                found[module] = bad
    return found


def test_rooms_exist():
    for room in FORBIDDEN:
        assert _modules(room), f"no modules found under {room}/"


def test_no_new_forbidden_import():
    new = {m: sorted(bad - ALLOWED.get(m, set())) for m, bad in _violations().items() if bad - ALLOWED.get(m, set())}
    assert not new, f"forbidden imports (see docs/ARCHITECTURE.md for the allowed directions): {new}"


def test_allowlist_is_still_true():
    found = _violations()
    gone = {m: sorted(bad - found.get(m, set())) for m, bad in ALLOWED.items() if bad - found.get(m, set())}
    assert not gone, f"these layer leaks are fixed: remove them from ALLOWED in {Path(__file__).name}: {gone}"


def test_imports_at_any_depth_count():
    # a function-local import is seen, and a relative import is read as the module it names
    source = "import os\ndef f():\n    from storage import ledger\n    from ..x import y\n    from . import z\n"
    assert _imported(source, "kedit_core.serving.app") == {"os", "storage", "kedit_core.x", "kedit_core.serving"}


# --------------------------------------------------------------------------- no import cycles

def _top_level_imports(path: Path) -> set[str]:
    """Modules (and `from m import name` as m.name) imported when the file runs, TYPE_CHECKING blocks left out."""
    names: set[str] = set()
    for statement in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(statement, ast.If) and "TYPE_CHECKING" in ast.unparse(statement.test):
            continue
        nodes = ast.walk(statement) if isinstance(statement, (ast.If, ast.Try)) else [statement]
        for node in nodes:
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_no_module_level_import_cycle_in_the_domain():
    modules = dict(_modules("kedit_core"))
    graph = {m: {t for t in _top_level_imports(p) if t in modules and t != m} for m, p in modules.items()}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycles.append(stack[stack.index(target):] + [target])
            elif not state.get(target):
                visit(target)
        stack.pop()
        state[module] = 2

    for module in sorted(graph):
        if not state.get(module):
            visit(module)
    assert not cycles, "module-level import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


IMPORT_ALL = """
import importlib, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
"""


@pytest.mark.parametrize("order", ["sorted", "reversed"])
def test_every_domain_module_imports_in_a_fresh_interpreter(order):
    # each order enters every cycle (if one came back) from a different side; a partially
    # initialised module then fails with ImportError
    names = [m for m, _ in _modules("kedit_core")]
    if order == "reversed":
        names.reverse()
    run = subprocess.run([sys.executable, "-c", IMPORT_ALL, *names], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]


def test_a_sub_room_rule_catches_its_import():
    # the dotted rooms work: a service importing the CLI, or a Prefect flow importing typer, is caught
    assert _is_in("flows.commands.serve_cmd", FORBIDDEN["flows.services"])
    assert _is_in("prefect", FORBIDDEN["flows.services"]) and not _is_in("prefectx", {"prefect"})
    assert not _is_in("flows.services.steps", FORBIDDEN["flows.prefect_flows"])
    assert _modules("flows.prefect_flows") == [("flows.prefect_flows", REPO / "flows" / "prefect_flows.py")]
