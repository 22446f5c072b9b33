"""Finder plugins through the ``reflora.finders`` entry-point group, tested with real wheels.

The wheels are written here (zipfile plus dist-info, no network, no build backend), installed
with pip into a temporary directory, and used from a fresh interpreter, as a user's would be.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

GOOD = '''
from reflora.adapters import LoRAPair


def find_updown(name, module, options):
    if type(module).__name__ == "UpDown":
        return [LoRAPair(name, module.down, module.up, module=module)]
    return None


find_updown.priority = 200
find_updown.supports = "UpDown layers (demo plugin)"


def find_late(name, module, options):
    return None


find_late.priority = -200


def find_raises(name, module, options):
    raise RuntimeError("plugin bug")


find_raises.priority = 150
'''


def _wheel(tmp: Path, dist: str, package: str, source: str, entry_points: dict[str, str]) -> Path:
    files = {
        f"{package}/__init__.py": source,
        f"{dist}-0.1.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {dist.replace('_', '-')}\nVersion: 0.1\n",
        f"{dist}-0.1.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        f"{dist}-0.1.dist-info/entry_points.txt": "[reflora.finders]\n"
        + "".join(f"{k} = {v}\n" for k, v in entry_points.items()),
    }
    record = f"{dist}-0.1.dist-info/RECORD"
    lines = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        lines.append(f"{path},sha256={digest},{len(text.encode())}")
    files[record] = "\n".join(lines + [f"{record},,"]) + "\n"
    path = tmp / f"{dist}-0.1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
    return path


SCRIPT = textwrap.dedent('''
    import json, sys, warnings
    import torch
    from torch import nn
    import reflora
    lazy = "reflora_plugin_demo" not in sys.modules and "broken_finder" not in sys.modules
    from reflora.adapters import find_pairs, list_finders

    class UpDown(nn.Module):
        def __init__(self):
            super().__init__()
            self.down = nn.Parameter(torch.randn(2, 8))
            self.up = nn.Parameter(torch.zeros(4, 2))

    model = nn.Sequential(UpDown(), nn.Linear(4, 4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        order = [n for n, _ in list_finders()]
        first = [p.name for p in find_pairs(model)]
        second = [p.name for p in find_pairs(model)]
    print(json.dumps({"lazy": lazy, "order": order, "first": first, "second": second,
                      "warnings": [str(w.message) for w in caught]}))
''')


@pytest.mark.slow
def test_plugins_from_installed_wheels(tmp_path: Path) -> None:
    good = _wheel(tmp_path, "reflora_plugin_demo", "reflora_plugin_demo", GOOD,
                  {"updown": "reflora_plugin_demo:find_updown", "late": "reflora_plugin_demo:find_late",
                   "raises": "reflora_plugin_demo:find_raises"})
    broken = _wheel(tmp_path, "broken_finder", "broken_finder", "raise ImportError('needs somelib')\n",
                    {"broken": "broken_finder:finder"})
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--no-build-isolation",
         "--disable-pip-version-check", "--target", str(site), str(good), str(broken)],
        check=True, capture_output=True,
    )
    assert (site / "reflora_plugin_demo-0.1.dist-info" / "entry_points.txt").exists()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True)
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["lazy"]  # importing reflora imports no plugin
    order = out["order"]
    assert order[:2] == ["updown", "raises"] and order[-1] == "late"  # by priority, around the built-ins
    assert order[2:6] == ["peft_lora", "reflora_pyg", "marked_bottleneck", "owned_factors"]
    assert out["first"] == out["second"] == ["0"]  # the plugin found the UpDown pair
    broken_w = [w for w in out["warnings"] if "'broken'" in w]
    assert len(broken_w) == 1 and "failed to import" in broken_w[0] and "needs somelib" in broken_w[0]
    assert "broken-finder 0.1" in broken_w[0]
    raises_w = [w for w in out["warnings"] if "'raises'" in w]
    assert len(raises_w) == 1 and "plugin bug" in raises_w[0] and "disabled" in raises_w[0]


def test_load_plugins_registers_entry_points_by_priority(monkeypatch) -> None:
    """In-process: a fake entry point list, a clash with a built-in name, a non-callable."""
    import importlib.metadata as md

    import reflora.adapters as adapters
    from reflora.adapters import plugins

    class EP:
        def __init__(self, name, obj):
            self.name, self.value, self.dist, self._obj = name, f"fake:{name}", None, obj

        def load(self):
            if isinstance(self._obj, Exception):
                raise self._obj
            return self._obj

    def finder(name, module, options):
        return None

    finder.priority = 5
    eps = [EP("zz_ok", finder), EP("peft_lora", finder), EP("not_callable", 3), EP("bad", ImportError("x"))]
    monkeypatch.setattr(md, "entry_points", lambda group: eps if group == "reflora.finders" else [])
    monkeypatch.setattr(plugins, "_loaded", False)
    try:
        with pytest.warns(plugins.FinderPluginWarning) as caught:
            names = [n for n, _ in adapters.list_finders()]
        messages = " | ".join(str(w.message) for w in caught)
        assert "'peft_lora'" in messages and "already registered" in messages
        assert "'not_callable'" in messages and "'bad'" in messages and "failed to import" in messages
        assert names.index("zz_ok") == names.index("marked_bottleneck") + 1  # priority 5: after 10, before -100
        assert names.count("peft_lora") == 1
    finally:
        if "zz_ok" in dict(adapters.list_finders()):
            adapters.unregister_finder("zz_ok")
