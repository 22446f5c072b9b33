"""The docstring examples run, and the demo shows what it claims. (The README's and the docs'
code blocks run in tests/project/test_docs_site.py.)"""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import subprocess
import sys

import pytest

from reflora.bench import mf


DOC_MODULES = ["reflora.functional", "reflora.func", "reflora.pairs", "reflora.adapters", "reflora.attaching", "reflora.config", "reflora.optimizers", "reflora.transport", "reflora.transport.spec", "reflora.transport.lowbit"]  # (reflora.attaching: attach)
if importlib.util.find_spec("torch_geometric"):
    DOC_MODULES.append("reflora.adapters.pyg")
if importlib.util.find_spec("timm") and importlib.util.find_spec("peft"):
    DOC_MODULES.append("reflora.adapters.timm")


@pytest.mark.parametrize("name", DOC_MODULES)
def test_docstring_examples(name) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_mf_reflora_beats_lora() -> None:
    cfg = mf.MFConfig()
    reflora_01 = mf.run("reflora", 0.01, cfg, seed=0)
    lora_01 = mf.run("lora", 0.01, cfg, seed=0)
    lora_03 = mf.run("lora", 0.03, cfg, seed=0)
    reflora_03 = mf.run("reflora", 0.03, cfg, seed=0)
    assert mf.iterations_to(reflora_01) is not None and mf.iterations_to(reflora_01) <= 45
    assert mf.iterations_to(reflora_03) is not None and mf.iterations_to(reflora_03) <= 25
    assert mf.iterations_to(lora_01) is None
    assert len(lora_03) < cfg.iters + 1  # diverged and stopped early


def test_demo_command_prints_the_comparison() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "reflora", "demo", "--seeds", "1", "--iters", "50"],
        check=True, capture_output=True, text=True,
    ).stdout
    for method in mf.METHODS:
        assert method in out
    assert "diverged" in out  # plain LoRA at lr 0.03
    row = next(line for line in out.splitlines() if line.split()[:2] == ["0.01", "reflora"])
    assert float(row.split()[-2]) < 1e-3  # loss after 50 iterations


def test_cli_rejects_bad_arguments() -> None:
    res = subprocess.run([sys.executable, "-m", "reflora", "demo", "--seeds", "0"], capture_output=True, text=True)
    assert res.returncode == 2 and "--seeds must be >= 1; got 0" in res.stderr
    res = subprocess.run([sys.executable, "-m", "reflora", "bench", "--steps", "-1"], capture_output=True, text=True)
    assert res.returncode == 2 and "--steps must be >= 1; got -1" in res.stderr
    res = subprocess.run([sys.executable, "-m", "reflora", "bench", "--tasks", "audio"], capture_output=True, text=True)
    assert res.returncode == 2 and "invalid choice: 'audio'" in res.stderr
    res = subprocess.run([sys.executable, "-m", "reflora", "bogus"], capture_output=True, text=True)
    assert res.returncode == 2 and "invalid choice" in res.stderr
