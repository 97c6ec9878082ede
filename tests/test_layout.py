"""The house rules of the package (docs/design.md, "Rooms"): no import circle between modules, every import goes
down the floors below (or stays in its room), the package root holds only the API, the config, errors and small
shared helpers, and every room says in its __init__ docstring what lives there and what it may import.

Every import counts, also those inside functions: a lazy import upward is still an arrow upward."""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "slim_trt"

# Top floor first. A room may import its own modules and any room on a lower floor, never one on its floor or above.
FLOORS = [
    ("__main__",),
    ("cli",),
    ("__init__",),
    ("triton", "jetson"),
    ("compression",),
    ("verification",),
    ("trt",),
    ("linter",),
    ("exporter",),
    ("models",),
    ("checkpoint",),
    ("runtime", "targets", "data", "algorithms"),
    ("config", "outputs", "resources", "timing"),
    ("errors",),
]
ROOT_MODULES = {"__init__", "__main__", "config", "errors", "outputs", "resources", "timing"}
# Copied beside the Triton models by `deploy triton`, so they must run without slim_trt installed.
STANDALONE = {"slim_trt.runtime.decoder", "slim_trt.runtime.ort_rewrite"}


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_edges(package: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the package's modules it imports, anywhere in its code. `from pkg import sub` counts as an import
    of the submodule `pkg.sub` when that is a module, else of `pkg`."""
    files = {module_name(p, package): p for p in package.rglob("*.py")}
    top = package.name
    edges: dict[str, set[str]] = defaultdict(set)
    for mod, path in files.items():
        base = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = base.split(".")
                    parent = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    parent = node.module or ""
                targets = [f"{parent}.{a.name}" if f"{parent}.{a.name}" in files else parent for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in files and "." in t:  # `import a.b.c` of a name, not a module
                    t = t.rpartition(".")[0]
                if (t == top or t.startswith(top + ".")) and t in files and t != mod:
                    edges[mod].add(t)
    return edges


def room(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def floor_of(name: str) -> int:
    for i, names in enumerate(FLOORS):
        if name in names:
            return i
    raise KeyError(name)


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack, on_stack, found = [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(set(edges) | {w for ws in edges.values() for w in ws}):
        if v not in index:
            visit(v)
    return found


def upward(edges: dict[str, set[str]]) -> list[str]:
    bad = []
    for a, targets in edges.items():
        for b in targets:
            ra, rb = room(a), room(b)
            if ra != rb and floor_of(rb) <= floor_of(ra):
                bad.append(f"{a} -> {b} ({ra} on floor {floor_of(ra)}, {rb} on floor {floor_of(rb)})")
    return sorted(bad)


EDGES = import_edges()


def test_no_import_circle():
    assert cycles(EDGES) == []


def test_every_import_goes_down_the_floors():
    assert upward(EDGES) == []


def test_every_room_and_root_module_has_a_floor():
    rooms = {room(m) for m in EDGES} | {room(w) for ws in EDGES.values() for w in ws}
    rooms |= {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    for name in sorted(rooms):
        floor_of(name)  # KeyError names a room the design does not place


def test_package_root_holds_only_the_api_config_errors_and_helpers():
    loose = {p.stem for p in PACKAGE.glob("*.py")}
    assert loose == ROOT_MODULES


def test_every_room_says_what_lives_there_and_what_it_may_import():
    for init in sorted(PACKAGE.glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert len(doc) > 60, f"{init} has no docstring saying what lives there"
        assert "import" in doc, f"{init} does not say what the room may import"


def test_the_modules_deploy_copies_import_nothing_else_of_slim_trt():
    for mod in STANDALONE:
        assert EDGES.get(mod, set()) <= STANDALONE, mod


def test_the_checks_catch_a_circle_and_an_upward_import(tmp_path):
    pkg = tmp_path / "slim_trt"
    for rel, text in {"__init__.py": "", "errors.py": "from .exporter import api\n",
                      "exporter/__init__.py": '"""x"""', "exporter/api.py": "def f():\n    from ..errors import E\n"}.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    edges = import_edges(pkg)
    assert edges["slim_trt.errors"] == {"slim_trt.exporter.api"}
    assert cycles(edges) == [["slim_trt.errors", "slim_trt.exporter.api"]]
    assert upward(edges) == ["slim_trt.errors -> slim_trt.exporter.api (errors on floor 13, exporter on floor 8)"]


@pytest.mark.parametrize("name", ["compress", "load", "save", "export", "verify", "lint", "build", "deploy",
                                  "generate", "CompressConfig", "CompressedLinear"])
def test_public_api_names_resolve(name):
    import slim_trt

    assert callable(getattr(slim_trt, name))


def test_the_design_page_draws_the_same_floors():
    """docs/design.md's rooms table names each room on the floor FLOORS gives it (a room table that drifts from
    the code fails here)."""
    import re

    page = (PACKAGE.parent / "docs" / "design.md").read_text()
    drawn = {}
    for line in page.splitlines():
        m = re.match(r"\| (\d+)(?:-(\d+))? \| (.+?) \|", line)
        if m:
            lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
            names = [n.rstrip("/").removesuffix(".py") for n in re.findall(r"`([^`]+)`", m.group(3))]
            for i, name in enumerate(names):
                drawn[name] = min(lo + i, hi) if hi > lo else lo
    assert drawn == {name: i for i, names in enumerate(FLOORS) for name in names}
