"""The README and the documentation pages stay true: their Python blocks run, the README keeps its
line budget, every error and warning class is in the troubleshooting page, local links resolve,
and the version is the same everywhere it is written.

A Python block (a fence opened with ``python`` or ``py``) runs unless the line just above it is
``<!-- skip: REASON -->``, and REASON has to say why, starting with one of ``SKIP_REASONS``;
``needs MODULE ...`` skips only where MODULE is not installed. The
blocks of one page run in order in one namespace (a page is a tutorial: later blocks build on
earlier ones), in a temporary working directory, with the finder and transport registries
restored afterwards.
"""

from __future__ import annotations

import ast

import contextlib
import importlib
import importlib.util
import inspect
import os
import pkgutil
import re
import warnings
from pathlib import Path

import pytest

import reflora

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
README_MAX_LINES = 250

# A skipped block names why, starting with one of these.
SKIP_REASONS = ("torchrun", "CUDA", "fragment of", "needs", "placeholder")

# Pages of other branches that the README / docs link to before they land (remove on merge).
PENDING: set[str] = set()

_FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)
_SKIP = re.compile(r"<!--\s*skip:\s*(.*?)\s*-->\s*$")


def python_blocks(path: Path) -> list[tuple[int, str, str | None]]:
    """``(line, code, skip_reason)`` for every Python block of a Markdown file."""
    text = path.read_text()
    out = []
    for m in _FENCE.finditer(text):
        if m.group(1) not in ("python", "py"):
            continue
        line = text.count("\n", 0, m.start()) + 1
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        skip = _SKIP.search(before)
        out.append((line, m.group(2), skip.group(1) if skip else None))
    return out


@contextlib.contextmanager
def _isolated(tmp_path: Path):
    from reflora import adapters
    from reflora.transport import registry as transport

    finders, transports, cwd = list(adapters._REGISTRY), dict(transport._REGISTRY), os.getcwd()
    os.chdir(tmp_path)
    try:
        yield
    finally:
        os.chdir(cwd)
        adapters._REGISTRY[:] = finders
        transport._REGISTRY.clear()
        transport._REGISTRY.update(transports)


def _skipped(skip: str | None) -> bool:
    if skip is None:
        return False
    m = re.match(r"needs ([A-Za-z_][\w.]*)", skip)
    if m and importlib.util.find_spec(m.group(1).split(".")[0]) is not None:
        return False  # the module is installed: run the block
    return True


def _runnable(path: Path) -> bool:
    return any(not _skipped(skip) for _, _, skip in python_blocks(path))


