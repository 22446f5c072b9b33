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

A kind applies to state tensors shaped like their parameter only: a ``"first"`` or
``"second"`` key holding anything else (Adafactor-style 1-D or factored row / column moments)
raises :class:`UnsupportedOptimizerError` before anything is modified, because there is no
element-wise map for it and silently leaving it in the old coordinates would be wrong. Scalar
state (step counters) belongs under ``"keep"``; a key the spec does not declare raises too.

Optimizers with a more structured state register a function instead (torch's and
transformers' Adafactor, whose factored second moment is mapped in factored form, below).
Lookup walks the optimizer's MRO, so subclasses inherit their parent's transport. An optimizer
nobody registered cannot be used with a parameter-space mode; the gradient-space modes need no
transport and work with any optimizer. Optimizers of optional packages (transformers'
``Adafactor``) are recognised by qualified class name on first lookup, so ``import reflora``
imports none of those packages.

Example:
    >>> import torch
    >>> from reflora.transport import register_state_transport
    >>> class MyAdam(torch.optim.Optimizer):  # a custom optimizer with Adam-like state
    ...     pass
    >>> _ = register_state_transport(MyAdam, {"step": "keep", "m": "first", "v": "second"})
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping, Union

import torch
from torch import Tensor

from reflora.functional import Transform, map_first_moments, map_second_moments
from reflora.pairs import EXPERT_LAYOUTS

__all__ = [
    "StateKind",
    "TransportContext",
    "TransportFn",
    "UnsupportedOptimizerError",
    "STATE_KINDS",
    "StateKindMap",
    "check_transportable",
    "get_state_transport",
    "keeps_second_moments",
    "qualname",
    "register_lazy_state_transport",
    "register_state_transport",
    "state_kinds",
    "registered_optimizers",
]

StateKind = Literal["first", "second", "keep"]


class UnsupportedOptimizerError(TypeError):
    """The optimizer, or the state it holds, cannot be used with the requested RefLoRA mode."""


def qualname(cls_or_obj: Any) -> str:
    """``module.qualname`` of a class (or of an object's class).

    Error messages use it because short names are ambiguous: ``torch.optim.Adafactor`` and
    ``transformers.optimization.Adafactor`` are different classes with different state.
    """
    cls = cls_or_obj if isinstance(cls_or_obj, type) else type(cls_or_obj)
    return f"{cls.__module__}.{cls.__qualname__}"


@dataclass(frozen=True)
class TransportContext:
    """What a transport function needs besides the tensors.

    Attributes:
        optimizer: the optimizer whose state is being moved (for error messages).
        second_moment: the rule for element-wise second moments (``"square"``, ``"keep"``,
            ``"reset"``).
        layout: the stored layouts of A and B (see :mod:`reflora.pairs`). State tensors shaped
            like their parameter arrive already viewed in the core's layout; this only matters
            to transports with differently shaped state (Adafactor's row / column moments).
    """

    optimizer: torch.optim.Optimizer
    second_moment: str
    layout: tuple[str, str] = ("plain", "plain")


@dataclass(frozen=True)
class StateKindMap:
    """How one kind of state follows a refactor ``(left, right) = (P^T, P^{-T})``.

    Attributes:
        apply: ``apply(T, state_A, state_B, rule) -> (new_A, new_B)`` on stacked core-layout
            tensors, or ``None``: left as it is.
        product: the same map as products ``x_A <- T_A x_A``, ``x_B <- x_B T_B``:
            ``product(left, right, rule) -> (T_A, T_B)``; ``None``: left as it is;
            ``NotImplemented``: not a product (use ``apply``). The hook folds these into the
            products it applies to the factors and gradients.
    """

    apply: Callable[[Transform, Tensor, Tensor, str], "tuple[Tensor, Tensor] | None"]
    product: Callable[[Tensor, Tensor, str], Any]


def _second_product(left: Tensor, right: Tensor, rule: str) -> Any:
    if rule == "keep":
        return None
    if rule == "square":
        return right.mT.square(), left.mT.square()
    return NotImplemented


#: The one table of state kinds. What a ``"first"`` / ``"second"`` / ``"keep"`` entry of a
#: registration (:func:`register_state_transport`) does to the state under a refactor. Used by
#: the spec transports, the hook's folded products and :mod:`reflora.func`.
STATE_KINDS: dict[str, StateKindMap] = {
    # linear in past gradients: mapped like a gradient, P^{-1} m_A, m_B P
    "first": StateKindMap(
        apply=lambda T, a, b, rule: map_first_moments(T, a, b),
        product=lambda left, right, rule: (right.mT, left.mT),
    ),
    # element-wise second moments: by the second_moment rule
    "second": StateKindMap(
        apply=lambda T, a, b, rule: None if rule == "keep" else map_second_moments(T, a, b, rule=rule),
        product=_second_product,
    ),
    "keep": StateKindMap(apply=lambda T, a, b, rule: None, product=lambda left, right, rule: None),
}


# fn(transform, state_A, state_B, ctx) -> (new_state_A, new_state_B). States hold stacked tensors
# of a group of same-shape pairs: every state tensor with at least one dimension, those shaped
# like their parameter in the core's layout (A-states (G, r, m), B-states (G, n, r); pairs
# stacking E MoE experts add an expert dimension, (G, E, r, m) / (G, E, n, r), and so does the
# transform), the others
# (factored moments) stacked as stored. Scalar state (0-d tensors, numbers) is not passed and
# stays as it is. Keys missing from the result are left unchanged, so a function must return
# every key it does not deliberately keep.
#
# A function may carry a ``check(state, param, ctx, where)`` attribute: it is called with one
# parameter's raw state dict for every pair before anything is modified (at attach time when
# the optimizer already has state, and before every refactor), and raises if the function could
# not move that state; that way a transport never fails half-way through a model.
TransportFn = Callable[
    [Transform, Mapping[str, Tensor], Mapping[str, Tensor], TransportContext],
    tuple[dict[str, Tensor], dict[str, Tensor]],
]
Spec = Union[Mapping[str, StateKind], TransportFn]

_REGISTRY: dict[type, TransportFn] = {}


def _unknown_key(optimizer: Any, key: str) -> str:
    return (
        f"{qualname(optimizer)} holds state {key!r} that its registered transport does not know; "
        f"declare it with reflora.transport.register_state_transport({type(optimizer).__name__}, "
        f"{{..., {key!r}: 'first' | 'second' | 'keep'}}, overwrite=True)"
    )


def _from_spec(cls: type, spec: Mapping[str, StateKind]) -> TransportFn:
    for key, kind in spec.items():
        if kind not in STATE_KINDS:
            raise ValueError(
                f"state key {key!r} of {qualname(cls)}: kind must be one of {tuple(STATE_KINDS)}; got {kind!r}"
            )
    spec = dict(spec)

    def check(state: Mapping[str, Any], param: Tensor, ctx: TransportContext, where: str) -> None:
        for key, value in state.items():
            kind = spec.get(key)
            if kind is None:
                raise KeyError(_unknown_key(ctx.optimizer, key))
            if kind == "keep" or value is None:
                continue
            if not isinstance(value, Tensor) or value.shape != param.shape:
                got = f"shape {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
                raise UnsupportedOptimizerError(
                    f"{qualname(ctx.optimizer)} holds state {key!r} ({got}) for {where} of shape "
                    f"{tuple(param.shape)}, which a {kind!r} kind cannot move (it maps state shaped like "
                    "its parameter only): use space='gradient', or register a function transport with "
                    f"reflora.transport.register_state_transport({type(ctx.optimizer).__name__}, fn, overwrite=True)"
                )

    def transport(T, sA, sB, ctx):
        outA: dict[str, Tensor] = {}
        outB: dict[str, Tensor] = {}
        for key in sorted(set(sA) | set(sB)):
            kind = spec.get(key)
            if kind is None:
                raise KeyError(_unknown_key(ctx.optimizer, key))
            if kind == "keep":
                continue
            if key not in sA or key not in sB:
                raise KeyError(f"state {key!r} is present for only one factor of a pair")
            new = STATE_KINDS[kind].apply(T, sA[key], sB[key], ctx.second_moment)
            if kind == "second" and new is None:  # the "keep" rule: the moments as they were
                new = (sA[key], sB[key])
            if new is not None:
                outA[key], outB[key] = new
        return outA, outB

    transport.__name__ = f"transport_{cls.__name__}"
    transport.spec = spec  # type: ignore[attr-defined]
    transport.check = check  # type: ignore[attr-defined]
    return transport


# Transports for optimizers of optional packages: (top-level package, class qualname, display
# name, transport). They are matched by name on first lookup of such an optimizer, which needs no
# import, so `import reflora` never imports the package (tests/test_packaging.py).
_LAZY: list[tuple[str, str, str, TransportFn]] = []


def _lookup(cls: type) -> TransportFn | None:
    fn = _REGISTRY.get(cls)
    if fn is None:
        package = cls.__module__.split(".")[0]
        for pkg, qualname, _, lazy in _LAZY:
            if package == pkg and cls.__qualname__ == qualname:
                fn = _REGISTRY[cls] = lazy
                break
    return fn


def register_lazy_state_transport(package: str, class_qualname: str, transport: TransportFn,
                                  display: str | None = None) -> None:
    """Register ``transport`` for a class of an optional package, matched by name on first lookup.

    The class is not imported: an optimizer whose class has ``__qualname__ == class_qualname``
    and whose module lies in the top-level ``package`` gets ``transport`` (this is how
    :mod:`reflora.lowbit` covers bitsandbytes and torchao without importing them).

    Args:
        package: the top-level package, e.g. ``"bitsandbytes"``.
        class_qualname: the class's ``__qualname__``, e.g. ``"AdamW8bit"``.
        transport: a transport function or object (see ``TransportFn``).
        display: the name :func:`registered_optimizers` lists (default: the transport's
            ``display`` attribute, else ``package.class_qualname``).
    """
    if any(pkg == package and name == class_qualname for pkg, name, _, _ in _LAZY):
        raise ValueError(f"a lazy state transport for {class_qualname!r} of package {package!r} is already registered")
    shown = display or getattr(transport, "display", None) or f"{package}.{class_qualname}"
    _LAZY.append((package, class_qualname, shown, transport))


def register_state_transport(optimizer_cls: type, spec: Spec, *, overwrite: bool = False) -> TransportFn:
    """Declare how the state of ``optimizer_cls`` follows a parameter-space refactor.

    Args:
        optimizer_cls: a ``torch.optim.Optimizer`` subclass.
        spec: ``{state_key: "first" | "second" | "keep"}`` (``"first"`` / ``"second"`` keys
            must hold tensors shaped like their parameter), or a function
            ``fn(transform, state_A, state_B, ctx) -> (new_state_A, new_state_B)``, optionally
            with a ``check(state, param, ctx, where)`` attribute (see ``TransportFn`` above).
        overwrite: replace an existing registration.

    Returns:
        The transport function that was registered.
    """
    if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)):
        raise TypeError(f"optimizer_cls must be a torch.optim.Optimizer subclass; got {optimizer_cls!r}")
    if _lookup(optimizer_cls) is not None and not overwrite:
        raise ValueError(
            f"a state transport for {qualname(optimizer_cls)} is already registered; pass overwrite=True"
        )
    if isinstance(spec, Mapping):
        fn = _from_spec(optimizer_cls, spec)
    elif callable(spec):
        fn = spec
    else:
        raise TypeError(f"spec must be a mapping of state keys to kinds or a callable; got {type(spec).__name__}")
    _REGISTRY[optimizer_cls] = fn
    return fn


