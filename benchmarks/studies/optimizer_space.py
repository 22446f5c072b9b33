"""Which space ``space="auto"`` should pick for the optimizers of issue 33, measured.

For each base optimizer (``reflora.bench.methods.BASE_OPTIMIZERS``): plain LoRA, RefLoRA in
gradient space and in parameter space (the full variant with ``attach``'s other defaults), on

* (a) a subset of ``rank_deficient.py``'s matrix problems, with ``resolved=0.0`` (RefLoRA acting
  at every step: the default's gate stays shut on most of them, where no space would show): full batch, ``r`` in {8, 16}, the
  target's rank ``k`` in {2, r} (rank above the need, and full), two rates around the
  optimizer's usual one (the task scale of ``BASE_OPTIMIZERS``), 300 steps, ``--seeds`` seeds:
  the median over seeds of the loss at step 300, as a ratio to plain LoRA on the same seeds;
* (b) ``reflora bench``'s graph task at its shared rate (scaled likewise), ``--seeds`` seeds,
  paired per seed with plain LoRA: final training loss and held-out accuracy.

Prints one table per optimizer and, per optimizer, the space with the lower geometric-mean loss
ratio in (a) and the lower mean training loss in (b)::

    python benchmarks/studies/optimizer_space.py --optimizers muon adamw-schedulefree --seeds 5 \\
        --json benchmarks/studies/rank/optimizer-space.json
    python benchmarks/studies/optimizer_space.py --from-json benchmarks/studies/rank/optimizer-space.json

(docs/optimizers.md quotes the tables; ``space="auto"`` follows them.)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from rank_deficient import problem  # noqa: E402

import reflora  # noqa: E402
from reflora.bench.methods import BASE_OPTIMIZERS, base_optimizer  # noqa: E402

# the paper's form (no gate): the gate keeps the default inert on most of these cells, where the
# space would not show
SPACES = {"lora": None, "gradient": {"space": "gradient", "resolved": 0.0}, "parameter": {"space": "parameter", "resolved": 0.0}}
REFUSED = ("soap",)  # parameter space refused (reflora.transport.catalog)
CELLS = [(8, 2), (8, 8), (16, 2), (16, 16)]
RATES = (1e-3, 3e-3)  # AdamW scale; multiplied by the optimizer's scale
STEPS = 300


class _Pair(nn.Module):
    """The matrix problem's pair as a module, so that the bench's optimizer factory can build on it."""

    def __init__(self, A: nn.Parameter, B: nn.Parameter) -> None:
        super().__init__()
        self.lora_A, self.lora_B = A, B


def matrix_run(opt_name: str, method: str, r: int, k: int, lr: float, seed: int) -> float:
    X, Y, A, B, _ = problem(seed, r, k)
    module = _Pair(A, B)
    opt, holder = base_optimizer(opt_name, module, lr, shared_lr=1e-3)
    if SPACES[method] is not None:
        try:
            reflora.attach(holder, [(A, B)], **SPACES[method])
        except reflora.UnsupportedOptimizerError:  # parameter space refused (the Shampoo family)
            return float("nan")
    loss0 = float(((X @ A.T @ B.T - Y) ** 2).mean())
    for _ in range(STEPS):
        opt.zero_grad()
        loss = ((X @ A.T @ B.T - Y) ** 2).mean()
        loss.backward()
        opt.step()
    if callable(getattr(opt, "eval", None)):
        opt.eval()
    with torch.no_grad():
        final = float(((X @ A.T @ B.T - Y) ** 2).mean())
    return final / loss0 if math.isfinite(final) else float("inf")


def graph_runs(opt_name: str, seeds: int) -> dict:
    from reflora.bench.runner import run_one
    from reflora.bench.tasks import TASKS

    task = TASKS["graph"]()
    method_of = {"lora": "lora", "gradient": "reflora", "parameter": "reflora-param"}
    out = {}
    for space, method in method_of.items():
        if space == "parameter" and opt_name in REFUSED:
            out[space] = [{"loss": None, "acc": None, "error": "refused"}] * seeds
            continue
        runs = [run_one(task, method, task.shared_lr, s, task.steps, optimizer=opt_name) for s in range(seeds)]
        out[space] = [{"loss": r.final_loss if not r.error else None, "acc": r.metric, "error": r.error} for r in runs]
    return out


def measure(opt_name: str, seeds: int) -> dict:
    matrix = {}
    for r, k in CELLS:
        for lr in RATES:
            for method in SPACES:
                matrix[f"{method}|{r}|{k}|{lr}"] = [matrix_run(opt_name, method, r, k, lr, s) for s in range(seeds)]
    return {"matrix": matrix, "graph": graph_runs(opt_name, seeds)}


def _gmean(xs: list[float]) -> float:
    xs = [max(x, 1e-300) for x in xs]
    return math.exp(statistics.fmean(math.log(x) for x in xs)) if all(math.isfinite(x) for x in xs) else float("inf")


def report(name: str, data: dict) -> str:
    lines = [f"\n{name} ({BASE_OPTIMIZERS[name][0]}):", "  (a) matrix problems, median loss at step 300 / plain LoRA's (r, k, lr x scale):"]
    ratios: dict[str, list[float]] = {"gradient": [], "parameter": []}
    for r, k in CELLS:
        for lr in RATES:
            base = statistics.median(data["matrix"][f"lora|{r}|{k}|{lr}"])
            row = []
            for space in ("gradient", "parameter"):
                vals = data["matrix"][f"{space}|{r}|{k}|{lr}"]
                if any(math.isnan(v) for v in vals):
                    row.append(f"{space}  refused")
                    continue
                v = statistics.median(vals) / base if base > 0 else float("nan")
                ratios[space].append(v)
                row.append(f"{space} {v:8.3g}")
            lines.append(f"    r={r:<3} k={k:<3} lr {lr:g}: plain {base:9.3g}   " + "   ".join(row))
    g = data["graph"]
    lines.append("  (b) graph task at the shared rate: final loss, held-out acc (mean over seeds; paired Δ vs plain LoRA)")
    base = g["lora"]
    for space in ("lora", "gradient", "parameter"):
        ok = [(x["loss"], x["acc"], b["loss"], b["acc"]) for x, b in zip(g[space], base) if x["loss"] is not None and b["loss"] is not None]
        if not ok:
            lines.append(f"    {space:<10} {'refused' if g[space][0].get('error') == 'refused' else 'diverged'}")
            continue
        dl = [a - c for a, _, c, _ in ok]
        da = [b - d for _, b, _, d in ok]
        lines.append(f"    {space:<10} loss {statistics.fmean(x[0] for x in ok):.4f} ({statistics.fmean(dl):+.4f}, "
                     f"{sum(d < 0 for d in dl)}W {sum(d > 0 for d in dl)}L)   acc {statistics.fmean(x[1] for x in ok):.3f} "
                     f"({statistics.fmean(da):+.3f}, {sum(d > 0 for d in da)}W {sum(d < 0 for d in da)}L)")
    gm = {s: _gmean(v) for s, v in ratios.items() if v}
    shown = ", ".join(f"{s} {gm[s]:.3g}" if s in gm else f"{s} refused" for s in ratios)
    lines.append(f"  geometric mean of (a)'s ratios: {shown} -> {min(gm, key=gm.get)}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--optimizers", nargs="+", default=[o for o in BASE_OPTIMIZERS if o != "adamw"],
                    choices=list(BASE_OPTIMIZERS))
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--from-json", type=Path, nargs="+", default=None)
    args = ap.parse_args()
    if args.from_json:
        data = {}
        for path in args.from_json:
            data.update(json.loads(path.read_text()))
    else:
        torch.set_num_threads(1)
        data = {}
        for name in args.optimizers:
            data[name] = measure(name, args.seeds)
            print(report(name, data[name]), flush=True)
            if args.json:
                args.json.write_text(json.dumps(data, default=float))
        return
    for name, d in data.items():
        print(report(name, d))


if __name__ == "__main__":
    main()
