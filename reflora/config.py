"""The RefLoRA options: every default, every check and every rule between options, in one place.

:class:`RefLoRAConfig` is built once by each entry point (:func:`reflora.attach`,
:mod:`reflora.func`, the DeepSpeed ZeRO path) and validated in ``__post_init__``; the pure API
(:mod:`reflora.functional`) calls the same checks for its keyword arguments. Rules that also
depend on something outside the options (a pair's shape, whether the optimizer keeps second
moments, DeepSpeed) are methods here that receive that fact as an argument: this module is the
bottom layer and imports nothing else of reflora.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import torch

__all__ = [
    "DEFAULT_GATE_WARMUP",
    "DEFAULT_RESOLVED",
    "FRAMES",
    "RANK_ABOVE_SIZE",
    "RefLoRAConfig",
    "SECOND_MOMENT_RULES",
    "SOLVERS",
    "SPACES",
    "DivergenceWarning",
    "UnstableOptionWarning",
    "UnsupportedOptimizerError",
    "VARIANTS",
    "check_eps",
    "check_frame",
    "check_int",
    "check_resolved",
    "check_solver",
    "check_variant",
    "default_eps",
    "resolve_resolved",
]

Space = Literal["auto", "gradient", "parameter"]

VARIANTS = ("full", "scalar")
SPACES = ("auto", "gradient", "parameter")
FRAMES = ("paper", "symmetric", "block")
SOLVERS = ("eigh", "newton_schulz")
SECOND_MOMENT_RULES = ("square", "keep", "reset")
RANK_ABOVE_SIZE = ("skip", "act")

#: The default resolution gate of the full variant with ``solver="eigh"`` (``resolved=None``).
DEFAULT_RESOLVED = 0.1

#: The default warmup where the resolution gate is on (``warmup_steps=None``): RefLoRA first acts
#: at the fourth optimizer step. After Adam's first step from ``B = 0`` every entry of ``B`` has
#: moved by about ``lr``, so ``B A`` has a flat spectrum that passes the gate for a step or two
#: before the task's own spectrum forms (docs/rank-deficient.md, "The warmup").
DEFAULT_GATE_WARMUP = 3


class UnstableOptionWarning(UserWarning):
    """An option was measured to diverge where plain training converges (the message says where)."""


class DivergenceWarning(UserWarning):
    """A pair's factors became non-finite or too large to decompose: the run has diverged."""


class UnsupportedOptimizerError(TypeError):
    """The optimizer, or the state it holds, cannot be used with the requested RefLoRA mode."""


# ------------------------------------------------------------------------------- one option


def check_int(name: str, value: Any, minimum: int) -> int:
    """``value`` if it is an int of at least ``minimum`` (TypeError / ValueError otherwise)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int; got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}")
    return value


def check_variant(variant: object) -> str:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}; got {variant!r}")
    return variant  # type: ignore[return-value]


def check_frame(frame: object) -> str:
    if frame not in FRAMES:
        raise ValueError(f"frame must be one of {FRAMES}; got {frame!r}")
    return frame  # type: ignore[return-value]


def check_solver(solver: object, frame: object = None) -> tuple[str, str]:
    """Validate ``solver`` and resolve ``frame`` against it: ``(solver, frame)``.

    ``frame=None`` means the solver's natural frame: ``"paper"`` for ``"eigh"``, ``"symmetric"``
    for ``"newton_schulz"``, which computes ``S^{1/2}`` and has no eigenbasis to rotate into.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}; got {solver!r}")
    if frame is None:
        return solver, "paper" if solver == "eigh" else "symmetric"  # type: ignore[return-value]
    frame = check_frame(frame)
    if frame == "block" and solver != "eigh":
        raise ValueError(
            "frame='block' is built on the eigendecompositions of solver='eigh'; use solver='eigh' (the default) "
            f"with frame='block', or frame='symmetric' with solver={solver!r}"
        )
    if solver == "newton_schulz" and frame == "paper":
        raise ValueError(
            "frame='paper' needs the eigenbasis of the balanced Gram, which solver='newton_schulz' "
            "does not compute (it has no eigendecomposition); use frame='symmetric' (or leave "
            "frame unset) with solver='newton_schulz', or solver='eigh' for the paper frame"
        )
    return solver, frame  # type: ignore[return-value]


