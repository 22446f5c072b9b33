"""The benchmark scripts run (tiny, on CPU): their tables have every row, and every time is finite."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks" / "studies"))
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
    floors = [("floor", "gradient"), ("floor", "parameter")]
    assert set(ratios) == {*overhead.MODES, *floors} and all(math.isfinite(v) and v > 0 for v in ratios.values())
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith(("full-", "scalar-"))]
    assert [r[0] for r in rows] == ["-".join(m) for m in overhead.MODES]
    for r in rows:
        assert r[1].endswith("ms") and r[3].endswith("us") and r[4].endswith("us")
    assert sum(line.startswith("minimal hook, full-") for line in out.splitlines()) == 2
    every_other = overhead.small_model(4, width=16, batch=4, interval=2)  # hook time: a mean, no back-to-back
    assert set(every_other) == {*overhead.MODES, *floors}
    out = capsys.readouterr().out
    assert "(interval=2)" in out
    rows = [line.split() for line in out.splitlines() if line.startswith(("full-", "scalar-"))]
    assert len(rows) == 4 and all(r[3].endswith("us") and r[4] == "-" for r in rows)
    task = overhead.bench_tasks(2, ["graph"])["graph"]
    assert set(task) == {"lora", "reflora", "reflora-param", "reflora-s", "reflora-s-grad"}
    assert task["lora"] == 1.0 and all(math.isfinite(v) and v > 0 for v in task.values())


def test_interval_script_runs_small(capsys) -> None:
    """benchmarks/studies/interval.py: a row per interval with paired differences, on the graph task."""
    pytest.importorskip("torch_geometric")
    import interval

    assert interval.main(["--tasks", "graph", "--intervals", "1", "3", "--seeds", "2", "--steps", "4"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(("LoRA ", "interval "))]
    assert [r.split()[0] + (r.split()[1] if r.startswith("interval") else "") for r in rows] == ["LoRA", "interval1", "interval3"]
    assert rows[2].count("W ") == 3  # vs LoRA (loss, metric) and vs interval 1


def test_bench_attach_options_are_for_reflora_methods_only() -> None:
    from torch import nn

    from reflora.bench.methods import make_optimizer

    model = nn.Linear(4, 4)
    with pytest.raises(ValueError, match=r"attach options \['interval'\] apply to the RefLoRA methods only"):
        make_optimizer("lora", model, 1e-3, interval=2)


@pytest.mark.parametrize("space", ["gradient", "parameter"])
def test_overhead_minimal_hook_does_the_same_work_as_attach(space) -> None:
    """Section (c)'s floor is only a floor if it computes what attach does: on a live PEFT model
    (B != 0, every direction live) both give the same factors, gradients and Adam moments."""
    import copy

    import torch
    from peft import LoraConfig, get_peft_model
    from torch import nn

    import reflora

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32))
    model0 = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2", "4"]))
    x, y = torch.randn(16, 32), torch.randn(16, 32)
    opt0 = torch.optim.AdamW([p for p in model0.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(5):
        opt0.zero_grad()
        (model0(x) - y).square().mean().backward()
        opt0.step()
    out = {}
    for how in ("plain", "attach", "floor"):
        model = copy.deepcopy(model0)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        opt.load_state_dict(copy.deepcopy(opt0.state_dict()))  # (load_state_dict shares the tensors)
        if how == "attach":
            reflora.attach(opt, model, variant="full", space=space, warmup_steps=0)  # the floor acts at once too
        elif how == "floor":
            overhead.minimal_hook(model, opt, space)
        for _ in range(3):
            opt.zero_grad()
            (model(x) - y).square().mean().backward()
            opt.step()
        out[how] = [t for p in model.parameters() if p.requires_grad
                    for t in (p.detach(), opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"])]
    # the same math to float32 round-off, norm-wise per tensor (the floor multiplies B-side
    # tensors through transposed views, the library as stored: elementwise, Adam's tiny second
    # moments differ in their last bits)
    assert all((a - b).norm() <= 1e-5 * b.norm() for a, b in zip(out["attach"], out["floor"]))
    assert not all(torch.allclose(a, b, rtol=1e-3, atol=1e-6) for a, b in zip(out["attach"], out["plain"]))


@pytest.mark.distributed
def test_distributed_benchmark_runs_small_on_two_processes(capsys) -> None:
    import importlib.util

    import torch

    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    # by path, under its own name: a top-level `distributed` module may be dask's
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "distributed.py"
    spec = importlib.util.spec_from_file_location("reflora_benchmark_distributed", path)
    bench_distributed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_distributed)

    args = ["--hidden", "32", "--inter", "64", "--layers", "1", "--heads", "2", "--rank", "4", "--seq", "16",
            "--steps", "2", "--timeout", "120"]
    assert bench_distributed.main(args) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith(("fsdp2 ", "fsdp2-s0 ", "ddp "))]
    modes = ["bare", "full/gradient", "full/parameter", "scalar/gradient", "scalar/parameter"]
    assert [(r[0], r[1]) for r in rows] == [(b, m) for b in ("fsdp2", "fsdp2-s0", "ddp") for m in modes]
    for r in rows:
        assert r[2].endswith("ms") and math.isfinite(float(r[2][:-2]))
    # RefLoRA's bytes per step under FSDP2: 7 pairs x 2 Grams x 4 x 4 float64 (full), 7 x 2 float64 (scalar)
    ours = {r[1]: r[-1] for r in rows if r[0] == "fsdp2" and r[1] != "bare"}
    assert ours == {"full/gradient": "1.75KB", "full/parameter": "1.75KB", "scalar/gradient": "0.11KB",
                    "scalar/parameter": "0.11KB"}
    assert all(r[-1] == "0.00KB" for r in rows if r[0] == "ddp" and r[1] != "bare")
    # FSDP2's default Shard(0): the full variant adds all-gathers of lora_A's shards (7 pairs: 2 KB of
    # float32 shards per rank and gathered tensor): A and its gradient (gradient space), and AdamW's 2
    # moments (parameter space; the table's medians are over steps that have moments)
    s0 = {line.split()[0]: line.split()[1:] for line in out.splitlines()
          if line.startswith(("full/", "scalar/")) and "%" in line and "MB" in line.split()[1]}
    assert [s0[m][1:3] for m in modes[1:]] == [["1.75KB", "4.00KB"], ["1.75KB", "8.00KB"], ["0.11KB", "0.00KB"],
                                               ["0.11KB", "0.00KB"]]
    own = {r[1]: r for r in rows if r[0] == "fsdp2-s0"}
    assert own["full/parameter"][-1] == "9.75KB" and own["scalar/gradient"][-1] == "0.11KB"
    growth = [line.split() for line in out.splitlines() if re.match(r"\s+\d+\s+\d", line)]
    assert [int(g[0]) for g in growth] == [8, 16, 32, 64, 128, 256, 512, 1024]


def test_rank_deficient_benchmark_runs_small(capsys, monkeypatch, tmp_path) -> None:
    """The grid script prints its ratio table, summary and table by regime, and prints them again
    from its JSON; --trace's diagnostics show the mechanism (release 0.2's default puts the top
    direction on one coordinate, plain LoRA spreads it)."""
    import rank_deficient

    monkeypatch.setattr(rank_deficient, "STEPS", (2, 4, 8))  # the table's machinery, not its numbers
    monkeypatch.setattr(sys, "argv", ["rank_deficient.py", "--seeds", "1", "--ranks", "4", "--optimizers", "adamw",
                                      "--batch", "256", "--workers", "1", "--methods", "default", "full/parameter/r0",
                                      "--json", str(tmp_path / "grid.json")])
    rank_deficient.main()
    out = capsys.readouterr().out
    assert "Summary over 3 cells" not in out  # r = 4 has k in {1, 2, 4}, three rates: nine cells
    assert "Summary over 9 cells" in out and "default" in out and "full/parameter/r0" in out
    regimes = [line for line in out.splitlines() if line.startswith("| adamw | full |")]
    assert [line.split(" | ")[2:4] for line in regimes] == [["k < r", "6"], ["k = r", "3"]]
    monkeypatch.setattr(sys, "argv", ["rank_deficient.py", "--from-json", str(tmp_path / "grid.json")])
    rank_deficient.main()
    assert capsys.readouterr().out == out
    lora = rank_deficient.trace("lora", "adamw", 3e-3, 8, 1, at=(5,))
    old = rank_deficient.trace("full/parameter/r0", "adamw", 3e-3, 8, 1, at=(5,))
    assert lora[0]["spread"] > 4 and old[0]["spread"] < 1.5
    assert old[0]["a_rest"] < 0.01 * lora[0]["a_rest"]  # the unneeded directions collapsed


def test_rank_deficient_gap_candidate_spans_the_default_and_plain_lora() -> None:
    """``gap=X`` adds a spectral-gap test to the default's gate: at X = 0 it never shuts (the default,
    exactly), at X = 1 it always does where the spectrum is not flat (plain LoRA, exactly), and in
    between it is a third trajectory; the library's gate is restored after each run."""
    import rank_deficient
    import reflora._linalg

    before = reflora._linalg.resolved_gate
    for m in ("gap=0", "gap=1", "gap=0.5"):
        rank_deficient._parse_method(m)
    cell = ("adamw", 1e-2, 4, 4, 0, 256, 60)
    at = {m: rank_deficient.run(m, *cell)["at"][50] for m in ("lora", "default", "gap=0", "gap=1", "gap=0.5")}
    assert reflora._linalg.resolved_gate is before
    assert at["gap=0"] == at["default"] and at["gap=1"] == at["lora"] and at["default"] != at["lora"]
    assert at["gap=0.5"] not in (at["lora"], at["default"])


