r"""Transports of 32-bit state: declared key by key (:class:`SpecTransport`) or as a function.

Both move a group's state stacked per key: every state tensor of the group's pairs under one key
is stacked (those shaped like their parameter viewed in the core's layout, ``(G, [E,] r, m)`` for
A and ``(G, [E,] n, r)`` for B), transformed, and written back into the same tensors.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from reflora.distributed import local
from reflora.functional import Transform
from reflora.pairs import LoRAPair, to_core
from reflora.transport.base import (
    STATE_KINDS,
    Chunks,
    StateKind,
    StateTransport,
    TransportContext,
    UnsupportedOptimizerError,
    qualname,
)

__all__ = ["FunctionTransport", "SpecTransport", "StackedTransport", "TransportFn"]

# fn(transform, state_A, state_B, ctx) -> (new_state_A, new_state_B), on stacked tensors (see
# StackedTransport.transform).
TransportFn = Callable[
    [Transform, Mapping[str, Tensor], Mapping[str, Tensor], TransportContext],
    tuple[dict[str, Tensor], dict[str, Tensor]],
]


class StackedTransport(StateTransport):
    """A transport that moves a group's state stacked per key: :meth:`move` stacks, calls
    :meth:`transform`, writes back. Subclasses give :meth:`transform` and :meth:`reflora.transport.StackedTransport.selects`."""

    def transform(
        self, T: Transform, sA: Mapping[str, Tensor], sB: Mapping[str, Tensor], ctx: TransportContext
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The group's new state from the stacked old one: ``(new_state_A, new_state_B)``.

        ``sA`` / ``sB`` hold the keys :meth:`reflora.transport.StackedTransport.selects` chose, stacked over the group: tensors shaped
        like their parameter in the core's layout (``(G, [E,] r, m)`` / ``(G, [E,] n, r)``; ``T``
        is stacked the same way), others (factored moments) as stored. Keys missing from the
        result are left unchanged.
        """
        raise NotImplementedError

    def selects(self, key: str, values: list[Any]) -> bool:
        """Whether the state under ``key`` (one value per factor of the group) is passed to :meth:`transform`."""
        return all(isinstance(v, Tensor) and v.dim() >= 1 for v in values)

    def __call__(self, T: Transform, sA: Any, sB: Any, ctx: TransportContext) -> Any:
        """:meth:`transform` (a registered transport used to be a plain function of the stacked state)."""
        return self.transform(T, sA, sB, ctx)

    def move(
        self, optimizer: torch.optim.Optimizer, pairs: list[LoRAPair], T: Transform, rule: str,
        gate: Tensor | None = None,
    ) -> None:
        state = optimizer.state
        layA, layB = pairs[0].layout
        experts = pairs[0].experts

        def view_for(layout: str, param_shape: torch.Size) -> Callable[[Tensor], Tensor]:
            # state shaped like the parameter gets the parameter's view; other shapes (factored
            # states) are left to the transform, which sees the layout in its context
            # (distributed hook: a DTensor state is moved through its local shard)
            return lambda v: to_core(local(v), layout, experts) if v.shape == param_shape else v

        sides = []
        for param_of, view in ((lambda p: p.A, view_for(layA, pairs[0].A.shape)),
                               (lambda p: p.B, view_for(layB, pairs[0].B.shape))):
            stacked = {}
            for key in state[param_of(pairs[0])].keys():
                values = [state[param_of(p)].get(key) for p in pairs]
                if self.selects(key, values):
                    stacked[key] = torch.stack([view(v) for v in values])
            sides.append((param_of, view, stacked))
        new = self.transform(T, sides[0][2], sides[1][2], TransportContext(optimizer, rule, (layA, layB)))
        for (param_of, view, _), moved in zip(sides, new):
            for key, value in moved.items():
                dst = [view(state[param_of(p)][key]) for p in pairs]
                values = list(value.unbind(0))
                if gate is not None:  # a traced step: keep the old value where the gate is false
                    values = [torch.where(gate, v, x) for v, x in zip(values, dst)]
                torch._foreach_copy_(dst, values)


def _unknown_key(optimizer: Any, key: str) -> str:
    return (
        f"{qualname(optimizer)} holds state {key!r} that its registered transport does not know; "
        f"declare it with reflora.transport.register_state_transport({type(optimizer).__name__}, "
        f"{{..., {key!r}: 'first' | 'second' | 'keep'}}, overwrite=True)"
    )