def default_eps(dtype: torch.dtype | None = None) -> float:
    """Relative threshold below which a direction of ``B A`` counts as zero (``eps=None``).

    A squared singular value ``sigma_j^2`` of ``B A`` computed from float64 Grams carries an
    absolute error of a few ``machine_eps * ||A||_2^2 ||B||_F^2``; anything below
    ``64 * machine_eps`` (1.4e-14) of that scale is indistinguishable from zero. The kernel always
    runs in float64, so ``dtype`` does not change the result.
    """
    return 64.0 * torch.finfo(torch.float64).eps


def check_eps(eps: object, dtype: torch.dtype) -> float:
    """``eps`` validated, ``None`` resolved to :func:`default_eps`."""
    if eps is None:
        return default_eps(dtype)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a float or None; got {type(eps).__name__}")
    if not (0.0 <= float(eps) < 1.0):
        raise ValueError(f"eps must be in [0, 1); got {eps!r}")
    return float(eps)


def check_resolved(resolved: object, variant: str = "full", solver: str = "eigh") -> float:
    """Validate the resolution gate (see :func:`reflora._linalg.resolved_gate`) for a variant and solver."""
    if isinstance(resolved, bool) or not isinstance(resolved, (int, float)):
        raise TypeError(f"resolved must be a float in [0, 1); got {type(resolved).__name__}")
    if not (0.0 <= float(resolved) < 1.0):
        raise ValueError(f"resolved must be in [0, 1) (0: always act, as in the paper); got {resolved!r}")
    if resolved > 0 and variant == "scalar":
        raise ValueError(
            f"resolved={resolved!r} gates the full variant on the singular values of B A; variant='scalar' "
            "has no spectrum to test. Leave resolved unset (or 0) with variant='scalar'"
        )
    if resolved > 0 and solver == "newton_schulz":
        raise ValueError(
            f"resolved={resolved!r} needs the singular values of B A, which solver='newton_schulz' does not "
            "compute; use solver='eigh' (the default) or resolved=0.0 with solver='newton_schulz'"
        )
    return float(resolved)


def resolve_resolved(resolved: object, variant: str, solver: str) -> float:
    """``resolved`` validated; ``None``: :data:`DEFAULT_RESOLVED` for the full variant with
    ``solver="eigh"``, else 0 (the scalar variant has no spectrum, Newton-Schulz computes none)."""
    if resolved is None:
        return DEFAULT_RESOLVED if variant == "full" and solver == "eigh" else 0.0
    return check_resolved(resolved, variant, solver)


def check_second_moment(rule: object, name: str = "second_moment") -> str:
    if rule not in SECOND_MOMENT_RULES:
        raise ValueError(f"{name} must be one of {SECOND_MOMENT_RULES}; got {rule!r}")
    return rule  # type: ignore[return-value]


def exceeds_layer_size(r: int, m: int, n: int) -> bool:
    """Whether a pair of rank ``r`` on an ``m -> n`` layer has more directions than ``B A`` can use."""
    return r > min(m, n)


# ------------------------------------------------------------------------------- all options


