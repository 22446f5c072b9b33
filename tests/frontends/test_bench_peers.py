"""`reflora bench`'s peers and the causal-LM task: LoRA-RITE, rsLoRA and DoRA (with and without
RefLoRA), the lm task's corpora and cached base, the best-rate-per-method table, merged results."""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest
import torch
from torch import nn

from reflora.bench.runner import Run


def _peft_mlp(B_std: float = 0.3):
    from peft import LoraConfig, get_peft_model

    from reflora.adapters import find_pairs

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 6)).double()
    model = get_peft_model(base, LoraConfig(r=3, lora_alpha=6, target_modules=["0", "2"]))
    with torch.no_grad():
        for p in find_pairs(model):
            p.B.normal_(0, B_std)  # a non-zero B, so that A's updates are not zero and R acts on both
    return model


def _refactored(model):
    """The same model, each pair's factors changed to (R A, B R^-1): every B A is unchanged."""
    from reflora.adapters import find_pairs

    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in find_pairs(other):
            R = torch.eye(3, dtype=torch.float64) + 0.5 * torch.randn(3, 3, generator=g, dtype=torch.float64)
            p.A.copy_(R @ p.A)
            p.B.copy_(p.B @ torch.linalg.inv(R))
    return other


def _trajectory(model, optimizer, steps: int = 30) -> torch.Tensor:
    from reflora.adapters import find_pairs

    g = torch.Generator().manual_seed(2)
    X, Y = torch.randn(64, 12, generator=g, dtype=torch.float64), torch.randn(64, 6, generator=g, dtype=torch.float64)
    out = []
    for _ in range(steps):
        loss = ((model(X) - Y) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        out.append(torch.cat([(p.B @ p.A).flatten() for p in find_pairs(model)]).detach().clone())
    return torch.stack(out)


def test_lora_rite_is_transformation_invariant_and_adamw_is_not() -> None:
    """LoRA-RITE's defining property (Yen et al., ICLR 2025): from two factorizations of the same
    ``B A`` it follows the same ``B A`` trajectory. The pairs reach ``LoRARite`` in reflora's
    discovery order as ``A_1, B_1, A_2, B_2, ...``; a wrong order or rank dimension breaks this."""
    pytest.importorskip("pytorch_optimizer")
    from reflora.bench.methods import lora_rite

    one, two = _peft_mlp(), None
    two = _refactored(one)
    a = _trajectory(one, lora_rite(one, 1e-2))
    b = _trajectory(two, lora_rite(two, 1e-2))
    assert float((a - b).abs().max() / a.abs().max()) < 1e-9
    assert float((a[-1] - a[0]).abs().max()) > 1e-2  # it trained
    # the same check fails for AdamW: its trajectory depends on the factorization
    one, two = _peft_mlp(), None
    two = _refactored(one)
    adam = lambda m: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2, weight_decay=0)  # noqa: E731
    a, b = _trajectory(one, adam(one)), _trajectory(two, adam(two))
    assert float((a - b).abs().max() / a.abs().max()) > 1e-2