class SpecTransport(StackedTransport):
    """State declared key by key: ``{state key: kind}`` with the kinds of
    :data:`reflora.transport.STATE_KINDS`.

    A ``"first"`` or ``"second"`` kind applies to state shaped like its parameter only: a key
    holding anything else (a 1-D or factored moment) raises :class:`reflora.UnsupportedOptimizerError`
    before anything is modified. Scalar state belongs under ``"keep"``; a key the spec does not
    declare raises too. Its state can be moved shard by shard, and folded into the core's
    products where every kind of it is a product.

    Example:
        >>> import torch
        >>> from reflora.transport import SpecTransport
        >>> SpecTransport({"step": "keep", "m": "first", "v": "second"}).keeps_second_moments()
        True
    """

    def __init__(self, spec: Mapping[str, StateKind], owner: str = "the optimizer") -> None:
        for key, kind in spec.items():
            if kind not in STATE_KINDS:
                raise ValueError(
                    f"state key {key!r} of {owner}: kind must be one of {tuple(STATE_KINDS)}; got {kind!r}"
                )
        self.spec: dict[str, StateKind] = dict(spec)

    def __repr__(self) -> str:
        return f"SpecTransport({self.spec})"

    @property
    def kinds(self) -> Mapping[str, StateKind]:
        return self.spec

    def sharded_refusal(self, optimizer: torch.optim.Optimizer) -> str | None:
        return None

    def check(self, state: Mapping[str, Any], param: Tensor, ctx: TransportContext, where: str) -> None:
        for key, value in state.items():
            kind = self.spec.get(key)
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

    def fold(
        self, optimizer: torch.optim.Optimizer, pairs: list[LoRAPair], left: Tensor, right: Tensor, rule: str
    ) -> tuple[Chunks, Chunks] | None:
        """Every key as products (``"first"`` like the gradients, ``"second"`` by the ``"square"``
        rule or not at all); ``None`` for the ``"reset"`` rule, pairs with and without state in
        one group, and state that is not parameter-shaped (which :meth:`~reflora.transport.StateTransport.move` then refuses)."""
        if rule == "reset":
            return None
        states = [(optimizer.state.get(p.A), optimizer.state.get(p.B)) for p in pairs]
        on_a: Chunks = []
        on_b: Chunks = []
        if not any(sa or sb for sa, sb in states):
            return on_a, on_b  # no state yet (the first step): nothing to move
        if not all(sa and sb for sa, sb in states):
            return None
        for key in states[0][0]:
            kind = STATE_KINDS.get(self.spec.get(key))  # type: ignore[arg-type]
            if kind is None:
                return None
            prod = kind.product(left, right, rule)
            if prod is None:
                continue
            if prod is NotImplemented:
                return None
            va, vb = [], []
            for p, (sa, sb) in zip(pairs, states):
                a, b = sa.get(key), sb.get(key)
                if not (isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == p.A.shape and b.shape == p.B.shape):
                    return None
                # (distributed hook: a DTensor state is moved through its local shard)
                va.append(to_core(local(a), p.layout[0], p.experts))
                vb.append(to_core(local(b), p.layout[1], p.experts))
            on_a.append((va, prod[0]))
            on_b.append((vb, prod[1]))
        return on_a, on_b

    def selects(self, key: str, values: list[Any]) -> bool:
        # exactly the "first" / "second" / "iterate" keys (check has made sure they are parameter-shaped)
        return self.spec.get(key) in ("first", "second", "iterate") and all(isinstance(v, Tensor) for v in values)

    def transform(self, T, sA, sB, ctx):
        outA: dict[str, Tensor] = {}
        outB: dict[str, Tensor] = {}
        for key in sorted(set(sA) | set(sB)):
            kind = self.spec.get(key)
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


class FunctionTransport(StackedTransport):
    """A function of a group's stacked state, ``fn(transform, state_A, state_B, ctx) ->
    (new_state_A, new_state_B)`` (see :meth:`reflora.transport.StackedTransport.transform`), with an optional
    ``check(state, param, ctx, where)`` that raises for state the function could not move.

    Every state tensor with at least one dimension is passed (factored ones included); scalar
    state stays as it is. ``register_state_transport(cls, fn)`` wraps a plain function in one;
    its attributes are not read, so pass ``check`` here.
    """

    def __init__(self, fn: TransportFn, check: Callable[..., None] | None = None, display: str | None = None) -> None:
        if not callable(fn):
            raise TypeError(f"a transport function must be callable; got {type(fn).__name__}")
        self.fn = fn
        self.check_fn = check
        self.display = display

    def __repr__(self) -> str:
        return f"FunctionTransport({self.fn!r})"

    def check(self, state, param, ctx, where) -> None:
        if self.check_fn is not None:
            self.check_fn(state, param, ctx, where)

    def transform(self, T, sA, sB, ctx):
        return self.fn(T, sA, sB, ctx)
