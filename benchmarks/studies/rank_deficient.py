"""RefLoRA against plain LoRA when the adapter's rank ``r`` exceeds the rank ``k`` the task needs.

The problem (issue 17): fit ``Y = X W`` with ``W = U V / sqrt(m)`` of rank ``k``; ``X`` is
``256 x 64``; one pair ``A (r x 64)``, ``B (64 x r)`` with PEFT's init (``A`` kaiming-uniform-like,
``B = 0``); loss ``mean((X A^T B^T - Y)^2)``. The grid:

* ``r`` in {4, 8, 16, 32} and the distinct ``k`` in {1, r/4, r/2, r};
* three learning rates over 10x per optimizer: AdamW (weight decay 0 and 0.01) at
  1e-3, 3e-3, 1e-2 and SGD with momentum 0.9 at 3e-3, 1e-2, 3e-2;
* full batch, or minibatches of 32 rows drawn per step (``--batch``).

Each cell runs every method on the same seeds (the same data, init and minibatch order) and
reports the median over seeds of the loss at steps 50 / 150 / 300, floored at 1e-8 of the initial
loss so that the float floor does not count. The table prints the ratio of a method's median to
plain LoRA's (below 1: RefLoRA is ahead); ``FAIL`` marks a cell where the ratio exceeds
``--tolerance`` (1.2) at some step, ``DIV`` a method that diverged (non-finite, or above the
initial loss at the end) where plain LoRA did not.

Methods (``--methods``): ``default`` is ``reflora.attach(opt, pairs)`` with every option left at
its default (what a user gets); the others name options, e.g. ``full/parameter/r0`` is the full
variant in parameter space with the resolution gate off (``resolved=0``, release 0.2's default
under AdamW), ``full/gradient/r0`` the paper's gradient form, ``keep`` / ``reset`` the other
second-moment rules, ``symmetric`` the symmetric frame, ``ns`` the Newton-Schulz solver,
``scalar/parameter`` RefLoRA-S.

Run: ``python benchmarks/studies/rank_deficient.py`` (default vs plain LoRA, 5 seeds, the whole grid,
about 10 minutes on 2 cores); ``--methods all --seeds 3`` for the safety sweep over every
option; ``--plot DIR`` writes loss curves of a few cells; ``--json F`` saves every run and
``--from-json F`` prints the report again (the ratio tables, the summary and a Markdown table by
regime); ``--trace --methods full/parameter/r0 default`` prints the per-step diagnostics behind
``docs/rank-deficient.md``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
from concurrent.futures import ProcessPoolExecutor
from unittest import mock

import torch
from torch import nn

import reflora

STEPS = (50, 150, 300)
M = N_OUT = 64
ROWS = 256

METHODS = {
    "lora": None,
    "default": {},
    "full/parameter/r0": dict(space="parameter", resolved=0.0),
    "full/gradient/r0": dict(space="gradient", resolved=0.0),
    "full/parameter": dict(space="parameter"),
    "full/gradient": dict(space="gradient"),
    "scalar/parameter": dict(variant="scalar", space="parameter"),
    "scalar/gradient": dict(variant="scalar", space="gradient"),
    "keep": dict(space="parameter", second_moment="keep"),
    "reset": dict(space="parameter", second_moment="reset"),
    "symmetric": dict(space="parameter", frame="symmetric"),
    "ns/gradient": dict(space="gradient", solver="newton_schulz"),
    "ns/parameter": dict(space="parameter", solver="newton_schulz"),
    "warmup50/r0": dict(space="parameter", resolved=0.0, warmup_steps=50),
}
OPTIMIZERS = {
    "adamw": (1e-3, 3e-3, 1e-2),
    "adamw-wd": (1e-3, 3e-3, 1e-2),
    "sgd-m": (3e-3, 1e-2, 3e-2),
}


def grid() -> list[tuple[int, int]]:
    return [(r, k) for r in (4, 8, 16, 32) for k in sorted({1, r // 4, r // 2, r})]


def problem(seed: int, r: int, k: int):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(M, k, generator=g) @ torch.randn(k, N_OUT, generator=g) / math.sqrt(M)
    X = torch.randn(ROWS, M, generator=g)
    A = nn.Parameter((torch.rand(r, M, generator=g) - 0.5) * 2 / math.sqrt(M))
    B = nn.Parameter(torch.zeros(N_OUT, r))
    return X, X @ W, A, B, g


def make_optimizer(method: str, opt_name: str, lr: float, A: nn.Parameter, B: nn.Parameter) -> torch.optim.Optimizer:
    """The grid's optimizer ``opt_name`` over ``(A, B)``, with RefLoRA attached as ``method`` says."""
    if opt_name == "sgd-m":
        opt = torch.optim.SGD([A, B], lr=lr, momentum=0.9)
    else:
        opt = torch.optim.AdamW([A, B], lr=lr, weight_decay=0.01 if opt_name == "adamw-wd" else 0.0)
    cfg = METHODS[method]
    if cfg is not None:
        reflora.attach(opt, [(A, B)], **cfg)
    return opt


