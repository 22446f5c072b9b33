"""``reflora demo``: plain LoRA vs RefLoRA on the paper's matrix-factorization problem.

The quick comparison alone (seconds); ``reflora bench`` runs the whole suite. The command line
(``--lr``, ``--seeds``, ``--iters``) is parsed by :mod:`reflora.__main__`.
"""

from __future__ import annotations

import argparse
import math
import time

__all__ = ["run_demo"]


def _fmt(x: float) -> str:
    if not math.isfinite(x) or x > 1e10:
        return "diverged"
    return f"{x:.3g}"


def run_demo(args: argparse.Namespace) -> int:
    """Plain LoRA vs RefLoRA on the paper's low-rank matrix-factorization problem."""
    import torch

    from reflora.bench import mf

    torch.set_num_threads(1)
    cfg = mf.MFConfig(iters=args.iters)
    print(
        f"Matrix factorization: fit rank-{cfg.r} Y ({cfg.n}x{cfg.m}, singular values "
        f"{cfg.s_min:g}..{cfg.s_max:g}) by B @ A with gradient descent, unbalanced start "
        f"(A ~ {cfg.a_scale:g}*sqrt(r/m)*N(0,1), B ~ {cfg.b_scale:g}*N(0,1)), float64, "
        f"seeds {list(range(args.seeds))}."
    )
    checkpoints = [c for c in (10, 25, 50, cfg.iters) if c <= cfg.iters]
    header = f"{'lr':>5} {'method':<10}" + "".join(f"{'loss@' + str(c):>12}" for c in checkpoints)
    header += f"{'iters to 1e-3':>15}"
    print(header)
    print("-" * len(header))
    t0 = time.perf_counter()
    for lr in args.lr:
        for method in mf.METHODS:
            runs = [mf.run(method, lr, cfg, seed) for seed in range(args.seeds)]
            row = f"{lr:>5g} {method:<10}"
            for c in checkpoints:
                vals = [r[c] if c < len(r) else math.inf for r in runs]
                row += f"{_fmt(sorted(vals)[len(vals) // 2]):>12}"
            hits = [mf.iterations_to(r) for r in runs]
            got = [h for h in hits if h is not None]
            hit = f"{min(got)}-{max(got)}" if len(got) == len(hits) else f"{len(got)}/{len(hits)} seeds"
            print(row + f"{hit:>15}")
    print(
        f"(median over seeds; 'iters to 1e-3' is the range over seeds; {time.perf_counter() - t0:.1f}s)\n"
        "Paper (its own, unstated sizes): RefLoRA reaches 1e-3 in ~37 iterations at lr 0.01 and ~11 "
        "at 0.03; LoRA diverges at 0.03."
    )
    return 0