def test_lora_rite_method_steps_the_pairs_and_the_rest_without_clipping() -> None:
    pytest.importorskip("pytorch_optimizer")
    from peft import LoraConfig, get_peft_model
    from pytorch_optimizer import LoRARite

    from reflora.adapters import find_pairs
    from reflora.bench.methods import JointOptimizer, make_optimizer

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 6))
    model = get_peft_model(base, LoraConfig(r=3, lora_alpha=6, target_modules=["0"], modules_to_save=["2"]))
    opt, handle = make_optimizer("lora-rite", model, 1e-2)
    assert handle is None and isinstance(opt, JointOptimizer)
    rite, adam = opt.optimizers
    assert isinstance(rite, LoRARite) and isinstance(adam, torch.optim.AdamW)
    pairs = find_pairs(model)
    assert [id(t) for t in rite.param_groups[0]["params"]] == [id(t) for p in pairs for t in (p.A, p.B)]
    group = rite.param_groups[0]
    assert group["clip_unmagnified_grad"] == 0 and group["update_skipping"] == 0 and group["weight_decay"] == 0
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    stepped = {id(p) for g in opt.param_groups for p in g["params"]}
    assert stepped == trainable  # every trainable parameter, once (the head by AdamW)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for _ in range(2):  # from B = 0 LoRA-RITE moves B first, then A
        loss = model(torch.randn(8, 12)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert len(moved) == len(before)


@pytest.mark.parametrize("method", ["rslora+reflora", "dora+reflora"])  # rslora / dora: the same builds
def test_lora_variants_build_their_model_and_refLoRA_acts_on_top(method) -> None:
    from reflora.bench.methods import LORA_OPTIONS
    from reflora.bench.runner import run_one
    from reflora.bench.tasks import TASKS

    task = TASKS["vision"]()
    model = task.build(0, **LORA_OPTIONS[method])
    layer = next(m for m in model.modules() if hasattr(m, "lora_A") and m.lora_A)
    if "rslora" in method:
        assert layer.scaling["default"] == pytest.approx(2 * task.rank / math.sqrt(task.rank))  # alpha / sqrt(r)
    else:
        assert layer.use_dora["default"] and len(layer.lora_magnitude_vector) == 1
    run = run_one(task, method, 3e-3, 0, 3)
    assert not run.error and len(run.losses) == 3 and math.isfinite(run.metric) and math.isfinite(run.val_metric)


def test_lora_variants_are_not_available_on_the_graph_task_and_say_why() -> None:
    from reflora.bench.runner import run_one
    from reflora.bench.tasks import TASKS

    run = run_one(TASKS["graph"](), "dora", 1e-2, 0, 2)
    assert not run.losses and "use_dora: PEFT options; this task's LoRA is reflora.adapters.pyg's" in run.error


# ----------------------------------------------------------------------------------- lm task


def test_lm_corpora_share_no_line_and_the_splits_are_disjoint() -> None:
    from reflora.bench import tasks

    code, prose = tasks.lm_corpora()
    assert len(code) > 1_000_000 and sum(map(len, prose)) > 300_000
    import ast
    import inspect
    import io
    import calendar
    import tokenize

    source = inspect.getsource(calendar)  # a module with docstrings and comments
    assert '"""' in source and "# " in source
    stripped = tasks._strip_code(source)
    assert stripped.encode() in code
    tree = ast.parse(stripped)
    nodes = [n for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef))]
    assert len(nodes) > 10 and all(ast.get_docstring(n) is None for n in nodes)
    assert not [t for t in tokenize.generate_tokens(io.StringIO(stripped).readline) if t.type == tokenize.COMMENT]
    long = lambda text: {ln.strip() for ln in text.splitlines() if len(ln.strip()) >= 20}  # noqa: E731
    code_lines = long(code.decode())
    prose_lines = set().union(*(long(d.decode()) for d in prose))
    assert prose_lines and not prose_lines & code_lines
    assert not prose_lines & {t.strip() for t in tasks.stdlib_docstrings()[0]}
    data = tasks._lm_data()
    n = {k: len(v) for k, v in data.items()}
    assert n[0] > 6 * n[1] and 0.5 < n[1] / n[2] < 2  # about 80 / 10 / 10
    paras = {k: {bytes(v[i : i + 200].tolist()) for i in range(0, len(v) - 200, 4000)} for k, v in data.items()}
    assert not paras[0] & paras[2] and not paras[1] & paras[2]


def test_lm_base_is_pretrained_once_and_cached_by_its_key(tmp_path, monkeypatch) -> None:
    from reflora.bench import tasks

    monkeypatch.setenv("REFLORA_CACHE", str(tmp_path))
    monkeypatch.setattr(tasks, "LM_PRETRAIN", {**tasks.LM_PRETRAIN, "steps": 3, "batch": 2})
    state, info = tasks.lm_base(progress=False)
    assert not info["cached"] and info["seconds"] > 0 and math.isfinite(info["final_loss"])
    files = list(tmp_path.glob("lm-base-*.pt"))
    assert [f.stem for f in files] == [info["key"]] == [f"lm-base-{tasks.lm_base_key()}"]
    again, info2 = tasks.lm_base(progress=False)
    assert info2["cached"] and info2["seconds"] == info["seconds"]
    assert all(torch.equal(state[k], again[k]) for k in state)
    key = tasks.lm_base_key()
    monkeypatch.setattr(tasks, "LM_CONFIG", {**tasks.LM_CONFIG, "intermediate_size": 256})
    assert tasks.lm_base_key() != key  # another config is another base


