r"""Optimizer-state transport: how an optimizer's per-parameter state follows a refactoring.

A parameter-space refactor replaces ``(A, B)`` by ``(P^T A, B P^{-T})``. The optimizer's state
was accumulated in the old coordinates and must be moved into the new ones, or the next step
mixes the two. Each optimizer class declares, per state key, what kind of quantity it holds:

* ``"first"``: linear in past gradients (momentum, Adam's ``exp_avg``). Mapped exactly like a
  gradient: ``P^{-1} m_A``, ``m_B P`` (:func:`reflora.functional.map_first_moments`).
* ``"second"``: element-wise second moments (``exp_avg_sq``, Adagrad's ``sum``). No exact map
  exists for a non-diagonal ``P``; the ``second_moment`` rule of :func:`reflora.attach` decides
  (``"square"`` by default, exact for the scalar variant; see
  :func:`reflora.functional.map_second_moments`).
* ``"keep"``: left alone (step counters, and quantities already invariant to a rescaling, such
  as RMSprop's momentum of normalised updates).

Optimizers with a more structured state register a function instead (Adafactor's factored
second moment below). Lookup walks the optimizer's MRO, so subclasses inherit their parent's
transport. An optimizer nobody registered cannot be used with a parameter-space mode; the
gradient-space modes need no transport and work with any optimizer.

Example:
    >>> import torch
    >>> from reflora.transport import register_state_transport
    >>> class MyAdam(torch.optim.Optimizer):  # a custom optimizer with Adam-like state
    ...     pass
    >>> _ = register_state_transport(MyAdam, {"step": "keep", "m": "first", "v": "second"})
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Mapping, Union

import torch
from torch import Tensor

from reflora.functional import Transform, map_first_moments, map_second_moments
from reflora.pairs import EXPERT_LAYOUTS

__all__ = [
    "StateKind",
    "TransportContext",
    "TransportFn",
    "get_state_transport",
    "register_state_transport",
    "registered_optimizers",
]

StateKind = Literal["first", "second", "keep"]
_KINDS = ("first", "second", "keep")


@dataclass(frozen=True)
class TransportContext:
    """What a transport function needs besides the tensors.

    Attributes:
        optimizer: the optimizer whose state is being moved (for error messages).
        second_moment: the rule for element-wise second moments (``"square"``, ``"keep"``,
            ``"reset"``).
        layout: the stored layouts of A and B (see :mod:`reflora.pairs`). State tensors shaped
            like their parameter arrive already viewed in the core's layout; this only matters
            to transports with differently shaped state (Adafactor's ``row_var`` / ``col_var``).
    """

    optimizer: torch.optim.Optimizer
    second_moment: str
    layout: tuple[str, str] = ("plain", "plain")


# fn(transform, state_A, state_B, ctx) -> (new_state_A, new_state_B). States hold stacked tensors
# of a group of same-shape pairs, in the core's layout: A-states (G, r, m) (or (G, r, 1)/(G, 1, m)
# for factored states), B-states (G, n, r); pairs stacking E MoE experts add an expert dimension,
# (G, E, r, m) / (G, E, n, r), and so does the transform. Keys missing from the result are left
# unchanged.
TransportFn = Callable[
    [Transform, Mapping[str, Tensor], Mapping[str, Tensor], TransportContext],
    tuple[dict[str, Tensor], dict[str, Tensor]],
]
Spec = Union[Mapping[str, StateKind], TransportFn]

_REGISTRY: dict[type, TransportFn] = {}


def _from_spec(cls: type, spec: Mapping[str, StateKind]) -> TransportFn:
    for key, kind in spec.items():
        if kind not in _KINDS:
            raise ValueError(
                f"state key {key!r} of {cls.__name__}: kind must be one of {_KINDS}; got {kind!r}"
            )
    spec = dict(spec)

    def transport(T, sA, sB, ctx):
        outA: dict[str, Tensor] = {}
        outB: dict[str, Tensor] = {}
        for key in sorted(set(sA) | set(sB)):
            kind = spec.get(key)
            if kind is None:
                raise KeyError(
                    f"{type(ctx.optimizer).__name__} holds state {key!r} that its registered "
                    f"transport does not know; declare it with register_state_transport("
                    f"{type(ctx.optimizer).__name__}, {{..., {key!r}: 'first' | 'second' | 'keep'}}, "
                    "overwrite=True)"
                )
            if kind == "keep":
                continue
            if key not in sA or key not in sB:
                raise KeyError(f"state {key!r} is present for only one factor of a pair")
            if kind == "first":
                outA[key], outB[key] = map_first_moments(T, sA[key], sB[key])
            else:
                outA[key], outB[key] = map_second_moments(T, sA[key], sB[key], rule=ctx.second_moment)
        return outA, outB

    transport.__name__ = f"transport_{cls.__name__}"
    transport.spec = spec  # type: ignore[attr-defined]
    return transport


def register_state_transport(optimizer_cls: type, spec: Spec, *, overwrite: bool = False) -> TransportFn:
    """Declare how the state of ``optimizer_cls`` follows a parameter-space refactor.

    Args:
        optimizer_cls: a ``torch.optim.Optimizer`` subclass.
        spec: ``{state_key: "first" | "second" | "keep"}``, or a function
            ``fn(transform, state_A, state_B, ctx) -> (new_state_A, new_state_B)``.
        overwrite: replace an existing registration.

    Returns:
        The transport function that was registered.
    """
    if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)):
        raise TypeError(f"optimizer_cls must be a torch.optim.Optimizer subclass; got {optimizer_cls!r}")
    if optimizer_cls in _REGISTRY and not overwrite:
        raise ValueError(
            f"a state transport for {optimizer_cls.__name__} is already registered; pass overwrite=True"
        )
    if isinstance(spec, Mapping):
        fn = _from_spec(optimizer_cls, spec)
    elif callable(spec):
        fn = spec
    else:
        raise TypeError(f"spec must be a mapping of state keys to kinds or a callable; got {type(spec).__name__}")
    _REGISTRY[optimizer_cls] = fn
    return fn


def get_state_transport(optimizer: torch.optim.Optimizer) -> TransportFn | None:
    """The transport registered for ``type(optimizer)`` or its nearest registered base class."""
    for cls in type(optimizer).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls]
        if cls is torch.optim.Optimizer:
            break
    return None


def registered_optimizers() -> list[str]:
    return sorted(c.__name__ for c in _REGISTRY)


def _adafactor_transport(T: Transform, sA, sB, ctx: TransportContext):
    """Adafactor keeps ``v ~ R C / mean(R)`` factored (``row_var`` R, ``col_var`` C).

    The ``"square"`` rule maps the full estimate ``v`` by ``Q = (P^{-1})^{o2}`` from the left
    (A) or ``P^{o2}`` from the right (B); both stay factored: for A, ``R' = Q R`` and
    ``C' = C mean(R') / mean(R)``; for B, ``C' = C P^{o2}``. Exact for the scalar variant.
    Layout: states arrive in the core's layout, so A's row factor is ``(G, r, 1)``.
    """
    outA: dict[str, Tensor] = {}
    outB: dict[str, Tensor] = {}
    rule = ctx.second_moment
    for key in set(sA) | set(sB):
        if key not in ("step", "row_var", "col_var"):
            raise KeyError(f"Adafactor state {key!r} has no transport (1-D 'variance' cannot be a factor)")
    if "row_var" not in sA:
        return outA, outB
    if rule == "keep":
        return outA, outB
    if rule == "reset":
        for out, s in ((outA, sA), (outB, sB)):
            out["row_var"] = torch.zeros_like(s["row_var"])
            out["col_var"] = torch.zeros_like(s["col_var"])
        return outA, outB
    if any(lay in EXPERT_LAYOUTS for lay in ctx.layout):
        raise NotImplementedError(
            "Adafactor factors the second moment of the whole stored (E * r, m) expert stack, not "
            "per expert, so it cannot follow a per-expert refactor; use space='gradient' for MoE "
            "expert LoRA"
        )
    if "flatten" in ctx.layout:
        raise NotImplementedError(
            "Adafactor factors the second moment of a convolution kernel over its last two axes, "
            "which the folded (r, in * k) layout does not keep; use space='gradient' for conv LoRA"
        )
    left, right = T
    cd = left.dtype
    # The stored row_var (rows, 1) / col_var (1, cols) arrive unviewed. In the core's layout the
    # row factor R is (G, rows, 1); for a factor stored transposed the stored col_var, transposed,
    # is the core's R and vice versa.
    tA, tB = (lay == "transposed" for lay in ctx.layout)
    keysA = ("col_var", "row_var") if tA else ("row_var", "col_var")
    keysB = ("col_var", "row_var") if tB else ("row_var", "col_var")
    sA = {k: (v.mT if tA else v) for k, v in sA.items()}
    sB = {k: (v.mT if tB else v) for k, v in sB.items()}

    R, C = sA[keysA[0]].to(cd), sA[keysA[1]].to(cd)
    QA = right.mT.square()
    R2 = QA * R if QA.shape[-1] == 1 else QA @ R
    C2 = C * (R2.mean(-2, keepdim=True) / R.mean(-2, keepdim=True).clamp_min(torch.finfo(cd).tiny))
    outA[keysA[0]], outA[keysA[1]] = R2.to(sA[keysA[0]].dtype), C2.to(sA[keysA[1]].dtype)
    if tA:
        outA = {k: v.mT for k, v in outA.items()}

    C = sB[keysB[1]].to(cd)
    QB = left.mT.square()
    C2 = C * QB if QB.shape[-1] == 1 else C @ QB
    outB[keysB[1]] = C2.to(sB[keysB[1]].dtype)
    if tB:
        outB = {k: v.mT for k, v in outB.items()}
    return outA, outB


_ADAM = {"step": "keep", "exp_avg": "first", "exp_avg_sq": "second", "max_exp_avg_sq": "second"}
register_state_transport(torch.optim.SGD, {"momentum_buffer": "first"})
register_state_transport(torch.optim.Adam, _ADAM)
register_state_transport(torch.optim.AdamW, _ADAM)
register_state_transport(torch.optim.NAdam, {**_ADAM, "mu_product": "keep"})
register_state_transport(torch.optim.RAdam, _ADAM)
# RMSprop's momentum buffer accumulates g / sqrt(v): invariant to a per-tensor rescaling, so
# "keep" is exact for the scalar variant (eps aside); no exact map exists for a full P.
register_state_transport(
    torch.optim.RMSprop,
    {"step": "keep", "square_avg": "second", "grad_avg": "first", "momentum_buffer": "keep"},
)
register_state_transport(torch.optim.Adagrad, {"step": "keep", "sum": "second"})
if hasattr(torch.optim, "Adafactor"):
    register_state_transport(torch.optim.Adafactor, _adafactor_transport)
