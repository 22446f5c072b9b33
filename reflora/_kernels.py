"""Gram-level kernels shared by :mod:`reflora.functional` and the step core (:mod:`reflora.step`).

Everything here is pure, batched over leading dimensions and traceable (no ``.item()``, no
Python branch on tensor values). The functional API validates its inputs and calls these; the
optimizer hook (:mod:`reflora.step`) stacks same-shape pairs and calls them once per group.

* :func:`grams`: ``(A A^T, B^T B)`` in float64, the only O((m + n) r^2) work of the full variant.
* :func:`full_kernel`: ``(left, right, S, S^{-1})`` from the Grams (all ``r x r``), by the
  ``eigh`` construction or the eigh-free Newton-Schulz solver (``solver=``).
* :func:`scalar_kernel`: RefLoRA-S's ``(p, 1/p)`` from the squared Frobenius norms.
* :func:`metric_kernel`: ``(S, S^{-1})`` only (gradient space; skips the roots where it can).
* :func:`metric`: ``(S, S^{-1})`` of a transform.
* :func:`eager_kernel`: the eager hook's shortcut on CPU: the two-``eigh`` kernel for pairs
  whose directions are all live, the general one for the rest (it syncs with the host to
  decide, so it is not for traced code nor for CUDA, where the hook must not sync).
* :func:`compiled_full_kernel`: :func:`full_kernel` through a per-shape ``torch.compile`` cache
  (``attach(compile=True)``).
* :func:`group_kernel`: which of these one group of the hook's step runs.
"""

from __future__ import annotations

import types
import warnings
from collections import defaultdict
from typing import Callable

import torch
from torch import Tensor

from reflora._linalg import (
    balanced_metric,
    block_metric,
    compute_dtype,
    live_metric,
    mm,
    newton_schulz_geomean,
    newton_schulz_metric,
)
from reflora.config import check_resolved, check_solver

__all__ = [
    "compiled_full_kernel",
    "decomposable",
    "eager_kernel",
    "full_kernel",
    "grams",
    "group_kernel",
    "metric",
    "metric_kernel",
    "scalar_kernel",
]