def run(method: str, opt_name: str, lr: float, r: int, k: int, seed: int, batch: int, steps: int | None = None,
        curve: bool = False) -> dict:
    """Losses (full data) at ``STEPS`` (and every step with ``curve``) of one run."""
    steps = steps or STEPS[-1]
    X, Y, A, B, g = problem(seed, r, k)
    opt = make_optimizer(method, opt_name, lr, A, B)
    if method in GAPS:
        with gap_gate(GAPS[method]):
            return _train(X, Y, A, B, g, opt, batch, steps, curve)
    return _train(X, Y, A, B, g, opt, batch, steps, curve)


def _train(X, Y, A, B, g, opt, batch: int, steps: int, curve: bool) -> dict:
    def full_loss() -> float:
        with torch.no_grad():
            return float(((X @ A.T @ B.T - Y) ** 2).mean())

    l0 = full_loss()
    out: dict = {"l0": l0, "at": {}, "curve": []}
    for t in range(1, steps + 1):
        idx = torch.randint(0, ROWS, (batch,), generator=g) if batch < ROWS else slice(None)
        opt.zero_grad()
        ((X[idx] @ A.T @ B.T - Y[idx]) ** 2).mean().backward()
        opt.step()
        if t in STEPS or curve:
            loss = full_loss()
            if curve:
                out["curve"].append(loss)
            if t in STEPS:
                out["at"][t] = loss
    return out


def trace(method: str, opt_name: str, lr: float, r: int, k: int, seed: int = 0,
          at: tuple[int, ...] = (1, 2, 3, 5, 10, 20, 50, 100, 150)) -> list[dict]:
    """Per-step diagnostics of one full-batch run (``--trace``), in the SVD basis of ``B A = U diag(s) V^T``.

    * ``s[j] / s[0]``: the spectrum of the product;
    * ``|A v_j|`` and ``|B^T u_j|``: how much of direction ``j`` each factor carries (balanced
      factors have both equal to ``s_j^{1/2}``), for the top direction and the median over the
      directions the target does not need (``j >= k``);
    * ``spread``: the participation ratio of ``A v_0`` over the ``r`` coordinates (rows of ``A``):
      ``r`` when the top direction is spread over every coordinate, 1 when it sits on one;
    * ``rms u_A``, ``rms u_B``: the RMS of AdamW's normalised update ``m_hat / (sqrt(v_hat) + eps)``
      after the step (the moments as transported by RefLoRA); 1 means every coordinate moves a full ``lr``;
    * ``dW / lr``: how far the step moved ``B A``, in units of the learning rate.
    """
    X, Y, A, B, _ = problem(seed, r, k)
    opt = torch.optim.AdamW([A, B], lr=lr, weight_decay=0.0) if opt_name != "sgd-m" else \
        torch.optim.SGD([A, B], lr=lr, momentum=0.9)
    cfg = METHODS[method]
    if cfg is not None:
        reflora.attach(opt, [(A, B)], **cfg)
    rows, prev = [], torch.zeros(N_OUT, M)
    for t in range(1, max(at) + 1):
        opt.zero_grad()
        ((X @ A.T @ B.T - Y) ** 2).mean().backward()
        opt.step()
        W = (B @ A).detach()
        if t in at:
            U, sv, Vh = torch.linalg.svd(W.double())
            a_dir = (A.detach().double() @ Vh.mT).norm(dim=0)  # |A v_j|
            b_dir = (B.detach().double().mT @ U).norm(dim=0)  # |B^T u_j|
            top = A.detach().double() @ Vh[0]
            row = {"step": t, "loss": float(((X @ W.T - Y) ** 2).mean()),
                   "s": (sv[:r] / sv[0]).tolist(), "a0": float(a_dir[0]), "b0": float(b_dir[0]),
                   "a_rest": float(a_dir[k:r].median()) if k < r else math.nan,
                   "b_rest": float(b_dir[k:r].median()) if k < r else math.nan,
                   "spread": float(top.square().sum() ** 2 / top.pow(4).sum()),
                   "dW": float((W - prev).norm() / lr)}
            if opt_name != "sgd-m":
                for name, p in (("uA", A), ("uB", B)):
                    st = opt.state[p]
                    u = (st["exp_avg"] / (1 - 0.9**t)) / ((st["exp_avg_sq"] / (1 - 0.999**t)).sqrt() + 1e-8)
                    row[name] = float(u.square().mean().sqrt())
            rows.append(row)
        prev = W
    return rows


