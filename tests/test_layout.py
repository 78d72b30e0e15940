"""The code's layout: no file edits sys.path (the package and the root modules are installed),
and the package's import graph has no cycle."""

from __future__ import annotations

import ast
import os

from conftest import ROOT

SKIP = {".venv", ".git", "build", "data", "__pycache__"}


def python_files():
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIP and not d.startswith(".")]
        for name in files:
            if name.endswith(".py"):
                yield os.path.join(folder, name)


def sys_path_edits(source: str) -> list[int]:
    """Lines that change sys.path: a call of one of its methods, or an assignment to it."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        target = None
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            target = node.func.value
        elif isinstance(node, (ast.Assign, ast.AugAssign)):
            target = node.targets[0] if isinstance(node, ast.Assign) else node.target
        if ast.unparse(target) == "sys.path" if target is not None else False:
            lines.append(node.lineno)
    return lines


def test_sys_path_edits_are_found():
    path = "sys." + "path"  # split, so that this file does not hold the text it looks for
    assert sys_path_edits(f"import sys\n{path}.insert(0, 'x')\n") == [2]
    assert sys_path_edits(f"import sys\n{path} += ['x']\n") == [2]
    assert sys_path_edits(f"import sys\nprint({path})\n") == []


def test_no_file_edits_sys_path():
    found = []
    for path in python_files():
        with open(path) as f:
            source = f.read()
        found += [f"{os.path.relpath(path, ROOT)}:{n}" for n in sys_path_edits(source)]
        # code run in a subprocess, written inside a string
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                if any("sys." + f"path.{verb}" in node.value for verb in ("insert", "append")):
                    found.append(f"{os.path.relpath(path, ROOT)}:{node.lineno} (in a string)")
    assert found == []


def package_imports() -> dict[str, set[str]]:
    """Each module of ntk_evolution and the package modules it imports."""
    package = os.path.join(ROOT, "ntk_evolution")
    graph = {}
    for folder, _, files in os.walk(package):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
            module = module.removesuffix(".__init__")
            with open(path) as f:
                tree = ast.parse(f.read())
            here = module if name == "__init__.py" else module.rpartition(".")[0]
            imported = set()
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    imported |= {a.name for a in node.names}
                elif isinstance(node, ast.ImportFrom):
                    base = node.module or ""
                    if node.level:
                        parent = here.rsplit(".", node.level - 1)[0] if node.level > 1 else here
                        base = f"{parent}.{base}" if base else parent
                    imported.add(base)
                    imported |= {f"{base}.{a.name}" for a in node.names}
            graph[module] = imported
    return {m: {i for i in deps if i in graph and i != m} for m, deps in graph.items()}


def cycle_in(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_cycle_finder_finds_a_cycle():
    assert cycle_in({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle_in({"a": {"b"}, "b": set()}) is None


def test_package_import_graph_has_no_cycle():
    graph = package_imports()
    assert "ntk_evolution.ntk" in graph and graph["ntk_evolution.ntk"]
    # the package __init__ re-exports nothing that imports back into it
    graph = {m: deps - {"ntk_evolution"} for m, deps in graph.items() if m != "ntk_evolution"}
    assert cycle_in(graph) is None
