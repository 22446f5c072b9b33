"""The resolution gate at every rate: plain LoRA, the default (``resolved=0.1`` and its 3-step
warmup), the gate without that warmup and the paper's ``resolved=0`` (``--methods``) on one bench
task at one rank, over a grid of learning rates, all in one run.

Issue 17 asks two things of the default that pull against each other at the same nominal rate:
never slower than plain LoRA where the task needs fewer directions than the rank, and as stable as
RefLoRA where plain LoRA is not (the LM at r = 64). Both are the same effect seen from two sides:
acting on a pair with unresolved directions shrinks the step Adam makes on ``B A``. This script
measures it where it matters, on the real tasks: each method at each rate (same seeds, batches and
initialisation; paired per seed with plain LoRA *at the same rate*) and each method at its own best
rate, chosen on the validation split (paired with plain LoRA at *its* best rate)::

    python benchmarks/studies/gate_rates.py --task lm --rank 64 --lrs 1e-3 3e-3 --json benchmarks/studies/rank/lm-r64-rates.json
    python benchmarks/studies/gate_rates.py --task vision --rank 4 --lrs 1e-3 3e-3 1e-2 --json benchmarks/studies/rank/vision-r4-rates.json
    python benchmarks/studies/gate_rates.py --from-json benchmarks/studies/rank/lm-r64-rates.json   # print again
    python benchmarks/studies/gate_rates.py --task text --rank 64 --lrs 3e-3 --methods lora default no-warmup --json benchmarks/studies/rank/text-r64-rates.json

``--lrs`` may be split over processes (one JSON each); ``--from-json`` merges them (and ``--json``
with it writes the merged file).

``--pairs`` answers *where* the gate acts: it trains the default once (the first rate, seed 0) and
prints, per pair, the fraction of steps at which the gate passed, how often it switched, and the
median of ``sigma_min / sigma_max`` of ``B A``, read with :func:`reflora.diagnostics.diagnose`
before each step (what the step's gate tests)::

    python benchmarks/studies/gate_rates.py --task vision --lrs 3e-3 --pairs
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import time
from pathlib import Path

#: short key -> (name in the tables, bench method, extra attach options)
METHODS = {
    "lora": ("plain LoRA", "lora", None),
    "default": ("default (resolved=0.1, warmup 3)", "reflora-param", None),
    "no-warmup": ("gate without warmup (warmup_steps=0)", "reflora-param", {"warmup_steps": 0}),
    "paper": ("resolved=0 (the paper)", "reflora-param", {"resolved": 0.0}),
    "block": ("frame='block'", "reflora-param", {"frame": "block"}),
}
#: names in runs saved before the default's 3-step warmup (2026-12-03) -> their names now: the
#: default of then is the gate without warmup; "default, warmup_steps=3" runs were the default of now
RENAMED = {
    "default (resolved=0.1)": METHODS["no-warmup"][0],
    "default, warmup_steps=3": METHODS["default"][0],
}


def run(task_name: str, rank: int | None, lrs: list[float], seeds: int, steps: int | None,
        methods: list[str] = ("lora", "default", "paper")) -> dict:  # type: ignore[assignment]
    from reflora.bench.runner import run_one
    from reflora.bench.tasks import TASKS

    task = TASKS[task_name]()
    if rank is not None:
        task = dataclasses.replace(task, rank=rank)
    steps = steps or task.full_steps
    runs = []
    for lr in lrs:
        for name, method, kw in (METHODS[m] for m in methods):
            for seed in range(seeds):
                r = run_one(task, method, lr, seed, steps, attach_kw=kw)
                d = r.as_dict()
                d["name"] = name
                d.pop("losses", None)  # the per-step curve: not needed for the tables, and large
                runs.append(d)
                print(f"{name} lr={lr:g} seed {seed}: final loss {r.final_loss:.4f}, {task.metric} {r.metric}", flush=True)
    return {"task": task_name, "rank": task.rank, "steps": steps, "metric": task.metric,
            "lower_is_better": task.lower_is_better, "runs": runs}


def pairs(task_name: str, rank: int | None, lr: float, steps: int | None, seed: int = 0) -> list[dict]:
    """Per pair of the default's run: the fraction of steps the gate passed, its switches, the
    median ``sigma_min / sigma_max`` (``B = 0`` at the start is left out: nothing to gate)."""
    import statistics

    import torch

    from reflora.bench.methods import make_optimizer
    from reflora.bench.tasks import TASKS
    from reflora.diagnostics import diagnose

    task = TASKS[task_name]()
    if rank is not None:
        task = dataclasses.replace(task, rank=rank)
    torch.manual_seed(seed)
    model = task.build(seed)
    model.train()
    opt, handle = make_optimizer("reflora-param", model, lr)
    resolved = handle.config.resolved  # the default gate
    batches = task.batches(seed)
    ratios: dict[str, list[float]] = {}
    for _ in range(steps or task.full_steps):
        for name, row in diagnose(model).items():
            if row["sigma_max"] > 0:
                ratios.setdefault(name, []).append(row["sigma_min"] / row["sigma_max"])
        opt.zero_grad(set_to_none=True)
        task.loss(model, next(batches)).backward()
        opt.step()
    out = []
    for name, rs in ratios.items():
        passed = [x >= resolved for x in rs]
        out.append({"pair": name, "passed": sum(passed) / len(passed), "switches": sum(a != b for a, b in zip(passed, passed[1:])),
                    "median_ratio": statistics.median(rs)})
    return out


def merge(parts: list[dict]) -> dict:
    out = dict(parts[0], runs=[])
    for p in parts:
        if (p["task"], p["rank"], p["steps"]) != (out["task"], out["rank"], out["steps"]):
            raise SystemExit("--from-json: the files hold different tasks, ranks or step counts")
        out["runs"] += p["runs"]
    return out


def _finite(runs: list[dict]) -> bool:
    return all(not r.get("error") and r["metric"] is not None for r in runs)


def table(data: dict) -> str:
    from reflora.bench.report import mean_sd, paired

    low = data["lower_is_better"]
    by = {}
    for r in data["runs"]:
        by.setdefault((RENAMED.get(r["name"], r["name"]), r["lr"]), {})[r["seed"]] = r
    lrs = sorted({lr for _, lr in by})
    order = [name for name, _, _ in METHODS.values()]
    names = sorted(dict.fromkeys(n for n, _ in by), key=lambda n: order.index(n) if n in order else len(order))
    metric = data["metric"]

    def row(name: str, lr: float, base_lr: float) -> str:
        mine, base = by[(name, lr)], by[("plain LoRA", base_lr)]
        if not _finite(list(mine.values())):
            return f"| {name} | {lr:g} | diverged | | | |"
        cells = [mean_sd([r["final_loss"] for r in mine.values()]), mean_sd([r["metric"] for r in mine.values()])]
        if name == "plain LoRA" and lr == base_lr or not _finite(list(base.values())):
            return f"| {name} | {lr:g} | {cells[0]} | | {cells[1]} | |"
        seeds = sorted(set(mine) & set(base))
        dl = paired([mine[s]["final_loss"] - base[s]["final_loss"] for s in seeds], True)
        dm = paired([mine[s]["metric"] - base[s]["metric"] for s in seeds], low)
        return f"| {name} | {lr:g} | {cells[0]} | {dl} | {cells[1]} | {dm} |"

    head = [f"| method | lr | final loss | Δ loss vs LoRA [95% CI] (W / L) | {metric} | Δ vs LoRA [95% CI] (W / L) |",
            "|---|---|---|---|---|---|"]
    lines = [f"**{data['task']}, r = {data['rank']}, {data['steps']} steps**: every rate, paired with plain LoRA at the same rate", ""]
    lines += head + [row(n, lr, lr) for lr in lrs for n in names if (n, lr) in by]

    def best(name: str) -> float | None:
        ok = [lr for lr in lrs if (name, lr) in by and _finite(list(by[(name, lr)].values()))]
        if not ok:
            return None
        score = {lr: sum(r["val_metric"] for r in by[(name, lr)].values()) / len(by[(name, lr)]) for lr in ok}
        return (min if low else max)(ok, key=score.__getitem__)

    base_lr = best("plain LoRA")
    lines += ["", "Each method at its own best rate (chosen on the validation split), paired with plain LoRA at its best rate:", ""]
    lines += head + [row(n, best(n), base_lr) for n in names if best(n) is not None and base_lr is not None]
    return "\n".join(lines)


#: a block of a docs page; an empty one (begin, then end) is filled by --docs
BLOCK = re.compile(r"<!-- gate-rates:begin (?P<name>[\w.-]+) -->\n(?:(?P<body>.*?)\n)?<!-- gate-rates:end (?P=name) -->", re.S)


def rewrite_docs(root: Path = Path(__file__).resolve().parents[2]) -> list[str]:
    """Rewrite every ``<!-- gate-rates:begin NAME -->`` block of ``docs/*.md`` with :func:`table` of
    ``benchmarks/studies/rank/NAME.json`` (``--docs``); returns the pages changed."""
    changed = []
    for page in sorted((root / "docs").glob("*.md")):
        text = page.read_text()

        def body(m: re.Match) -> str:
            data = json.loads((root / "benchmarks" / "studies" / "rank" / f"{m['name']}.json").read_text())
            return f"<!-- gate-rates:begin {m['name']} -->\n{table(data)}\n<!-- gate-rates:end {m['name']} -->"

        new = BLOCK.sub(body, text)
        if new != text:
            page.write_text(new)
            changed.append(page.name)
    return changed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="lm")
    p.add_argument("--rank", type=int, default=None)
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--steps", type=int, default=None, help="default: the task's full budget")
    p.add_argument("--json", type=Path, default=None, help="write the runs (with --from-json: the merged parts) here")
    p.add_argument("--pairs", action="store_true", help="where the default's gate acts, pair by pair (one run); no table")
    p.add_argument("--from-json", type=Path, nargs="+", default=None, help="print the table of saved runs; runs nothing")
    p.add_argument("--methods", nargs="+", default=["lora", "default", "paper"], choices=list(METHODS),
                   help="lora, default, no-warmup (the gate without the default's warmup), paper (resolved=0)")
    p.add_argument("--docs", action="store_true", help="rewrite the gate-rates tables of docs/*.md from their JSON")
    args = p.parse_args()
    if args.docs:
        print("rewrote:", ", ".join(rewrite_docs()) or "nothing (the tables are current)")
        return
    if args.pairs:
        rows = pairs(args.task, args.rank, args.lrs[0], args.steps)
        print("| pair | steps the gate passed | switches | median sigma_min / sigma_max |\n|---|---|---|---|")
        for r in rows:
            print(f"| {r['pair']} | {r['passed']:.0%} | {r['switches']} | {r['median_ratio']:.3f} |")
        acting = sum(r["passed"] for r in rows) / len(rows)
        print(f"\n{len(rows)} pairs; the gate passed at {acting:.0%} of pair-steps")
        return
    if args.from_json:
        data = merge([json.loads(f.read_text()) for f in args.from_json])
        if args.json:  # the parts merged into one file
            args.json.write_text(json.dumps(data, separators=(",", ":"), default=float))
    else:
        t0 = time.perf_counter()
        data = run(args.task, args.rank, args.lrs, args.seeds, args.steps, args.methods)
        data["seconds"] = time.perf_counter() - t0
        if args.json:
            args.json.write_text(json.dumps(data, separators=(",", ":"), default=float))
    print(table(data))


if __name__ == "__main__":
    main()