def grams(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    """``(A A^T, B^T B)`` in the compute dtype: the only O((m + n) r^2) work of the full variant."""
    cd = compute_dtype(A.dtype)
    Ac, Bc = A.to(cd), B.to(cd)
    return mm(Ac, Ac.mT), mm(Bc.mT, Bc)


def decomposable(X: Tensor, Y: Tensor) -> Tensor:
    """Per pair (shape ``X.shape[:-2]``): whether its Grams are finite and small enough to
    decompose, ``max|X| * max|Y| < sqrt(finfo.max)`` (1.3e154 in float64). Beyond that ``eigh``
    overflows inside (LAPACK raises "failed to converge"); ``||B A||`` is then about 1e77 or
    more, a run that has diverged."""
    return _small_enough(*_maxima(X, Y))


def _maxima(X: Tensor, Y: Tensor) -> tuple[Tensor, Tensor]:
    """Per pair: ``max|X|`` and ``max|Y|``; NaN or inf where the Gram has a NaN or inf entry (amax
    propagates NaN)."""
    return X.abs().flatten(-2).amax(-1), Y.abs().flatten(-2).amax(-1)


def _small_enough(ax: Tensor, ay: Tensor) -> Tensor:
    """:func:`decomposable` from the maxima: their product (which overflows to inf, and is NaN or
    inf for a non-finite Gram, so fails the test rather than wrapping) under ``sqrt(finfo.max)``."""
    return ax * ay < torch.finfo(ax.dtype).max ** 0.5


def _finite_only(X: Tensor, Y: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(finite, safe, X, Y)``: pairs with finite Grams, pairs also small enough to decompose
    (:func:`decomposable`), and the Grams with the others zeroed (kept away from ``eigh``, which
    could raise, and from the iteration). :func:`_guarded` sets the outputs of non-finite pairs
    to NaN and of finite pairs too large to decompose to the identity (no refactor)."""
    ax, ay = _maxima(X, Y)  # one reduction per Gram tells both tests
    finite = torch.isfinite(ax) & torch.isfinite(ay)
    safe_ = _small_enough(ax, ay)[..., None, None]
    return finite[..., None, None], safe_, torch.where(safe_, X, 0.0), torch.where(safe_, Y, 0.0)


def _guarded(finite: Tensor, safe: Tensor, out: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    nan = torch.full((), float("nan"), dtype=out[0].dtype, device=out[0].device)
    eye = torch.eye(out[0].shape[-1], dtype=out[0].dtype, device=out[0].device)
    return tuple(torch.where(safe, t, torch.where(finite, eye, nan)) for t in out)


def full_kernel(
    X: Tensor, Y: Tensor, eps: float, frame: str = "paper", solver: str = "eigh", resolved: float = 0.0
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(left, right, S, S^{-1})`` of a stack of pairs from their Grams (compute dtype).

    ``solver="eigh"``: :func:`reflora._linalg.balanced_metric` (either frame; ``resolved > 0``
    leaves the pairs that fail :func:`reflora._linalg.resolved_gate` as they are).
    ``solver="newton_schulz"``: :func:`reflora._linalg.newton_schulz_metric` (matmuls only,
    symmetric frame only; ``frame="paper"`` and ``resolved > 0`` raise). A non-finite factor shows up as a
    non-finite Gram (NaN/Inf propagate through the product); such pairs get NaN outputs. A pair
    whose Grams are finite but too large to decompose (:func:`decomposable`: the run has diverged)
    gets the identity.
    """
    solver, frame = check_solver(solver, frame)
    finite, safe, X, Y = _finite_only(X, Y)
    if solver == "newton_schulz":
        check_resolved(resolved, "full", solver)
        out = newton_schulz_metric(X, Y, eps)
    elif frame == "block":
        out = block_metric(X, Y, eps)[:4]
    else:
        out = balanced_metric(X, Y, eps, frame, resolved)[:4]
    return _guarded(finite, safe, out)  # type: ignore[return-value]


def metric_kernel(
    X: Tensor, Y: Tensor, eps: float, solver: str = "eigh", resolved: float = 0.0
) -> tuple[Tensor, Tensor]:
    """``(S, S^{-1})`` only: for ``"newton_schulz"`` this skips the square-root iteration (about
    40% of its matmuls), for ``"eigh"`` it is ``full_kernel``'s ``S`` and ``S^{-1}``."""
    solver, _ = check_solver(solver)
    if solver == "eigh":
        return full_kernel(X, Y, eps, "symmetric", solver, resolved)[2:]
    check_resolved(resolved, "full", solver)
    finite, safe, X, Y = _finite_only(X, Y)
    return _guarded(finite, safe, newton_schulz_geomean(X, Y, eps)[:2])  # type: ignore[return-value]


def scalar_kernel(a_sq: Tensor, b_sq: Tensor) -> tuple[Tensor, Tensor]:
    """RefLoRA-S's ``(p, 1/p)`` as ``(..., 1, 1)`` from ``||A||_F^2`` and ``||B||_F^2`` (shape ``(...)``).

    ``p = sqrt(||B||_F / ||A||_F)``, taken as a ratio of square roots so that it cannot overflow;
    ``p = 1`` when either factor is zero (PEFT's ``B = 0``), NaN for a non-finite pair.
    """
    ra, rb = a_sq.pow(0.25)[..., None, None], b_sq.pow(0.25)[..., None, None]  # sqrt(||A||), sqrt(||B||)
    p = torch.where((ra > 0) & (rb > 0), rb / ra, 1.0)
    # NaN for a non-finite pair (the product of two fourth roots of finite floats cannot overflow)
    p = torch.where(torch.isfinite(ra * rb), p, float("nan"))
    return p, p.reciprocal()


def metric(left: Tensor, right: Tensor) -> tuple[Tensor, Tensor]:
    """``(S, S^{-1}) = (P P^T, P^{-T} P^{-1})`` of a transform (``(p^2, 1/p^2)`` for the scalar form)."""
    if left.shape[-1] == 1:
        return left.square(), right.square()
    return left.mT @ left, right @ right.mT


def eager_kernel(
    X: Tensor, Y: Tensor, eps: float, frame: str | None,
    general: Callable[[Tensor, Tensor], tuple[Tensor, ...]], metric: bool = True, resolved: float = 0.0,
) -> tuple[Tensor, ...]:
    """``general(X, Y)``'s answer, computed by :func:`reflora._linalg.live_metric` where it can.

    ``frame=None`` asks for ``(S, S^{-1})`` (``general`` must return those), ``"paper"`` for
    ``(left, right, S, S^{-1})`` (``(left, right)`` with ``metric=False``). Every pair whose
    directions are all live (and, for the paper frame, whose singular values are well separated)
    gets the two-``eigh`` closed form, which equals the general kernel's result to round-off; the
    others (non-finite pairs included: their ``sigma^2`` are NaN, so not live) go through
    ``general``. One host sync decides (two when some pairs need ``general``): eager CPU use only.
    ``resolved`` must be the one ``general`` uses.
    """
    try:
        out, ok = live_metric(X, Y, eps, frame, metric, resolved)  # a non-finite Gram gives NaN sigma^2: not ok
    except torch.linalg.LinAlgError:  # or LAPACK refuses it
        return general(X, Y)
    ok = ok & decomposable(X, Y)  # pairs too large to decompose: the general kernel's guard
    if bool(ok.all()):
        return out
    lead, r = X.shape[:-2], X.shape[-1]
    bad = (~ok).flatten().nonzero().squeeze(-1)
    sub = general(X.reshape(-1, r, r)[bad], Y.reshape(-1, r, r)[bad])
    return tuple(t.reshape(-1, r, r).index_copy(0, bad, u).reshape(*lead, r, r) for t, u in zip(out, sub))


# ------------------------------------------------------------------------------- compile=True
# Eager steps with compile=True run the r x r kernel through torch.compile. The kernel sees the
# Grams only, (G, [E,] r, r): its graphs depend on r, E, the dtype, the device, eps, frame and the
# group size G. Dynamo keeps compiled graphs, and counts recompiles against its limit (8), per
# *code object*, so one compiled function shared by every shape crashed a PEFT model with 9 or
# more distinct ranks (rank_pattern). Here every key gets its own copy of the kernel's code object
# (its own cache), and G is padded to a power of two, so a group whose member set varies (MoE
# routing, conditional branches) needs at most log2(G) + 1 graphs. A key that would need more
# than _MAX_GRAPHS_PER_KEY graphs runs eagerly (one warning), never crashes.

_MAX_GRAPHS_PER_KEY = 6
_BACKEND = "inductor"  # tests swap in "eager": same dynamo caches and guards, no code generation
_COMPILED: dict[tuple, Callable[..., tuple[Tensor, ...]]] = {}
_COMPILED_SIZES: dict[tuple, set[int]] = defaultdict(set)
_WARNED: set[tuple] = set()


def _fresh_compiled_kernel() -> Callable[..., tuple[Tensor, ...]]:
    # a new code object (equal to full_kernel's) is what gives this key a cache of its own
    fn = types.FunctionType(
        full_kernel.__code__.replace(), full_kernel.__globals__, full_kernel.__name__,
        full_kernel.__defaults__, full_kernel.__closure__,
    )
    fn.__doc__, fn.__qualname__ = full_kernel.__doc__, full_kernel.__qualname__
    return torch.compile(fn, fullgraph=True, dynamic=False, backend=_BACKEND)


def _bucket(G: int) -> int:
    return 1 << (G - 1).bit_length()


def compiled_full_kernel(
    X: Tensor, Y: Tensor, eps: float, frame: str, solver: str = "eigh", resolved: float = 0.0
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`full_kernel` through a per-key ``torch.compile`` cache, padded to a bounded set of shapes.

    Padding rows are identity Grams (a balanced pair: finite outputs) and are dropped again.
    """
    G = X.shape[0]
    key = (tuple(X.shape[1:]), X.dtype, X.device, float(eps), frame, solver, float(resolved), _BACKEND)
    size = _bucket(G)
    sizes = _COMPILED_SIZES[key]
    if size not in sizes and len(sizes) >= _MAX_GRAPHS_PER_KEY:
        if key not in _WARNED:
            _WARNED.add(key)
            warnings.warn(
                f"reflora compile=True: Grams of shape {key[0]} ({X.dtype}, {X.device}) came in "
                f"{len(sizes) + 1} group sizes; running that kernel eagerly from now on instead of "
                "recompiling it again (results are the same)",
                stacklevel=4,
            )
        return full_kernel(X, Y, eps, frame, solver, resolved)
    fn = _COMPILED.get(key)
    if fn is None:
        fn = _COMPILED[key] = _fresh_compiled_kernel()
    sizes.add(size)
    if size != G:
        eye = torch.eye(X.shape[-1], dtype=X.dtype, device=X.device).expand(size - G, *X.shape[1:])
        X, Y = torch.cat([X, eye]), torch.cat([Y, eye])
    out = fn(X, Y, eps, frame, solver, resolved)
    return out if size == G else tuple(t[:G] for t in out)  # type: ignore[return-value]


def group_kernel(
    X: Tensor, Y: Tensor, *, eps: float, frame: str, solver: str, resolved: float, transform: bool,
    compiled: bool = False,
) -> tuple[Tensor, ...]:
    """The r x r kernel on a stack of Grams: the transform ``(left, right)`` if ``transform``
    (parameter space), else ``(S, S^{-1})`` (gradient space: the frame does not enter ``S``,
    so the paper frame's rotation and Newton-Schulz's square roots are skipped).

    Traced (inside an outer ``torch.compile``): the general kernel, traced into that graph.
    ``compiled``: the per-key compiled kernel. Eager on CPU with ``eigh``: :func:`eager_kernel`,
    two ``eigh`` instead of three or four for pairs whose directions are all live (the same
    answer to round-off; it syncs with the host to decide, which CUDA steps must not, so they
    take the general kernel).
    """
    res = resolved
    if torch.compiler.is_compiling():
        return full_kernel(X, Y, eps, frame, solver, res)[:2] if transform else metric_kernel(X, Y, eps, solver, res)
    if compiled:
        out = compiled_full_kernel(X, Y, eps, frame if transform else "symmetric", solver, res)
        return out[:2] if transform else out[2:]
    if solver == "eigh" and X.device.type == "cpu" and (frame == "paper" or not transform):
        if transform:
            return eager_kernel(
                X, Y, eps, "paper", lambda x, y: full_kernel(x, y, eps, "paper", solver, res)[:2],
                metric=False, resolved=res,
            )
        return eager_kernel(X, Y, eps, None, lambda x, y: metric_kernel(x, y, eps, solver, res), resolved=res)
    return full_kernel(X, Y, eps, frame, solver, res)[:2] if transform else metric_kernel(X, Y, eps, solver, res)
