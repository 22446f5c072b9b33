r"""Adafactor's state follows the factors: torch's ``Adafactor`` and transformers' ``Adafactor``.

Adafactor keeps the second moment of a matrix factored, ``v ~ R C / mean(R)`` (row means ``R``
and column means ``C``), so it is not shaped like its parameter and no element-wise map moves
it. These transports map the factored estimate in factored form (``_factored_second_moments``)
and, for transformers' optimizer, its momentum of normalised updates with it.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from reflora.functional import Transform, map_second_moments
from reflora.pairs import EXPERT_LAYOUTS
from reflora.transport.base import TransportContext, UnsupportedOptimizerError, qualname
from reflora.transport.spec import StackedTransport

__all__ = ["HFAdafactorTransport", "TorchAdafactorTransport"]


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


class _AdafactorTransport(StackedTransport):
    """The shared check: every state key known, and factored moments only where the layout keeps
    Adafactor's factorisation (not a folded conv kernel, not a stack of MoE experts)."""

    KEYS: tuple[str, ...] = ()
    FACTORED = ""

    def keeps_second_moments(self) -> bool:
        return True

    def check(self, state: Mapping[str, Any], param: Tensor, ctx: TransportContext, where: str) -> None:
        keys, factored = self.KEYS, self.FACTORED
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


class TorchAdafactorTransport(_AdafactorTransport):
    """torch's Adafactor: ``row_var`` ``(rows, 1)`` and ``col_var`` ``(1, cols)``, factored."""

    KEYS = ("step", "row_var", "col_var")
    FACTORED = "row_var"

    def transform(self, T: Transform, sA, sB, ctx: TransportContext):
        return _torch_adafactor(T, sA, sB, ctx)


def _torch_adafactor(T: Transform, sA, sB, ctx: TransportContext):
    if "row_var" not in sA:
        return {}, {}
    new = _factored_second_moments(T, (sA["row_var"], sA["col_var"]), (sB["row_var"], sB["col_var"]), ctx)
    if new is None:
        return {}, {}
    (rA, cA), (rB, cB) = new
    return {"row_var": rA, "col_var": cA}, {"row_var": rB, "col_var": cB}


class HFAdafactorTransport(_AdafactorTransport):
    r"""transformers' Adafactor: ``exp_avg_sq_row`` ``(rows,)`` / ``exp_avg_sq_col`` ``(cols,)``.

    The factored moment is the same estimate as torch's, stored without the kept dims (shared
    math: ``_factored_second_moments``); its unfactored ``exp_avg_sq`` (1-D parameters only)
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

    KEYS = ("step", "RMS", "exp_avg", "exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq")
    FACTORED = "exp_avg_sq_row"

    def transform(self, T: Transform, sA, sB, ctx: TransportContext):
        return _hf_adafactor(T, sA, sB, ctx)


def _hf_adafactor(T: Transform, sA, sB, ctx: TransportContext):
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