def gate_steps(method: str, opt_name: str, lr: float, r: int, k: int, seed: int, batch: int = ROWS) -> list[int]:
    """The steps (from 1) before which ``B A`` passes the default gate's test, ``sigma_min >= 0.1
    sigma_max`` over its ``r`` singular values (``--gate-steps``): where the default acts in that
    run (with ``warmup_steps`` it acts there only after the warmup)."""
    X, Y, A, B, g = problem(seed, r, k)
    opt = make_optimizer(method, opt_name, lr, A, B)
    passed = []
    for t in range(1, STEPS[-1] + 1):
        with torch.no_grad():
            s = torch.linalg.svdvals((B @ A).double())[:r]
        if s[0] > 0 and s[-1] >= 0.1 * s[0]:
            passed.append(t)
        idx = torch.randint(0, ROWS, (batch,), generator=g) if batch < ROWS else slice(None)
        opt.zero_grad()
        ((X[idx] @ A.T @ B.T - Y[idx]) ** 2).mean().backward()
        opt.step()
    return passed


def print_trace(methods: list[str], cells: list[tuple[str, float, int, int]]) -> None:
    for o, lr, r, k in cells:
        print(f"\n--trace: {o} lr={lr:g}, r={r}, k={k}, seed 0, full batch")
        head = (f"{'method':<18} {'step':>4} {'loss':>8} {'s1/s0':>7} {'s_r-1/s0':>8} {'|A v0|':>7} {'|B^T u0|':>8} "
                f"{'|A v_j|,j>=k':>12} {'|B^T u_j|':>9} {'spread':>6} {'rms u_A':>7} {'rms u_B':>7} {'dW/lr':>6}")
        print(head)
        for m in ["lora", *methods]:
            for row in trace(m, o, lr, r, k):
                s = row["s"]
                print(f"{'plain LoRA' if m == 'lora' else m:<18} {row['step']:>4} {row['loss']:>8.2e} "
                      f"{(s[1] if r > 1 else 1):>7.1e} {s[-1]:>8.1e} {row['a0']:>7.3f} {row['b0']:>8.3f} "
                      f"{row['a_rest']:>12.2e} {row['b_rest']:>9.2e} {row['spread']:>6.2f} "
                      f"{row.get('uA', math.nan):>7.3f} {row.get('uB', math.nan):>7.3f} {row['dW']:>6.2f}")


def floored(v: float, l0: float) -> float:
    return max(v, 1e-8 * l0) if math.isfinite(v) else math.inf


