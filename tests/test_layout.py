"""The code's layout: one subpackage per system, a package that imports nothing from the
repository root, root modules that are the original's names for the package's, no file that edits
sys.path, and an import graph with no cycle."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import tomllib

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


def all_package_imports() -> dict[str, set[str]]:
    """Each module of ntk_evolution and every module it imports."""
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
    return graph


def package_imports() -> dict[str, set[str]]:
    """Each module of ntk_evolution and the package modules it imports."""
    graph = all_package_imports()
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
    assert "ntk_evolution.kernels.ntk" in graph and graph["ntk_evolution.kernels.ntk"]
    # the package __init__ re-exports nothing that imports back into it
    graph = {m: deps - {"ntk_evolution"} for m, deps in graph.items() if m != "ntk_evolution"}
    assert cycle_in(graph) is None


SYSTEMS = ("attacks", "kernels", "similarity", "automata", "io", "study")


def test_each_system_is_a_subpackage_with_its_figures():
    graph = package_imports()
    for system in SYSTEMS:
        assert f"ntk_evolution.{system}" in graph, system
        members = [m for m in graph if m.startswith(f"ntk_evolution.{system}.")]
        assert len(members) >= 2, (system, members)
    for system in ("attacks", "kernels", "similarity", "automata", "study"):
        assert f"ntk_evolution.{system}.plots" in graph
        # every figure is saved through the one save_figure
        assert "ntk_evolution.figures" in graph[f"ntk_evolution.{system}.plots"], system
    core = [m for m in graph if m.count(".") == 1 and m.split(".")[1] not in SYSTEMS]
    assert len(core) <= 10, core  # a small core: models, data, dynamics, training, ...


def test_the_package_imports_nothing_from_the_root():
    root_modules = {
        name[:-3] for name in os.listdir(ROOT) if name.endswith(".py") and name != "setup.py"
    }
    assert {"models", "data", "utils", "run_exp"} <= root_modules
    found = {
        module: sorted(imported & root_modules)
        for module, imported in all_package_imports().items()
        if imported & root_modules
    }
    assert found == {}


def test_no_generic_top_level_module_is_installed():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        installed = tomllib.load(f)["tool"]["setuptools"].get("py-modules", [])
    assert not {"models", "data", "utils"} & set(installed)


def test_the_root_modules_are_the_packages_under_the_originals_names():
    code = (
        "import models, data, utils\n"
        "import ntk_evolution.models as m, ntk_evolution.data as d, ntk_evolution.utils as u\n"
        "assert models.get_model is m.get_model and models.MODELS is m.MODELS\n"
        "assert data.load_dataset is d.load_dataset and data.SHAPES is d.SHAPES\n"
        "assert utils.UserError is u.UserError and utils.save_pickle is u.save_pickle\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.stdout.strip() == "ok", done.stderr


def test_the_systems_import_each_other_without_a_cycle():
    """Each subpackage taken as one node (with the core modules): no system imports one that
    imports it back, so each can be read from the bottom up."""

    def node(module: str) -> str:
        return ".".join(module.split(".")[:2])

    systems: dict[str, set[str]] = {}
    for module, imported in package_imports().items():
        systems.setdefault(node(module), set()).update(
            node(other) for other in imported if node(other) != node(module)
        )
    assert "ntk_evolution.attacks" in systems["ntk_evolution.kernels"]
    assert cycle_in(systems) is None, cycle_in(systems)