@pytest.mark.slow
def test_lm_task_fine_tunes_and_reports_perplexity(tmp_path, monkeypatch) -> None:
    from reflora.adapters import find_pairs
    from reflora.bench import tasks
    from reflora.bench.runner import run_one

    monkeypatch.setenv("REFLORA_CACHE", str(tmp_path))
    monkeypatch.setattr(tasks, "LM_PRETRAIN", {**tasks.LM_PRETRAIN, "steps": 3, "batch": 2})
    monkeypatch.setattr(tasks, "LM_EVAL_WINDOWS", 8)
    task = tasks.TASKS["lm"]()
    assert task.lower_is_better and task.metric == "held-out ppl"
    pairs = find_pairs(task.build(0))
    assert len(pairs) == 7 * tasks.LM_CONFIG["num_hidden_layers"] and {p.shape[0] for p in pairs} == {8}
    r64 = dataclasses.replace(task, rank=64)
    assert {p.shape[0] for p in find_pairs(r64.build(0))} == {64}  # below every layer size (256, 512)
    for method in ("lora-rite", "dora+reflora"):
        run = run_one(task, method, 3e-3, 0, 3)
        assert not run.error and len(run.losses) == 3, (method, run.error)
        assert 1 < run.metric < 256 and 1 < run.val_metric < 256  # per-byte perplexity of a 256-symbol model


@pytest.mark.slow
def test_lm_qlora_variant_has_a_4bit_base_and_trains(tmp_path, monkeypatch) -> None:
    pytest.importorskip("bitsandbytes")
    from reflora.bench import tasks
    from reflora.bench.runner import run_one

    monkeypatch.setenv("REFLORA_CACHE", str(tmp_path))
    monkeypatch.setattr(tasks, "LM_PRETRAIN", {**tasks.LM_PRETRAIN, "steps": 3, "batch": 2})
    monkeypatch.setattr(tasks, "LM_EVAL_WINDOWS", 8)
    task = tasks.TASKS["lm-qlora"]()
    model = task.build(0)
    kinds = {type(m.base_layer).__name__ for m in model.modules() if hasattr(m, "base_layer")}
    assert kinds == {"Linear4bit"}
    run = run_one(task, "reflora-param", 3e-3, 0, 2)
    assert not run.error and len(run.losses) == 2 and math.isfinite(run.metric)


# ------------------------------------------------------------------------------ best rates


def _run(method, lr, seed, val, test, loss=1.0, error=""):
    r = Run("t", method, lr, seed, losses=[loss] * 10, metric=test, error=error)
    r.val_metric = val
    return r


def test_best_rate_is_chosen_on_validation_and_a_diverged_rate_is_out() -> None:
    from reflora.bench.report import best_rates

    runs = [_run("lora", 1e-3, s, 0.7, 0.9) for s in range(3)]
    runs += [_run("lora", 1e-2, s, 0.8, 0.5) for s in range(3)]  # best on val, worse on test: val decides
    runs += [_run("lora", 1e-1, s, 0.95, 0.95) for s in range(2)] + [_run("lora", 1e-1, 2, float("nan"), float("nan"),
                                                                        error="diverged (non-finite loss)")]
    assert best_rates(runs) == {"lora": 1e-2}
    ppl = [_run("m", lr, s, v, v) for lr, v in ((1e-3, 5.0), (1e-2, 4.0)) for s in range(2)]
    assert best_rates(ppl, lower_is_better=True) == {"m": 1e-2} and best_rates(ppl) == {"m": 1e-3}
    # extra seeds at one rate do not change the choice: rates compete on the seeds they share
    extra = ppl + [_run("m", 1e-3, s, 1.0, 1.0) for s in (2, 3, 4)]
    assert best_rates(extra, lower_is_better=True) == {"m": 1e-2}


