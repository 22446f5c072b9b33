"""The package's shape (issue 18, item 4): module sizes, no import cycle, no private names
imported across modules, the module `attach` not shadowed by its function."""

from __future__ import annotations

import ast
import pathlib
import re
from pathlib import Path

import reflora

ROOT = pathlib.Path(reflora.__file__).parent
ADAPTERS = pathlib.Path(reflora.adapters.__file__).parent


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for base, prefix in ((ROOT, "reflora"), (ADAPTERS, "reflora.adapters")):
        for path in base.rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if base == ROOT and parts[0] == "adapters":
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([prefix, *parts])] = path
    return out


def _code_lines(path: pathlib.Path) -> int:
    src = path.read_text()
    docs: set[int] = set()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(getattr(first, "value", None), ast.Constant) \
                    and isinstance(first.value.value, str):
                docs.update(range(first.lineno, first.end_lineno + 1))  # type: ignore[operator]
    return sum(1 for i, line in enumerate(src.splitlines(), 1)
               if line.strip() and not line.strip().startswith("#") and i not in docs)


def _imports(path: pathlib.Path, top_level_only: bool) -> list[tuple[str, list[str]]]:
    tree = ast.parse(path.read_text())
    out: list[tuple[str, list[str]]] = []

    def visit(body):
        for node in body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue  # annotations only
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                out.append((node.module, [a.name for a in node.names]))
            elif isinstance(node, ast.Import):
                out.extend((a.name, []) for a in node.names)
            elif isinstance(node, (ast.If, ast.Try)):
                visit(node.body)

    if top_level_only:
        visit(tree.body)
    else:
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                out.append((node.module, [a.name for a in node.names]))
    return out


def test_no_module_is_over_about_500_lines_of_code():
    sizes = {name: _code_lines(path) for name, path in _modules().items()}
    assert max(sizes.values()) <= 500, sorted(sizes.items(), key=lambda kv: -kv[1])[:3]


def test_no_import_of_another_modules_private_names():
    bad = []
    for name, path in _modules().items():
        for module, names in _imports(path, top_level_only=False):
            if module.startswith("reflora") and module != name:
                bad += [f"{name}: from {module} import {n}" for n in names if n.startswith("_") and not n.startswith("__")]
    assert not bad, bad


def test_no_import_cycle_at_import_time():
    mods = _modules()
    edges: dict[str, set[str]] = {}
    for name, path in mods.items():
        deps = set()
        for module, names in _imports(path, top_level_only=True):
            deps |= {f"{module}.{n}" for n in names if f"{module}.{n}" in mods}
            if module in mods:
                deps.add(module)
        # a package's __init__ re-exporting its submodules is not a cycle
        edges[name] = {d for d in deps if d != name and not name.startswith(d + ".")}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in edges.get(node, ()):
            if dep.startswith(node + "."):
                continue  # a package importing its own submodule
            assert state.get(dep) != 1, " -> ".join(path + [dep])
            if dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for name in mods:
        if name not in state:
            visit(name, [name])


def test_the_attach_function_does_not_shadow_a_module():
    import importlib.util

    assert callable(reflora.attach) and reflora.attach.__module__ == "reflora.hooks"
    assert importlib.util.find_spec("reflora.attach") is None


def test_every_benchmark_script_and_folder_is_in_the_benchmarks_readme():
    """benchmarks/README.md says what each script measures and how to run it: a new script or
    results folder without a row there fails."""
    bench = Path(__file__).resolve().parent.parent / "benchmarks"
    readme = (bench / "README.md").read_text()
    listed = set(re.findall(r"^\| `([^`]+)` \|", readme, flags=re.M))
    present = {p.name for p in bench.glob("*.py")} | {p.name for p in bench.glob("*.sh")}
    present |= {p.name + "/" for p in bench.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))}
    assert present - listed == set(), f"add a row to benchmarks/README.md for {sorted(present - listed)}"
    assert listed - present == set(), f"benchmarks/README.md lists what is not there: {sorted(listed - present)}"
