"""Which second-moment rule should a full-variant parameter-space refactor use under Adam?

Element-wise second moments (Adam's ``exp_avg_sq``) have no exact map under a non-diagonal
refactoring ``P``. This script measures the three rules of
:func:`reflora.functional.map_second_moments` ("square", "keep", "reset") against plain LoRA
and the gradient-space form, in ``attach``'s default frame, the paper's eigenbasis frame
(``frame="paper"``; the rows marked "paper frame" pass it explicitly and, since the default
changed from the symmetric frame ``P = S^{1/2}``, repeat the rule rows above them; the table in
docs/options.md was recorded with the symmetric default), on a LoRA regression problem (three adapted linear maps,
PEFT init with B = 0, a rank-r target plus noise), several seeds, AdamW, same budget.
Prints final loss mean +- std over seeds and the paired per-seed difference to plain LoRA.

``--optimizer sgd`` runs the same problem under ``torch.optim.SGD`` (``--momentum``, default 0.9)
and compares the four modes (full / scalar x gradient / parameter space) with plain LoRA instead:
the evidence behind ``space="auto"``'s choice for SGD-like optimizers. ``--optimizer rmsprop``
does the same under ``torch.optim.RMSprop`` (``--momentum``, default 0), which ``space="auto"``
counts as Adam-like (element-wise second moments). With ``--momentum 0`` the
two spaces give the same product ``B A`` (the refactor's frame cancels), so their rows agree up
to round-off: a sanity check.

Run: ``python benchmarks/studies/second_moment.py [--seeds 5 --steps 100 --lr 3e-3 1e-2 3e-2]``;
``python benchmarks/studies/second_moment.py --optimizer sgd [--momentum 0.9] [--lr 0.01 0.03 0.1]``.

``--optimizer adamw8bit`` / ``lion8bit`` (bitsandbytes, the ``qlora`` extra; every factor in
8-bit state) and ``--optimizer adamw --modes`` (torch's 32-bit AdamW) compare the four modes
with plain LoRA the same way: the evidence behind ``space="auto"`` for the low-bit optimizers
(docs/qlora.md).
"""

from __future__ import annotations

import argparse
import math
import statistics

import torch
from torch import nn

import reflora


def problem(seed: int, m: int = 64, n: int = 48, r: int = 4, k: int = 3):
    g = torch.Generator().manual_seed(seed)
    pairs, tasks = [], []
    for _ in range(k):
        W0 = torch.randn(n, m, generator=g) / m**0.5
        target = W0 + torch.randn(n, r, generator=g) @ torch.randn(r, m, generator=g) / m**0.5
        X = torch.randn(256, m, generator=g)
        Y = X @ target.T + 0.01 * torch.randn(256, n, generator=g)
        A = nn.Parameter((torch.rand(r, m, generator=g) - 0.5) * 2 / m**0.5)  # kaiming-uniform-like
        B = nn.Parameter(torch.zeros(n, r))
        pairs.append((A, B))
        tasks.append((X, Y, W0))
    return pairs, tasks


