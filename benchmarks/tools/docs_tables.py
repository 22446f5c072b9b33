"""Keep the results tables in the README and ``docs/`` equal to the committed bench results.

A table in Markdown sits between two markers::

    <!-- results:TASK methods=lora,lora-rite,reflora-param source=benchmarks/full/lm.json -->
    ...generated...
    <!-- /results:TASK -->

``TASK`` is a task of the results (``mf``, ``graph``, ``lm``, ``lm-r64``, ...); ``methods`` (optional)
selects and orders the rows; ``baseline`` (optional, default ``lora``) is the method the others are
paired with; ``source`` (optional, comma-separated) names the results files, by default every
``benchmarks/full/*.json``. The text between the markers is exactly what
``reflora bench --from-results SOURCES --markdown --methods METHODS --baseline BASELINE`` prints
for that task.

    python benchmarks/tools/docs_tables.py            # rewrite every block from the results
    python benchmarks/tools/docs_tables.py --check    # exit 1 and name each block that differs

``tests/frontends/test_bench_peers.py`` runs the check, so a table cannot drift from its results.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BLOCK = re.compile(r"(<!-- results:(?P<task>[\w.+-]+)(?P<opts>[^>]*?)\s*-->\n)(?P<body>.*?)(<!-- /results:(?P=task) -->)",
                   re.S)


def default_sources() -> list[Path]:
    return sorted((ROOT / "benchmarks" / "full").glob("*.json"))


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def render(task: str, opts: str) -> str:
    """The Markdown of ``task`` for a block's options (``methods=...``, ``source=...``)."""
    from reflora.bench.cli import markdown_from

    kv = dict(item.split("=", 1) for item in opts.split())
    unknown = set(kv) - {"methods", "source", "baseline"}
    if unknown:
        raise ValueError(f"results block {task!r}: unknown option(s) {sorted(unknown)}; use methods=, source=, baseline=")
    sources = [ROOT / s for s in kv["source"].split(",")] if "source" in kv else default_sources()
    methods = kv["methods"].split(",") if "methods" in kv else None
    blocks = markdown_from(sources, methods, kv.get("baseline", "lora")).split("\n\n**")
    for i, b in enumerate(blocks):
        text = b if i == 0 else "**" + b
        if text.startswith(f"**{task}**:"):
            return text
    raise ValueError(f"results block {task!r}: no such task in {[str(s.relative_to(ROOT)) for s in sources]}")


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name


def update(check: bool, docs: list[Path] | None = None) -> list[str]:
    """Rewrite (or, with ``check``, only compare) every block of ``docs`` (default: the README and
    ``docs/``); returns ``file: task`` per block that differed."""
    stale = []
    for doc in documents() if docs is None else docs:
        text = doc.read_text()
        changed = False

        def repl(m: re.Match) -> str:
            nonlocal changed
            body = render(m["task"], m["opts"]) + "\n"
            if body != m["body"]:
                stale.append(f"{_rel(doc)}: {m['task']}")
                changed = True
            return m.group(1) + body + m.group(5)

        new = BLOCK.sub(repl, text)
        if changed and not check:
            doc.write_text(new)
    return stale


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="compare only; exit 1 if a block differs from its results")
    args = p.parse_args(argv)
    stale = update(args.check)
    for s in stale:
        print(("stale: " if args.check else "updated: ") + s)
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
