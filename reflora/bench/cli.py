"""``reflora bench``: RefLoRA against plain LoRA and its neighbours, side by side, in one run."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from reflora.bench import mf
from reflora.bench.methods import BASE_OPTIMIZERS, METHODS
from reflora.bench.report import best_rate_table, best_rates, describe_rank, markdown_table, plot_mf, plot_task, task_table
from reflora.bench.runner import Run, run_one
from reflora.bench.tasks import TASKS
from reflora.bench.vmapped import VMAP_METHODS, vmapped_sweep

__all__ = ["MF_COUNTERPARTS", "add_arguments", "bench", "check_out", "markdown_from", "merge_results", "mf_methods", "report_from",
           "vmap_summary"]

ALL_TASKS = ("mf", "text", "vision", "graph", "lm", "lm-qlora")
DEFAULT_TASKS = ("mf", "text", "vision", "graph")  # the quick default (``make demo``)
FULL_TASKS = ("mf", "text", "vision", "graph", "lm")  # --full's default
# the quick default's methods; --full runs every method in METHODS
DEFAULT_METHODS = ("lora", "lora+", "riemannian", "lora-rite", "reflora", "reflora-param", "reflora-s", "reflora-s-grad")

# bench method -> the mf method that is the same update rule under plain gradient descent (mf has no
# optimizer state, so RefLoRA's parameter- and gradient-space forms coincide there). LoRA+ has none.
MF_COUNTERPARTS = {
    "lora": "lora",
    "riemannian": "scaledgd",
    "reflora": "reflora",
    "reflora-param": "reflora",
    "reflora-s": "reflora_s",
    "reflora-s-grad": "reflora_s",
}


def add_arguments(p) -> None:
    p.add_argument("--tasks", nargs="+", default=None, choices=ALL_TASKS,
                   help=f"tasks to run (default: {' '.join(DEFAULT_TASKS)}; with --full also lm)")
    p.add_argument("--methods", nargs="+", default=None, choices=list(METHODS),
                   help=f"methods (default: {' '.join(DEFAULT_METHODS)}; with --full all of them)")
    p.add_argument("--full", action="store_true",
                   help="5 seeds at the shared lr, longer runs, a stability sweep of 5 rates over 30x with 3 seeds each, "
                        "and each method at its own best rate (chosen on the validation split, then 5 seeds on the test "
                        "split), on every task (several hours on 2 CPU cores: run tasks separately and merge them with "
                        "--from-results)")
    p.add_argument("--seeds", type=int, default=None, help="override the number of seeds")
    p.add_argument("--steps", type=int, default=None, help="override the steps per run (text/vision/graph)")
    p.add_argument("--shared-lr-only", action="store_true",
                   help="run each task at its shared learning rate only (no sweep): every seed, the paired comparison")
    p.add_argument("--rank", type=int, default=None,
                   help="LoRA rank r of the text/vision/graph tasks (lora_alpha = 2r on text and vision; default: each "
                        "task's own, 8 / 4 / 4)")
    p.add_argument("--out", type=Path, default=Path("results"), help="folder for results.json and PNG plots")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--from-results", type=Path, nargs="+", default=None, metavar="RESULTS_JSON",
                   help="print the tables of saved runs again (and their plots into --out unless --no-plots); several "
                        "files are merged (each task from the file that has it); runs nothing")
    p.add_argument("--markdown", action="store_true",
                   help="with --from-results: print one compact Markdown table per task (each method at its own best "
                        "rate; --methods selects and orders the rows) instead of the full tables")
    p.add_argument("--baseline", default="lora", choices=list(METHODS), metavar="METHOD",
                   help="with --markdown: the method every other is paired with (default: lora, plain LoRA)")
    p.add_argument("--optimizer", default="adamw", choices=list(BASE_OPTIMIZERS),
                   help="the base optimizer of plain LoRA and the RefLoRA modes (default adamw; the other methods are "
                        "built on AdamW and are reported n/a under another); its rates are the task's, scaled "
                        "(reflora.bench.methods.BASE_OPTIMIZERS)")
    p.add_argument("--no-vmap", action="store_true",
                   help="run every member of the lr sweep one by one (default: one torch.func.vmap'ed program per "
                        "method and seed on the vision and graph tasks)")


def check_out(out: Path) -> str | None:
    """Create ``out`` and probe that a file can be written there, before any benchmark work.

    Args:
        out: The ``--out`` folder.

    Returns:
        ``None`` if the folder is usable, else a one-line message naming the path, the cause and the fix.
    """
    blocker = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".reflora-write-probe-", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        cause = exc.strerror or type(exc).__name__
        if blocker is not None:
            cause += f" ({str(blocker)!r} is a file, not a folder)"
        return (f"--out {str(out)!r} cannot be created or written: {cause}; "
                "pass --out a folder you can write to (it is created if missing), e.g. --out results")
    return None


def mf_methods(methods: list[str]) -> tuple[list[str], list[str]]:
    """The mf methods that stand for the chosen bench methods, and the chosen ones with no mf counterpart.

    Args:
        methods: The ``--methods`` values (names in :data:`reflora.bench.methods.METHODS`).

    Returns:
        ``(mf_names, unmatched)``: ``mf_names`` in :data:`reflora.bench.mf.METHODS` order, always with
        the ``lora`` baseline when any method matched (empty when none did); ``unmatched`` the bench
        methods that have no mf counterpart.
    """
    wanted = {MF_COUNTERPARTS[m] for m in methods if m in MF_COUNTERPARTS}
    unmatched = [m for m in dict.fromkeys(methods) if m not in MF_COUNTERPARTS]
    if wanted:
        wanted.add("lora")
    return [m for m in mf.METHODS if m in wanted], unmatched


def _mf(args, out: Path, report: dict, methods: list[str]) -> None:
    seeds = args.seeds or 3
    cfg = mf.MFConfig()
    rows = []
    for lr in (0.01, 0.03):
        for m in methods:
            runs = [mf.run(m, lr, cfg, s) for s in range(seeds)]
            rows.append({"lr": lr, "method": m, "iters_to_1e-3": [mf.iterations_to(r) for r in runs], "losses": runs})
    report["mf"] = {"config": cfg.__dict__, "methods": methods, "seeds": seeds, "rows": rows}
    _mf_report(report["mf"], None if args.no_plots else out)


def _mf_report(entry: dict, out: Path | None) -> None:
    """Print the mf table (and write its plot into ``out``) from a results entry."""
    cfg, rows = entry["config"], entry["rows"]
    seeds = len(rows[0]["losses"]) if rows else 0
    print(f"\n== mf: the paper's matrix factorization (rank-{cfg['r']} {cfg['n']}x{cfg['m']} target, singular values "
          f"{cfg['s_min']:g}..{cfg['s_max']:g}, plain GD from an unbalanced start, {seeds} seeds, float64)")
    head = f"{'lr':>5} {'method':<10}{'loss@25':>11}{'loss@50':>11}{'loss@100':>11}{'iters to 1e-3':>15}"
    print(head + "\n" + "-" * len(head))
    curves = {}
    for row in rows:
        lr, m, runs, hits = row["lr"], row["method"], row["losses"], row["iters_to_1e-3"]
        curves[(m, lr)] = runs
        med = lambda i: statistics.median([r[i] if i < len(r) else math.inf for r in runs])  # noqa: E731
        hit = (f"{min(hits)}-{max(hits)}" if all(h is not None for h in hits)
               else f"{sum(h is not None for h in hits)}/{len(hits)} seeds")
        fmt = lambda v: "diverged" if not math.isfinite(v) or v > 1e10 else f"{v:.3g}"  # noqa: E731
        print(f"{lr:>5g} {m:<10}{fmt(med(25)):>11}{fmt(med(50)):>11}{fmt(med(100)):>11}{hit:>15}")
    print("Paper: RefLoRA reaches 1e-3 in ~37 iterations at 0.01 and ~11 at 0.03; LoRA diverges at 0.03 and is "
          "~3e2 after 100 iterations at 0.01; ScaledGD ~1e2 / ~2.")
    if out is not None:
        print(f"plot: {plot_mf(curves, out / 'mf.png')}")


def _task_report(name: str, entry: dict, runs: list, out: Path | None) -> None:
    """Print a task's tables (and write its plot into ``out``) from its results entry and runs."""
    print(f"\n== {name}: {describe_rank(entry['description'], entry.get('rank'))}")
    print(f"   {BASE_OPTIMIZERS[entry.get('optimizer', 'adamw')][0]}, {entry['steps']} steps, {entry['seeds']} seed(s) at the shared lr {entry['shared_lr']:g}, grid "
          f"{entry['grid']} ({entry['grid_seeds']} seed(s) each); Δ = paired per-seed difference vs plain LoRA, mean "
          "[95% t-interval] (wins W / losses L; a lower loss wins); steps→LoRA = steps to reach plain LoRA's final "
          "training loss (EMA); overhead = ms/step vs plain LoRA; state MB = optimizer state")
    lower = entry.get("lower_is_better", False)
    print(task_table(runs, entry["shared_lr"], entry["metric"], lower))
    if any(math.isfinite(r.val_metric) for r in runs) and len({r.lr for r in runs}) > 1:
        print(f"\nbest rate per method: each method's rate chosen on the validation split (mean over the sweep's "
              f"seeds), then {entry['seeds']} seeds at that rate reported on the test split; Δ = paired per-seed "
              f"difference to plain LoRA at its own best rate{' (lower perplexity wins)' if lower else ''}")
        print(best_rate_table(runs, entry["metric"], lower))
    plateau = _plateau(runs)
    if plateau:
        print(plateau)
    if entry.get("pretrain"):
        pre = entry["pretrain"]
        print(f"pretrained base: {pre['params'] / 1e6:.1f}M parameters, final loss {pre['final_loss']:.3f}, "
              f"{pre['seconds']:.0f}s once ({'from the cache' if pre.get('cached') else 'trained in this run'}: "
              f"{pre['key']})")
    if entry.get("vmap"):
        print(entry["vmap"]["text"])
    if out is not None:
        print(f"plot: {plot_task(runs, entry['shared_lr'], describe_rank(entry['description'], entry.get('rank')), entry['metric'], out / f'{name}.png')}")