def get_state_transport(optimizer: torch.optim.Optimizer | type) -> TransportFn | None:
    """The transport registered for ``type(optimizer)`` (or the class ``optimizer``) or its
    nearest registered base class."""
    for cls in (optimizer if isinstance(optimizer, type) else type(optimizer)).__mro__:
        fn = _lookup(cls)
        if fn is not None:
            return fn
        if cls is torch.optim.Optimizer:
            break
    return None


def state_kinds(optimizer: torch.optim.Optimizer | type) -> dict[str, StateKind] | None:
    """``{state key: kind}`` of the spec registered for ``optimizer`` (or its nearest registered
    base class); ``None`` for a function transport or none."""
    spec = getattr(get_state_transport(optimizer), "spec", None)
    return None if spec is None else dict(spec)


def keeps_second_moments(transport: Any) -> bool:
    """Whether a registered transport moves element-wise second moments (an Adam-like optimizer).

    A spec transport says so with a ``"second"`` kind (Adam, AdamW, NAdam, RAdam, RMSprop,
    Adagrad); a function transport is taken to (the built-in ones move Adafactor's factored
    second moments). SGD's spec holds a ``"first"`` kind only. A low-bit transport
    (:mod:`reflora.lowbit`) says so with its ``kinds`` (bitsandbytes' Lion: ``"first"`` only)."""
    spec = getattr(transport, "spec", None)
    if spec is None:  # a low-bit transport (reflora.lowbit) declares the kinds of its moments
        spec = getattr(transport, "kinds", None)
    return spec is None or "second" in spec.values()


