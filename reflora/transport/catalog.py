"""Transports for the optimizers of other packages people reach for now, matched by class name.

Nothing here imports those packages: each entry is registered with
:func:`reflora.transport.register_lazy_state_transport` and matched on the first lookup of an
optimizer whose class has that name in that top-level package. Each spec declares every state
key the optimizer keeps per parameter, with its kind (:data:`reflora.transport.STATE_KINDS`);
what ``space="auto"`` picks for each, and the measurements behind it, are in docs/optimizers.md.

* ``torch.optim.Muon`` (registered directly where torch has it): its momentum buffer is a first
  moment; the orthogonalised update itself keeps no state.
* ``schedulefree``: ``z`` is the base sequence of the schedule-free iterates, a point in
  parameter space (the parameters hold the interpolation ``y`` in ``train()`` mode, the average
  ``x`` in ``eval()`` mode, both linear in ``z`` and the parameters). It moves like the factor
  itself (``"iterate"``), so a refactor in either mode maps every sequence by the same linear
  map and ``train()`` / ``eval()`` afterwards still switch between the refactored ``x`` and ``y``.
* ``pytorch_optimizer``: Lion, ADOPT, AdEMAMix, Prodigy (``s`` is a weighted sum of gradients:
  first; ``p0``, the initial point, an iterate, so that ``<g, p0 - p>`` in its ``d`` estimate is
  unchanged; the group's ``d`` is a scalar and stays), AdaBelief, Adan, Lamb, and its own
  schedule-free AdamW / SGD. The Shampoo family (SOAP, Shampoo, ScalableShampoo, Kron) keeps
  Kronecker factors of each factor's gradient, ``E[g g^T]`` and ``E[g^T g]``: under
  ``A' = P^T A`` the left one maps as ``P^{-1} L P^{-T}`` but the right one becomes
  ``E[g^T P^{-T} P^{-1} g]``, a function of the past gradients themselves, not of ``E[g^T g]``.
  No exact move exists, so parameter space is refused (:class:`~reflora.transport.RefusedTransport`).
"""

from __future__ import annotations

from reflora.transport.base import RefusedTransport, StateKind

__all__ = ["CATALOG", "MUON"]

MUON: dict[str, StateKind] = {"momentum_buffer": "first"}
_SF_ADAM: dict[str, StateKind] = {"z": "iterate", "exp_avg_sq": "second"}
_SF_SGD: dict[str, StateKind] = {"z": "iterate"}
_SF_REFERENCE: dict[str, StateKind] = {"x": "iterate", "y": "iterate", "z": "iterate"}
_ADAM: dict[str, StateKind] = {"exp_avg": "first", "exp_avg_sq": "second"}


def _shampoo(name: str, keys: str) -> RefusedTransport:
    return RefusedTransport(
        f"space='parameter' under {name}: it keeps Kronecker factors of each factor's gradient ({keys}), and "
        "after a refactor A' = P^T A the right one depends on the past gradients themselves, so no exact move "
        "exists. Use space='gradient' (what space='auto' picks for it)",
        display=f"pytorch_optimizer.{name}",
    )


#: ``(top-level package, class qualname, spec)``
CATALOG: list[tuple[str, str, "dict[str, StateKind] | RefusedTransport"]] = [
    ("schedulefree", "AdamWScheduleFree", _SF_ADAM),
    ("schedulefree", "AdamWScheduleFreeClosure", _SF_ADAM),
    ("schedulefree", "AdamWScheduleFreePaper", _SF_ADAM),
    ("schedulefree", "RAdamScheduleFree", _SF_ADAM),
    ("schedulefree", "RAdamScheduleFreeClosure", _SF_ADAM),
    ("schedulefree", "SGDScheduleFree", _SF_SGD),
    ("schedulefree", "SGDScheduleFreeClosure", _SF_SGD),
    ("schedulefree", "AdamWScheduleFreeReference", {**_SF_REFERENCE, "exp_avg_sq": "second"}),
    ("schedulefree", "SGDScheduleFreeReference", _SF_REFERENCE),
    ("pytorch_optimizer", "Lion", {"exp_avg": "first"}),
    ("pytorch_optimizer", "ADOPT", _ADAM),
    ("pytorch_optimizer", "AdEMAMix", {**_ADAM, "exp_avg_slow": "first"}),
    ("pytorch_optimizer", "Prodigy", {**_ADAM, "s": "first", "p0": "iterate"}),
    ("pytorch_optimizer", "AdaBelief", {"exp_avg": "first", "exp_avg_var": "second"}),
    ("pytorch_optimizer", "Adan", {**_ADAM, "exp_avg_diff": "first", "previous_grad": "first"}),
    ("pytorch_optimizer", "Lamb", {**_ADAM, "weight_norm": "keep", "adam_norm": "keep", "trust_ratio": "keep"}),
    ("pytorch_optimizer", "ScheduleFreeAdamW", _SF_ADAM),
    ("pytorch_optimizer", "ScheduleFreeSGD", _SF_SGD),
    ("pytorch_optimizer", "SOAP", _shampoo("SOAP", "GG, with eigenbases Q")),
    ("pytorch_optimizer", "Shampoo", _shampoo("Shampoo", "pre_conditioners")),
    ("pytorch_optimizer", "ScalableShampoo", _shampoo("ScalableShampoo", "pre_conditioner")),
    ("pytorch_optimizer", "Kron", _shampoo("Kron", "Q")),
]
