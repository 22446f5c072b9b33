r"""The pure functional core of RefLoRA (Zhang, Li, Giannakis, arXiv 2505.18877).

Layout (PEFT / loralib): ``A`` is ``(..., r, m)`` (``lora_A.weight``), ``B`` is ``(..., n, r)``
(``lora_B.weight``), the adapted weight is ``W = W0 + s * B @ A``. Every function takes arbitrary
leading batch dimensions (broadcast between ``A`` and ``B``), never mutates its inputs, has no
``.item()`` and no Python branch on tensor values, and therefore runs under
``torch.func.vmap`` and ``torch.compile(fullgraph=True)``.

The factorization ``(A, B)`` of ``B @ A`` is not unique: for any invertible ``P`` (r x r),
``(P^T A, B P^{-T})`` gives the same product, but a gradient step from it changes ``W`` through
the metric ``S = P P^T``. RefLoRA picks the ``S`` that balances the factors::

    X = A A^T,  Y = B^T B,  S X S = Y  =>  S = X^{-1} # Y   (matrix geometric mean)

computed from the two r x r Grams with symmetric eigendecompositions (the paper's route; the
construction and its extension to rank-deficient products are in
:func:`reflora._linalg.balanced_metric`).

Numerics, and where this implementation deviates from the paper's formulas (the reasons and
measurements: docs/theory.md):

* **Compute dtype.** The Grams and every r x r operation run in float64 whatever the factors'
  dtype, and results are cast back to the input dtype: a float32 Gram has already lost the small
  eigenvalues of a factor conditioned like 1e3 (the accuracy contract per dtype: docs/theory.md,
  "Numerics and limits").
* **Dead directions (the paper's S does not exist).** ``S X S = Y`` has an SPD solution only
  when ``B A`` has full rank ``r``. A direction whose squared singular value is at most
  ``eps * ||A||_2^2 * ||B||_F^2`` (default ``eps`` = 1.4e-14: zero to float64 round-off) is
  *dead*: the metric there is the identity (a plain LoRA step), and only the live directions are
  balanced; no inverse of a dead value is ever taken. Cases: ``B = 0`` (PEFT's init; all
  directions dead, ``S = I``, so training starts with no warmup), ``r > min(m, n)`` (a 3-label
  head with r = 8), and exactly rank-deficient products.
* **Frame.** Any ``P`` with ``P P^T = S`` gives the same plain gradient step; they differ for
  optimizers that are not rotation-equivariant (Adam). The default ``frame="paper"`` takes the
  paper's closed form (balanced Grams equal to ``diag(sigma)``), made canonical: a tiny fixed
  tie-breaker orders (near-)repeated eigenspaces by coordinate and each eigenvector's largest
  entry is positive, so eager, compiled, other devices and ranks give the same factors to
  round-off. ``frame="symmetric"`` takes ``P = S^{1/2}`` (unique without any convention; the
  identity for an already balanced pair). How the two train: docs/options.md.
* **Solver.** ``solver="eigh"`` (default) is the construction above. ``solver="newton_schulz"``
  computes ``S`` and ``S^{-1}`` as the blocks of ``sign([[0, Y], [X, 0]])`` and ``S^{\pm 1/2}``
  as those of ``sign([[0, S], [I, 0]])`` by coupled Newton-Schulz iterations: matrix products
  only, a fixed step count set by ``r``, traceable. It gives the symmetric frame only
  (``frame=None`` resolves to it; ``frame="paper"`` raises). It cannot see the spectrum, so
  instead of dead directions both Grams get a diagonal shift of 1e-12 of their mean eigenvalue:
  a direction dead in both factors gets RefLoRA-S's scalar metric ``sqrt(tr Y / tr X)`` instead
  of 1, one dead in a single factor (``r > min(m, n)``) a large but finite metric, and a pair
  with ``||B A||_F^2 <= eps ||A||_F^2 ||B||_F^2`` (``B = 0``) exactly the identity, as with
  eigh. Its agreement with eigh by conditioning: docs/theory.md, "Eigh-free solver".
* **Non-finite input.** A pair holding NaN/Inf gets NaN outputs; the other pairs of the batch
  are computed as usual (bad matrices are replaced before ``eigh``, which could otherwise raise).

These functions are not meant to be differentiated through.
"""

