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

import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Protocol

import torch
from torch import Tensor, nn

from reflora.config import RefLoRAConfig
from reflora.functional import check_ranks

__all__ = [
    "EXPERT_LAYOUTS",
    "LAYOUTS",
    "LoRAPair",
    "NamedPair",
    "UnusedPairWarning",
    "batch_key",
    "canonical_name",
    "from_core",
    "to_core",
    "validate",
]


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
        check_ranks(self.a().shape, self.b().shape, self.name)

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


# ------------------------------------------------------------------------------- validity


def batch_key(device: Any, dtype: torch.dtype, experts: int, shape: tuple[int, int, int],
              layout: tuple[str, str], sharding: Any = None) -> tuple:
    """What pairs must share to be stacked into one batched call: device, dtype, experts, ``(r, m, n)``,
    layouts and (for ``DTensor`` factors) mesh and placements. Every front-end groups by this key."""
    return (device, dtype, experts, *shape, layout, sharding)


class NamedPair(Protocol):
    """A pair named by its factors' keys in a parameter dict (:class:`reflora.func.ParamPair`)."""

    A: str
    B: str

    @property
    def key(self) -> str: ...


def validate(
    pairs: Iterable[LoRAPair] | Iterable[NamedPair],
    *,
    optimizer: torch.optim.Optimizer | None = None,
    config: RefLoRAConfig | None = None,
    trained: bool = False,
    left_to: str = "the bare optimizer",
) -> list[Any]:
    """The one check of the pairs RefLoRA is given, where they enter (:func:`reflora.attach`,
    :mod:`reflora.func`, :func:`reflora.adapters.find_pairs`, the DeepSpeed ZeRO path).

    Always: each factor belongs to one pair, ``A`` is not ``B``; for :class:`LoRAPair` s (whose
    constructor has checked layouts, experts and that the ranks agree) each factor is floating
    point and a pair's factors share a device; for :class:`NamedPair` s, names are unique.

    Args:
        pairs: :class:`LoRAPair` s, or :class:`NamedPair` s (names only: what can be checked
            before the tensors are known).
        optimizer: every factor must be one of its parameters.
        config: its pair rules: ``rank_above_size="skip"`` leaves pairs with ``r > min(m, n)``
            out (one warning naming them; an error if none is left), and a pair the resolved
            space cannot handle raises (:meth:`reflora.RefLoRAConfig.check_pair`).
        trained: every factor must require a gradient.
        left_to: who steps the pairs left out (for the warning).

    Returns:
        The pairs to manage, in order.
    """
    pairs = list(pairs)
    named = [p for p in pairs if not isinstance(p, LoRAPair)]
    if named:
        return _validate_names(named)
    if config is not None:
        pairs = _leave_out(pairs, config, left_to)
    in_opt = None if optimizer is None else {id(p) for g in optimizer.param_groups for p in g["params"]}
    owner: dict[int, str] = {}
    for pair in pairs:
        if config is not None:
            config.check_pair(pair.name, *pair.shape)
        if pair.A is pair.B:
            raise ValueError(f"pair {pair.name!r}: A and B are the same parameter (shape {tuple(pair.A.shape)})")
        for label, t in (("A", pair.A), ("B", pair.B)):
            if not t.dtype.is_floating_point:
                raise TypeError(f"pair {pair.name!r}: {label} has dtype {t.dtype}; expected a floating dtype")
            if trained and not t.requires_grad:
                raise ValueError(
                    f"pair {pair.name!r}: its {label} factor (shape {tuple(t.shape)}) is frozen "
                    "(requires_grad=False): train both factors, or leave this pair out of attach. RefLoRA "
                    "re-balances two trained factors; with one frozen (LoRA-FA) there is nothing to re-balance"
                )
            if in_opt is not None and id(t) not in in_opt:
                cls = type(optimizer)
                hint = (
                    " (under DeepSpeed, pass engine.optimizer, DeepSpeed's wrapper: the torch optimizer "
                    "inside steps on flat partitions)" if "deepspeed" in sys.modules else ""
                )
                raise ValueError(
                    f"pair {pair.name!r}: its {label} factor (shape {tuple(t.shape)}) is not a parameter "
                    f"of this {cls.__module__}.{cls.__qualname__}; build the optimizer over the LoRA parameters "
                    f"first{hint}"
                )
            _own(owner, id(t), pair.name, label, f"a tensor of shape {tuple(t.shape)}")
        if pair.A.device != pair.B.device:
            raise ValueError(f"pair {pair.name!r}: A is on {pair.A.device} but B is on {pair.B.device}")
    return pairs


def _own(owner: dict[Any, str], factor: Any, name: str, label: str, what: str) -> None:
    other = owner.get(factor)
    owner[factor] = name
    if other is not None:
        raise ValueError(
            f"pair {name!r} shares its {label} factor with pair {other!r} ({what}); each factor may belong to "
            "one pair only (duplicate pairs?)"
        )


def _validate_names(pairs: list[NamedPair]) -> list[NamedPair]:
    owner: dict[Any, str] = {}
    names: set[str] = set()
    for p in pairs:
        if p.A == p.B:
            raise ValueError(f"pair {p.key!r}: A and B are the same parameter {p.A!r}")
        if p.key in names:
            raise ValueError(f"two pairs are named {p.key!r}; pair names must be unique")
        names.add(p.key)
        for label, key in (("A", p.A), ("B", p.B)):
            _own(owner, key, p.key, label, f"parameter {key!r}")
    return pairs


def _leave_out(pairs: list[LoRAPair], config: RefLoRAConfig, left_to: str) -> list[LoRAPair]:
    """``rank_above_size="skip"``: the pairs without those the configuration leaves out (one
    warning naming them; an error if that leaves none)."""
    above = [p for p in pairs if config.leaves_out(*p.shape)]
    if not above:
        return pairs
    names = ", ".join(f"{p.name!r} (r={p.shape[0]}, m={p.shape[1]}, n={p.shape[2]})" for p in above[:4])
    more = f" and {len(above) - 4} more" if len(above) > 4 else ""
    if len(above) == len(pairs):
        raise ValueError(
            f"every pair has a rank above its layer's size (r > min(m, n)): {names}{more}. Such pairs are "
            "skipped by default (rank_above_size='skip'), which would leave nothing to manage. Pass "
            "rank_above_size='act' to apply RefLoRA to their live directions, or check that A is "
            "(r, m) = lora_A.weight and B is (n, r) = lora_B.weight (not swapped)"
        )
    warnings.warn(
        f"leaving {len(above)} pair(s) whose rank exceeds the layer's size (r > min(m, n)) to {left_to}: "
        f"{names}{more}. B A can use at most min(m, n) of their r directions; pass rank_above_size='act' to "
        "apply RefLoRA to them anyway",
        stacklevel=4,
    )
    return [p for p in pairs if not config.leaves_out(*p.shape)]
