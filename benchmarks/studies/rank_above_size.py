"""Pairs whose rank exceeds the layer's size (r > min(m, n)): RefLoRA with rank_above_size="act"
against plain LoRA, every mode, AdamW and SGD with momentum, with a same-budget control pair of
ordinary shape, so that what is due to the rank and what is due to the method can be told apart.

A least-squares fit of a random (n x m) map by B @ A from PEFT's init (A random, B = 0), 80
steps, 5 seeds. Prints the median final loss over seeds and, for each mode, the wins against
plain LoRA (paired by seed); "full/parameter/sym" is frame="symmetric". Run: ``python benchmarks/studies/rank_above_size.py [--seeds 5]``.
"""

from __future__ import annotations

import argparse
import statistics

import torch

import reflora

MODES = [None, ("full", "gradient"), ("full", "parameter"), ("full", "parameter", "symmetric"),
         ("scalar", "gradient"), ("scalar", "parameter")]
SHAPES = [(16, 8, 4), (8, 32, 3), (8, 4, 32), (4, 8, 32)]  # (r, m, n); the last one is the control


def run(mode, opt_name: str, r: int, m: int, n: int, seed: int, steps: int = 80, **attach_kw) -> tuple[float, float]:
    """``(first, final)`` training loss of one run (``mode`` None: plain LoRA). tests/core/test_numerics.py uses it too."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(64, m, generator=g)
    Y = X @ torch.randn(n, m, generator=g).T
    A = torch.nn.Parameter(torch.randn(r, m, generator=g) / m**0.5)
    B = torch.nn.Parameter(torch.zeros(n, r))
    opt = (torch.optim.AdamW([A, B], lr=1e-2, weight_decay=0.0) if opt_name == "AdamW"
           else torch.optim.SGD([A, B], lr=0.02, momentum=0.9))
    if mode is not None:
        kw = {"frame": mode[2] if len(mode) > 2 else None, "rank_above_size": "act", **attach_kw}
        reflora.attach(opt, [(A, B)], variant=mode[0], space=mode[1], **kw)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = ((X @ (B @ A).T - Y) ** 2).mean()
        losses.append(float(loss))
        loss.backward()
        opt.step()
    with torch.no_grad():
        return losses[0], float(((X @ (B @ A).T - Y) ** 2).mean())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    names = ["LoRA"] + ["/".join(m[:2]) + ("/sym" if len(m) > 2 else "") for m in MODES[1:]]
    head = f"{'r,m,n':<10}{'opt':<7}" + "".join(f"{k:>18}" for k in names)
    print(f"final training loss, median over {args.seeds} seeds (wins vs LoRA, paired by seed)")
    print(head + "\n" + "-" * len(head))
    for shape in SHAPES:
        for opt_name in ("AdamW", "SGD"):
            res = [[run(mode, opt_name, *shape, s)[1] for s in range(args.seeds)] for mode in MODES]
            cells = []
            for k, vals in enumerate(res):
                med = f"{statistics.median(vals):.3g}"
                if k:
                    med += f" ({sum(a < b for a, b in zip(vals, res[0]))}/{len(vals)})"
                cells.append(f"{med:>18}")
            label = ",".join(map(str, shape)) + ("*" if shape[0] <= min(shape[1:]) else "")
            print(f"{label:<10}{opt_name:<7}" + "".join(cells))
    print("* control: rank within the layer's size")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