_SAME = ("description", "rank", "steps", "seeds", "grid_seeds", "shared_lr", "grid", "metric")


def _merge_entry(name: str, a: dict, b: dict, path) -> dict:
    """Two runs of one task with other methods (``--methods`` split over processes): one entry."""
    differ = [k for k in _SAME if a.get(k) != b.get(k)]
    if differ:
        raise ValueError(f"--from-results: task {name!r} is in two files whose settings differ ({', '.join(differ)}; "
                         f"the second: {str(path)!r}); merge runs of the same settings only")
    key = lambda r: (r["method"], r["lr"], r["seed"])  # noqa: E731
    mine = {key(r) for r in a["runs"]}
    dup = [k for k in map(key, b["runs"]) if k in mine]
    if dup:
        raise ValueError(f"--from-results: task {name!r} has run {dup[0]} in two files (the second: {str(path)!r}); "
                         "merge runs of different methods only")
    programs = [v for v in (a.get("vmap"), b.get("vmap")) if v]
    return {**a, "runs": a["runs"] + b["runs"], "vmap": programs[0] if len(programs) == 1 else
            ({**programs[0], "text": programs[0]["text"] + "\n" + programs[1]["text"]} if programs else None)}


def merge_results(paths: list[Path]) -> dict:
    """One report from several ``results.json`` files: the mf entry from the file that has it,
    and each task's runs from every file that has the task. The same task in several files
    (``--methods`` split over processes) must have the same settings and no run twice.

    Raises:
        ValueError: a file is not a bench results file, or two files disagree on a task.
    """
    merged: dict = {"commands": [], "seconds": 0.0, "tasks": {}}
    for path in paths:
        try:
            report = json.loads(Path(path).read_text())
            tasks = report["tasks"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"--from-results {str(path)!r} is not a results.json written by reflora bench "
                             f"({type(exc).__name__}: {exc}); pass the results.json of a bench run") from exc
        merged["commands"].append(f"{report.get('command', 'reflora bench')} ({report.get('seconds', float('nan')):.0f}s)")
        merged["seconds"] += report.get("seconds", float("nan"))
        if "mf" in report:
            if "mf" in merged:
                raise ValueError(f"--from-results: the mf task is in two files (the second: {str(path)!r}); "
                                 "pass each task once")
            merged["mf"] = report["mf"]
        for name, entry in tasks.items():
            if name in merged["tasks"]:
                merged["tasks"][name] = _merge_entry(name, merged["tasks"][name], entry, path)
            else:
                merged["tasks"][name] = entry
        merged.setdefault("machine", report.get("machine"))
    return merged