def run(method: str, seed: int, steps: int, lr: float, optimizer: str = "adamw", momentum: float = 0.9,
        interval: int = 1) -> float:
    pairs, tasks = problem(seed)
    params = [p for ab in pairs for p in ab]
    if optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum)
    elif optimizer == "rmsprop":
        opt = torch.optim.RMSprop(params, lr=lr, momentum=momentum)
    elif optimizer in ("adamw8bit", "lion8bit"):
        import bitsandbytes as bnb  # the qlora extra

        # min_8bit_size=0: these factors (256 and 192 elements) would otherwise stay in 32-bit
        cls = bnb.optim.AdamW8bit if optimizer == "adamw8bit" else bnb.optim.Lion8bit
        opt = cls(params, lr=lr, weight_decay=0.0, min_8bit_size=0)
    else:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    if "/" in method:  # "variant/space"; parameter space in its default (paper) frame and "square" rule
        variant, space = method.split("/")
        reflora.attach(opt, pairs, variant=variant, space=space, interval=interval)
    elif method == "gradient":
        reflora.attach(opt, pairs, variant="full", space="gradient", interval=interval)
    elif method.endswith("-paper"):
        reflora.attach(opt, pairs, variant="full", space="parameter", second_moment=method[:-6], frame="paper",
                       interval=interval)
    elif method != "lora":
        reflora.attach(opt, pairs, variant="full", space="parameter", second_moment=method, interval=interval)
    for _ in range(steps):
        opt.zero_grad()
        loss = sum(((X @ (W0 + B @ A).T - Y) ** 2).mean() for (A, B), (X, Y, W0) in zip(pairs, tasks))
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float(sum(((X @ (W0 + B @ A).T - Y) ** 2).mean() for (A, B), (X, Y, W0) in zip(pairs, tasks)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr", type=float, nargs="+", default=None,
                    help="learning rates (default: 3e-3 1e-2 3e-2 for adamw and rmsprop, 0.01 0.03 0.1 for sgd)")
    ap.add_argument("--optimizer", choices=("adamw", "sgd", "rmsprop", "adamw8bit", "lion8bit"), default="adamw")
    ap.add_argument("--modes", action="store_true", help="adamw: the four modes vs plain LoRA (not the rules)")
    ap.add_argument("--momentum", type=float, default=None,
                    help="momentum of SGD (default 0.9) or RMSprop (default 0); not for adamw")
    ap.add_argument("--interval", type=int, default=1,
                    help="RefLoRA acts every this many steps (attach's interval; default 1, the paper's)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.optimizer != "adamw" or args.modes:
        modes_main(args)
        return
    args.lr = args.lr or [3e-3, 1e-2, 3e-2]
    methods = ["lora", "gradient", "square", "keep", "reset", "square-paper", "keep-paper"]
    labels = {"lora": "plain LoRA", "gradient": "full, gradient space", "square": "full, param, 'square'",
              "keep": "full, param, 'keep'", "reset": "full, param, 'reset'",
              "square-paper": "  same, paper frame", "keep-paper": "  'keep', paper frame"}
    for lr in args.lr:
        res = {m: [run(m, s, args.steps, lr, interval=args.interval) for s in range(args.seeds)] for m in methods}
        _table(f"AdamW lr={lr:g}, {args.steps} steps, {args.seeds} seeds, interval {args.interval}", res, labels)


def _stdev(v: list[float]) -> float:
    if len(v) < 2:
        return 0.0
    if not all(map(math.isfinite, v)):  # a diverged seed: statistics.stdev raises on inf
        return math.nan
    return statistics.stdev(v)


def _table(title: str, res: dict[str, list[float]], labels: dict[str, str]) -> None:
    """Final loss mean and std per method, its paired per-seed difference to plain LoRA and wins."""
    print(f"\n{title}: final training loss (lower is better)")
    head = f"{'method':<24} {'mean':>10} {'std':>10} {'paired diff vs LoRA':>22} {'wins':>6}"
    print(head)
    print("-" * len(head))
    for m, label in labels.items():
        v = res[m]
        d = [a - b for a, b in zip(v, res["lora"])]
        wins = sum(x < 0 for x in d)
        dd = f"{statistics.mean(d):+.2e} +- {_stdev(d):.1e}" if m != "lora" else ""
        print(f"{label:<24} {statistics.mean(v):>10.3e} {_stdev(v):>10.1e} {dd:>22} {'' if m == 'lora' else f'{wins}/{len(v)}':>6}")


def modes_main(args: argparse.Namespace) -> None:
    """The four modes against plain LoRA under SGD or RMSprop."""
    methods = ["lora", "full/gradient", "full/parameter", "scalar/gradient", "scalar/parameter"]
    sgd = args.optimizer == "sgd"
    momentum = args.momentum if args.momentum is not None else (0.9 if sgd else 0.0)
    name = {"sgd": "SGD", "rmsprop": "RMSprop", "adamw": "AdamW (32-bit)", "adamw8bit": "bitsandbytes AdamW8bit",
            "lion8bit": "bitsandbytes Lion8bit"}[args.optimizer]
    default_lr = {"sgd": [0.01, 0.03, 0.1], "lion8bit": [3e-4, 1e-3, 3e-3]}.get(args.optimizer, [3e-3, 1e-2, 3e-2])
    for lr in args.lr or default_lr:
        res = {m: [run(m, s, args.steps, lr, args.optimizer, momentum, args.interval) for s in range(args.seeds)]
               for m in methods}
        mom = f" momentum={momentum:g}" if args.optimizer in ("sgd", "rmsprop") else ""
        _table(f"{name}{mom} lr={lr:g}, {args.steps} steps, {args.seeds} seeds, interval {args.interval}", res,
               {m: "plain LoRA" if m == "lora" else m for m in methods})


if __name__ == "__main__":
    main()
