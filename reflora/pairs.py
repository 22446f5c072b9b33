"""``LoRAPair``: one low-rank factor pair of a model, presented in the core's layout.

Layouts are normalised here and only here. A factor is stored in one of these layouts:

* ``"plain"``: already the core's layout (``A`` is ``(r, m)``, ``B`` is ``(n, r)``);
* ``"transposed"``: stored as the transpose (``A`` as ``(m, r)``, ``B`` as ``(r, n)``);
* ``"flatten"``: a convolution kernel, ``A`` ``(r, in, *k)`` folded to ``(r, in * prod(k))`` and
  ``B`` ``(out, r, 1, ...)`` folded to ``(out, r)``.

A pair may also hold ``experts = E > 1`` independent pairs stacked in one parameter each (PEFT's
MoE ``ParamWrapper``); ``LoRAPair.a`` / ``LoRAPair.b`` are then ``(E, r, m)`` /
``(E, n, r)`` and each expert ``e`` contributes ``B[e] @ A[e]``. Two layouts split the stack:

* ``"expert_rows"``: expert-major rows, ``(E * p, q)`` viewed as ``(E, p, q)`` (PEFT's
  ``lora_A``: ``(E * r, in)``, rows ``e * r ... e * r + r - 1`` belong to expert ``e``);
* ``"expert_cols"``: expert-minor columns, ``(p, q * E)`` viewed as ``(p, q, E)`` with the expert
  axis moved to the front, ``(E, p, q)`` (PEFT's ``lora_B``: ``(out, r * E)``, column
  ``k * E + e`` is rank ``k`` of expert ``e``).

With ``experts == 1`` the two expert layouts are the plain one.

All of them are views of the parameter's storage (no copies), so writing into a view with
``copy_`` updates the parameter. Optimizer state tensors shaped like the parameter use the same
views.

Pair names are normalised here too (:func:`canonical_name`): the segments torch's wrappers add
to module names are dropped, so a model finds the same pair names bare, under DDP /
``DataParallel``, ``torch.compile``, FSDP or activation checkpointing, and a handle checkpoint
moves between them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

__all__ = ["EXPERT_LAYOUTS", "LAYOUTS", "LoRAPair", "UnusedPairWarning", "canonical_name", "from_core", "to_core"]


class UnusedPairWarning(UserWarning):
    """A managed pair the model does not use: the forward pass on ``example_inputs`` never read its
    factors, or they still had no gradient after the first optimizer steps. RefLoRA cannot act on
    such a pair (it has nothing to precondition)."""

Layout = Literal["plain", "transposed", "flatten", "expert_rows", "expert_cols"]
#: Layouts of a stack of MoE experts' factors stored in one tensor (``experts > 1``).
EXPERT_LAYOUTS = ("expert_rows", "expert_cols")
#: Every layout a stored factor may have (see the module docstring).
LAYOUTS = ("plain", "transposed", "flatten", *EXPERT_LAYOUTS)


# Attributes under which torch's wrappers hold the wrapped module: torch.compile's OptimizedModule
# (`_orig_mod`), FSDP (`_fsdp_wrapped_module`), activation checkpointing's CheckpointWrapper
# (`_checkpoint_wrapped_module`). Private names no model uses for its own children, so they are
# dropped wherever they occur (a compiled or wrapped submodule puts them mid-name).
_WRAPPER_SEGMENTS = frozenset({"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})


def canonical_name(name: str) -> str:
    """``name`` without the segments torch's module wrappers add.

    Drops every ``_orig_mod`` / ``_fsdp_wrapped_module`` / ``_checkpoint_wrapped_module``
    segment, then leading ``module`` segments (DDP and ``DataParallel``; only leading ones, as
    ``torch.nn.modules.utils.consume_prefix_in_state_dict_if_present`` does, because a model may
    call its own children ``module``).

    Example:
        >>> canonical_name("module._orig_mod.layers.0._checkpoint_wrapped_module.q_proj.default")
        'layers.0.q_proj.default'
    """
    parts = [s for s in name.split(".") if s not in _WRAPPER_SEGMENTS]
    while parts and parts[0] == "module":
        parts.pop(0)
    return ".".join(parts)


def to_core(t: Tensor, layout: str, experts: int = 1) -> Tensor:
    """View ``t`` (a factor, its gradient or a same-shaped state tensor) in the core's layout.

    Args:
        t: the stored tensor.
        layout: one of :data:`reflora.pairs.LAYOUTS`.
        experts: how many expert pairs ``t`` stacks (only the expert layouts use it).

    Returns:
        A view of ``t``: 2-D, or ``(experts, p, q)`` for an expert layout with ``experts > 1``.
    """
    if layout == "plain":
        return t
    if layout == "transposed":
        return t.mT
    if layout == "flatten":
        return t.view(t.shape[0], -1)
    if layout not in EXPERT_LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}; got {layout!r}")
    if experts == 1:
        return t
    if layout == "expert_rows":
        return t.view(experts, t.shape[0] // experts, t.shape[1])
    return t.view(t.shape[0], t.shape[1] // experts, experts).permute(2, 0, 1)


@dataclass(frozen=True, eq=False)
class LoRAPair:
    """A trainable factor pair ``(A, B)`` with ``delta W = B @ A`` (in the core's layout).

    Attributes:
        name: qualified name of the pair (unique within a model), e.g. ``"...q_proj.default"``.
        A: the parameter holding the down-projection.
        B: the parameter holding the up-projection.
        layout: ``(layout_of_A, layout_of_B)``, each one of :data:`reflora.pairs.LAYOUTS` (see the module
            docstring); :meth:`a` / :meth:`b` return the views.
        module: the module that owns the pair, when there is one.
        experts: how many independent expert pairs ``A`` and ``B`` stack (``1``: an ordinary
            pair). With ``experts > 1`` both layouts must be expert layouts, the views carry a
            leading expert dimension and every expert is refactored on its own.
    """

    name: str
    A: nn.Parameter
    B: nn.Parameter
    layout: tuple[str, str] = ("plain", "plain")
    module: nn.Module | None = field(default=None, repr=False)
    experts: int = 1

    def __post_init__(self) -> None:
        E = self.experts
        if isinstance(E, bool) or not isinstance(E, int):
            raise TypeError(f"pair {self.name!r}: experts must be an int; got {type(E).__name__}")
        if E < 1:
            raise ValueError(f"pair {self.name!r}: experts must be >= 1; got {E}")
        for label, p, lay in (("A", self.A, self.layout[0]), ("B", self.B, self.layout[1])):
            if not isinstance(p, Tensor):
                raise TypeError(f"pair {self.name!r}: {label} must be a tensor; got {type(p).__name__}")
            if lay not in LAYOUTS:
                raise ValueError(f"pair {self.name!r}: layout of {label} must be one of {LAYOUTS}; got {lay!r}")
            if isinstance(p, nn.parameter.UninitializedParameter):
                raise ValueError(
                    f"pair {self.name!r}: {label} is not initialised yet (a lazy module); run one forward "
                    "pass before looking for pairs or building the optimizer"
                )
            if lay == "flatten" and p.dim() < 2 or lay != "flatten" and p.dim() != 2:
                zero3 = (
                    " (a DeepSpeed ZeRO-3 partitioned parameter, which RefLoRA cannot see; use ZeRO-1/2 with "
                    "space='gradient', or FSDP2)" if hasattr(p, "ds_id") else ""
                )
                raise ValueError(
                    f"pair {self.name!r}: {label} must be 2-D for layout {lay!r}; got shape {tuple(p.shape)}{zero3}"
                )
            if E > 1 and lay not in EXPERT_LAYOUTS:
                raise ValueError(
                    f"pair {self.name!r}: experts={E} needs an expert layout for {label} (one of "
                    f"{EXPERT_LAYOUTS}); layout {lay!r} has no expert dimension"
                )
            dim = 0 if lay == "expert_rows" else 1
            if E > 1 and p.shape[dim] % E:
                raise ValueError(
                    f"pair {self.name!r}: {label} of shape {tuple(p.shape)} cannot hold {E} experts in "
                    f"layout {lay!r}: dimension {dim} ({p.shape[dim]}) is not a multiple of {E}"
                )
        a, b = self.a(), self.b()
        if a.shape[-2] != b.shape[-1]:
            raise ValueError(
                f"pair {self.name!r}: A has rank {a.shape[-2]} (shape {tuple(a.shape)}) but B has "
                f"rank {b.shape[-1]} (shape {tuple(b.shape)})"
            )

    def a(self) -> Tensor:
        """``A`` as an ``(r, m)`` view (``(E, r, m)`` with experts)."""
        return to_core(self.A, self.layout[0], self.experts)

    def b(self) -> Tensor:
        """``B`` as an ``(n, r)`` view (``(E, n, r)`` with experts)."""
        return to_core(self.B, self.layout[1], self.experts)

    def grad_a(self) -> Tensor | None:
        """``A.grad`` viewed like :meth:`a` (None when there is no gradient)."""
        g = self.A.grad
        return None if g is None else to_core(g, self.layout[0], self.experts)

    def grad_b(self) -> Tensor | None:
        """``B.grad`` viewed like :meth:`b` (None when there is no gradient)."""
        g = self.B.grad
        return None if g is None else to_core(g, self.layout[1], self.experts)

    @property
    def rank(self) -> int:
        """``r``, per expert."""
        return self.a().shape[-2]

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(r, m, n)``, per expert (see ``experts`` for how many)."""
        r, m = self.a().shape[-2:]
        return r, m, self.b().shape[-2]

    def delta(self) -> Tensor:
        """``B @ A`` (detached, core layout), the update this pair contributes before scaling.

        ``(n, m)``, or ``(E, n, m)`` (one product per expert) with experts.
        """
        with torch.no_grad():
            return self.b() @ self.a()


def from_core(t: Tensor, layout: str, shape: torch.Size | tuple[int, ...], experts: int = 1) -> Tensor:
    """The inverse of :func:`to_core`: a tensor in the core's layout back in the stored ``shape``.

    For out-of-place code (:mod:`reflora.func`), where nothing is written through a view: the
    result is a view where the layout allows one, a reshaped copy otherwise.

    Args:
        t: the tensor in the core's layout (what :func:`to_core` returns for the stored tensor).
        layout: one of :data:`reflora.pairs.LAYOUTS`.
        shape: the stored tensor's shape.
        experts: how many expert pairs the stored tensor stacks.

    Example:
        >>> w = torch.randn(6, 4)
        >>> torch.equal(from_core(to_core(w, "expert_cols", 2), "expert_cols", w.shape, 2), w)
        True
    """
    if layout == "plain":
        return t
    if layout == "transposed":
        return t.mT
    if layout == "flatten":
        return t.reshape(shape)
    if layout not in EXPERT_LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}; got {layout!r}")
    if experts == 1:
        return t
    if layout == "expert_rows":
        return t.reshape(shape)
    return t.permute(1, 2, 0).reshape(shape)
