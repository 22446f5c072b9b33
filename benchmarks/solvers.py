"""Accuracy and per-group kernel time of the two solvers (docs/theory.md, "Eigh-free solver (measured)").

Factors as in ``benchmarks/numerics.py`` (singular values log-spaced over ``cond`` for A and B
alike, random singular vectors, ``||A|| / ||B|| = 100``, m = 256, n = 192) but stored in float64,
so that only the solver differs. Worst relative (Frobenius) error over the seeds of
``solver="newton_schulz"`` against the float64 eigh kernel for ``S``, ``S^-1 grad_A`` and
``grad_B S``; then ``S`` of each solver against an independent float64 route
(``X^{-1/2} (X^{1/2} Y X^{1/2})^{1/2} X^{-1/2}``), which shows whose error the difference is.
Times: one call of the ``r x r`` kernel (``full_kernel``: ``S``, ``S^-1`` and the symmetric
frame's roots) on a group of 32 pairs' Grams, median of 20. Run:
``python benchmarks/solvers.py [--device cuda]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from numerics import factors, reference_S  # noqa: E402

from reflora._kernels import full_kernel, grams  # noqa: E402
from reflora.config import default_eps  # noqa: E402
from reflora.functional import precondition, preconditioner  # noqa: E402


def errors(r: int, cond: float, seed: int, device: str) -> dict[str, float]:
    A, B = (t.to(device) for t in factors(r, 256, 192, cond, torch.float64, seed))
    g = torch.Generator().manual_seed(seed + 1)
    gA = torch.randn(A.shape, generator=g, dtype=torch.float64).to(device)
    gB = torch.randn(B.shape, generator=g, dtype=torch.float64).to(device)
    rel = lambda x, ref: float((x - ref).norm() / ref.norm())  # noqa: E731
    S_ref = reference_S(A, B).to(device)
    S_e, _ = preconditioner(A, B)
    S_n, _ = preconditioner(A, B, solver="newton_schulz")
    pA_e, pB_e = precondition(A, B, gA, gB)
    pA_n, pB_n = precondition(A, B, gA, gB, solver="newton_schulz")
    return {
        "S": rel(S_n, S_e),
        "S^-1 grad_A": rel(pA_n, pA_e),
        "grad_B S": rel(pB_n, pB_e),
        "S: NS vs ref": rel(S_n, S_ref),
        "S: eigh vs ref": rel(S_e, S_ref),
    }


def kernel_ms(r: int, solver: str, device: str, group: int = 32, repeats: int = 20) -> float:
    A, B = (t.to(device) for t in factors(r, 256, 192, 100.0, torch.float32, 0))
    X, Y = grams(A.expand(group, -1, -1), B.expand(group, -1, -1))
    eps = default_eps()
    frame = "symmetric"
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(3):
        full_kernel(X, Y, eps, frame, solver)
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        full_kernel(X, Y, eps, frame, solver)
        sync()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    keys = ("S", "S^-1 grad_A", "grad_B S", "S: NS vs ref", "S: eigh vs ref")
    print("newton_schulz vs eigh (float64 factors), worst relative error over", args.seeds, "seeds")
    head = f"{'cond(A),cond(B)':>16}{'r':>4}" + "".join(f"{k:>15}" for k in keys)
    print(head + "\n" + "-" * len(head))
    for cond in (1e1, 1e2, 1e3, 1e4):
        for r in (4, 16, 64):
            worst = {k: 0.0 for k in keys}
            for seed in range(args.seeds):
                for k, v in errors(r, cond, seed, args.device).items():
                    worst[k] = max(worst[k], v)
            print(f"{cond:>16.0e}{r:>4}" + "".join(f"{worst[k]:>15.1e}" for k in keys))
    print(f"\nper-group kernel time, 32 pairs, {args.device} ({args.threads} thread(s)), ms")
    print(f"{'r':>4}{'eigh':>10}{'newton_schulz':>15}")
    for r in (4, 16, 64):
        print(f"{r:>4}{kernel_ms(r, 'eigh', args.device):>10.2f}{kernel_ms(r, 'newton_schulz', args.device):>15.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
