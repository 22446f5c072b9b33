r"""Optimizer-state transport: how an optimizer's per-parameter state follows a refactoring.

The interface is :class:`StateTransport` (:mod:`reflora.transport.base`); its implementations are
here together: :class:`SpecTransport` (state declared key by key), :class:`FunctionTransport`
(a function of the stacked state), the Adafactor transports (:mod:`reflora.transport.adafactor`)
and the low-bit ones (:mod:`reflora.transport.lowbit`); the registry keyed by optimizer class is
:mod:`reflora.transport.registry`.

A parameter-space refactor replaces ``(A, B)`` by ``(P^T A, B P^{-T})``. The optimizer's state
was accumulated in the old coordinates and must be moved into the new ones, or the next step
mixes the two. Each optimizer class declares, per state key, what kind of quantity it holds:

* ``"first"``: linear in past gradients (momentum, Adam's ``exp_avg``). Mapped exactly like a
  gradient: ``P^{-1} m_A``, ``m_B P`` (:func:`reflora.functional.map_first_moments`).
* ``"second"``: element-wise second moments (``exp_avg_sq``, Adagrad's ``sum``). No exact map
  exists for a non-diagonal ``P``; the ``second_moment`` rule of :func:`reflora.attach` decides
  (``"square"`` by default, exact for the scalar variant; see
  :func:`reflora.functional.map_second_moments`).
* ``"iterate"``: a point in parameter space (schedule-free's ``z``, Prodigy's initial point
  ``p0``). Mapped like the factor itself: ``P^T x_A``, ``x_B P^{-T}``.
* ``"keep"``: left alone (step counters, and quantities already invariant to a rescaling, such
  as RMSprop's momentum of normalised updates).

A kind applies to state tensors shaped like their parameter only: a ``"first"`` or
``"second"`` key holding anything else (Adafactor-style 1-D or factored row / column moments)
raises :class:`reflora.UnsupportedOptimizerError` before anything is modified, because there is no
element-wise map for it and silently leaving it in the old coordinates would be wrong. Scalar
state (step counters) belongs under ``"keep"``; a key the spec does not declare raises too.

Optimizers with a more structured state register a :class:`StateTransport` or a function
instead (torch's and transformers' Adafactor, whose factored second moment is mapped in
factored form; the low-bit optimizers, whose state is quantized).
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

import torch

from reflora.transport.adafactor import HFAdafactorTransport, TorchAdafactorTransport
from reflora.transport.base import (
    STATE_KINDS,
    StateKind,
    RefusedTransport,
    StateKindMap,
    StateTransport,
    TransportContext,
    UnsupportedOptimizerError,
    qualname,
)
from reflora.transport.catalog import CATALOG, MUON
from reflora.transport.lowbit import LAZY_TRANSPORTS
from reflora.transport.registry import (
    check_transportable,
    get_state_transport,
    keeps_second_moments,
    register_lazy_state_transport,
    register_state_transport,
    registered_optimizers,
    state_kinds,
)
from reflora.transport.spec import FunctionTransport, SpecTransport, StackedTransport, TransportFn

__all__ = [
    "STATE_KINDS",
    "FunctionTransport",
    "RefusedTransport",
    "SpecTransport",
    "StackedTransport",
    "StateKind",
    "StateKindMap",
    "StateTransport",
    "TransportContext",
    "TransportFn",
    "UnsupportedOptimizerError",
    "check_transportable",
    "get_state_transport",
    "keeps_second_moments",
    "qualname",
    "register_lazy_state_transport",
    "register_state_transport",
    "registered_optimizers",
    "state_kinds",
]

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
    register_state_transport(torch.optim.Adafactor, TorchAdafactorTransport())
register_lazy_state_transport("transformers", "Adafactor", HFAdafactorTransport(),
                              display="transformers.optimization.Adafactor")
if hasattr(torch.optim, "Muon"):
    register_state_transport(torch.optim.Muon, MUON)
for _package, _name, _transport in LAZY_TRANSPORTS:
    register_lazy_state_transport(_package, _name, _transport)
for _package, _name, _spec in CATALOG:
    register_lazy_state_transport(_package, _name, _spec)
