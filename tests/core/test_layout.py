"""The package's shape (issues 18 and 32): the layers of docs/design.md and nothing else.

Every import counts, wherever it is written (module level, inside a function, under
``TYPE_CHECKING``): no module imports one of a higher layer, and no chain of imports comes back to
where it started. Also: modules stay readable in one sitting, no module imports another's
underscore names, ``integrations/`` is framework glue above ``attach``, and the function ``attach``
does not share a name with a module.
"""

from __future__ import annotations

import ast
import fnmatch
import pathlib
import re
from pathlib import Path

import reflora

ROOT = pathlib.Path(reflora.__file__).parent
ADAPTERS = pathlib.Path(reflora.adapters.__file__).parent

#: The layers, bottom first, as docs/design.md draws them. A module may import its own layer and
#: those below it.
LAYERS: list[tuple[str, list[str]]] = [
    ("options", ["reflora.config"]),
    ("math", ["reflora._linalg", "reflora._kernels", "reflora.functional"]),
    ("pairs", ["reflora.pairs"]),
    ("discovery", ["reflora.adapters", "reflora.adapters.*"]),
    ("sharding", ["reflora.distributed", "reflora.reshard"]),
    ("state transport", ["reflora.transport", "reflora.transport.*", "reflora.lowbit"]),
    ("step core", ["reflora.step", "reflora.base_steps"]),
    ("step services", ["reflora.diagnostics", "reflora.cache", "reflora.runner", "reflora.strategies",
                       "reflora.checkpoint", "reflora.optimizers"]),
    ("front-ends", ["reflora.handle", "reflora.attaching", "reflora.func"]),
    ("framework glue", ["reflora.integrations", "reflora.integrations.*"]),
    ("package and applications", ["reflora", "reflora.__main__", "reflora.bench", "reflora.bench.*"]),
]


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


def _layer(module: str) -> int:
    for i, (_, patterns) in enumerate(LAYERS):
        if any(fnmatch.fnmatchcase(module, p) for p in patterns):
            return i
    raise AssertionError(f"{module} is in no layer: add it to LAYERS here and to docs/design.md")


def _imports(path: pathlib.Path) -> list[tuple[str, list[str]]]:
    """Every ``(module, names)`` imported anywhere in the file (TYPE_CHECKING blocks and
    function bodies included), absolute and relative."""
    out: list[tuple[str, list[str]]] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: relative import; write it absolute")
        elif isinstance(node, ast.Import):
            out.extend((a.name, []) for a in node.names)
    return out


def _edges() -> dict[str, set[str]]:
    """Module -> the reflora modules it imports (``from reflora import step`` is reflora.step)."""
    mods = _modules()
    edges: dict[str, set[str]] = {}
    for name, path in mods.items():
        deps = set()
        for module, names in _imports(path):
            if not module.startswith("reflora"):
                continue
            subs = {f"{module}.{n}" for n in names if f"{module}.{n}" in mods}
            deps |= subs
            if len(subs) < len(names) or not names:
                deps.add(module if module in mods else module.rsplit(".", 1)[0])
        edges[name] = {d for d in deps if d != name}
    return edges


def test_every_module_is_in_a_layer_and_imports_nothing_above_its_own():
    up = []
    for name, deps in _edges().items():
        for dep in deps:
            if _layer(dep) > _layer(name):
                up.append(f"{name} ({LAYERS[_layer(name)][0]}) imports {dep} ({LAYERS[_layer(dep)][0]})")
    assert not up, up


def test_no_import_cycle_counting_every_import():
    edges = _edges()
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(edges.get(node, ())):
            assert state.get(dep) != 1, " -> ".join(path + [dep])
            if dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for name in sorted(edges):
        if name not in state:
            visit(name, [name])


def test_the_options_import_nothing_of_reflora():
    assert _edges()["reflora.config"] == set()


def test_integrations_are_framework_glue_above_attach():
    """Nothing below the applications imports integrations/, and integrations/ drives the
    front-ends and their services only, never the step core, the kernels or the math."""
    edges = _edges()
    glue = [m for m in edges if m.startswith("reflora.integrations")]
    assert glue
    for name, deps in edges.items():
        if not name.startswith(("reflora.integrations", "reflora.bench")) and name != "reflora":
            assert not {d for d in deps if d.startswith("reflora.integrations")}, name
    core = ("reflora.step", "reflora._kernels", "reflora._linalg", "reflora.functional", "reflora.runner")
    for name in glue:
        assert _layer(name) > _layer("reflora.attaching"), name
        assert not edges[name] & set(core), (name, edges[name] & set(core))


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


def test_no_module_is_over_about_500_lines_of_code():
    sizes = {name: _code_lines(path) for name, path in _modules().items()}
    assert max(sizes.values()) <= 500, sorted(sizes.items(), key=lambda kv: -kv[1])[:3]


def test_no_import_of_another_modules_private_names():
    bad = []
    for name, path in _modules().items():
        for module, names in _imports(path):
            if module.startswith("reflora") and module != name:
                bad += [f"{name}: from {module} import {n}" for n in names if n.startswith("_") and not n.startswith("__")]
    assert not bad, bad


def test_the_attach_function_does_not_shadow_a_module():
    import importlib.util

    assert callable(reflora.attach) and reflora.attach.__module__ == "reflora.attaching"
    assert importlib.util.find_spec("reflora.attach") is None


def test_every_benchmark_script_and_folder_is_in_the_benchmarks_readme():
    """benchmarks/README.md says what each script measures and how to run it: a new script or
    results folder without a row there fails (the studies and tools folders included)."""
    bench = Path(__file__).resolve().parents[2] / "benchmarks"
    readme = (bench / "README.md").read_text()
    listed = set(re.findall(r"^\| `([^`]+)` \|", readme, flags=re.M))
    present = set()
    for folder in (bench, bench / "studies", bench / "tools"):
        prefix = "" if folder == bench else folder.name + "/"
        present |= {prefix + p.name for p in folder.glob("*.py")} | {prefix + p.name for p in folder.glob("*.sh")}
        present |= {prefix + p.name + "/" for p in folder.iterdir()
                    if p.is_dir() and not p.name.startswith(("_", ".")) and p.name not in ("studies", "tools")}
    assert present - listed == set(), f"add a row to benchmarks/README.md for {sorted(present - listed)}"
    assert listed - present == set(), f"benchmarks/README.md lists what is not there: {sorted(listed - present)}"