def _mf_markdown(entry: dict) -> str:
    """The mf task as a compact Markdown table: loss after 100 iterations (median over seeds) and
    the iterations to reach 1e-3 (range over seeds), per step size and method."""
    cfg, rows = entry["config"], entry["rows"]
    seeds = len(rows[0]["losses"]) if rows else 0
    lines = [f"**mf**: the paper's matrix factorization (rank-{cfg['r']} {cfg['n']}x{cfg['m']} target, plain gradient "
             f"descent from an unbalanced start, float64), {seeds} seeds.", "",
             "| step size | method | loss after 100 iterations (median) | iterations to 1e-3 |", "|---|---|---|---|"]
    for row in rows:
        runs, hits = row["losses"], row["iters_to_1e-3"]
        at = statistics.median([r[100] if len(r) > 100 else math.inf for r in runs])
        at_s = "diverged" if not math.isfinite(at) or at > 1e10 else f"{at:.3g}"
        hit = (f"{min(hits)}-{max(hits)}" if all(h is not None for h in hits)
               else f"not reached ({sum(h is not None for h in hits)}/{len(hits)} seeds)")
        lines.append(f"| {row['lr']:g} | {row['method']} | {at_s} | {hit} |")
    return "\n".join(lines)


def _saved_runs(entry: dict) -> list[Run]:
    """A results entry's runs as :class:`Run` objects (fields a newer or older file lacks keep
    their defaults; unknown ones are dropped)."""
    fields = {f.name for f in dataclasses.fields(Run)}
    runs = [Run(**{k: v for k, v in d.items() if k in fields}) for d in entry["runs"]]
    for r in runs:
        r.imbalance = [tuple(x) for x in r.imbalance]
    return runs