def diverged(res: dict) -> bool:
    last = res["at"][STEPS[-1]]
    return not math.isfinite(last) or last > res["l0"]


#: ``gap=X`` methods: the default whose gate also needs every ``sigma_j >= X sigma_{j+1}`` (no gap
#: in the spectrum of ``B A``); a candidate measured here, not a library option (see ``gap_gate``).
GAPS: dict[str, float] = {}


def _parse_method(m: str) -> None:
    """``resolved=X``: the default with another gate; ``eps=X``: release 0.2's default with a larger
    dead-direction threshold (balance only the directions above it); ``gap=X``: the default with a
    spectral-gap test added to its gate (:func:`gap_gate`)."""
    if m.startswith("resolved="):
        METHODS[m] = {"resolved": float(m.split("=", 1)[1])}
    elif m.startswith("eps="):
        METHODS[m] = {"space": "parameter", "resolved": 0.0, "eps": float(m.split("=", 1)[1])}
    elif m.startswith("gap="):
        METHODS[m], GAPS[m] = {}, float(m.split("=", 1)[1])
    elif m.startswith("warmup="):
        METHODS[m] = {"warmup_steps": int(m.split("=", 1)[1])}


def gap_gate(ratio: float):
    """A candidate gate, not shipped (docs/rank-deficient.md, "The warmup"): the default's test
    ``sigma_min >= resolved * sigma_max`` and, besides, no gap in the spectrum (``sigma_j >= ratio *
    sigma_{j+1}`` for every pair of neighbours), meant to keep the gate shut where ``r - k`` noise
    directions sit below the task's (measured: it does not clear the cells the default loses,
    whose spectrum is flat when the gate passes). Installed for one run over
    ``reflora._linalg.resolved_gate``, which every form of the kernel calls."""
    import reflora._linalg as linalg

    base = linalg.resolved_gate

    def gate(sig2: torch.Tensor, resolved: float) -> torch.Tensor:
        sig = sig2.clamp_min(0.0).sqrt()  # ascending
        no_gap = (sig[..., :-1] >= ratio * sig[..., 1:]).all(-1)
        return base(sig2, resolved) & (no_gap | ~torch.isfinite(sig).all(-1))

    return mock.patch.object(linalg, "resolved_gate", gate)


