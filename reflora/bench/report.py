"""Tables, plots and the results file of ``reflora bench``."""

from __future__ import annotations

import math
import re
import statistics
from collections import defaultdict
from pathlib import Path

from reflora.bench.runner import Run, steps_to

__all__ = ["best_rates", "best_rate_table", "describe_rank", "markdown_table", "paired", "plot_mf", "plot_task", "task_table"]

# two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (then the normal's 1.96)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def describe_rank(description: str, rank: int | None) -> str:
    """A task's description with its LoRA rank as run (``--rank`` changes ``r=...``; results saved
    before the description followed the rank still print the rank they ran at)."""
    return description if rank is None else re.sub(r"\br=\d+", f"r={rank}", description)


def paired(diffs: list[float], lower_is_better: bool = False) -> str:
    """``mean [lo, hi] (wW lL)``: the mean paired difference, its 95% t-interval, wins and losses.

    A win is a positive difference, or a negative one with ``lower_is_better`` (a loss)."""
    diffs = [d for d in diffs if math.isfinite(d)]
    if not diffs:
        return "n/a"
    mean = statistics.fmean(diffs)
    won, lost = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    if lower_is_better:
        won, lost = lost, won
    wl = f"({won}W {lost}L)"
    if len(diffs) == 1:
        return f"{mean:+.3f} {wl}"
    t = _T975[len(diffs) - 2] if len(diffs) - 1 <= len(_T975) else 1.96
    half = t * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return f"{mean:+.3f} [{mean - half:+.3f}, {mean + half:+.3f}] {wl}"


def mean_sd(xs: list[float]) -> str:
    """``mean±sd`` with three significant digits on the mean and the sd to the same decimals."""
    xs = [x for x in xs if math.isfinite(x)]
    if not xs:
        return "n/a"
    mean = statistics.fmean(xs)
    dec = 3 if mean == 0 else min(4, max(0, 2 - math.floor(math.log10(abs(mean)))))
    if len(xs) == 1:
        return f"{mean:.{dec}f}"
    sd = statistics.stdev(xs)
    return f"{mean:.{dec}f}" if sd == 0 else f"{mean:.{dec}f}±{sd:.{dec}f}"


def _fmt_metric(v: float) -> str:
    """An accuracy to 3 decimals; a perplexity (above 1) to 4 significant digits."""
    return f"{v:.3f}" if abs(v) <= 1 else f"{v:.4g}"


def best_rates(runs: list[Run], lower_is_better: bool = False) -> dict[str, float]:
    """Each method's best learning rate, chosen on the validation split.

    A rate qualifies when every one of its runs trained to the end (a diverged run disqualifies
    it); among those, the best mean validation metric over seeds wins (ties: the smaller rate).
    Only rates run with the same number of seeds as the sweep's smallest count compete, on those
    seeds, so that every rate is judged on the same seeds.

    Returns:
        ``{method: lr}`` for the methods with at least one qualifying rate.
    """
    by = defaultdict(dict)
    for r in runs:
        by[(r.method, r.lr)][r.seed] = r
    out = {}
    for m in dict.fromkeys(r.method for r in runs):
        rates = {lr: rs for (mm, lr), rs in by.items() if mm == m}
        if not rates:
            continue
        seeds = set.intersection(*(set(rs) for rs in rates.values()))
        scores = {}
        for lr, rs in rates.items():
            sel = [rs[s] for s in seeds]
            if sel and all(not r.error and math.isfinite(r.val_metric) for r in sel):
                scores[lr] = statistics.fmean(r.val_metric for r in sel)
        if scores:
            sign = 1 if lower_is_better else -1
            out[m] = min(sorted(scores), key=lambda lr: sign * scores[lr])
    return out


