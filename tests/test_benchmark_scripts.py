"""The benchmark scripts run (tiny, on CPU): their tables have every row, and every time is finite."""

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
import overhead  # noqa: E402


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


def test_overhead_small_model_and_bench_task_sections_run_small(capsys) -> None:
    """Sections (c) and (d) of benchmarks/overhead.py: a row per mode with finite times."""
    pytest.importorskip("torch_geometric")
    ratios = overhead.small_model(3, width=16, batch=4)
    assert set(ratios) == set(overhead.MODES) and all(math.isfinite(v) and v > 0 for v in ratios.values())
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith(("full-", "scalar-"))]
    assert [r[0] for r in rows] == ["-".join(m) for m in overhead.MODES]
    for r in rows:
        assert r[1].endswith("ms") and r[3].endswith("us") and r[4].endswith("us")
    task = overhead.bench_tasks(2, ["graph"])["graph"]
    assert set(task) == {"lora", "reflora", "reflora-param", "reflora-s", "reflora-s-grad"}
    assert task["lora"] == 1.0 and all(math.isfinite(v) and v > 0 for v in task.values())


@pytest.mark.distributed
def test_distributed_benchmark_runs_small_on_two_processes(capsys) -> None:
    import importlib.util

    import torch

    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    # by path, under its own name: a top-level `distributed` module may be dask's
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "distributed.py"
    spec = importlib.util.spec_from_file_location("reflora_benchmark_distributed", path)
    bench_distributed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_distributed)

    args = ["--hidden", "32", "--inter", "64", "--layers", "1", "--heads", "2", "--rank", "4", "--seq", "16",
            "--steps", "2", "--timeout", "120"]
    assert bench_distributed.main(args) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith(("fsdp2 ", "ddp "))]
    modes = ["bare", "full/gradient", "full/parameter", "scalar/gradient", "scalar/parameter"]
    assert [(r[0], r[1]) for r in rows] == [(b, m) for b in ("fsdp2", "ddp") for m in modes]
    for r in rows:
        assert r[2].endswith("ms") and math.isfinite(float(r[2][:-2]))
    # RefLoRA's bytes per step under FSDP2: 7 pairs x 2 Grams x 4 x 4 float64 (full), 7 x 2 float64 (scalar)
    ours = {r[1]: r[-1] for r in rows if r[0] == "fsdp2" and r[1] != "bare"}
    assert ours == {"full/gradient": "1.75KB", "full/parameter": "1.75KB", "scalar/gradient": "0.11KB",
                    "scalar/parameter": "0.11KB"}
    assert all(r[-1] == "0.00KB" for r in rows if r[0] == "ddp" and r[1] != "bare")
    growth = [line.split() for line in out.splitlines() if re.match(r"\s+\d+\s+\d", line)]
    assert [int(g[0]) for g in growth] == [8, 16, 32, 64, 128, 256, 512, 1024]
