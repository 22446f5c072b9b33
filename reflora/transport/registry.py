"""The registry of state transports, keyed by optimizer class (nearest registered base class wins).

Optimizers of optional packages (transformers' ``Adafactor``, bitsandbytes, torchao) are matched
by qualified class name on first lookup (:func:`reflora.transport.register_lazy_state_transport`), so that
``import reflora`` imports none of those packages.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Union

import torch

from reflora.transport.base import StateKind, StateTransport, qualname
from reflora.transport.spec import FunctionTransport, SpecTransport, TransportFn

__all__ = [
    "Spec",
    "check_transportable",
    "get_state_transport",
    "keeps_second_moments",
    "register_lazy_state_transport",
    "register_state_transport",
    "registered_optimizers",
    "state_kinds",
]

Spec = Union[Mapping[str, StateKind], StateTransport, TransportFn]

_REGISTRY: dict[type, StateTransport] = {}
# (top-level package, class qualname, display name, transport), matched by name on first lookup
_LAZY: list[tuple[str, str, str, StateTransport]] = []


def _lookup(cls: type) -> StateTransport | None:
    transport = _REGISTRY.get(cls)
    if transport is None:
        package = cls.__module__.split(".")[0]
        for pkg, name, _, lazy in _LAZY:
            if package == pkg and cls.__qualname__ == name:
                transport = _REGISTRY[cls] = lazy
                break
    return transport


def _as_transport(spec: Spec, owner: str) -> StateTransport:
    if isinstance(spec, StateTransport):
        return spec
    if isinstance(spec, Mapping):
        return SpecTransport(spec, owner)
    if callable(spec):
        return FunctionTransport(spec)
    raise TypeError(
        f"spec must be a mapping of state keys to kinds, a StateTransport or a callable; got {type(spec).__name__}"
    )


def register_lazy_state_transport(package: str, class_qualname: str, transport: Spec, display: str | None = None) -> None:
    """Register ``transport`` for a class of an optional package, matched by name on first lookup.

    The class is not imported: an optimizer whose class has ``__qualname__ == class_qualname``
    and whose module lies in the top-level ``package`` gets ``transport`` (this is how the
    low-bit transports cover bitsandbytes and torchao without importing them).

    Args:
        package: the top-level package, e.g. ``"bitsandbytes"``.
        class_qualname: the class's ``__qualname__``, e.g. ``"AdamW8bit"``.
        transport: a :class:`~reflora.transport.StateTransport` (or what
            :func:`register_state_transport` accepts).
        display: the name :func:`registered_optimizers` lists (default: the transport's
            ``display``, else ``package.class_qualname``).
    """
    if any(pkg == package and name == class_qualname for pkg, name, _, _ in _LAZY):
        raise ValueError(f"a lazy state transport for {class_qualname!r} of package {package!r} is already registered")
    transport = _as_transport(transport, f"{package}.{class_qualname}")
    _LAZY.append((package, class_qualname, display or transport.display or f"{package}.{class_qualname}", transport))


def register_state_transport(optimizer_cls: type, spec: Spec, *, overwrite: bool = False) -> StateTransport:
    """Declare how the state of ``optimizer_cls`` follows a parameter-space refactor.

    Args:
        optimizer_cls: a ``torch.optim.Optimizer`` subclass.
        spec: ``{state_key: "first" | "second" | "keep"}`` (``"first"`` / ``"second"`` keys
            must hold tensors shaped like their parameter; a
            :class:`~reflora.transport.SpecTransport`), a
            :class:`~reflora.transport.StateTransport`, or a function
            ``fn(transform, state_A, state_B, ctx) -> (new_state_A, new_state_B)`` of the stacked
            state (wrapped in a :class:`~reflora.transport.FunctionTransport`; to have it checked
            before anything is modified, register ``FunctionTransport(fn, check=...)``).
        overwrite: replace an existing registration.

    Returns:
        The transport that was registered.
    """
    if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)):
        raise TypeError(f"optimizer_cls must be a torch.optim.Optimizer subclass; got {optimizer_cls!r}")
    if _lookup(optimizer_cls) is not None and not overwrite:
        raise ValueError(
            f"a state transport for {qualname(optimizer_cls)} is already registered; pass overwrite=True"
        )
    transport = _REGISTRY[optimizer_cls] = _as_transport(spec, qualname(optimizer_cls))
    return transport


def get_state_transport(optimizer: torch.optim.Optimizer | type) -> StateTransport | None:
    """The transport registered for ``type(optimizer)`` (or the class ``optimizer``) or its
    nearest registered base class."""
    for cls in (optimizer if isinstance(optimizer, type) else type(optimizer)).__mro__:
        transport = _lookup(cls)
        if transport is not None:
            return transport
        if cls is torch.optim.Optimizer:
            break
    return None


def state_kinds(optimizer: torch.optim.Optimizer | type) -> dict[str, StateKind] | None:
    """``{state key: kind}`` of the transport registered for ``optimizer`` (or its nearest
    registered base class) where it declares its state key by key; ``None`` otherwise."""
    transport = get_state_transport(optimizer)
    return None if transport is None or not isinstance(transport, SpecTransport) else dict(transport.kinds)


def keeps_second_moments(transport: StateTransport) -> bool:
    """Whether a registered transport moves element-wise second moments (an Adam-like optimizer):
    :meth:`reflora.transport.StateTransport.keeps_second_moments`."""
    return transport.keeps_second_moments()


def check_transportable(opt: torch.optim.Optimizer, transport: StateTransport | None, second_moment: str,
                        pairs: Iterable[Any]) -> None:
    """Raise (before anything is modified) if ``transport`` cannot move the state of ``pairs``
    (:class:`reflora.LoRAPair` s) that ``opt`` holds now."""
    if transport is not None:
        transport.check_pairs(opt, pairs, second_moment)


def registered_optimizers() -> list[str]:
    """Qualified names of the optimizer classes with a registered transport."""
    return sorted({qualname(c) for c in _REGISTRY} | {display for _, _, display, _ in _LAZY})