def best_rate_table(runs: list[Run], metric_name: str, lower_is_better: bool = False) -> str:
    """Every method at its own best rate (chosen on validation), reported on the test split.

    Columns: the chosen rate, seeds, test metric (mean±sd), its paired per-seed difference to
    plain LoRA *at plain LoRA's own best rate* (mean, 95% t-interval, wins W / losses L), final
    training loss and its paired difference."""
    best = best_rates(runs, lower_is_better)
    by = defaultdict(dict)
    for r in runs:
        by[(r.method, r.lr)][r.seed] = r
    base = by.get(("lora", best.get("lora")), {})
    head = (f"{'method':<15}{'best lr':>9}{'seeds':>6}{'test ' + metric_name:>18}{'Δ vs LoRA@best [95% CI]':>36}"
            f"{'final loss':>15}{'Δ loss [95% CI]':>36}")
    lines = [head, "-" * len(head)]
    for m in dict.fromkeys(r.method for r in runs):
        if m not in best:
            errs = [r.error for r in runs if r.method == m and r.error]
            lines.append(f"{m:<15}  n/a: {(errs[0] if errs else 'no rate trained to the end')[:100]}")
            continue
        rs = by[(m, best[m])]
        ok = [r for r in rs.values() if not r.error]
        pairs = [(r, base[r.seed]) for r in ok if r.seed in base and not base[r.seed].error]
        d_metric = "" if m == "lora" or not pairs else paired([r.metric - b.metric for r, b in pairs], lower_is_better)
        d_loss = "" if m == "lora" or not pairs else paired([r.final_loss - b.final_loss for r, b in pairs], True)
        div = len(rs) - len(ok)
        lines.append(f"{m:<15}{best[m]:>9g}{len(rs):>6}{mean_sd([r.metric for r in ok]) + (f' ({div}div)' if div else ''):>18}"
                     f"{d_metric:>36}{mean_sd([r.final_loss for r in ok]):>15}{d_loss:>36}")
    return "\n".join(lines)


def _paired_cells(diffs: list[float], lower_is_better: bool) -> tuple[str, str]:
    """``("mean [lo, hi]", "wW lL")`` for a Markdown table (see :func:`paired`)."""
    text = paired(diffs, lower_is_better)
    if text == "n/a":
        return "n/a", ""
    head, _, wl = text.rpartition(" (")
    return head, wl.rstrip(")").replace(" ", " / ")


def markdown_table(name: str, entry: dict, runs: list[Run], methods: list[str] | None = None,
                   baseline: str = "lora") -> str:
    """A compact Markdown table of one task: each method at its own best rate (chosen on the
    validation split) when the entry has a sweep, else at the shared rate; the test metric and the
    final training loss with their paired differences to plain LoRA (at its own best rate), 95%
    t-intervals and wins / losses. ``methods`` selects and orders the rows (default: all);
    ``baseline`` is the method every other is paired with (default: plain LoRA).

    This is what the README and ``docs/results.md`` show; a test checks them against it."""
    lower = entry.get("lower_is_better", False)
    sweep = len(entry["grid"]) > 1 and any(math.isfinite(r.val_metric) for r in runs)
    rates = best_rates(runs, lower) if sweep else {}
    by = defaultdict(dict)
    for r in runs:
        by[(r.method, r.lr)][r.seed] = r
    rate = lambda m: rates.get(m) if sweep else entry["shared_lr"]  # noqa: E731
    base = by.get((baseline, rate(baseline)), {})
    order = [m for m in (methods or dict.fromkeys(r.method for r in runs)) if any(r.method == m for r in runs)]
    has_val = any(math.isfinite(r.val_metric) for r in runs)  # results from before 0.3 have one held-out split
    metric = entry["metric"].replace("held-out ", "test ") if has_val else entry["metric"]
    where = "own best rate (validation)" if sweep else f"shared rate {entry['shared_lr']:g}"
    seeds = max((len(by[(m, rate(m))]) for m in order if rate(m) is not None), default=0)
    lines = [f"**{name}**: {describe_rank(entry['description'], entry.get('rank'))}; {entry['steps']} steps, each method at its {where}, "
             f"{seeds} seeds{'; lower perplexity is better' if lower else ''}.", "",
             f"| method | lr | {metric} | Δ vs {'LoRA' if baseline == 'lora' else baseline} [95% CI] | W / L "
             "| final loss | Δ loss [95% CI] | W / L |",
             "|---|---|---|---|---|---|---|---|"]
    for m in order:
        lr = rate(m)
        rs = by.get((m, lr), {})
        ok = [r for r in rs.values() if not r.error]
        if lr is None or not ok:
            errs = [r.error for r in runs if r.method == m and r.error]
            lines.append(f"| {m} | n/a: {(errs[0] if errs else 'no rate trained to the end')[:70]} | | | | | | |")
            continue
        pairs = [(r, base[r.seed]) for r in ok if r.seed in base and not base[r.seed].error]
        if m == baseline or not pairs:
            dm, wm, dl, wl = "", "", "", ""
        else:
            dm, wm = _paired_cells([r.metric - b.metric for r, b in pairs], lower)
            dl, wl = _paired_cells([r.final_loss - b.final_loss for r, b in pairs], True)
        div = len(rs) - len(ok)
        lines.append(f"| {m} | {lr:g} | {mean_sd([r.metric for r in ok])}{f' ({div} div)' if div else ''} | {dm} | {wm} "
                     f"| {mean_sd([r.final_loss for r in ok])} | {dl} | {wl} |")
    return "\n".join(lines)