def test_best_rate_table_pairs_each_method_with_plain_lora_at_its_own_best_rate() -> None:
    from reflora.bench.report import best_rate_table

    runs = [_run("lora", 1e-3, s, 0.6, 0.6 + 0.01 * s) for s in range(5)]
    runs += [_run("lora", 1e-2, s, 0.7, 0.70 + 0.01 * s) for s in range(5)]
    runs += [_run("x", 1e-2, s, 0.9, 0.72 + 0.01 * s, loss=0.5) for s in range(5)]
    runs += [_run("x", 1e-3, s, 0.5, 0.5) for s in range(5)]
    table = best_rate_table(runs, "acc").splitlines()
    row = next(line for line in table if line.startswith("x "))
    assert "0.01" in row and "+0.020 [+0.020, +0.020] (5W 0L)" in row  # vs lora at 1e-2, not at 1e-3
    assert "-0.500 [-0.500, -0.500] (5W 0L)" in row  # a lower final loss wins


def _results(path, runs, methods, **over):
    entry = {"description": "d", "rank": 4, "steps": 10, "seeds": 1, "grid_seeds": 1, "shared_lr": 1e-2,
             "grid": [1e-2], "metric": "held-out acc", "runs": [r.as_dict() for r in runs if r.method in methods],
             "vmap": None, **over}
    path.write_text(json.dumps({"command": f"reflora bench --methods {' '.join(methods)}", "seconds": 1.0,
                                "tasks": {"graph": entry}}, default=float))
    return path


