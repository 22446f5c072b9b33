"""Candidate fixes for the rank-deficient regime that were measured and not shipped (issue 17).

Each candidate is a parameter-space refactor written here in a few lines (float64, one pair,
AdamW's moments moved with the "square" rule like the library's transport), so that its effect
can be compared with plain LoRA, release 0.2's default (``resolved=0``) and the shipped
resolution gate on the cells of ``benchmarks/studies/rank_deficient.py`` (AdamW, full batch, median of
``--seeds`` seeds, loss at steps 50 / 150 / 300). In the basis ``Z`` where ``Z^{-1} A`` has
orthonormal rows and ``B Z`` orthogonal columns of norms ``sigma_j`` (the singular values of
``B A``), every candidate rescales direction ``j`` of ``A`` by ``d_j`` and of ``B`` by ``1 / d_j``:

* ``balanced``: ``d_j^2 = sigma_j`` in the paper's eigenbasis frame (what the library does with
  ``resolved=0``; here without its dead-direction rule, as a check of this script);
* ``floor``: ``d_j^2 = max(sigma_j, c * mean eig(A A^T))``: never shrink ``A`` below its own
  scale (balance only directions already larger than it), paper frame;
* ``floor+nearest``: the same, then the rotation ``Q`` that keeps the pair closest to the
  current one (``min ||Q A' - A||^2 + ||B' Q^T - B||^2``, a polar factor) instead of the eigenbasis;
* ``per-direction``: ``A' = Z D Z^{-1} A`` (the current coordinates kept), with ``d_j`` balancing
  the two norms of direction ``j`` where ``sigma_j >= c * max(mean eig(A A^T), mean eig(B^T B))``
  and ``d_j = 1`` elsewhere.

Run: ``python benchmarks/studies/rank_deficient_candidates.py [--seeds 3]``. The outcome is in
``docs/rank-deficient.md`` ("Candidates measured").
"""

from __future__ import annotations

import argparse
import math
import statistics

import torch

import reflora
from rank_deficient import floored, problem

CELLS = [(8, 1, 3e-3), (8, 1, 1e-2), (16, 4, 3e-3), (16, 4, 1e-2), (8, 8, 3e-3), (8, 8, 1e-2), (16, 16, 3e-3)]


def _basis(A: torch.Tensor, B: torch.Tensor):
    X, Y = A.double() @ A.double().T, B.double().T @ B.double()
    lam, Va = torch.linalg.eigh(X)
    lam = lam.clamp_min(1e-300)
    Z0, Z0i = Va * lam.sqrt(), (Va / lam.sqrt()).T
    sig2, Vm = torch.linalg.eigh(Z0.T @ Y @ Z0)
    Z, Zi = (Z0 @ Vm).flip(1), (Vm.T @ Z0i).flip(0)  # descending sigma
    return X, Y, Z, Zi, sig2.clamp_min(0).sqrt().flip(0)


def transform(name: str, A: torch.Tensor, B: torch.Tensor, c: float = 0.1):
    """``(left, right)`` with ``A' = left A``, ``B' = B right``, or ``None`` to leave the pair alone."""
    X, Y, Z, Zi, sig = _basis(A, B)
    r = X.shape[0]
    if sig[0] <= 0:
        return None
    a2, b2 = X.trace() / r, Y.trace() / r
    if name == "per-direction":
        d2 = torch.where(sig >= c * torch.maximum(a2, b2), sig * Zi.norm(dim=1) / Z.norm(dim=0), 1.0)
        d = d2.sqrt()
        return (Z * d) @ Zi, (Z / d) @ Zi
    d2 = torch.where(sig > 1e-7 * sig[0], sig, a2) if name == "balanced" else torch.maximum(sig, c * a2)
    d = d2.sqrt()
    left, right = d[:, None] * Zi, Z / d
    if name == "floor+nearest":
        U, _, Vh = torch.linalg.svd((left @ X + right.T @ Y).T)
        Q = (U @ Vh).T
        left, right = Q @ left, right @ Q.T
    return left, right


def run(name: str, seed: int, r: int, k: int, lr: float, steps: int = 300) -> dict[int, float]:
    X, Y, A, B, _ = problem(seed, r, k)
    opt = torch.optim.AdamW([A, B], lr=lr, weight_decay=0.0)
    if name == "default":
        reflora.attach(opt, [(A, B)])
    elif name == "resolved=0":
        reflora.attach(opt, [(A, B)], resolved=0.0)
    elif name != "lora":
        def pre(o, args, kwargs):
            with torch.no_grad():
                try:
                    T = transform(name, A, B)
                except torch.linalg.LinAlgError:
                    return
                if T is None or not all(torch.isfinite(t).all() for t in T):
                    return
                L, R = T
                A.copy_(L @ A.double())
                B.copy_(B.double() @ R)
                A.grad.copy_(R.T @ A.grad.double())
                B.grad.copy_(B.grad.double() @ L.T)
                if "exp_avg" in o.state[A]:
                    sa, sb = o.state[A], o.state[B]
                    sa["exp_avg"].copy_(R.T @ sa["exp_avg"].double())
                    sb["exp_avg"].copy_(sb["exp_avg"].double() @ L.T)
                    sa["exp_avg_sq"].copy_(R.T.square() @ sa["exp_avg_sq"].double())
                    sb["exp_avg_sq"].copy_(sb["exp_avg_sq"].double() @ L.T.square())

        opt.register_step_pre_hook(pre)
    with torch.no_grad():
        out, l0 = {}, float(((X @ A.T @ B.T - Y) ** 2).mean())
    for t in range(1, steps + 1):
        opt.zero_grad()
        ((X @ A.T @ B.T - Y) ** 2).mean().backward()
        opt.step()
        if t in (50, 150, 300):
            with torch.no_grad():
                out[t] = floored(float(((X @ A.T @ B.T - Y) ** 2).mean()), l0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    names = ["lora", "resolved=0", "default", "balanced", "floor", "floor+nearest", "per-direction"]
    print(f"AdamW, full batch: median loss over {args.seeds} seeds at steps 50 / 150 / 300")
    print(f"{'r':>3} {'k':>3} {'lr':>6}  " + "  ".join(f"{n:>26}" for n in names))
    for r, k, lr in CELLS:
        cols = []
        for n in names:
            res = [run(n, s, r, k, lr) for s in range(args.seeds)]
            med = [statistics.median(x[t] for x in res) for t in (50, 150, 300)]
            cols.append(" / ".join(f"{v:.1e}" if math.isfinite(v) else "inf" for v in med))
        print(f"{r:>3} {k:>3} {lr:>6.0e}  " + "  ".join(f"{c:>26}" for c in cols))


if __name__ == "__main__":
    main()