def task_table(runs: list[Run], shared_lr: float, metric_name: str, lower_is_better: bool = False) -> str:
    """The shared-rate table (every seed), then the sweep table when several rates were run.

    Shared rate: final training loss and held-out metric (mean±sd over seeds), each with its
    paired per-seed difference to plain LoRA (mean, 95% t-interval, wins and losses; a loss wins
    when lower), steps to reach plain LoRA's final loss, ms per step, overhead, state memory.
    Sweep: per rate, the test metric and the final loss (means over seeds; ``div`` counts diverged
    runs), each method's best rate chosen on the validation split (:func:`best_rates`; "-" when no rate
    qualifies or the file predates the split) and the range of its test metric over the rates. With
    ``lower_is_better`` (perplexity) a lower metric wins."""
    by = defaultdict(list)
    for r in runs:
        by[(r.method, r.lr)].append(r)
    methods = list(dict.fromkeys(r.method for r in runs))
    lrs = sorted({r.lr for r in runs})
    base = {r.seed: r for r in by[("lora", shared_lr)]}
    head = (f"{'method':<15}{'final loss':>13}{'Δ loss vs LoRA [95% CI]':>34}{metric_name:>13}"
            f"{'Δ vs LoRA [95% CI]':>34}{'steps→LoRA':>12}{'ms/step':>10}{'overhead':>9}{'state MB':>9}")
    lines = [head, "-" * len(head)]
    for m in methods:
        rs = by[(m, shared_lr)]
        if rs and all(r.error and not r.losses for r in rs):
            lines.append(f"{m:<15}  n/a: {rs[0].error[:100]}")
            continue
        pairs = [(r, base[r.seed]) for r in rs if r.seed in base]
        d_loss = "" if m == "lora" or not pairs else paired([r.final_loss - b.final_loss for r, b in pairs], True)
        d_metric = "" if m == "lora" or not pairs else paired([r.metric - b.metric for r, b in pairs], lower_is_better)
        reach = [steps_to(r.losses, b.final_loss) for r, b in pairs]
        reach_s = "" if m == "lora" else ("-" if not reach or any(x is None for x in reach)
                                          else mean_sd([float(x) for x in reach]))
        ms = [r.ms_per_step for r in rs]
        base_ms = [b.ms_per_step for _, b in pairs]
        over = f"{statistics.fmean(ms) / statistics.fmean(base_ms) - 1:+.0%}" if base_ms and m != "lora" else ""
        lines.append(f"{m:<15}{mean_sd([r.final_loss for r in rs]):>13}{d_loss:>34}{mean_sd([r.metric for r in rs]):>13}"
                     f"{d_metric:>34}{reach_s:>12}{mean_sd(ms):>10}{over:>9}{mean_sd([r.state_mb for r in rs]):>9}")
    if len(lrs) > 1:
        seeds = min(len(by[(m, lr)]) for m in methods for lr in lrs if by[(m, lr)]) if runs else 0
        lines += ["", f"stability sweep: {metric_name} / final training loss per learning rate, mean over seeds "
                      f"(at least {seeds} each; 'div': diverged runs)"]
        chosen = best_rates(runs, lower_is_better)
        head = f"{'method':<15}" + "".join(f"{'lr ' + format(lr, 'g'):>17}" for lr in lrs) + f"{'best (val)':>11}{'range':>16}"
        lines += [head, "-" * len(head)]
        for m in methods:
            cells, means = [], {}
            for lr in lrs:
                rs = by[(m, lr)]
                ok = [r for r in rs if not r.error and math.isfinite(r.metric)]
                div = sum(bool(r.error) and bool(r.losses) for r in rs)
                if not ok:
                    cells.append(f"{'n/a' if not div else f'{div} div':>17}")
                    continue
                means[lr] = statistics.fmean(r.metric for r in ok)
                loss = statistics.fmean(r.final_loss for r in ok)
                cells.append(f"{_fmt_metric(means[lr])} / {loss:.3g}{f' ({div}div)' if div else ''}".rjust(17))
            if not means:
                lines.append(f"{m:<15}  n/a")
                continue
            best = format(chosen[m], "g") if m in chosen else "-"
            rng = f"{_fmt_metric(min(means.values()))}-{_fmt_metric(max(means.values()))}" + ("" if len(means) == len(lrs) else "*")
            lines.append(f"{m:<15}" + "".join(cells) + f"{best:>11}{rng:>16}")
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
    # one colour per method in every panel (tab20 past the default cycle's 10 colours)
    color = {m: f"C{i}" if len(methods) <= 10 else plt.get_cmap("tab20")(i % 20) for i, m in enumerate(methods)}
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
    import textwrap

    ax.set_title("\n".join(textwrap.wrap(title, 70)) + f"\nlr = {shared_lr:g}", fontsize=8)
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
