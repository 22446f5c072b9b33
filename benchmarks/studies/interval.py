"""Does RefLoRA keep its gain when it acts only every ``interval`` steps?

On small models the hook's fixed cost is the price of RefLoRA (docs/cost.md, "Acting every `interval` steps",
section c: the full variant costs 1.12-1.21x of a 4 ms step at ``interval=1``, 1.06-1.07x at
``interval=4``; measure cost there, not here, where runs are made one after another). This script trains ``reflora bench``'s tasks with plain LoRA and with RefLoRA
(default: full variant, parameter space, AdamW, the paper frame) at several intervals, over
several seeds at the task's shared learning rate, and prints per interval the final training
loss and the held-out metric with their paired per-seed differences to plain LoRA (95%
t-intervals, wins and losses) and the loss difference to ``interval=1``.

Run: ``python benchmarks/studies/interval.py [--tasks graph vision] [--intervals 1 2 4] [--seeds 5]``.
Prints tables; writes nothing.
"""

from __future__ import annotations

import argparse

from reflora.bench.report import mean_sd, paired
from reflora.bench.runner import run_one
from reflora.bench.tasks import TASKS


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=["graph", "vision"], choices=sorted(TASKS))
    ap.add_argument("--intervals", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=None, help="steps per run (default: the task's --full budget)")
    ap.add_argument("--method", default="reflora-param", help="the RefLoRA method of reflora bench (default reflora-param)")
    args = ap.parse_args(argv)
    for name in args.tasks:
        task = TASKS[name]()
        steps = args.steps or task.full_steps
        lora = [run_one(task, "lora", task.shared_lr, s, steps) for s in range(args.seeds)]
        ours = {k: [run_one(task, args.method, task.shared_lr, s, steps, {"interval": k}) for s in range(args.seeds)]
                for k in args.intervals}
        print(f"\n{name}: {args.method} every `interval` steps vs plain LoRA, AdamW lr={task.shared_lr:g}, "
              f"{steps} steps, {args.seeds} seeds (final loss: mean of the last 10% of steps)")
        head = (f"{'method':<16} {'final loss':>16} {'d loss vs LoRA':>30} {task.metric:>14} "
                f"{'d metric vs LoRA':>30} {'d loss vs interval 1':>30}")
        print(head + "\n" + "-" * len(head))
        print(f"{'LoRA':<16} {mean_sd([r.final_loss for r in lora]):>16} {'':>30} {mean_sd([r.metric for r in lora]):>14}")
        first = ours[args.intervals[0]]
        for k, runs in ours.items():
            errors = [r.error for r in runs if r.error]
            if errors:
                print(f"{'interval ' + str(k):<16} {errors[0]}")
                continue
            d_loss = paired([a.final_loss - b.final_loss for a, b in zip(runs, lora)], lower_is_better=True)
            d_metric = paired([a.metric - b.metric for a, b in zip(runs, lora)])
            d_first = "" if runs is first else paired(
                [a.final_loss - b.final_loss for a, b in zip(runs, first)], lower_is_better=True)
            print(f"{'interval ' + str(k):<16} {mean_sd([r.final_loss for r in runs]):>16} {d_loss:>30} "
                  f"{mean_sd([r.metric for r in runs]):>14} {d_metric:>30} {d_first:>30}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
