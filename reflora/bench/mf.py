r"""The paper's matrix-factorization experiment (arXiv 2505.18877, Sec. 5.1, Fig. 2).

Fit a rank-``r`` target ``Y = U diag(s) V^T`` (``n x m``) by ``B @ A`` with plain gradient
descent on ``0.5 * ||B A - Y||_F^2``, from an *unbalanced* start (``A`` large, ``B`` small).
The paper does not give its sizes; ours (defaults of :class:`MFConfig`) are chosen so the
target has rank ``r`` (the minimum loss is 0) and singular values 25..30, with
``A ~ 4 * sqrt(r/m) * N(0, 1)`` and ``B ~ 0.1 * N(0, 1)``.

Methods (all plain GD on the same start, float64):

* ``lora``: the raw factor gradients.
* ``scaledgd``: ScaledGD / Riemannian preconditioning, ``grad_A (B^T B)^{-1}``-style
  (Tong et al. 2021; PEFT's ``create_riemannian_optimizer`` without its regulariser).
* ``reflora``: :func:`reflora.functional.precondition`, full variant.
* ``reflora_s``: the scalar variant (RefLoRA-S).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from reflora.functional import precondition

__all__ = ["METHODS", "MFConfig", "iterations_to", "make_problem", "run"]

METHODS = ("lora", "scaledgd", "reflora", "reflora_s")


@dataclass(frozen=True)
class MFConfig:
    n: int = 64
    m: int = 64
    r: int = 8
    s_min: float = 25.0
    s_max: float = 30.0
    a_scale: float = 4.0
    b_scale: float = 0.1
    iters: int = 100
    diverged: float = 1e10


def make_problem(cfg: MFConfig, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(Y, A0, B0)`` in float64 for one seed."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(cfg.n, cfg.r, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(cfg.m, cfg.r, generator=g, dtype=torch.float64))
    s = torch.linspace(cfg.s_max, cfg.s_min, cfg.r, dtype=torch.float64)
    Y = (U * s) @ V.T
    A0 = cfg.a_scale * math.sqrt(cfg.r / cfg.m) * torch.randn(cfg.r, cfg.m, generator=g, dtype=torch.float64)
    B0 = cfg.b_scale * torch.randn(cfg.n, cfg.r, generator=g, dtype=torch.float64)
    return Y, A0, B0


def _direction(method: str, A: torch.Tensor, B: torch.Tensor, gA: torch.Tensor, gB: torch.Tensor):
    if method == "lora":
        return gA, gB
    if method == "scaledgd":
        return torch.linalg.solve(B.T @ B, gA), torch.linalg.solve(A @ A.T, gB.T).T
    if method == "reflora":
        return precondition(A, B, gA, gB, variant="full")
    if method == "reflora_s":
        return precondition(A, B, gA, gB, variant="scalar")
    raise ValueError(f"method must be one of {METHODS}; got {method!r}")


def run(method: str, lr: float, cfg: MFConfig = MFConfig(), seed: int = 0) -> list[float]:
    """Loss at iterations 0..iters (shorter if it diverged past ``cfg.diverged``)."""
    Y, A, B = make_problem(cfg, seed)
    losses: list[float] = []
    for _ in range(cfg.iters + 1):
        G = B @ A - Y
        loss = 0.5 * float(G.square().sum())
        losses.append(loss)
        if not math.isfinite(loss) or loss > cfg.diverged:
            break
        dA, dB = _direction(method, A, B, B.T @ G, G @ A.T)
        A, B = A - lr * dA, B - lr * dB
    return losses


def iterations_to(losses: list[float], target: float = 1e-3) -> int | None:
    """First iteration whose loss is below ``target`` (None if never)."""
    return next((i for i, v in enumerate(losses) if v < target), None)