from __future__ import annotations

import warnings
from typing import Literal, NamedTuple, Sequence

import torch
from torch import Tensor

from reflora._kernels import full_kernel, grams, metric, metric_kernel, scalar_kernel
from reflora._linalg import compute_dtype
from reflora.config import check_eps, check_resolved, check_second_moment, check_solver, check_variant

__all__ = [
    "Refactored",
    "RankAboveSizeWarning",
    "RefactoredWithGrads",
    "Transform",
    "apply_transform",
    "check_ranks",
    "map_first_moments",
    "map_second_moments",
    "precondition",
    "preconditioner",
    "refactor",
    "refactor_transform",
]

Variant = Literal["full", "scalar"]
Frame = Literal["paper", "symmetric", "block"]
Solver = Literal["eigh", "newton_schulz"]
SecondMomentRule = Literal["square", "keep", "reset"]


class RankAboveSizeWarning(UserWarning):
    """The rank ``r`` exceeds ``min(m, n)``: possibly ``(B, A)`` passed as ``(A, B)``.

    A rank above the layer's size is legitimate (a 3-label head with r = 8) and is handled (the
    surplus directions are dead and left as they are); silence it with
    ``warnings.filterwarnings("ignore", category=reflora.functional.RankAboveSizeWarning)``.
    """


class Transform(NamedTuple):
    r"""A refactoring ``(A, B) -> (left @ A, B @ right)``, with ``left = P^T``, ``right = P^{-T}``.

    For ``variant="full"`` both are ``(..., r, r)``; for ``variant="scalar"`` both are
    ``(..., 1, 1)`` (``left = p``, ``right = 1 / p``). They are in the compute dtype (float64). Because
    ``left @ right^T = I``, ``B' A' = B A``.
    """

    left: Tensor
    right: Tensor


class Refactored(NamedTuple):
    """The refactored pair ``(A', B')`` returned by :func:`refactor` when no gradients are given."""

    A: Tensor
    B: Tensor


class RefactoredWithGrads(NamedTuple):
    """``(A', B', grad_A', grad_B')``: the refactored pair and its gradients in the new coordinates."""

    A: Tensor
    B: Tensor
    grad_A: Tensor
    grad_B: Tensor