def _job(args):
    _parse_method(args[0])  # worker processes rebuild the parsed methods
    return args, run(*args)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--methods", nargs="+", default=["default"],
                    help=f"methods compared with plain LoRA, or 'all' (choices: {', '.join(m for m in METHODS if m != 'lora')}; "
                         "also resolved=X, the default with another gate, eps=X, release 0.2's default with a "
                         "larger dead-direction threshold, and gap=X, the default with a spectral-gap test added "
                         "to its gate)")
    ap.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=list(OPTIMIZERS))
    ap.add_argument("--batch", nargs="+", type=int, default=[ROWS, 32], help="rows per step (256: full batch)")
    ap.add_argument("--ranks", nargs="+", type=int, default=[4, 8, 16, 32])
    ap.add_argument("--tolerance", type=float, default=1.2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", default=None, help="write every run's losses here")
    ap.add_argument("--from-json", default=None, help="print the report of runs saved with --json; runs nothing")
    ap.add_argument("--plot", default=None, help="directory for loss-curve plots of a few cells")
    ap.add_argument("--gate-steps", action="store_true",
                    help="print the steps at which B A passes the default gate's test in the cells where it lost late")
    ap.add_argument("--trace", action="store_true",
                    help="print per-step diagnostics (spectrum, per-direction factor norms, spread, Adam's update) "
                         "of plain LoRA and --methods on two cells (k < r and k = r), then stop")
    args = ap.parse_args()
    if args.from_json:
        report(*load(args.from_json), args.tolerance)
        return
    methods = [m for m in METHODS if m != "lora"] if args.methods == ["all"] else args.methods
    for m in methods:
        _parse_method(m)
        if m not in METHODS:
            ap.error(f"unknown method {m!r}; choices: {', '.join(METHODS)}")
    torch.set_num_threads(1)
    if args.trace:
        print_trace(methods, [("adamw", 3e-3, 8, 1), ("adamw", 1e-2, 8, 8)])
        return
    if args.gate_steps:
        # the cells where the default lost late (docs/rank-deficient.md): where does its gate pass?
        for o, lr, r, k, b in [("adamw", 1e-2, 8, 4, ROWS), ("adamw", 1e-2, 8, 4, 32), ("adamw", 1e-2, 4, 2, 32)]:
            for m in ["lora", *methods]:
                for seed in range(args.seeds):
                    steps = gate_steps(m, o, lr, r, k, seed, b)
                    shown = steps if len(steps) <= 8 else [*steps[:4], "...", *steps[-3:]]
                    print(f"{o} lr={lr:g} r={r} k={k} batch {b} {m:<14} seed {seed}: passes before "
                          f"{len(steps)} of {STEPS[-1]} steps: {shown}")
        return
    cells = [(o, lr, r, k, b) for o in args.optimizers for b in args.batch for (r, k) in grid() if r in args.ranks
             for lr in OPTIMIZERS[o]]
    jobs = [(m, o, lr, r, k, s, b) for (o, lr, r, k, b) in cells for m in ["lora", *methods] for s in range(args.seeds)]
    results: dict = {}
    with ProcessPoolExecutor(args.workers) as pool:
        for key, res in pool.map(_job, jobs, chunksize=8):
            results[key] = res
    report(cells, methods, args.seeds, results, args.tolerance)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{"method": k[0], "optimizer": k[1], "lr": k[2], "r": k[3], "k": k[4], "seed": k[5],
                        "batch": k[6], **v} for k, v in results.items()], f)
    if args.plot:
        plot(args.plot, methods)


def report(cells, methods, seeds, results, tol) -> None:
    fails = {m: 0 for m in methods}
    divs = {m: 0 for m in methods}
    worst = {m: (0.0, None) for m in methods}
    wins = {m: 0 for m in methods}
    by_cell: dict = {}  # (method, cell) -> (over tolerance, diverged, ahead, worst ratio)
    regimes: dict = {}  # (optimizer, batch, k == r) -> cells
    for c in cells:
        regimes.setdefault((c[0], c[4], c[2] == c[3]), []).append(c)
    for o, b in itertools.product(dict.fromkeys(c[0] for c in cells), dict.fromkeys(c[4] for c in cells)):
        rows = [c for c in cells if c[0] == o and c[4] == b]
        if not rows:
            continue
        print(f"\n{o}, {'full batch' if b >= ROWS else f'minibatch {b}'}: median loss ratio to plain LoRA at steps "
              f"{' / '.join(map(str, STEPS))} ({seeds} seeds; < 1: ahead)")
        print(f"{'r':>3} {'k':>3} {'lr':>7} {'plain LoRA (median loss)':>30}  " + "  ".join(f"{m:>26}" for m in methods))
        for (_, lr, r, k, _) in rows:
            base = [results[("lora", o, lr, r, k, s, b)] for s in range(seeds)]
            bmed = {t: statistics.median(floored(x["at"][t], x["l0"]) for x in base) for t in STEPS}
            base_div = sum(map(diverged, base)) > seeds // 2
            line = f"{r:>3} {k:>3} {lr:>7.0e} {' / '.join(f'{bmed[t]:.1e}' for t in STEPS):>30}  "
            cols = []
            for m in methods:
                runs = [results[(m, o, lr, r, k, s, b)] for s in range(seeds)]
                med = {t: statistics.median(floored(x["at"][t], x["l0"]) for x in runs) for t in STEPS}
                ratio = {t: med[t] / bmed[t] if bmed[t] > 0 else math.inf for t in STEPS}
                div = any(map(diverged, runs)) and not base_div
                bad = div or any(v > tol for v in ratio.values())
                fails[m] += bad
                divs[m] += div
                wins[m] += ratio[STEPS[-1]] < 1 / tol
                top = max(ratio.values())
                by_cell[(m, (o, lr, r, k, b))] = (bad, div, ratio[STEPS[-1]] < 1 / tol, top)
                if top > worst[m][0]:
                    worst[m] = (top, (o, b, r, k, lr))
                flag = " DIV" if div else (" FAIL" if bad else "")
                cols.append(f"{' / '.join(_fmt(ratio[t]) for t in STEPS)}{flag:>5}")
            print(line + "  ".join(f"{c:>26}" for c in cols))
    print(f"\nSummary over {len(cells)} cells (tolerance {tol}x at every step):")
    for m in methods:
        w = worst[m]
        print(f"  {m:<22} cells over tolerance: {fails[m]:>3}   diverged where LoRA did not: {divs[m]:>3}   "
              f"ahead by > {tol}x at step {STEPS[-1]}: {wins[m]:>3}   worst ratio {w[0]:.2f} at {w[1]}")
    print(f"\nBy regime (each method: cells over {tol}x / diverged / ahead by > {tol}x at step {STEPS[-1]} / worst ratio):\n")
    print("| optimizer | batch | regime | cells | " + " | ".join(methods) + " |")
    print("|---|---|---|---|" + "---|" * len(methods))
    for (o, b, full), rows in regimes.items():
        cols = []
        for m in methods:
            st = [by_cell[(m, c)] for c in rows]
            cols.append(f"{sum(x[0] for x in st)} / {sum(x[1] for x in st)} / {sum(x[2] for x in st)} / "
                        f"{_fmt(max(x[3] for x in st))}")
        print(f"| {o} | {'full' if b >= ROWS else f'minibatch {b}'} | {'k = r' if full else 'k < r'} | {len(rows)} | "
              + " | ".join(cols) + " |")


