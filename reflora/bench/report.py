"""Tables, plots and the results file of ``reflora bench``."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from pathlib import Path

from reflora.bench.runner import Run, steps_to

__all__ = ["paired", "plot_mf", "plot_task", "task_table"]

# two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (then the normal's 1.96)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def paired(diffs: list[float]) -> str:
    """``mean [lo, hi] (wW lL)``: the mean paired difference, its 95% t-interval, wins and losses."""
    diffs = [d for d in diffs if math.isfinite(d)]
    if not diffs:
        return "n/a"
    mean = statistics.fmean(diffs)
    wl = f"({sum(d > 0 for d in diffs)}W {sum(d < 0 for d in diffs)}L)"
    if len(diffs) == 1:
        return f"{mean:+.3f} {wl}"
    t = _T975[len(diffs) - 2] if len(diffs) - 1 <= len(_T975) else 1.96
    half = t * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return f"{mean:+.3f} [{mean - half:+.3f}, {mean + half:+.3f}] {wl}"


def _ms(xs: list[float]) -> str:
    xs = [x for x in xs if math.isfinite(x)]
    if not xs:
        return "n/a"
    if len(xs) == 1:
        return f"{xs[0]:.3g}"
    return f"{statistics.fmean(xs):.3g}±{statistics.stdev(xs):.1g}"


def task_table(runs: list[Run], shared_lr: float, metric_name: str) -> str:
    """The per-task results table (shared lr), with best-of-grid columns when a grid was run."""
    by = defaultdict(list)
    for r in runs:
        by[(r.method, r.lr)].append(r)
    methods = list(dict.fromkeys(r.method for r in runs))
    lrs = sorted({r.lr for r in runs})
    base = {r.seed: r for r in by[("lora", shared_lr)]}
    head = (f"{'method':<15}{'final loss':>14}{metric_name:>14}{'Δ vs LoRA [95% CI] (W L)':>34}{'steps→LoRA':>12}"
            f"{'ms/step':>9}{'overhead':>9} {'state MB':>10}")
    if len(lrs) > 1:
        head += f"{'best lr':>9}{'best ' + metric_name[:8]:>14}{'grid range':>14}"
    lines = [head, "-" * len(head)]
    for m in methods:
        rs = by[(m, shared_lr)]
        if rs and all(r.error and not r.losses for r in rs):
            lines.append(f"{m:<15}  n/a: {rs[0].error[:90]}")
            continue
        metric = [r.metric for r in rs]
        diffs = [r.metric - base[r.seed].metric for r in rs if r.seed in base]
        delta = "" if m == "lora" or not diffs else paired(diffs)
        reach = [steps_to(r.losses, base[r.seed].final_loss) if r.seed in base else None for r in rs]
        reach_s = "" if m == "lora" else ("-" if any(x is None for x in reach) else _ms([float(x) for x in reach]))
        ms = [r.ms_per_step for r in rs]
        base_ms = [base[r.seed].ms_per_step for r in rs if r.seed in base]
        over = f"{statistics.fmean(ms) / statistics.fmean(base_ms) - 1:+.0%}" if base_ms and m != "lora" else ""
        line = (f"{m:<15}{_ms([r.final_loss for r in rs]):>14}{_ms(metric):>14}{delta:>34}{reach_s:>12}"
                f"{_ms(ms):>9}{over:>9} {_ms([r.state_mb for r in rs]):>10}")
        if len(lrs) > 1:
            per_lr = {lr: [r.metric for r in by[(m, lr)] if math.isfinite(r.metric)] for lr in lrs}
            means = {lr: statistics.fmean(v) if v else float("nan") for lr, v in per_lr.items()}
            ok = {lr: v for lr, v in means.items() if math.isfinite(v)}
            if ok:
                best = max(ok, key=ok.get)
                rng = f"{min(ok.values()):.3f}-{max(ok.values()):.3f}" + ("" if len(ok) == len(lrs) else "*")
                line += f"{best:>9g}{ok[best]:>14.3f}{rng:>14}"
        lines.append(line)
    return "\n".join(lines)


def _ema(xs, beta=0.8):
    out, m = [], None
    for x in xs:
        m = x if m is None else beta * m + (1 - beta) * x
        out.append(m)
    return out


def plot_task(runs: list[Run], shared_lr: float, title: str, metric_name: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r.method for r in runs))
    lrs = sorted({r.lr for r in runs})
    color = {m: f"C{i}" for i, m in enumerate(methods)}  # one colour per method in every panel
    panels = 2 + (len(lrs) > 1)
    fig, axes = plt.subplots(1, panels, figsize=(5.8 * panels, 4.2), squeeze=False)
    ax = axes[0][0]
    for m in methods:
        curves = [_ema(r.losses) for r in runs if r.method == m and r.lr == shared_lr and r.losses]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        mean = [statistics.fmean(c[i] for c in curves) for i in range(n)]
        ax.plot(range(1, n + 1), mean, label=m, color=color[m], lw=1.6 if m.startswith("reflora") else 1.2,
                ls="-" if m.startswith("reflora") else "--")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (EMA 0.8, mean over seeds)")
    ax.set_title(f"{title}\nlr = {shared_lr:g}", fontsize=9)
    ax.legend(fontsize=8)
    ax1 = axes[0][1]
    for m in methods:
        curves = [r.imbalance for r in runs if r.method == m and r.lr == shared_lr and r.imbalance]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        xs = [curves[0][i][0] for i in range(n)]
        mean = [statistics.fmean(c[i][1] for c in curves) for i in range(n)]
        ax1.plot(xs, mean, label=m, color=color[m], lw=1.6 if m.startswith("reflora") else 1.2, ls="-" if m.startswith("reflora") else "--")
    ax1.set_yscale("symlog", linthresh=1e-3)
    ax1.set_xlabel("optimizer step")
    ax1.set_ylabel("mean |log(||A||_F / ||B||_F)| over pairs")
    ax1.set_title("factor imbalance (0: balanced), mean over seeds", fontsize=9)
    if len(lrs) > 1:
        ax2 = axes[0][2]
        for m in methods:
            ys = []
            for lr in lrs:
                v = [r.metric for r in runs if r.method == m and r.lr == lr and math.isfinite(r.metric)]
                ys.append(statistics.fmean(v) if v else float("nan"))
            ax2.plot(lrs, ys, marker="o", label=m, color=color[m], ls="-" if m.startswith("reflora") else "--")
        ax2.set_xscale("log")
        ax2.set_xlabel("learning rate")
        ax2.set_ylabel(metric_name)
        ax2.set_title("held-out metric over the lr grid (stability)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_mf(curves: dict[tuple[str, float], list[list[float]]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lrs = sorted({lr for _, lr in curves})
    fig, axes = plt.subplots(1, len(lrs), figsize=(6 * len(lrs), 4.2), squeeze=False)
    for ax, lr in zip(axes[0], lrs):
        for (method, l), runs in curves.items():
            if l != lr:
                continue
            for i, c in enumerate(runs):
                ax.plot(range(len(c)), c, color=f"C{list(dict.fromkeys(m for m, _ in curves)).index(method)}",
                        alpha=0.9 if i == 0 else 0.35, lw=1.4, label=method if i == 0 else None)
        ax.axhline(1e-3, color="gray", lw=0.8, ls=":")
        ax.set_yscale("log")
        ax.set_ylim(1e-8, 1e6)
        ax.set_xlabel("iteration")
        ax.set_ylabel("loss 0.5 ||BA - Y||^2")
        ax.set_title(f"matrix factorization, step size {lr:g}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