@dataclass(frozen=True)
class RefLoRAConfig:
    """The RefLoRA options of :func:`reflora.attach` and :mod:`reflora.func`, validated.

    The fields are the keyword arguments of :func:`reflora.attach` (see there for what each one
    means). ``__post_init__`` checks every option, in a fixed order, and resolves the defaults
    that depend on others: ``frame=None`` (``"paper"`` with ``solver="eigh"``, ``"symmetric"``
    with ``"newton_schulz"``), ``resolved=None`` (0.1 for the full variant with ``"eigh"``,
    else 0) and ``warmup_steps=None`` (3 where that gate is on, else 0). ``space`` may stay
    ``"auto"`` until the optimizer is known (:meth:`with_space`). ``eps=None`` stays ``None``:
    it depends on the factors' dtype (:meth:`eps_for`).

    Example:
        >>> from reflora.config import RefLoRAConfig
        >>> cfg = RefLoRAConfig(variant="full", solver="newton_schulz")
        >>> cfg.frame, cfg.resolved, cfg.warmup_steps
        ('symmetric', 0.0, 0)
        >>> RefLoRAConfig().warmup_steps
        3
    """

    variant: Literal["full", "scalar"] = "full"
    space: Space = "auto"
    warmup_steps: int | None = None
    interval: int = 1
    eps: float | None = None
    second_moment: Literal["square", "keep", "reset"] = "square"
    frame: Literal["paper", "symmetric", "block"] | None = None
    solver: Literal["eigh", "newton_schulz"] = "eigh"
    rank_above_size: Literal["skip", "act"] = "skip"
    resolved: float | None = None
    compile: bool = False
    diagnostics_interval: int = 0

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        set_("variant", check_variant(self.variant))
        if self.space not in SPACES:
            raise ValueError(f"space must be one of {SPACES}; got {self.space!r}")
        if self.warmup_steps is not None:
            check_int("warmup_steps", self.warmup_steps, 0)
        check_int("interval", self.interval, 1)
        check_int("diagnostics_interval", self.diagnostics_interval, 0)
        if not isinstance(self.compile, bool):
            raise TypeError(f"compile must be a bool; got {type(self.compile).__name__}")
        check_second_moment(self.second_moment)
        solver, frame = check_solver(self.solver, self.frame)
        set_("solver", solver)
        set_("frame", frame)
        if self.eps is not None:
            set_("eps", check_eps(self.eps, torch.float64))
        if frame == "block":
            self._check_block()
            set_("resolved", 0.0)  # the block frame floors unresolved directions instead of gating
        set_("resolved", resolve_resolved(self.resolved, self.variant, solver))
        if self.warmup_steps is None:  # the gate's warmup where the gate is on
            set_("warmup_steps", DEFAULT_GATE_WARMUP if self.resolved > 0 else 0)
        if self.rank_above_size not in RANK_ABOVE_SIZE:
            raise ValueError(f"rank_above_size must be 'skip' or 'act'; got {self.rank_above_size!r}")

    def _check_block(self) -> None:
        if self.variant != "full":
            raise ValueError("frame='block' is a frame of the full variant; use variant='full' with frame='block'")
        if self.resolved not in (None, 0, 0.0):
            raise ValueError(
                f"frame='block' has no resolution gate (it floors the unresolved directions instead); leave "
                f"resolved unset with frame='block' (got resolved={self.resolved!r})"
            )
        if self.space == "gradient":
            raise ValueError(
                "frame='block' acts through the coordinates of the refactored factors, which gradient space does "
                "not change; use space='parameter' (or 'auto' with an optimizer that has a state transport)"
            )

    def with_space(self, space: Literal["gradient", "parameter"]) -> RefLoRAConfig:
        """This configuration with ``space`` resolved."""
        return dataclasses.replace(self, space=space)

    def eps_for(self, dtype: torch.dtype) -> float:
        """The dead-direction threshold for factors of ``dtype`` (``eps=None``: its default)."""
        return check_eps(self.eps, dtype)

    def active(self, t: int) -> bool:
        """Whether RefLoRA acts at optimizer step ``t`` (counted from 0)."""
        return t >= self.warmup_steps and (t - self.warmup_steps) % self.interval == 0

    @property
    def caches(self) -> bool:
        """Gradient space with ``interval > 1`` keeps ``S`` and ``S^{-1}`` between refreshes."""
        return self.space == "gradient" and self.interval > 1

    # -- rules that need a fact from outside the options ------------------------------------
    def leaves_out(self, r: int, m: int, n: int) -> bool:
        """``rank_above_size="skip"``: whether a pair of this shape is left to the bare optimizer."""
        return self.rank_above_size == "skip" and exceeds_layer_size(r, m, n)

    def refuses_parameter_space(self, r: int, m: int, n: int) -> bool:
        """Whether parameter space cannot refactor a pair of this shape with these options: the
        eigh-free solver cannot tell dead directions from live ones; on a direction dead in one
        factor its ``P`` is conditioned like 1e3-1e6, and refactoring by it every step sent the
        factors to NaN in every case measured."""
        return self.solver == "newton_schulz" and self.variant == "full" and exceeds_layer_size(r, m, n)

    def check_pair(self, name: str, r: int, m: int, n: int) -> None:
        """Raise for a pair of this shape that this configuration (space resolved) cannot handle."""
        if self.space == "parameter" and self.refuses_parameter_space(r, m, n):
            raise ValueError(
                f"solver='newton_schulz' with space='parameter' cannot refactor pairs whose rank exceeds "
                f"the layer's size (r > min(m, n)), e.g. {name!r} (r={r}, m={m}, n={n}): it has no dead-direction "
                "handling and the refactor becomes ill-conditioned (measured: NaN). Use solver='eigh', "
                "space='gradient', or rank_above_size='skip' (the default, which leaves such pairs to the bare "
                "optimizer)"
            )

    def warn_if_unstable(self, optimizer_name: str, keeps_second_moments: bool, stacklevel: int = 3) -> None:
        """One :class:`UnstableOptionWarning` for an option measured to diverge, or to lose, with an
        optimizer whose transport does (``keeps_second_moments``) or does not keep element-wise
        second moments: ``second_moment="reset"`` in parameter space under one that does, and
        ``frame="block"`` under one that does not (its frame only matters to per-coordinate steps)."""
        if self.frame == "block" and not keeps_second_moments:
            warnings.warn(
                f"frame='block' under {optimizer_name}: its frame only matters to optimizers with per-coordinate "
                "steps (Adam's family); here it is the floored balance, which lost to the paper's form under SGD "
                "(docs/rank-deficient.md). Use the default, or resolved=0.0",
                UnstableOptionWarning,
                stacklevel=stacklevel,
            )
            return
        if self.space != "parameter" or self.second_moment != "reset" or not keeps_second_moments:
            return
        warnings.warn(
            f"second_moment='reset' zeroes {optimizer_name}'s second moments at every refactor, so the next "
            "update divides by a near-zero denominator: with the full variant it diverged in every AdamW cell "
            "of benchmarks/studies/rank_deficient.py (docs/rank-deficient.md). Use second_moment='square' "
            "(the default)",
            UnstableOptionWarning,
            stacklevel=stacklevel,
        )

    def check_zero_diagnostics(self) -> None:
        """Raise for options the DeepSpeed ZeRO path (gradient hooks during backward, see
        :class:`reflora.strategies.ZeroGradientStrategy`) cannot honour."""
        if self.diagnostics_interval:
            raise ValueError(
                "diagnostics_interval under DeepSpeed ZeRO: the handle there preconditions gradients in "
                "DeepSpeed's own hooks and records no diagnostics. Leave diagnostics_interval=0 and call "
                "reflora.diagnostics.diagnose(pairs) (or the model) between steps for the same stats"
            )

    def check_zero_space(self, wrapper_name: str) -> None:
        """Raise for ``space="parameter"`` under DeepSpeed ZeRO (after ZeRO-3 has been ruled out)."""
        if self.space == "parameter":
            raise UnsupportedOptimizerError(
                f"space='parameter' under DeepSpeed ZeRO ({wrapper_name}): a refactor must rewrite the fp32 master "
                "weights and the optimizer state of A and B, which ZeRO keeps as flat partitions spread over the "
                "ranks. Use space='gradient' (supported on ZeRO-1/2: gradients are preconditioned before DeepSpeed "
                "reduces them), or FSDP2 (torch.distributed.fsdp.fully_shard, see reflora.distributed), where all "
                "four modes work"
            )
