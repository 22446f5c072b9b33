"""The GPU-check benchmark runs (tiny, on CPU): its table has every row, and every time is finite."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_overhead  # noqa: E402


def test_gpu_overhead_runs_small_on_cpu(capsys) -> None:
    args = ["--device", "cpu", "--hidden", "32", "--inter", "64", "--heads", "2", "--layers", "1",
            "--tokens", "32", "--ranks", "4", "--repeats", "2", "--compile-ranks"]
    assert gpu_overhead.main(args) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if re.match(r"\s+4\s", line)]
    labels = ["full/gradient/eigh", "full/gradient/newton_schulz", "full/parameter/eigh",
              "full/parameter/newton_schulz", "scalar/gradient"]
    assert [next(lab for lab in labels if f" {lab} " in row) for row in rows] == labels
    for row in rows:
        r, step, label, grouped, per_layer, compiled, share = row.split()
        for cell in (step, grouped, per_layer):
            assert cell.endswith("ms") and math.isfinite(float(cell[:-2]))
        assert compiled == "nanms"  # --compile-ranks given empty: no compiled rows
        assert share.endswith("%")