def test_rank_deficient_candidates_script_agrees_with_the_library() -> None:
    import rank_deficient_candidates as cand

    # the script's own balanced refactor shows what the library's resolved=0 shows: far behind
    # plain LoRA at r = 8, k = 1 (the two differ in the dead-direction rule and the sign convention)
    plain = cand.run("lora", 0, 8, 1, 3e-3, steps=150)[150]
    for name in ("balanced", "resolved=0"):
        assert cand.run(name, 0, 8, 1, 3e-3, steps=150)[150] > 10 * plain, name
    assert cand.run("default", 0, 8, 1, 3e-3, steps=150)[150] == pytest.approx(plain, rel=1e-6)


def test_gate_rates_runs_small_and_pairs_each_rate_and_each_best_rate(tmp_path, capsys, monkeypatch) -> None:
    """gate_rates.py: every method at every rate on the same seeds, paired with plain LoRA at that
    rate; parts written by processes merge; each method's best rate is chosen on validation."""
    import json

    import gate_rates

    for lr in ("1e-2", "3e-2"):
        monkeypatch.setattr(sys, "argv", ["gate_rates.py", "--task", "graph", "--rank", "8", "--lrs", lr, "--seeds", "2",
                                          "--steps", "2", "--json", str(tmp_path / f"{lr}.json")])
        gate_rates.main()
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["gate_rates.py", "--from-json", str(tmp_path / "1e-2.json"),
                                      str(tmp_path / "3e-2.json"), "--json", str(tmp_path / "all.json")])
    gate_rates.main()
    out = capsys.readouterr().out
    data = json.loads((tmp_path / "all.json").read_text())
    assert (data["task"], data["rank"], data["steps"]) == ("graph", 8, 2) and len(data["runs"]) == 3 * 2 * 2
    assert out.strip() == gate_rates.table(data).strip()
    assert "**graph, r = 8, 2 steps**" in out and out.count("| plain LoRA |") == 3  # two rates, then the best
    assert out.count("| default (resolved=0.1, warmup 3) |") == 3 and out.count("| resolved=0 (the paper) |") == 3
    # runs saved before the default's warmup show under today's names (the default of then is the
    # gate without warmup, and "default, warmup_steps=3" the default of now); --methods picks what runs
    then = {"default (resolved=0.1, warmup 3)": "default, warmup_steps=3", "resolved=0 (the paper)": "default (resolved=0.1)"}
    old = dict(data, runs=[dict(r, name=then.get(r["name"], r["name"])) for r in data["runs"]])
    assert gate_rates.table(old) == gate_rates.table(data).replace("resolved=0 (the paper)",
                                                                 "gate without warmup (warmup_steps=0)")
    monkeypatch.setattr(sys, "argv", ["gate_rates.py", "--task", "graph", "--rank", "8", "--lrs", "1e-2", "--seeds", "1",
                                      "--steps", "2", "--methods", "lora", "no-warmup"])
    gate_rates.main()
    out2 = capsys.readouterr().out
    assert "| gate without warmup (warmup_steps=0) |" in out2 and "| resolved=0 (the paper) |" not in out2
    assert "Each method at its own best rate (chosen on the validation split)" in out
    with pytest.raises(SystemExit, match="different tasks"):
        gate_rates.merge([data, dict(data, rank=4)])
    # --pairs: where the default's gate acts, pair by pair
    rows = gate_rates.pairs("graph", 8, 1e-2, 3)
    assert [r["pair"] for r in rows] == ["conv1.lin", "conv2.lin"]
    assert all(0 <= r["passed"] <= 1 and 0 <= r["median_ratio"] <= 1 and r["switches"] <= 1 for r in rows)


