"""Packaging contract: `adapters/` installs as `reflora.adapters`, never as top-level `adapters`,
and importing reflora pulls in no optional dependency."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
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
def test_sdist_and_wheel_build_without_warnings_and_the_wheel_installs_on_its_own(tmp_path: Path) -> None:
    """``python -m build`` makes the sdist and, from it, the wheel: no license deprecation warning
    (an SPDX ``license`` string and ``license-files``, PEP 639). The wheel installed into a scratch
    folder imports ``reflora`` and ``reflora.adapters`` with the checkout off the path, never as a
    top-level ``adapters``, and carries ``py.typed``, ``LICENSE`` and the console script."""
    src = tmp_path / "src"
    src.mkdir()
    for item in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / item, src / item)
    for folder in ("reflora", "adapters"):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path / "dist"
    built = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(src)],
        check=True, capture_output=True, text=True,
    )
    log = built.stdout + built.stderr
    assert "deprecated" not in log.lower(), log[-3000:]  # e.g. "`project.license` as a TOML table is deprecated"
    (sdist,) = dist.glob("reflora-*.tar.gz")
    with tarfile.open(sdist) as tar:
        members = tar.getnames()
    assert any(m.endswith("/LICENSE") for m in members) and any(m.endswith("/adapters/traced.py") for m in members)
    (wheel,) = dist.glob("reflora-*.whl")
    zf = zipfile.ZipFile(wheel)
    names = zf.namelist()
    assert "reflora/adapters/__init__.py" in names
    assert "reflora/py.typed" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), names
    assert not [n for n in names if n.startswith("adapters/")], names
    (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    meta = zf.read(metadata).decode()
    assert "License-Expression: MIT" in meta and "License-File: LICENSE" in meta
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    entries = zf.read(entry_points).decode()
    assert "[console_scripts]" in entries and "reflora = reflora.__main__:main" in entries

    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)], check=True
    )
    code = (
        "import sys, importlib.util\n"
        f"sys.path = [p for p in sys.path if p not in ('', {str(ROOT)!r})]\n"
        f"sys.path.insert(0, {str(site)!r})\n"
        "import reflora, reflora.adapters\n"
        f"assert reflora.__file__.startswith({str(site)!r}), reflora.__file__\n"
        f"assert reflora.adapters.__file__.startswith({str(site)!r}), reflora.adapters.__file__\n"
        "assert reflora.adapters.find_pairs and reflora.attach\n"
        "assert importlib.util.find_spec('adapters') is None, 'top-level adapters is taken'\n"
    )
    # -S, then site-packages appended by hand: its .pth files (the editable install of this checkout)
    # are not processed, so only the wheel can provide reflora
    env_site = subprocess.run([sys.executable, "-c", "import torch, os; print(os.path.dirname(os.path.dirname(torch.__file__)))"],
                              check=True, capture_output=True, text=True).stdout.strip()
    subprocess.run([sys.executable, "-S", "-c", f"import sys; sys.path.append({env_site!r})\n" + code],
                   check=True, cwd=tmp_path)