def check_transportable(opt: torch.optim.Optimizer, transport: Any, second_moment: str, pairs: Any) -> None:
    """Raise (before anything is modified) if ``transport`` cannot move the state of ``pairs``
    (:class:`reflora.LoRAPair` s) that ``opt`` holds now."""
    check = getattr(transport, "check", None)
    if check is None:
        return
    for pair in pairs:
        ctx = TransportContext(opt, second_moment, pair.layout)
        for label, param in (("A", pair.A), ("B", pair.B)):
            state = opt.state.get(param)
            if state:
                check(state, param, ctx, f"factor {label} of pair {pair.name!r}")


def registered_optimizers() -> list[str]:
    """Qualified names of the optimizer classes with a registered transport."""
    return sorted({qualname(c) for c in _REGISTRY} | {display for _, _, display, _ in _LAZY})


# ------------------------------------------------------------------------------- Adafactor


def _factored_second_moments(
    T: Transform, factors_A: tuple[Tensor, Tensor], factors_B: tuple[Tensor, Tensor], ctx: TransportContext
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]] | None:
    r"""Map Adafactor's factored second moment ``v ~ R C / mean(R)`` of a group of pairs.

    ``R`` (row means of ``v``) and ``C`` (column means) stay factored. The ``"square"`` rule maps
    the full estimate by ``Q = (P^{-1})^{o2}`` from the left (A) or ``P^{o2}`` from the right
    (B); the new factors are the row and column means of the mapped estimate: for A,
    ``R' = Q R`` and ``C' = C mean(R') / mean(R)``; for B, ``C' = C P^{o2}`` and
    ``R' = R mean(C') / mean(C)``. Both factors must move: the optimizer mixes each with fresh
    gradient statistics, so one left in the old scale skews every later estimate. Exact for the
    scalar variant (Adafactor's ``eps`` aside): A's factors become ``R / p^2``, ``C / p^2`` and
    B's ``R p^2``, ``C p^2``, what the optimizer would hold had it seen the rescaled gradients.

    Args:
        T: the group's transform.
        factors_A: ``(row, col)`` of A's state stacked over the group, as stored (the factor's
            stored layout) with kept dims: row ``(G, rows, 1)``, col ``(G, 1, cols)``.
        factors_B: the same for B.
        ctx: the transport context (rule, layouts).

    Returns:
        New ``((row_A, col_A), (row_B, col_B))`` in the same form, or ``None`` for the
        ``"keep"`` rule.
    """
    rule = ctx.second_moment
    if rule == "keep":
        return None
    if rule == "reset":
        return tuple(tuple(torch.zeros_like(t) for t in f) for f in (factors_A, factors_B))  # type: ignore[return-value]
    if "flatten" in ctx.layout:
        raise UnsupportedOptimizerError(_ADAFACTOR_CONV)
    if any(lay in EXPERT_LAYOUTS for lay in ctx.layout):
        raise UnsupportedOptimizerError(_ADAFACTOR_EXPERTS)
    left, right = T
    cd = left.dtype
    tiny = torch.finfo(cd).tiny

    def to_core(factors, transposed):
        # a factor stored transposed has the core's row factor in its stored column factor
        row, col = (f.to(cd) for f in factors)
        return (col.mT, row.mT) if transposed else (row, col)

    def to_stored(R, C, transposed, like):
        out = (C.mT, R.mT) if transposed else (R, C)
        return tuple(o.to(ref.dtype) for o, ref in zip(out, like))

    tA, tB = (lay == "transposed" for lay in ctx.layout)
    R, C = to_core(factors_A, tA)
    Q = right.mT.square()
    R2 = Q * R if Q.shape[-1] == 1 else Q @ R
    C2 = C * (R2.mean(-2, keepdim=True) / R.mean(-2, keepdim=True).clamp_min(tiny))
    new_A = to_stored(R2, C2, tA, factors_A)

    R, C = to_core(factors_B, tB)
    Q = left.mT.square()
    C2 = C * Q if Q.shape[-1] == 1 else C @ Q
    R2 = R * (C2.mean(-1, keepdim=True) / C.mean(-1, keepdim=True).clamp_min(tiny))
    new_B = to_stored(R2, C2, tB, factors_B)
    return new_A, new_B  # type: ignore[return-value]