def load(path: str) -> tuple[list, list[str], int, dict]:
    """``report``'s arguments from a file written by ``--json`` (cells and methods in run order)."""
    with open(path) as f:
        rows = json.load(f)
    results = {}
    for row in rows:
        key = tuple(row[f] for f in ("method", "optimizer", "lr", "r", "k", "seed", "batch"))
        results[key] = dict(row, at={int(t): v for t, v in row["at"].items()})
    cells = list(dict.fromkeys((k[1], k[2], k[3], k[4], k[6]) for k in results))
    methods = [m for m in dict.fromkeys(k[0] for k in results) if m != "lora"]
    seeds = len({k[5] for k in results})
    return cells, methods, seeds, results


def _fmt(x: float) -> str:
    if not math.isfinite(x):
        return "inf"
    return f"{x:.2f}" if 0.01 <= x < 100 else f"{x:.0e}"


def plot(out: str, methods: list[str]) -> None:
    """Loss curves (median of 3 seeds) for a few cells: k < r and k = r, AdamW and SGD."""
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out, exist_ok=True)
    cells = [("adamw", 3e-3, 8, 1), ("adamw", 3e-3, 16, 4), ("adamw", 1e-2, 8, 8), ("sgd-m", 1e-2, 16, 4)]
    fig, axes = plt.subplots(1, len(cells), figsize=(4.2 * len(cells), 3.4))
    for ax, (o, lr, r, k) in zip(axes, cells):
        for i, m in enumerate(["lora", *dict.fromkeys([*methods, "full/parameter/r0"])]):
            curves = [run(m, o, lr, r, k, s, ROWS, curve=True)["curve"] for s in range(3)]
            med = [statistics.median(c[t] for c in curves) for t in range(len(curves[0]))]
            # overlapping curves (the gate closed: default == plain LoRA) stay visible
            ax.semilogy(range(1, len(med) + 1), med, label="plain LoRA" if m == "lora" else m,
                        linestyle=("-", "--", ":", "-.")[i % 4], linewidth=2.2 - 0.4 * (i % 4))
        ax.set_title(f"{o} lr={lr:g}, r={r}, k={k}")
        ax.set_xlabel("step")
    axes[0].set_ylabel("training loss (median of 3 seeds)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(out, "rank_deficient.png")
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