@pytest.mark.parametrize("page", [p for p in PAGES if _runnable(p)], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_python_blocks_run(page: Path, tmp_path: Path) -> None:
    namespace: dict = {"__name__": f"docs:{page.name}"}
    with _isolated(tmp_path), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # third-party noise; the blocks' own warnings are shown as text
        for line, code, skip in python_blocks(page):
            if not _skipped(skip):
                exec(compile(code, f"{page.relative_to(ROOT)}:{line}", "exec"), namespace)


def test_every_python_block_runs_or_names_why_not() -> None:
    counts = {"run": 0, "skipped": 0}
    for page in PAGES:
        for line, _, skip in python_blocks(page):
            if not _skipped(skip):
                counts["run"] += 1
            else:
                where = f"{page.relative_to(ROOT)}:{line}"
                assert skip.startswith(SKIP_REASONS), f"{where}: skip reason {skip!r} must start with one of {SKIP_REASONS}"
                counts["skipped"] += 1
    print(f"Python blocks in README.md and docs/*.md: {counts['run']} run, {counts['skipped']} skipped with a reason")
    assert counts["run"] >= 10 and counts["skipped"] <= counts["run"]


def test_readme_stays_short() -> None:
    n = len((ROOT / "README.md").read_text().splitlines())
    assert n <= README_MAX_LINES, (
        f"README.md has {n} lines (budget {README_MAX_LINES}): move detail into docs/ and link to it"
    )


def _package_modules():
    import reflora.adapters  # installed from the top-level adapters/ folder: walked on its own

    infos = [*pkgutil.walk_packages(reflora.__path__, "reflora."),
             *pkgutil.walk_packages(reflora.adapters.__path__, "reflora.adapters.")]
    yield reflora.adapters
    for info in infos:
        try:
            yield importlib.import_module(info.name)
        except ImportError as err:  # an optional dependency is missing: that module's classes are not checked
            warnings.warn(f"{info.name} not checked: {err}")


def test_every_error_and_warning_class_is_in_troubleshooting() -> None:
    text = (DOCS / "troubleshooting.md").read_text()
    defined = {
        obj.__name__
        for module in _package_modules()
        for _, obj in inspect.getmembers(module, inspect.isclass)
        if issubclass(obj, BaseException) and obj.__module__ == module.__name__
    }
    assert {"NoPairsFoundError", "UnsupportedOptimizerError", "ShardingError", "RankAboveSizeWarning"} <= defined
    missing = sorted(name for name in defined if f"`{name}`" not in text)
    assert not missing, f"docs/troubleshooting.md does not mention {missing}"


def _source_strings() -> str:
    """The package's source with implicitly concatenated string literals joined, so that a
    message split over several lines reads as one."""
    text = "\n".join(p.read_text() for folder in ("reflora", "adapters") for p in (ROOT / folder).rglob("*.py"))
    return re.sub(r"""(["'])\s*\n\s*(?:rf|fr|f|r)?\1""", "", text)


def test_troubleshooting_quotes_the_messages_as_raised() -> None:
    """Every message quoted in the first column of the troubleshooting tables is in the source:
    the literal parts between ``...`` (12 characters or longer) appear as written."""
    source = _source_strings()
    stale = []
    for row in re.findall(r"^\| (.*?) \|", (DOCS / "troubleshooting.md").read_text(), re.M):
        for span in re.findall(r"`([^`]+)`", row):
            message = re.sub(r"^\w+(Error|Warning): ", "", span)
            stale += [f"{span!r}: {part!r}" for part in (s.strip() for s in message.split("...")) if len(part) >= 12 and part not in source]
    assert not stale, stale


def _warning_messages() -> list[tuple[str, str]]:
    """``(where, literal head)`` of every ``warnings.warn`` call in the package: the first run of
    literal text of 12 characters or more in its message, cut to 40."""
    out = []
    for folder in ("reflora", "adapters"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "warn"
                        and isinstance(node.func.value, ast.Name) and node.func.value.id == "warnings"):
                    continue
                parts: list[str] = []

                def literal(n: ast.AST) -> None:
                    if isinstance(n, ast.Constant) and isinstance(n.value, str):
                        parts.append(n.value)
                    elif isinstance(n, ast.JoinedStr):
                        for v in n.values:
                            parts.append(v.value if isinstance(v, ast.Constant) else "\0")
                    elif isinstance(n, ast.BinOp):
                        literal(n.left)
                        literal(n.right)

                literal(node.args[0])
                runs = [r.strip(" .;:,") for r in "".join(parts).split("\0")]
                head = next((r for r in runs if len(r) >= 12), "")
                if head:
                    out.append((f"{path.relative_to(ROOT)}:{node.lineno}", head[:40].strip()))
    return out


def test_every_warning_message_is_in_troubleshooting() -> None:
    """A warning added anywhere in the package must be listed on the troubleshooting page (its
    first run of literal text, up to 40 characters)."""
    messages = _warning_messages()
    assert len(messages) >= 20
    text = re.sub(r"\s+", " ", (DOCS / "troubleshooting.md").read_text())
    missing = [f"{where}: {head!r}" for where, head in messages if re.sub(r"\s+", " ", head) not in text]
    assert not missing, "docs/troubleshooting.md does not list these warnings:\n" + "\n".join(missing)


_LINK = re.compile(r"\]\(([^)\s#]+)(#[^)\s]*)?\)")


def test_local_links_resolve() -> None:
    broken = []
    for page in PAGES + [ROOT / "CHANGELOG.md"]:
        for m in _LINK.finditer(page.read_text()):
            target = m.group(1)
            if re.match(r"[a-z]+:", target):
                continue
            path = (page.parent / target).resolve()
            if not path.exists() and path.relative_to(ROOT).as_posix() not in PENDING:
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, broken


def test_project_files() -> None:
    """LICENSE is the license the package metadata names; CITATION.cff is valid YAML that cites
    the software and prefers the paper."""
    text = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^license = "MIT"$', text, re.M) and re.search(r'^license-files = \["LICENSE"\]$', text, re.M)
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    yaml = pytest.importorskip("yaml")
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["type"] == "software" and cff["license"] == "MIT"
    assert "2505.18877" in cff["preferred-citation"]["url"]


def test_version_is_the_same_everywhere() -> None:
    version = re.search(r'^version = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert reflora.__version__ == version
    assert re.search(rf"^version: {re.escape(version)}$", (ROOT / "CITATION.cff").read_text(), re.M)
    # Keep a Changelog: an "Unreleased" section may sit above the latest release
    first = re.search(r"^## (?!Unreleased)(\S+)", (ROOT / "CHANGELOG.md").read_text(), re.M).group(1)
    assert first == version, f"CHANGELOG.md's latest entry is {first}, the package is {version}"
