"""Accuracy of RefLoRA's kernel by factor dtype, conditioning and rank (docs/theory.md, "Numerics and limits (measured)").

For each (dtype, cond, r): factors with singular values log-spaced over ``cond`` (A and B
independently, random singular vectors, ||A|| / ||B|| = 100), stored in ``dtype``. The answer is
computed from the *same stored values* cast to float64 with an independent float64 route
(the geometric mean through X^{1/2}); reported are the worst relative errors over 5 seeds of
``S``, of the preconditioned gradients ``S^-1 grad_A`` and ``grad_B S``, and the balance
``||A'A'^T - B'^T B'|| / ||A'A'^T||`` of the refactored pair. Run: ``python benchmarks/numerics.py``.
"""

from __future__ import annotations

import argparse
import math

import torch

from reflora.functional import precondition, preconditioner, refactor


def factors(r: int, m: int, n: int, cond: float, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def conditioned(rows: int, cols: int) -> torch.Tensor:
        u, _, vh = torch.linalg.svd(torch.randn(rows, cols, generator=g, dtype=torch.float64), full_matrices=False)
        s = torch.logspace(0.0, -math.log10(cond), min(rows, cols), dtype=torch.float64)
        return (u * s) @ vh

    return (10 * conditioned(r, m)).to(dtype), (0.1 * conditioned(n, r)).to(dtype)


def reference_S(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """X^{-1} # Y = X^{-1/2} (X^{1/2} Y X^{1/2})^{1/2} X^{-1/2} in float64 (another route than the kernel's)."""
    A, B = A.double(), B.double()
    w, V = torch.linalg.eigh(A @ A.mT)
    Xh, Xih = (V * w.sqrt()) @ V.mT, (V / w.sqrt()) @ V.mT
    w2, V2 = torch.linalg.eigh(Xh @ (B.mT @ B) @ Xh)
    return Xih @ ((V2 * w2.clamp_min(0).sqrt()) @ V2.mT) @ Xih


def errors(r: int, cond: float, dtype: torch.dtype, seed: int, m: int = 256, n: int = 192) -> dict[str, float]:
    """Relative errors of S, the preconditioned gradients and the balance against float64."""
    A, B = factors(r, m, n, cond, dtype, seed)
    g = torch.Generator().manual_seed(seed + 1)
    gA = torch.randn(A.shape, generator=g).to(dtype)
    gB = torch.randn(B.shape, generator=g).to(dtype)
    S_ref = reference_S(A, B)
    rel = lambda x, ref: float((x.double() - ref).norm() / ref.norm())  # noqa: E731
    S, _ = preconditioner(A, B)
    pA, pB = precondition(A, B, gA, gB)
    pA_ref = torch.linalg.solve(S_ref, gA.double())
    pB_ref = gB.double() @ S_ref
    A2, B2 = (t.double() for t in refactor(A, B))
    G1, G2 = A2 @ A2.mT, B2.mT @ B2
    return {"S": rel(S, S_ref), "S^-1 grad_A": rel(pA, pA_ref), "grad_B S": rel(pB, pB_ref),
            "balance": float((G1 - G2).norm() / G1.norm())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=5)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    keys = ("S", "S^-1 grad_A", "grad_B S", "balance")
    head = f"{'dtype':<9}{'cond(A),cond(B)':>16}{'r':>4}" + "".join(f"{k:>14}" for k in keys)
    print(head + "\n" + "-" * len(head))
    for dtype in (torch.float32, torch.bfloat16):
        for cond in (1e1, 1e2, 1e3):
            for r in (4, 16, 64):
                worst = {k: 0.0 for k in keys}
                for seed in range(args.seeds):
                    for k, v in errors(r, cond, dtype, seed).items():
                        worst[k] = max(worst[k], v)
                print(f"{str(dtype).split('.')[-1]:<9}{cond:>16.0e}{r:>4}" + "".join(f"{worst[k]:>14.1e}" for k in keys))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
