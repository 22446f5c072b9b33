"""Gram-level kernels and argument checks shared by :mod:`reflora.functional` and the hook layer.

Everything here is pure, batched over leading dimensions and traceable (no ``.item()``, no
Python branch on tensor values). The functional API validates its inputs and calls these; the
optimizer hook (:mod:`reflora.attach`) stacks same-shape pairs and calls them once per group.

* :func:`grams`: ``(A A^T, B^T B)`` in float64, the only O((m + n) r^2) work of the full variant.
* :func:`full_kernel`: ``(left, right, S, S^{-1})`` from the Grams (all ``r x r``).
* :func:`scalar_kernel`: RefLoRA-S's ``(p, 1/p)`` from the squared Frobenius norms.
* :func:`metric`: ``(S, S^{-1})`` of a transform.
"""

from __future__ import annotations

import torch
from torch import Tensor

from reflora._linalg import balanced_metric, compute_dtype, default_eps

__all__ = [
    "FRAMES",
    "SECOND_MOMENT_RULES",
    "VARIANTS",
    "check_eps",
    "check_frame",
    "check_variant",
    "full_kernel",
    "grams",
    "metric",
    "scalar_kernel",
]

VARIANTS = ("full", "scalar")
FRAMES = ("paper", "symmetric")
SECOND_MOMENT_RULES = ("square", "keep", "reset")


def check_variant(variant: object) -> str:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}; got {variant!r}")
    return variant  # type: ignore[return-value]


def check_frame(frame: object) -> str:
    if frame not in FRAMES:
        raise ValueError(f"frame must be one of {FRAMES}; got {frame!r}")
    return frame  # type: ignore[return-value]


def check_eps(eps: object, dtype: torch.dtype) -> float:
    if eps is None:
        return default_eps(dtype)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a float or None; got {type(eps).__name__}")
    if not (0.0 <= float(eps) < 1.0):
        raise ValueError(f"eps must be in [0, 1); got {eps!r}")
    return float(eps)


def grams(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    """``(A A^T, B^T B)`` in the compute dtype: the only O((m + n) r^2) work of the full variant."""
    cd = compute_dtype(A.dtype)
    Ac, Bc = A.to(cd), B.to(cd)
    return Ac @ Ac.mT, Bc.mT @ Bc


def full_kernel(
    X: Tensor, Y: Tensor, eps: float, frame: str = "paper"
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(left, right, S, S^{-1})`` of a stack of pairs from their Grams (compute dtype).

    See :func:`reflora._linalg.balanced_metric` for the construction. A non-finite factor shows
    up as a non-finite Gram (NaN/Inf propagate through the product); such pairs get NaN outputs
    and are kept away from ``eigh``, which could otherwise raise.
    """
    finite = torch.isfinite(X).flatten(-2).all(-1) & torch.isfinite(Y).flatten(-2).all(-1)
    finite = finite[..., None, None]
    X = torch.where(finite, X, 0.0)
    Y = torch.where(finite, Y, 0.0)
    out = balanced_metric(X, Y, eps, frame)[:4]
    nan = torch.full((), float("nan"), dtype=X.dtype, device=X.device)
    return tuple(torch.where(finite, t, nan) for t in out)  # type: ignore[return-value]


def scalar_kernel(a_sq: Tensor, b_sq: Tensor) -> tuple[Tensor, Tensor]:
    """RefLoRA-S's ``(p, 1/p)`` as ``(..., 1, 1)`` from ``||A||_F^2`` and ``||B||_F^2`` (shape ``(...)``).

    ``p = sqrt(||B||_F / ||A||_F)``, taken as a ratio of square roots so that it cannot overflow;
    ``p = 1`` when either factor is zero (PEFT's ``B = 0``), NaN for a non-finite pair.
    """
    na = a_sq.sqrt()[..., None, None]
    nb = b_sq.sqrt()[..., None, None]
    p = nb.sqrt() / na.sqrt()
    p = torch.where((na > 0) & (nb > 0), p, 1.0)
    p = torch.where(torch.isfinite(na) & torch.isfinite(nb), p, float("nan"))
    return p, 1.0 / p


def metric(left: Tensor, right: Tensor) -> tuple[Tensor, Tensor]:
    """``(S, S^{-1}) = (P P^T, P^{-T} P^{-1})`` of a transform (``(p^2, 1/p^2)`` for the scalar form)."""
    if left.shape[-1] == 1:
        return left.square(), right.square()
    return left.mT @ left, right @ right.mT