# ----------------------------------------------------------------------------- validation


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _check_tensor(name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if not t.dtype.is_floating_point:
        raise TypeError(
            f"{name} has dtype {t.dtype}; expected a real floating dtype "
            "(float16, bfloat16, float32 or float64)"
        )
    return t


def _broadcast_batch(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...] | None:
    out = []
    for i in range(1, max(len(a), len(b)) + 1):
        x = a[-i] if i <= len(a) else 1
        y = b[-i] if i <= len(b) else 1
        if x != y and x != 1 and y != 1:
            return None
        out.append(x if y == 1 else y)
    return tuple(reversed(out))


def check_ranks(a_shape: Sequence[int], b_shape: Sequence[int], name: str | None = None) -> int:
    """The rank ``r`` of ``A`` ``(..., r, m)`` and ``B`` ``(..., n, r)`` (core layout); raises if they
    disagree (the factors are swapped, or not a pair). The one rank check of a pair: the pure API,
    :class:`reflora.LoRAPair` and :func:`reflora.adapters.mark_pair` call it."""
    r, rb = a_shape[-2], b_shape[-1]
    if r != rb:
        where = "" if name is None else f"pair {name!r}: "
        raise ValueError(
            f"{where}A has rank {r} (shape {tuple(a_shape)}) but B has rank {rb} (shape {tuple(b_shape)}); "
            "expected A of shape (..., r, m) and B of shape (..., n, r)"
        )
    return r


def _check_pair(A: object, B: object) -> tuple[Tensor, Tensor]:
    A = _check_tensor("A", A)
    B = _check_tensor("B", B)
    if A.dim() < 2:
        raise ValueError(
            f"A must have at least 2 dimensions (..., r, m); got shape {_shape(A)}"
        )
    if B.dim() < 2:
        raise ValueError(
            f"B must have at least 2 dimensions (..., n, r); got shape {_shape(B)}"
        )
    for name, t, dims in (("A", A, "(..., r, m)"), ("B", B, "(..., n, r)")):
        if 0 in t.shape[-2:]:
            raise ValueError(
                f"{name} has shape {_shape(t)}, an empty matrix; expected {dims} with r, m, n >= 1 "
                "(a rank-0 adapter has nothing to refactor: drop it)"
            )
    check_ranks(_shape(A), _shape(B))
    if A.dtype != B.dtype:
        raise TypeError(
            f"A has dtype {A.dtype} but B has dtype {B.dtype}; cast both to one dtype"
        )
    if A.device != B.device:
        raise ValueError(
            f"A is on {A.device} but B is on {B.device}; move both to one device"
        )
    if _broadcast_batch(_shape(A)[:-2], _shape(B)[:-2]) is None:
        raise ValueError(
            f"batch shapes of A {_shape(A)[:-2]} and B {_shape(B)[:-2]} do not broadcast "
            f"(A has shape {_shape(A)}, B has shape {_shape(B)})"
        )
    return A, B


def _check_grads(A: Tensor, B: Tensor, grad_A: object, grad_B: object) -> tuple[Tensor, Tensor]:
    grad_A = _check_tensor("grad_A", grad_A)
    grad_B = _check_tensor("grad_B", grad_B)
    for name, g, p in (("grad_A", grad_A, A), ("grad_B", grad_B, B)):
        if g.shape != p.shape:
            raise ValueError(
                f"{name} has shape {_shape(g)} but {name[-1]} has shape {_shape(p)}; "
                "a gradient must have the shape of its factor"
            )
        if g.device != p.device:
            raise ValueError(f"{name} is on {g.device} but {name[-1]} is on {p.device}")
    return grad_A, grad_B


def _warn_rank_above_size(A: Tensor, B: Tensor, stacklevel: int = 3) -> None:
    r, m, n = A.shape[-2], A.shape[-1], B.shape[-2]
    if r > min(m, n) and not torch.compiler.is_compiling():
        warnings.warn(
            f"A has shape {_shape(A)} and B has shape {_shape(B)}: the rank r={r} exceeds "
            f"min(m, n)={min(m, n)}. Did you pass (B, A)? The core expects A (..., r, m) = "
            "lora_A.weight and B (..., n, r) = lora_B.weight. If the rank really exceeds the "
            "layer's size, this is supported (the surplus directions are left as they are); "
            "silence this with warnings.filterwarnings('ignore', "
            "category=reflora.functional.RankAboveSizeWarning)",
            RankAboveSizeWarning,
            stacklevel=stacklevel,
        )


def _check_transform(transform: object) -> Transform:
    if not (isinstance(transform, tuple) and len(transform) == 2):
        raise TypeError(
            "transform must be a Transform(left, right) as returned by refactor_transform; "
            f"got {type(transform).__name__}"
        )
    left, right = transform
    for name, t in (("transform.left", left), ("transform.right", right)):
        _check_tensor(name, t)
        if t.dim() < 2 or t.shape[-1] != t.shape[-2]:
            raise ValueError(f"{name} must be (..., r, r) or (..., 1, 1); got shape {_shape(t)}")
    return Transform(left, right)


# ----------------------------------------------------------------------------- the math


def _full_transform(
    A: Tensor, B: Tensor, eps: float, frame: str = "paper", solver: str = "eigh", resolved: float = 0.0
) -> Transform:
    return Transform(*full_kernel(*grams(A, B), eps, frame, solver, resolved)[:2])


def _scalar_transform(A: Tensor, B: Tensor) -> Transform:
    cd = compute_dtype(A.dtype)
    Ac, Bc = A.to(cd), B.to(cd)
    return Transform(*scalar_kernel(Ac.square().sum((-2, -1)), Bc.square().sum((-2, -1))))


def _matmul_left(T: Tensor, X: Tensor) -> Tensor:
    """``T @ X`` where ``T`` is ``(..., r, r)`` or a ``(..., 1, 1)`` scalar."""
    return T * X if T.shape[-1] == 1 else T @ X


def _matmul_right(X: Tensor, T: Tensor) -> Tensor:
    """``X @ T`` where ``T`` is ``(..., r, r)`` or a ``(..., 1, 1)`` scalar."""
    return X * T if T.shape[-1] == 1 else X @ T


# ----------------------------------------------------------------------------- public API


def refactor_transform(
    A: Tensor,
    B: Tensor,
    *,
    variant: Variant = "full",
    eps: float | None = None,
    frame: Frame | None = None,
    solver: Solver = "eigh",
    resolved: float = 0.0,
) -> Transform:
    r"""Compute the optimal refactoring of ``(A, B)`` without applying it.

    .. code-block:: text

        full:   left = P^T,  right = P^{-T},  P P^T = S = (A A^T)^{-1} # (B^T B)
                frame="paper": P = V_A diag(1/a) V_M diag(sigma^{1/2});  frame="symmetric": P = S^{1/2}
                solver="eigh": eigendecompositions;  solver="newton_schulz": matmul iterations
        scalar: left = p,    right = 1/p,     p = sqrt(||B||_F / ||A||_F)

    Args:
        A: ``(..., r, m)`` down-projection factor.
        B: ``(..., n, r)`` up-projection factor; batch dimensions broadcast with ``A``'s.
        variant: ``"full"`` (RefLoRA) or ``"scalar"`` (RefLoRA-S).
        eps: live-direction threshold (full variant only): a direction of ``B A`` whose squared
            singular value is at most ``eps * ||A||_2^2 * ||B||_F^2`` is dead and left as it is.
            ``None`` picks ``64 * machine_eps(float64)`` = 1.4e-14. See the module docstring.
        frame: which ``P`` among those with ``P P^T = S`` (full variant only):
            ``"paper"`` (the paper's closed form, balanced Grams equal to ``diag(sigma)``, with a
            canonical sign and tie rule) or ``"symmetric"`` (``S^{1/2}``, closest to the
            identity). ``None`` (default): ``"paper"`` with ``solver="eigh"``, ``"symmetric"``
            with ``solver="newton_schulz"`` (which cannot produce the paper frame: passing
            ``frame="paper"`` with it raises ``ValueError``). ``"block"``
            (``reflora._linalg.block_metric``, ``solver="eigh"``, ``resolved=0``): balanced
            on the directions above a tenth of the largest singular value only, the others
            floored there; not the paper's optimum, an opt-in for ranks above the task's need.
        solver: ``"eigh"`` (default: symmetric eigendecompositions, exact dead-direction
            handling) or ``"newton_schulz"`` (matrix products only, a fixed number of steps:
            no eigensolver, which is slow for small batched matrices on GPUs; dead directions
            are regularised instead, see :func:`reflora._linalg.newton_schulz_geomean` and the
            module docstring). Full variant only; ``"scalar"`` has nothing to decompose.
        resolved: full variant with ``solver="eigh"``: a pair whose smallest singular value of
            ``B A`` is below ``resolved`` times its largest gets the identity (it is left as it
            is). ``0`` (default here, unlike ``attach`` and ``reflora.func``'s 0.1: a pure
            function gives the paper's transform of one pair; the gate is a training schedule,
            with its own warmup, that the optimizer front-ends apply; ``docs/rank-deficient.md``).

    Returns:
        A :class:`Transform` in float64.

    Example:
        >>> import torch
        >>> from reflora.functional import refactor_transform, apply_transform
        >>> A, B = torch.randn(4, 32), torch.randn(16, 4)
        >>> T = refactor_transform(A, B)
        >>> A2, B2 = apply_transform(T, A, B)
        >>> torch.allclose(B2 @ A2, B @ A, atol=1e-4)
        True

    Reference: arXiv 2505.18877, Theorem 1 (optimal refactoring) and Sec. 4 (RefLoRA-S).
    """
    A, B = _check_pair(A, B)
    variant = check_variant(variant)
    eps_ = check_eps(eps, A.dtype)
    solver, frame = check_solver(solver, frame)
    resolved = check_resolved(resolved, variant, solver)
    if frame == "block" and (resolved or variant == "scalar"):
        raise ValueError("frame='block' is a gate-free frame of the full variant; use variant='full' and resolved=0 with it")
    _warn_rank_above_size(A, B)
    if variant == "scalar":
        return _scalar_transform(A, B)
    return _full_transform(A, B, eps_, frame, solver, resolved)


def apply_transform(transform: Transform, A: Tensor, B: Tensor) -> Refactored:
    """Apply a :class:`Transform`: ``(left @ A, B @ right)``, cast back to the factors' dtype."""
    left, right = _check_transform(transform)
    A, B = _check_pair(A, B)
    cd = left.dtype
    A2 = _matmul_left(left, A.to(cd)).to(A.dtype)
    B2 = _matmul_right(B.to(cd), right).to(B.dtype)
    return Refactored(A2, B2)


def map_first_moments(transform: Transform, m_A: Tensor, m_B: Tensor) -> tuple[Tensor, Tensor]:
    r"""Map gradients or first moments (covectors) into the refactored coordinates.

    .. code-block:: text

        A' = P^T A,  B' = B P^{-T}   =>   dL/dA' = P^{-1} dL/dA,   dL/dB' = dL/dB P

    Exact for any ``P``: a first moment is a linear combination of past gradients. Returns
    tensors in the dtype of ``m_A`` / ``m_B``.
    """
    left, right = _check_transform(transform)
    for name, t in (("m_A", m_A), ("m_B", m_B)):
        _check_tensor(name, t)
    cd = left.dtype
    mA = _matmul_left(right.mT, m_A.to(cd)).to(m_A.dtype)
    mB = _matmul_right(m_B.to(cd), left.mT).to(m_B.dtype)
    return mA, mB


def map_second_moments(
    transform: Transform, v_A: Tensor, v_B: Tensor, *, rule: SecondMomentRule = "square"
) -> tuple[Tensor, Tensor]:
    r"""Map element-wise second moments (Adam's ``exp_avg_sq``) into the refactored coordinates.

    There is no exact map for a non-diagonal ``P``: ``E[(P^{-1} g)^2]`` needs the cross moments
    ``E[g_i g_j]`` that Adam does not keep. Rules:

    .. code-block:: text

        "square": v_A' = (P^{-1})^{o2} v_A,  v_B' = v_B P^{o2}   (o2: element-wise square)
        "keep":   unchanged
        "reset":  zeros

    ``"square"`` drops the cross moments (treats coordinates as uncorrelated). It keeps
    ``v >= 0`` and is **exact** whenever ``P`` is diagonal, in particular for the scalar variant
    (``v_A / p^2``, ``v_B * p^2``).
    """
    left, right = _check_transform(transform)
    for name, t in (("v_A", v_A), ("v_B", v_B)):
        _check_tensor(name, t)
    check_second_moment(rule, "rule")
    if rule == "keep":
        return v_A.clone(), v_B.clone()
    if rule == "reset":
        return torch.zeros_like(v_A), torch.zeros_like(v_B)
    cd = left.dtype
    vA = _matmul_left(right.mT.square(), v_A.to(cd)).to(v_A.dtype)
    vB = _matmul_right(v_B.to(cd), left.mT.square()).to(v_B.dtype)
    return vA, vB


def refactor(
    A: Tensor,
    B: Tensor,
    grads: tuple[Tensor, Tensor] | None = None,
    *,
    variant: Variant = "full",
    eps: float | None = None,
    frame: Frame | None = None,
    solver: Solver = "eigh",
    resolved: float = 0.0,
) -> Refactored | RefactoredWithGrads:
    r"""Replace ``(A, B)`` by its optimal (balanced) factorization of the same product.

    .. code-block:: text

        A' = P^T A,   B' = B P^{-T},   B' A' = B A
        full:   A' A'^T = B'^T B'  (eigenvalues sigma, the singular values of B A;
                frame="paper" makes both equal diag(sigma)),  ||A'||_F^2 + ||B'||_F^2 = 2 ||B A||_*
        scalar: P = p I,  ||A'||_F = ||B'||_F

    Args:
        A: ``(..., r, m)`` factor (``lora_A.weight``).
        B: ``(..., n, r)`` factor (``lora_B.weight``); batch dimensions broadcast with ``A``'s.
        grads: optional ``(grad_A, grad_B)``, shaped like ``A`` and ``B``. When given they are
            mapped into the new coordinates (``P^{-1} grad_A``, ``grad_B P``).
        variant: ``"full"`` (RefLoRA) or ``"scalar"`` (RefLoRA-S).
        eps: live-direction threshold, see :func:`refactor_transform`.
        frame: ``"paper"``, ``"symmetric"``, ``"block"`` or ``None`` (the solver's: ``"paper"`` for eigh,
            ``"symmetric"`` for Newton-Schulz), see :func:`refactor_transform`.
        solver: ``"eigh"`` (default) or ``"newton_schulz"``, see :func:`refactor_transform`.
        resolved: the resolution gate, see :func:`refactor_transform` (default 0: the paper).

    Returns:
        ``Refactored(A', B')`` (a 2-tuple) without ``grads``;
        ``RefactoredWithGrads(A', B', grad_A', grad_B')`` (a 4-tuple) with them. ``out[0]`` and
        ``out[1]`` are always ``A'`` and ``B'``. Dtypes are preserved; the batch shape is the
        broadcast of ``A``'s and ``B``'s. A pair with a zero product (e.g. ``B = 0``) is
        returned unchanged; a pair holding NaN/Inf comes back as NaN.

    Example:
        >>> import torch
        >>> from reflora.functional import refactor
        >>> A, B = 10 * torch.randn(8, 64), 0.01 * torch.randn(32, 8)
        >>> A2, B2 = refactor(A, B)
        >>> torch.allclose(A2 @ A2.T, B2.T @ B2, atol=1e-4)
        True

    Reference: arXiv 2505.18877, Theorem 1.
    """
    A, B = _check_pair(A, B)
    if grads is not None:
        if not (isinstance(grads, (tuple, list)) and len(grads) == 2):
            raise TypeError(
                f"grads must be a (grad_A, grad_B) tuple or None; got {type(grads).__name__}"
            )
        gA, gB = _check_grads(A, B, grads[0], grads[1])
    T = refactor_transform(A, B, variant=variant, eps=eps, frame=frame, solver=solver, resolved=resolved)
    A2, B2 = apply_transform(T, A, B)
    if grads is None:
        return Refactored(A2, B2)
    gA2, gB2 = map_first_moments(T, gA, gB)
    return RefactoredWithGrads(A2, B2, gA2, gB2)


def preconditioner(
    A: Tensor,
    B: Tensor,
    *,
    variant: Variant = "full",
    eps: float | None = None,
    solver: Solver = "eigh",
    resolved: float = 0.0,
) -> tuple[Tensor, Tensor]:
    r"""The metric ``S = P P^T`` and its inverse, in the compute dtype.

    ``S`` is the symmetric positive definite solution of ``S (A A^T) S = B^T B`` (the matrix
    geometric mean ``(A A^T)^{-1} # (B^T B)``); ``S = I`` for an already balanced pair and for a
    pair with no live direction such as ``B = 0`` (see the module docstring). For
    ``variant="scalar"`` both are ``(..., 1, 1)``:
    ``(p^2, 1 / p^2)``. ``solver``: ``"eigh"`` (default) or ``"newton_schulz"`` (see
    :func:`refactor_transform`; ``S`` needs neither the frame's rotation nor the square roots,
    so neither is computed). ``resolved``: the resolution gate (``S = I`` for a pair that fails
    it), see :func:`refactor_transform`.
    """
    solver, _ = check_solver(solver)
    A, B = _check_pair(A, B)
    if check_variant(variant) == "scalar":
        return metric(*refactor_transform(A, B, variant=variant, eps=eps, solver=solver, resolved=resolved))
    eps_ = check_eps(eps, A.dtype)
    resolved = check_resolved(resolved, variant, solver)
    _warn_rank_above_size(A, B)
    # the kernel's own S and S^-1: no frame rotation, no square roots, no recomputation from P
    return metric_kernel(*grams(A, B), eps_, solver, resolved)


def precondition(
    A: Tensor,
    B: Tensor,
    grad_A: Tensor,
    grad_B: Tensor,
    *,
    variant: Variant = "full",
    eps: float | None = None,
    solver: Solver = "eigh",
    resolved: float = 0.0,
) -> tuple[Tensor, Tensor]:
    r"""The gradient-space form of RefLoRA: precondition the factor gradients.

    .. code-block:: text

        full:   grad_A' = S^{-1} grad_A,   grad_B' = grad_B S,   S = (A A^T)^{-1} # (B^T B)
        scalar: grad_A' = grad_A / p^2,    grad_B' = grad_B p^2, p^2 = ||B||_F / ||A||_F

    A plain gradient step with these gradients moves ``W = B A`` exactly as a step from the
    refactored pair would (the reference code's default form). With Adam the two forms differ.
    A pair with no live direction (``B = 0`` at PEFT's init) gets its gradients back unchanged, so ``B``
    still moves at step one.

    Args:
        A, B: the factors, ``(..., r, m)`` and ``(..., n, r)``.
        grad_A, grad_B: their gradients, same shapes.
        variant: ``"full"`` or ``"scalar"``.
        eps: live-direction threshold, see :func:`refactor_transform`.
        solver: ``"eigh"`` (default) or ``"newton_schulz"``, see :func:`refactor_transform`.
        resolved: the resolution gate, see :func:`refactor_transform` (default 0: the paper).

    Returns:
        ``(grad_A', grad_B')`` in the gradients' dtypes.

    Example:
        >>> import torch
        >>> from reflora.functional import precondition
        >>> A, B = torch.randn(4, 32), torch.zeros(16, 4)
        >>> gA, gB = torch.zeros(4, 32), torch.randn(16, 4)
        >>> gA2, gB2 = precondition(A, B, gA, gB)  # B = 0: plain gradients
        >>> torch.equal(gB2, gB)
        True

    Reference: arXiv 2505.18877, Sec. 3 (the preconditioned form).
    """
    A, B = _check_pair(A, B)
    gA, gB = _check_grads(A, B, grad_A, grad_B)
    S, S_inv = preconditioner(A, B, variant=variant, eps=eps, solver=solver, resolved=resolved)
    cd = S.dtype
    gA2 = _matmul_left(S_inv, gA.to(cd)).to(gA.dtype)
    gB2 = _matmul_right(gB.to(cd), S).to(gB.dtype)
    return gA2, gB2
