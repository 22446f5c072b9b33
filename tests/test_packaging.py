"""Packaging contract: `adapters/` installs as `reflora.adapters`, never as top-level `adapters`,
and importing reflora pulls in no optional dependency."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = ["peft", "transformers", "timm", "torch_geometric", "matplotlib", "sklearn", "adapters", "bitsandbytes", "torchao", "trl"]


def test_import_reflora_imports_no_optional_package() -> None:
    code = (
        "import sys, reflora, reflora.functional, reflora.adapters\n"
        f"bad = [m for m in {OPTIONAL!r} if m in sys.modules]\n"
        "assert not bad, bad\n"
        "assert reflora.__all__ == sorted(reflora.__all__)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT.parent)


@pytest.mark.slow
def test_wheel_installs_adapters_as_reflora_adapters(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for item in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / item, src / item)
    for folder in ("reflora", "adapters"):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(src)],
        check=True,
    )
    (wheel,) = dist.glob("reflora-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "reflora/adapters/__init__.py" in names
    assert "reflora/py.typed" in names
    assert not [n for n in names if n.startswith("adapters/")], names

    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)], check=True
    )
    code = (
        "import sys, importlib.util\n"
        f"sys.path.insert(0, {str(site)!r})\n"
        "import reflora, reflora.adapters\n"
        f"assert reflora.adapters.__file__.startswith({str(site)!r}), reflora.adapters.__file__\n"
        "assert reflora.adapters.find_pairs\n"
        "assert importlib.util.find_spec('adapters') is None, 'top-level adapters is taken'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