_ADAFACTOR_CONV = (
    "Adafactor factors the second moment of a convolution kernel over its last two axes, which the "
    "folded (r, in * k) layout of a conv LoRA factor does not keep; use space='gradient' for conv LoRA"
)


_ADAFACTOR_EXPERTS = (
    "Adafactor factors the second moment of the whole stored (E * r, m) expert stack, not per "
    "expert, so it cannot follow a per-expert refactor; use space='gradient' for MoE expert LoRA"
)


def _adafactor_check(keys: tuple[str, ...], factored: str) -> Callable[..., None]:
    def check(state: Mapping[str, Any], param: Tensor, ctx: TransportContext, where: str) -> None:
        unknown = sorted(set(state) - set(keys))
        if unknown:
            raise UnsupportedOptimizerError(
                f"{qualname(ctx.optimizer)} holds state {unknown} for {where} of shape "
                f"{tuple(param.shape)} that its transport does not know (it moves {list(keys)}); "
                "register a transport that does with reflora.transport.register_state_transport("
                f"{type(ctx.optimizer).__name__}, fn, overwrite=True), or use space='gradient'"
            )
        if factored in state and ctx.second_moment not in ("keep", "reset"):
            if "flatten" in ctx.layout:
                raise UnsupportedOptimizerError(f"{qualname(ctx.optimizer)}, {where}: {_ADAFACTOR_CONV}")
            if any(lay in EXPERT_LAYOUTS for lay in ctx.layout):
                raise UnsupportedOptimizerError(f"{qualname(ctx.optimizer)}, {where}: {_ADAFACTOR_EXPERTS}")

    return check


