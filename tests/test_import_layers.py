"""One-way imports, read from the source with `ast` (nothing is imported), function-local imports included.

Layers, lowest first: 0 maskalign/ < 1 models_maskalign < 2 util/ < 3 engine < 4 the other root scripts
(main_pretrain, main_finetune, visualize, ...) < 5 demo.py and benchmarks/. A module imports only its own layer or
lower, and the first-party import graph has no cycle at all. tests/ is outside the layering.
"""
from __future__ import annotations

import ast
from collections import deque
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE_LAYERS = {"maskalign": 0, "util": 2, "demo": 5, "benchmarks": 5}
ROOT_LAYERS = {"models_maskalign": 1, "engine": 3, "demo": 5}  # every other root *.py is an entry point, layer 4
Edge = tuple[str, str, int]  # (importer, imported, line)


def modules(root: Path) -> dict[str, Path]:
    """Every first-party module name -> its file; a package without __init__.py maps to a file that isn't there."""
    found: dict[str, Path] = {path.stem: path for path in root.glob("*.py")}
    for pkg in PACKAGE_LAYERS:  # after the root scripts: a package shadows a same-named root script
        if (root / pkg).is_dir():
            found[pkg] = root / pkg / "__init__.py"
            for path in (root / pkg).rglob("*.py") if pkg == "demo" else (root / pkg).glob("*.py"):
                parts = path.relative_to(root).with_suffix("").parts
                found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def layer_of(module: str, root: Path = REPO) -> int | None:
    top = module.split(".")[0]
    if top in PACKAGE_LAYERS and (root / top).is_dir():
        return PACKAGE_LAYERS[top]
    return ROOT_LAYERS.get(module, 4) if "." not in module and (root / f"{module}.py").exists() else None


def _targets(node: ast.AST, importer: str, is_package: bool, known: set[str]) -> list[str]:
    """The first-party modules one import node (or importlib.import_module call) names."""
    def longest_known(name: str) -> list[str]:
        prefixes = [name.rsplit(".", n)[0] for n in range(name.count(".") + 1)]  # a.b.c, a.b, a
        return [p for p in prefixes if p in known][:1]

    if isinstance(node, ast.Import):
        return [t for alias in node.names for t in longest_known(alias.name)]
    if isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:  # relative: against the importer's package
            pkg = importer.split(".") if is_package else importer.split(".")[:-1]
            pkg = pkg[: len(pkg) - (node.level - 1)]
            base = ".".join([*pkg, base] if base else pkg)
        found: list[str] = []
        for alias in node.names:  # `from pkg import submodule` is an edge to the submodule
            sub = f"{base}.{alias.name}" if base else alias.name
            found += [sub] if sub in known else longest_known(base)
        return found
    if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
        func, name = node.func, node.args[0].value
        called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if called == "import_module" and isinstance(name, str) and not name.startswith("."):
            return longest_known(name)
    return []


def scan(root: Path) -> list[Edge]:
    """Every first-party import edge in the layered code, anywhere in each file's tree."""
    found = modules(root)
    edges: list[Edge] = []
    for importer, path in sorted(found.items()):
        if not path.exists():
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            for imported in _targets(node, importer, path.name == "__init__.py", set(found)):
                if imported != importer:
                    edges.append((importer, imported, node.lineno))
    return sorted(set(edges), key=lambda e: (e[0], e[2], e[1]))


def violations(edges: list[Edge], root: Path = REPO) -> list[Edge]:
    """Edges from a module to a module of a higher layer."""
    return [e for e in edges if (layer_of(e[1], root) or 0) > (layer_of(e[0], root) or 0)]


def find_cycles(edges: list[Edge]) -> list[list[str]]:
    """The shortest cycle through each module that lies on one, as paths [a, b, ..., a]; each cycle once."""
    graph: dict[str, set[str]] = {}
    for a, b, _ in edges:
        graph.setdefault(a, set()).add(b)
    cycles: dict[frozenset[str], list[str]] = {}
    for start in sorted(graph):
        parent: dict[str, str] = {}
        queue = deque([start])
        while queue and start not in parent:
            node = queue.popleft()
            for nxt in sorted(graph.get(node, ())):
                if nxt not in parent:
                    parent[nxt] = node
                    queue.append(nxt)
        if start in parent:
            path = [start]
            while len(path) == 1 or path[-1] != start:
                path.append(parent[path[-1]])
            cycles.setdefault(frozenset(path), path[::-1])
    return list(cycles.values())


def _fmt(edges: list[Edge]) -> str:
    return "\n".join(f"  {a} -> {b} (line {line})" for a, b, line in edges)


def _fmt_cycle(cycle: list[str], edges: list[Edge]) -> str:
    lines = {(a, b): line for a, b, line in reversed(edges)}  # the first line of each edge
    hops = ", ".join(f"{a} -> {b} (line {lines[a, b]})" for a, b in zip(cycle, cycle[1:]))
    return f"  {' -> '.join(cycle)}   [{hops}]"


def test_no_upward_imports() -> None:
    bad = violations(scan(REPO))
    assert not bad, "imports of a higher layer (maskalign < models_maskalign < util < engine < scripts < demo):\n" + (
        _fmt(bad))


def test_no_import_cycles() -> None:
    edges = scan(REPO)
    cycles = find_cycles(edges)
    assert not cycles, "import cycles:\n" + "\n".join(_fmt_cycle(c, edges) for c in cycles)


def test_scanner_finds_a_known_edge() -> None:
    assert any(a == "models_maskalign" and b == "maskalign.alignment" for a, b, _ in scan(REPO))


def test_checker_flags_a_fake_violation_and_cycle(tmp_path: Path) -> None:
    files = {
        "maskalign/__init__.py": "from . import a\n",
        "maskalign/a.py": "import os\n\ndef late():\n    from util.x import thing\n",
        "util/x.py": "from util import y\n",
        "util/y.py": 'import importlib\n\nmod = importlib.import_module("util.x")\n',
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    edges = scan(tmp_path)
    assert ("maskalign", "maskalign.a", 1) in edges  # relative import from a package's __init__
    assert _fmt(violations(edges, tmp_path)) == "  maskalign.a -> util.x (line 4)"
    assert find_cycles(edges) == [["util.x", "util.y", "util.x"]]