def markdown_from(paths: list[Path], methods: list[str] | None = None, baseline: str = "lora") -> str:
    """The compact Markdown tables of saved runs (:func:`reflora.bench.report.markdown_table`),
    one per task in file order, separated by blank lines."""
    report = merge_results(list(paths))
    blocks = [_mf_markdown(report["mf"])] if "mf" in report else []
    for name, entry in report["tasks"].items():
        blocks.append(markdown_table(name, entry, _saved_runs(entry), methods, baseline))
    return "\n\n".join(blocks)


def _plateau(runs: list) -> str:
    """How flat plain LoRA's training loss is at the end: its mean over the last tenth of the
    steps against the tenth at 60-70% of the run, per rate (mean over seeds)."""
    by = {}
    for r in runs:
        if r.method == "lora" and not r.error and len(r.losses) >= 20:
            by.setdefault(r.lr, []).append(r.losses)
    if not by:
        return ""
    cells = []
    for lr, curves in sorted(by.items()):
        n = min(len(c) for c in curves)
        late = statistics.fmean(x for c in curves for x in c[n - n // 10 : n])
        mid = statistics.fmean(x for c in curves for x in c[6 * n // 10 : 7 * n // 10])
        cells.append(f"{late / mid - 1:+.1%} at lr {lr:g}")
    return "plateau: plain LoRA's training loss over the last tenth of the run vs the tenth at 60-70%: " + ", ".join(cells)


def report_from(paths: Path | list[Path], out: Path | None) -> int:
    """``reflora bench --from-results PATH [PATH ...]``: print the tables of saved runs again
    (new plots into ``out``); several files are merged (:func:`merge_results`).

    Args:
        paths: ``results.json`` files written by ``reflora bench``.
        out: the folder for the plots, or ``None`` for none.

    Returns:
        0, or 2 with a one-line message when a file is missing or not a bench results file.
    """
    try:
        report = merge_results([paths] if isinstance(paths, (str, Path)) else list(paths))
    except ValueError as exc:
        return _error(str(exc))
    print("\n".join(report["commands"]))
    if "mf" in report:
        _mf_report(report["mf"], out)
    for name, entry in report["tasks"].items():
        _task_report(name, entry, _saved_runs(entry), out)
    return 0


def vmap_summary(programs: list, runs: list, shared_lr: float) -> dict:
    """What the vmapped sweep cost against one-by-one runs, and how its shared-rate member agrees.

    Args:
        programs: ``(method, seed, members, seconds, note)`` per vmapped program.
        runs: the task's runs (the one-by-one runs at the shared rate among them).
        shared_lr: the task's shared rate (every program trains it too).

    Returns:
        ``{"programs", "members", "seconds", "sequential_seconds", "speedup", "loss_rel_diff",
        "metric_diff", "loss_rel_diff_20", "notes", "text"}``: the shared-rate member's relative
        final-loss and metric differences to its one-by-one run, and the largest relative loss
        difference over the first 20 steps (the two are the same training in exact arithmetic;
        in float32 their round-off differs and grows over a long run). ``sequential_seconds`` costs each member as its
        method and seed's one-by-one run at the shared rate (same model, steps and batches; the step
        cost does not depend on the rate), measured in this same bench run.
    """
    seq = {(r.method, r.seed): r for r in runs if r.path == "eager" and r.lr == shared_lr}
    vm_s = sum(p[3] for p in programs)
    seq_s, dl, dm, early = 0.0, [], [], []
    for m, s, members, _, _ in programs:
        ref = seq.get((m, s))
        if ref is None:
            continue
        seq_s += ref.seconds * len(members)
        mine = next((r for r in members if r.lr == shared_lr), None)
        if mine is not None and mine.losses and ref.losses:
            dl.append(abs(mine.final_loss - ref.final_loss) / max(abs(ref.final_loss), 1e-12))
            early += [abs(a - b) / max(abs(b), 1e-12) for a, b in list(zip(mine.losses, ref.losses))[:20]]
            dm.append(abs(mine.metric - ref.metric))
    notes = [p[4] for p in programs if p[4]]
    members = sum(len(p[2]) for p in programs)
    out = {"programs": len(programs), "members": members, "seconds": vm_s, "sequential_seconds": seq_s,
           "speedup": seq_s / vm_s if vm_s else float("nan"),
           "loss_rel_diff": max(dl, default=float("nan")), "metric_diff": max(dm, default=float("nan")),
           "loss_rel_diff_20": max(early, default=float("nan")),
           "notes": notes}
    out["text"] = (
        f"vmapped sweep: {len(programs)} programs ({', '.join(dict.fromkeys(p[0] for p in programs))}; "
        f"{members // max(1, len(programs))} rates each) in {vm_s:.0f}s; one by one the same {members} runs take "
        f"~{seq_s:.0f}s (each costed as its method and seed's run at the shared lr, this run): "
        f"{out['speedup']:.1f}x. The member at the shared lr vs its one-by-one run (attach on torch.optim.AdamW): "
        f"loss within {out['loss_rel_diff_20']:.0e} (relative) over the first 20 steps; at the end (float32 "
        f"round-off grows in training) final loss within {out['loss_rel_diff']:.1e}, metric within {out['metric_diff']:.3f}"
        + "".join(f"\n  note: {n}" for n in notes))
    return out


def _error(message: str) -> int:
    print(f"reflora: {message}", file=sys.stderr)
    return 2


def bench(args) -> int:
    """Run ``reflora bench``; bad input (an unusable ``--out``, no mf counterpart) exits 2 before any work.

    Args:
        args: The parsed arguments (see :func:`add_arguments`).

    Returns:
        The exit code: 0, or 2 with a one-line ``reflora: ...`` message on stderr.
    """
    from tqdm.auto import tqdm

    if args.markdown and args.from_results is None:
        return _error("--markdown prints the tables of saved runs: pass --from-results RESULTS_JSON [...]")
    if args.from_results is not None and args.markdown:
        try:
            print(markdown_from(args.from_results, args.methods, args.baseline))
        except ValueError as exc:
            return _error(str(exc))
        return 0
    if args.from_results is not None:
        if not args.no_plots:
            problem = check_out(args.out)
            if problem is not None:
                return _error(problem)
        return report_from(args.from_results, None if args.no_plots else args.out)
    if args.tasks is None:
        args.tasks = list(FULL_TASKS if args.full else DEFAULT_TASKS)
    if args.methods is None:
        args.methods = list(METHODS if args.full else DEFAULT_METHODS)
    tasks = list(args.tasks)
    mf_note = None
    if args.optimizer != "adamw" and "mf" in tasks:
        tasks.remove("mf")
        print(f"note: mf skipped: it is the paper's plain gradient descent, not --optimizer {args.optimizer}")
    if "mf" in tasks:
        mf_names, unmatched = mf_methods(args.methods)
        if not mf_names:
            msg = (f"--methods {' '.join(args.methods)} has no counterpart on the mf task (mf runs "
                   f"{', '.join(f'{k}->{v}' for k, v in MF_COUNTERPARTS.items())})")
            if tasks == ["mf"]:
                return _error(msg + f"; add one of {', '.join(MF_COUNTERPARTS)} to --methods, or pick another task "
                              "with --tasks")
            tasks.remove("mf")
            mf_note = f"note: mf skipped: {msg}"
        elif set(args.methods) != set(METHODS) and set(args.methods) != set(DEFAULT_METHODS):
            mf_note = (f"note: mf runs {', '.join(mf_names)}, the mf counterparts of --methods "
                       f"{' '.join(args.methods)} (lora always, as the baseline)"
                       + (f"; {', '.join(unmatched)} {'has' if len(unmatched) == 1 else 'have'} no mf counterpart"
                          if unmatched else ""))
    out: Path = args.out
    problem = check_out(out)
    if problem is not None:
        return _error(problem)
    if mf_note:
        print(mf_note)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t_start = time.perf_counter()
    report: dict = {
        "command": "reflora bench " + ("--full " if args.full else "") + ("--no-vmap " if args.no_vmap else "")
                   + (f"--rank {args.rank} " if args.rank is not None else "")
                   + ("--shared-lr-only " if args.shared_lr_only else "")
                   + (f"--optimizer {args.optimizer} " if args.optimizer != "adamw" else "") + "--tasks " + " ".join(args.tasks)
                   + " --methods " + " ".join(args.methods),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "threads": torch.get_num_threads(), "torch": torch.__version__},
        "tasks": {},
    }
    if "mf" in tasks:
        _mf(args, out, report, mf_names)
    for name in [t for t in tasks if t != "mf"]:
        task = TASKS[name]()
        key = name
        if args.rank is not None and args.rank != task.rank:
            task = dataclasses.replace(task, rank=args.rank, description=describe_rank(task.description, args.rank))
            key = f"{name}-r{args.rank}"  # a task at another rank is another entry (merged with --from-results)
        if args.optimizer != "adamw":  # so is a task under another optimizer
            key = f"{key}-{args.optimizer}"
        pretrain = None
        if name.startswith("lm"):
            from reflora.bench.tasks import lm_base

            pretrain = lm_base()[1]
        seeds = args.seeds or (5 if args.full else 1)
        steps = args.steps or (task.full_steps if args.full else task.steps)
        # --full: the stability sweep (5 rates over 30x, 3 seeds each) on every task, and all
        # seeds at the shared rate; by default the 3-point grid where runs are cheap, 1 seed
        if args.shared_lr_only:
            grid, grid_seeds = (task.shared_lr,), seeds
        elif args.full:
            grid, grid_seeds = task.full_grid, min(seeds, 3)
        else:
            grid, grid_seeds = task.lr_grid if name != "text" else (task.shared_lr,), seeds
        # the sweep's other rates: one vmapped program per (method, seed) where the model allows it;
        # that program also trains the shared rate, as a check against the one-by-one run
        vm_methods = ([m for m in args.methods if m in VMAP_METHODS]
                      if task.vmappable and len(grid) > 1 and not args.no_vmap and args.optimizer == "adamw" else [])
        jobs = [(m, lr, s) for s in range(seeds) for lr in grid for m in args.methods
                if (lr == task.shared_lr or s < grid_seeds) and not (m in vm_methods and lr != task.shared_lr)]
        runs = []
        for m, lr, s in tqdm(jobs, desc=f"{name}", unit="run", leave=False, disable=None):
            runs.append(run_one(task, m, lr, s, steps, optimizer=args.optimizer))
        programs = []
        for m, s in tqdm([(m, s) for s in range(grid_seeds) for m in vm_methods], desc=f"{name} (vmap)",
                         unit="program", leave=False, disable=None):
            members, seconds, note = vmapped_sweep(task, m, list(grid), s, steps)
            programs.append((m, s, members, seconds, note))
            runs += [r for r in members if r.lr != task.shared_lr]
        if args.full and len(grid) > 1:
            # each method at its own best rate, chosen on the validation split over the sweep's
            # seeds; the seeds that rate has not run yet are run now (one by one)
            chosen = best_rates(runs, task.lower_is_better)
            have = {(r.method, r.lr, r.seed) for r in runs}
            extra = [(m, lr, s) for m, lr in chosen.items() for s in range(seeds) if (m, lr, s) not in have]
            for m, lr, s in tqdm(extra, desc=f"{name} (best rates)", unit="run", leave=False, disable=None):
                runs.append(run_one(task, m, lr, s, steps, optimizer=args.optimizer))
        runs.sort(key=lambda r: args.methods.index(r.method))  # stable: the table's rows in --methods order
        vm = vmap_summary(programs, runs, task.shared_lr) if programs else None
        entry = {"description": task.description, "rank": task.rank, "steps": steps, "seeds": seeds, "grid_seeds": grid_seeds,
                 "shared_lr": task.shared_lr, "grid": list(grid), "metric": task.metric,
                 "lower_is_better": task.lower_is_better, "pretrain": pretrain, "optimizer": args.optimizer,
                 "runs": [r.as_dict() for r in runs], "vmap": vm}
        report["tasks"][key] = entry
        _task_report(key, entry, runs, None if args.no_plots else out)
    report["seconds"] = time.perf_counter() - t_start
    path = out / "results.json"
    path.write_text(json.dumps(report, separators=(",", ":"), default=float))  # compact: every loss of every run
    print(f"\nresults: {path} ({report['seconds']:.0f}s)")
    return 0