def _adafactor_transport(T: Transform, sA, sB, ctx: TransportContext):
    """torch's Adafactor: ``row_var`` ``(rows, 1)`` and ``col_var`` ``(1, cols)``, factored."""
    if "row_var" not in sA:
        return {}, {}
    new = _factored_second_moments(T, (sA["row_var"], sA["col_var"]), (sB["row_var"], sB["col_var"]), ctx)
    if new is None:
        return {}, {}
    (rA, cA), (rB, cB) = new
    return {"row_var": rA, "col_var": cA}, {"row_var": rB, "col_var": cB}


_adafactor_transport.check = _adafactor_check(("step", "row_var", "col_var"), "row_var")  # type: ignore[attr-defined]


def _hf_adafactor_transport(T: Transform, sA, sB, ctx: TransportContext):
    r"""transformers' Adafactor: ``exp_avg_sq_row`` ``(rows,)`` / ``exp_avg_sq_col`` ``(cols,)``.

    The factored moment is the same estimate as torch's, stored without the kept dims (shared
    math: :func:`_factored_second_moments`); its unfactored ``exp_avg_sq`` (1-D parameters only)
    is an element-wise second moment. ``step`` and ``RMS`` (recomputed from the parameter before
    use) are kept.

    ``exp_avg`` (with ``beta1``) is *not* Adam's first moment: it averages the normalised updates
    ``u = lr g / sqrt(v)``. Mapping it like a gradient would be wrong for the scalar variant
    (``u`` does not change under a per-tensor rescaling), keeping it is wrong for a full ``P``
    (its rows belong to the old rank basis; measured: training stalls). It is mapped the way the
    refactor maps ``u`` itself for the current ``v``: with ``g = sqrt(v) u``,
    ``u'_A = (P^{-1} (sqrt(v_A) u_A)) / sqrt(v'_A)`` and
    ``u'_B = ((sqrt(v_B) u_B) P) / sqrt(v'_B)``; for a factored ``v`` only its rank-indexed
    factor enters (the other cancels). Exact for the current step's update, and for the scalar
    variant (``exp_avg`` unchanged: what Adafactor would hold had it seen the rescaled gradients,
    with ``scale_parameter=False``); past updates were normalised by past ``v``, so for a full
    ``P`` it is an approximation, as every element-wise moment map is.
    """
    outA: dict[str, Tensor] = {}
    outB: dict[str, Tensor] = {}
    row, col = "exp_avg_sq_row", "exp_avg_sq_col"
    tA, tB = (lay == "transposed" for lay in ctx.layout)
    # the rank-indexed factor of v, old and new, in the core's layout: A's (G, r, 1), B's (G, 1, r)
    rank_A = rank_B = None
    if row in sA:
        new = _factored_second_moments(
            T,
            (sA[row].unsqueeze(-1), sA[col].unsqueeze(-2)),
            (sB[row].unsqueeze(-1), sB[col].unsqueeze(-2)),
            ctx,
        )
        if new is not None:
            (rA, cA), (rB, cB) = new
            outA[row], outA[col] = rA.squeeze(-1), cA.squeeze(-2)
            outB[row], outB[col] = rB.squeeze(-1), cB.squeeze(-2)
        keyA, keyB = (col if tA else row), (row if tB else col)
        rank_A = (sA[keyA], outA.get(keyA, sA[keyA]), -1)
        rank_B = (sB[keyB], outB.get(keyB, sB[keyB]), -2)
    if "exp_avg_sq" in sA:
        outA["exp_avg_sq"], outB["exp_avg_sq"] = map_second_moments(
            T, sA["exp_avg_sq"], sB["exp_avg_sq"], rule=ctx.second_moment
        )
        rank_A = (sA["exp_avg_sq"], outA["exp_avg_sq"], None)
        rank_B = (sB["exp_avg_sq"], outB["exp_avg_sq"], None)
    if "exp_avg" in sA and rank_A is not None and rank_B is not None and ctx.second_moment != "reset":
        left, right = T
        cd = left.dtype
        tiny = torch.finfo(cd).tiny

        def scales(old, new, dim):
            old, new = (x.to(cd) if dim is None else x.to(cd).unsqueeze(dim) for x in (old, new))
            return old.clamp_min(0).sqrt(), new.clamp_min(tiny).sqrt()

        def mm(X, Y):  # the scalar variant's transforms are (G, 1, 1)
            return X * Y if X.shape[-1] == 1 or Y.shape[-2] == 1 else X @ Y

        s_old, s_new = scales(*rank_A)
        mA = sA["exp_avg"]
        outA["exp_avg"] = (mm(right.mT, s_old * mA.to(cd)) / s_new).to(mA.dtype)
        s_old, s_new = scales(*rank_B)
        mB = sB["exp_avg"]
        outB["exp_avg"] = (mm(s_old * mB.to(cd), left.mT) / s_new).to(mB.dtype)
    return outA, outB


_hf_adafactor_transport.check = _adafactor_check(  # type: ignore[attr-defined]
    ("step", "RMS", "exp_avg", "exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq"), "exp_avg_sq_row"
)


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
_LAZY.append(("transformers", "Adafactor", "transformers.optimization.Adafactor", _hf_adafactor_transport))