def test_overhead_floor_rows_do_the_defaults_unavoidable_work_and_change_nothing() -> None:
    """Section (b)'s floor rows: ``default_floor`` runs the default's Grams and kernel (the same
    transform the default computes) and one pass that leaves every tensor as it was."""
    import torch

    import reflora
    import reflora.step

    torch.manual_seed(0)
    raw = [(torch.nn.Parameter(torch.randn(4, 12)), torch.nn.Parameter(torch.randn(10, 4))) for _ in range(3)]
    params = [p for pair in raw for p in pair]
    opt = torch.optim.AdamW(params, lr=1e-3)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    before = [t.clone() for p in params for t in (p.data, p.grad, *opt.state[p].values()) if t.dim() > 0]
    h = reflora.attach(opt, raw, warmup_steps=10**9)
    seen = []
    real = reflora.step.group_metrics
    try:
        reflora.step.group_metrics = lambda *a, **k: seen.append(real(*a, **k)) or seen[-1]
        overhead.default_floor(h, opt, raw)
        overhead.grams_floor(h)
    finally:
        reflora.step.group_metrics = real
    after = [t for p in params for t in (p.data, p.grad, *opt.state[p].values()) if t.dim() > 0]
    assert len(after) == len(before) and all(torch.equal(a, b) for a, b in zip(after, before))
    (left, right), = seen[0]
    assert left.shape == (3, 4, 4) and torch.allclose(right @ left, torch.eye(4, dtype=left.dtype).expand(3, 4, 4))
    h.remove()
