r"""The state-transport interface: :class:`StateTransport`, the table of state kinds, the context.

A parameter-space refactor replaces ``(A, B)`` by ``(P^T A, B P^{-T})``. The optimizer's state
was accumulated in the old coordinates and must follow. One :class:`StateTransport` per optimizer
class says how; the step core (:func:`reflora.step.refactor_groups`) calls, for each group of
same-shape pairs:

1. :meth:`~reflora.transport.StateTransport.check` on every factor that holds state, before anything is modified
   (a transport never fails half-way through a model);
2. :meth:`~reflora.transport.StateTransport.fold`: the state it can move as products ``x_A <- T_A x_A``,
   ``x_B <- x_B T_B``, which the core folds into the products it applies to the factors and
   gradients anyway (``None``: nothing to fold);
3. :meth:`~reflora.transport.StateTransport.move`: everything :meth:`~reflora.transport.StateTransport.fold` did not take, in place.

The kinds of per-parameter state are one table, :data:`reflora.transport.STATE_KINDS` (``"first"``, ``"second"``,
``"iterate"``, ``"keep"``); a new kind is a new entry there, and every
transport that declares its keys by kind (:class:`reflora.transport.SpecTransport`) then moves it.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Literal, Mapping

import torch
from torch import Tensor

from reflora.config import UnsupportedOptimizerError
from reflora.functional import Transform, apply_transform, map_first_moments, map_second_moments

if TYPE_CHECKING:
    from reflora.pairs import LoRAPair

__all__ = [
    "STATE_KINDS",
    "Chunks",
    "StateKind",
    "StateKindMap",
    "RefusedTransport",
    "StateTransport",
    "TransportContext",
    "UnsupportedOptimizerError",
    "qualname",
]

StateKind = Literal["first", "second", "iterate", "keep"]
#: ``[(tensors of one shape, stacked r x r transforms)]``: products to apply (see :meth:`reflora.transport.StateTransport.fold`).
Chunks = list[tuple[list[Tensor], Tensor]]


def qualname(cls_or_obj: Any) -> str:
    """``module.qualname`` of a class (or of an object's class).

    Error messages use it because short names are ambiguous: ``torch.optim.Adafactor`` and
    ``transformers.optimization.Adafactor`` are different classes with different state.
    """
    cls = cls_or_obj if isinstance(cls_or_obj, type) else type(cls_or_obj)
    return f"{cls.__module__}.{cls.__qualname__}"


@dataclass(frozen=True)
class TransportContext:
    """What a transport needs besides the tensors.

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
            ``NotImplemented``: not a product (use ``apply``).
    """

    apply: Callable[[Transform, Tensor, Tensor, str], "tuple[Tensor, Tensor] | None"]
    product: Callable[[Tensor, Tensor, str], Any]


def _second_product(left: Tensor, right: Tensor, rule: str) -> Any:
    if rule == "keep":
        return None
    if rule == "square":
        return right.mT.square(), left.mT.square()
    return NotImplemented


#: The one table of state kinds: what a ``"first"`` / ``"second"`` / ``"keep"`` entry of a
#: registration does to the state under a refactor. Used by the spec transports (moved or folded
#: into the core's products), the low-bit transports and :mod:`reflora.func`.
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
    # a parameter-space iterate (schedule-free's z, Prodigy's p0, a reference's x / y): mapped like
    # the factor itself, P^T x_A, x_B P^{-T}, so that every iterate of the pair keeps its product
    "iterate": StateKindMap(
        apply=lambda T, a, b, rule: tuple(apply_transform(T, a, b)),
        product=lambda left, right, rule: (left, right),
    ),
    "keep": StateKindMap(apply=lambda T, a, b, rule: None, product=lambda left, right, rule: None),
}


class StateTransport(abc.ABC):
    """How one optimizer class's per-parameter state follows a parameter-space refactor.

    Implementations: :class:`reflora.transport.SpecTransport` (state declared key by key with a
    kind of :data:`reflora.transport.STATE_KINDS`), :class:`reflora.transport.FunctionTransport` (a function of
    the stacked state), the Adafactor transports (factored second moments) and the low-bit ones
    (:mod:`reflora.transport.lowbit`: quantized state). A new optimizer needs :meth:`move`;
    :meth:`check` and :attr:`kinds` are what make it safe and let ``space="auto"`` choose.

    Attributes:
        display: the optimizer's qualified name in listings (``None``: the registered class's).
        quantized: whether the state is stored quantized (low-bit optimizers).
    """

    display: str | None = None
    quantized: bool = False

    @property
    def kinds(self) -> Mapping[str, StateKind] | None:
        """``{state key: kind}`` of what this transport moves, or ``None`` where the state is not
        declared key by key (a function of the whole state)."""
        return None

    def keeps_second_moments(self) -> bool:
        """Whether the optimizer keeps element-wise second moments (an Adam-like one, to which
        ``space="auto"`` gives parameter space). Undeclared state counts as Adam-like."""
        kinds = self.kinds
        return kinds is None or "second" in kinds.values()

    def sharded_refusal(self, optimizer: torch.optim.Optimizer) -> str | None:
        """Why the state of sharded (``DTensor`` / FSDP2) factors cannot be moved shard by shard by
        this transport (``None``: it can). The default: only state shaped like its parameter can."""
        return (
            f"space='parameter' on sharded (DTensor / FSDP2) factors moves optimizer state shard by shard, "
            f"which needs state shaped like its parameter; {qualname(optimizer)}'s transport is a function "
            "(factored state, e.g. Adafactor). Use space='gradient', or an optimizer with parameter-shaped "
            "state (SGD, Adam, AdamW, ...)"
        )

    def refusal(self, optimizer: torch.optim.Optimizer) -> str | None:
        """Why this optimizer's state can never be moved (``space="parameter"`` raises it at
        ``attach``; ``space="auto"`` picks gradient space without a notice), or ``None``."""
        return None

    def check(self, state: Mapping[str, Any], param: Tensor, ctx: TransportContext, where: str) -> None:
        """Raise if this parameter's raw ``state`` dict could not be moved (before anything is
        modified; ``where`` names the factor for the message). The default accepts everything."""

    def fold(
        self, optimizer: torch.optim.Optimizer, pairs: list[LoRAPair], left: Tensor, right: Tensor, rule: str
    ) -> tuple[Chunks, Chunks] | None:
        """The state of ``pairs`` (one group) as products for the core to apply with the factors':
        ``(left products, right products)`` (``([], [])``: nothing to move), or ``None``: not
        foldable, :meth:`move` moves it. The default folds nothing."""
        return None

    @abc.abstractmethod
    def move(
        self, optimizer: torch.optim.Optimizer, pairs: list[LoRAPair], T: Transform, rule: str,
        gate: Tensor | None = None,
    ) -> None:
        """Move the state of ``pairs`` (one group of same-shape pairs, every one holding state) by
        ``T`` (stacked over ``pairs``, float32 or wider) in place; second moments by ``rule``.
        With ``gate`` (a 0-d bool, traced steps) every value is kept where it is false."""

    def check_pairs(self, optimizer: torch.optim.Optimizer, pairs: Iterable[LoRAPair], rule: str) -> None:
        """:meth:`check` for the state ``optimizer`` holds now for every factor of ``pairs``."""
        for pair in pairs:
            ctx = TransportContext(optimizer, rule, pair.layout)
            for label, param in (("A", pair.A), ("B", pair.B)):
                state = optimizer.state.get(param)
                if state:
                    self.check(state, param, ctx, f"factor {label} of pair {pair.name!r}")


class RefusedTransport(StateTransport):
    """An optimizer whose state no refactor can move (a Shampoo-family preconditioner, whose
    Kronecker factors of ``A``'s gradient have no closed-form map): registered so that
    ``space="auto"`` picks gradient space silently and ``space="parameter"`` raises ``reason``."""

    def __init__(self, reason: str, display: str | None = None) -> None:
        self.reason = reason
        self.display = display

    def __repr__(self) -> str:
        return f"RefusedTransport({self.reason[:40]!r}...)"

    @property
    def kinds(self) -> Mapping[str, StateKind]:
        return {}

    def refusal(self, optimizer: torch.optim.Optimizer) -> str | None:
        return self.reason

    def move(self, optimizer, pairs, T, rule, gate=None) -> None:  # noqa: D102 - never reached
        raise UnsupportedOptimizerError(self.reason)