def test_from_results_merges_one_task_run_in_parts(tmp_path, capsys) -> None:
    from reflora.__main__ import main

    runs = [_run("lora", 1e-2, 0, 0.7, 0.7), _run("reflora", 1e-2, 0, 0.8, 0.8)]
    a = _results(tmp_path / "a.json", runs, ["lora"])
    b = _results(tmp_path / "b.json", runs, ["reflora"])
    assert main(["bench", "--from-results", str(a), str(b), "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "--methods lora" in out and "--methods reflora" in out
    row = next(line for line in out.splitlines() if line.startswith("reflora" + " " * 8))  # the table row
    assert "+0.100 (1W 0L)" in row  # paired with plain LoRA from the other file
    c = _results(tmp_path / "c.json", runs, ["reflora"], steps=20)
    assert main(["bench", "--from-results", str(a), str(c), "--no-plots"]) == 2
    assert "settings differ (steps" in capsys.readouterr().err
    assert main(["bench", "--from-results", str(a), str(a), "--no-plots"]) == 2
    assert "in two files" in capsys.readouterr().err


# ------------------------------------------------------------------------- docs tables


def _docs_tables():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "tools" / "docs_tables.py"
    spec = importlib.util.spec_from_file_location("docs_tables", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_results_tables_in_the_readme_and_docs_match_the_committed_results() -> None:
    """Every ``<!-- results:TASK -->`` block is what ``reflora bench --from-results --markdown``
    prints for the committed results (``python benchmarks/tools/docs_tables.py`` rewrites them)."""
    mod = _docs_tables()
    blocks = [(d.name, m["task"]) for d in mod.documents() for m in mod.BLOCK.finditer(d.read_text())]
    assert {"mf", "graph", "lm"} <= {t for _, t in blocks if _ == "results.md"}
    assert mod.update(check=True) == []


def test_a_table_edited_by_hand_is_caught(tmp_path, monkeypatch) -> None:
    mod = _docs_tables()
    doc = next(d for d in mod.documents() if mod.BLOCK.search(d.read_text()))
    text = doc.read_text()
    m = mod.BLOCK.search(text)
    body = m["body"]
    digit = next(i for i, c in enumerate(body) if c.isdigit() and i > body.index("|"))
    forged = body[:digit] + str((int(body[digit]) + 1) % 10) + body[digit + 1:]
    fake = tmp_path / "README.md"
    fake.write_text(text[: m.start("body")] + forged + text[m.end("body"):])
    assert mod.update(check=True, docs=[fake]) == ["README.md: " + m["task"]]
    assert mod.update(check=False, docs=[fake]) == ["README.md: " + m["task"]]
    assert mod.update(check=True, docs=[fake]) == [] and fake.read_text() == text


def test_markdown_table_pairs_with_the_chosen_baseline_and_marks_what_cannot_run() -> None:
    from reflora.bench.report import markdown_table

    runs = [_run("lora", lr, s, v, v) for lr, v in ((1e-3, 0.6), (1e-2, 0.7)) for s in range(3)]
    runs += [_run("lora-rite", lr, s, v, v + 0.01 * s) for lr, v in ((1e-3, 0.8), (1e-2, 0.5)) for s in range(3)]
    runs += [Run("t", "dora", 1e-3, 0, error="use_dora: PEFT options; not this task")]
    entry = {"description": "d", "steps": 10, "shared_lr": 1e-2, "grid": [1e-3, 1e-2], "metric": "held-out acc"}
    table = markdown_table("t", entry, runs, ["lora-rite", "lora", "dora"], baseline="lora-rite")
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert "Δ vs lora-rite [95% CI]" in table and "test acc" in table
    assert rows["lora-rite"].startswith("| lora-rite | 0.001 | 0.810±0.010 |  |")  # lora-rite's best rate: 1e-3
    assert "| 0.01 | 0.700 | -0.110 [-0.135, -0.085] | 0W / 3L |" in rows["lora"]
    assert "n/a: use_dora: PEFT options" in rows["dora"]


def test_the_gate_tables_in_the_docs_are_what_gate_rates_prints() -> None:
    """Every ``<!-- gate-rates:begin NAME -->`` block is ``gate_rates.table`` of
    ``benchmarks/studies/rank/NAME.json``, and every such file is shown on the rank-deficient page."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("gate_rates", root / "benchmarks" / "studies" / "gate_rates.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    block = mod.BLOCK
    expected = {"lm-r64-rates": ("lm", 64), "vision-r4-rates": ("vision", 4), "graph-r4-rates": ("graph", 4),
                "text-r8-rates": ("text", 8), "lm-r8-rates": ("lm", 8), "graph-r32-rates": ("graph", 32),
                "vision-r32-rates": ("vision", 32), "text-r64-rates": ("text", 64)}
    files = {p.stem for p in (root / "benchmarks" / "studies" / "rank").glob("*-rates.json")}
    assert files == set(expected)
    shown_on = {}
    for page in ("results.md", "rank-deficient.md"):
        text = (root / "docs" / page).read_text()
        assert text.count("gate-rates:begin") == len(block.findall(text)), f"{page}: a malformed gate-rates block"
        for m in block.finditer(text):
            data = json.loads((root / "benchmarks" / "studies" / "rank" / f"{m['name']}.json").read_text())
            assert (data["task"], data["rank"]) == expected[m["name"]]
            seeds: dict = {}
            for r in data["runs"]:  # every method at every rate it ran: seeds 0-4, once each
                seeds.setdefault((r["name"], r["lr"]), []).append(r["seed"])
            assert all(sorted(v) == [0, 1, 2, 3, 4] for v in seeds.values()), m["name"]
            assert m["body"] == mod.table(data), f"{page}: {m['name']}"
            shown_on.setdefault(m["name"], set()).add(page)
    assert all("rank-deficient.md" in shown_on.get(name, ()) for name in files), shown_on
    assert shown_on["lm-r64-rates"] == {"results.md", "rank-deficient.md"}, shown_on  # as before the vision table


def test_lora_rite_shipped_keeps_pytorch_optimizers_defaults() -> None:
    """The peer as its authors ship it: LoRARite's unmagnified-gradient clipping and update
    skipping on (``lora-rite`` turns them off so that no method clips)."""
    pytest.importorskip("pytorch_optimizer")
    import inspect

    from peft import LoraConfig, get_peft_model
    from pytorch_optimizer import LoRARite

    from reflora.bench.methods import make_optimizer

    defaults = inspect.signature(LoRARite.__init__).parameters
    model = get_peft_model(nn.Sequential(nn.Linear(12, 10)), LoraConfig(r=3, target_modules=["0"]))
    opt, _ = make_optimizer("lora-rite-shipped", model, 1e-2)
    group = opt.optimizers[0].param_groups[0]
    assert group["clip_unmagnified_grad"] == defaults["clip_unmagnified_grad"].default > 0
    assert group["update_skipping"] == defaults["update_skipping"].default > 0
