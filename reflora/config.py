"""The RefLoRA options, validated once: :class:`RefLoRAConfig`, and the choice of space.

Every entry point (:func:`reflora.attach`, :mod:`reflora.func`, the DeepSpeed ZeRO path) builds
one :class:`RefLoRAConfig` from its keyword arguments; a rule about an option lives here and
nowhere else. ``space="auto"`` is resolved here too, from the optimizer
(:func:`reflora.default_space`) and then from the pairs (:func:`reflora.config.resolve_space`).
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Literal

import torch

from reflora._kernels import (
    DEFAULT_GATE_WARMUP,
    SECOND_MOMENT_RULES,
    UnstableOptionWarning,
    check_eps,
    check_solver,
    check_variant,
    resolve_resolved,
)
from reflora.distributed import any_sharded
from reflora.integrations.deepspeed import zero_optimizer
from reflora.pairs import LoRAPair
from reflora.transport import (
    UnsupportedOptimizerError,
    check_transportable,
    get_state_transport,
    keeps_second_moments,
    qualname,
)

__all__ = ["GradientSpaceFallbackWarning", "RefLoRAConfig", "check_int", "default_space", "resolve_space", "unwrap_optimizer"]


class GradientSpaceFallbackWarning(UserWarning):
    """``space="auto"`` chose gradient space because no state transport is registered for the
    optimizer. For Adam-like optimizers parameter space is usually the better mode (their
    element-wise second moments undo much of a gradient-space preconditioner), and it needs the
    transport. Silence it by passing ``space="gradient"``, or with
    ``warnings.filterwarnings("ignore", category=reflora.GradientSpaceFallbackWarning)``."""

Space = Literal["auto", "gradient", "parameter"]
SPACES = ("auto", "gradient", "parameter")
RANK_ABOVE_SIZE = ("skip", "act")


def check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int; got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}")
    return value


@dataclass(frozen=True)
class RefLoRAConfig:
    """The RefLoRA options of :func:`reflora.attach` and :mod:`reflora.func`, validated.

    The fields are the keyword arguments of :func:`reflora.attach` (see there for what each one
    means). ``__post_init__`` checks every option, in a fixed order, and resolves the defaults
    that depend on others: ``frame=None`` (``"paper"`` with ``solver="eigh"``, ``"symmetric"``
    with ``"newton_schulz"``), ``resolved=None`` (0.1 for the full variant with ``"eigh"``,
    else 0) and ``warmup_steps=None`` (3 where that gate is on, else 0). ``space`` may stay
    ``"auto"`` until the optimizer is known
    (:meth:`with_space`). ``eps=None`` stays ``None``: it depends on the factors' dtype
    (:meth:`eps_for`).

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
    frame: Literal["paper", "symmetric"] | None = None
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
        if self.second_moment not in SECOND_MOMENT_RULES:
            raise ValueError(f"second_moment must be one of {SECOND_MOMENT_RULES}; got {self.second_moment!r}")
        solver, frame = check_solver(self.solver, self.frame)
        set_("solver", solver)
        set_("frame", frame)
        if self.eps is not None:
            set_("eps", check_eps(self.eps, torch.float64))
        set_("resolved", resolve_resolved(self.resolved, self.variant, solver))
        if self.warmup_steps is None:  # the gate's warmup where the gate is on (DEFAULT_GATE_WARMUP)
            set_("warmup_steps", DEFAULT_GATE_WARMUP if self.resolved > 0 else 0)
        if self.rank_above_size not in RANK_ABOVE_SIZE:
            raise ValueError(f"rank_above_size must be 'skip' or 'act'; got {self.rank_above_size!r}")

    def with_space(self, space: Literal["gradient", "parameter"]) -> RefLoRAConfig:
        """This configuration with ``space`` resolved."""
        return dataclasses.replace(self, space=space)

    def warn_if_unstable(self, optimizer: Any, stacklevel: int = 3) -> None:
        """One :class:`~reflora._kernels.UnstableOptionWarning` for an option measured to diverge with
        ``optimizer`` (a torch optimizer instance or class): ``second_moment="reset"`` in parameter
        space under an optimizer with element-wise second moments."""
        if self.space != "parameter" or self.second_moment != "reset":
            return
        transport = get_state_transport(optimizer)
        if transport is None or not keeps_second_moments(transport):
            return
        warnings.warn(
            f"second_moment='reset' zeroes {qualname(optimizer)}'s second moments at every refactor, so the next "
            "update divides by a near-zero denominator: with the full variant it diverged in every AdamW cell "
            "of benchmarks/rank_deficient.py (90 of 90; docs/rank-deficient.md). Use second_moment='square' "
            "(the default)",
            UnstableOptionWarning,
            stacklevel=stacklevel,
        )

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

    def check_pairs(self, pairs: Iterable[LoRAPair]) -> None:
        """Raise for pairs this configuration cannot handle (before anything is hooked)."""
        if self.solver == "newton_schulz" and self.variant == "full" and self.space == "parameter":
            above = [p for p in pairs if rank_above_size(p)]
            if above:
                # the eigh-free solver cannot tell dead directions from live ones; on a direction
                # dead in one factor its P is conditioned like 1e3-1e6, and refactoring by it every
                # step sent the factors to NaN in every case measured
                raise ValueError(
                    f"solver='newton_schulz' with space='parameter' cannot refactor pairs whose rank exceeds "
                    f"the layer's size (r > min(m, n)), e.g. {above[0].name!r} (r={above[0].shape[0]}, "
                    f"m={above[0].shape[1]}, n={above[0].shape[2]}): it has no dead-direction handling and the "
                    "refactor becomes ill-conditioned (measured: NaN). Use solver='eigh', space='gradient', or "
                    "rank_above_size='skip' (the default, which leaves such pairs to the bare optimizer)"
                )


def rank_above_size(pair: LoRAPair) -> bool:
    """Whether the pair's rank exceeds its layer's size, ``r > min(m, n)``."""
    r, m, n = pair.shape
    return r > min(m, n)


def skip_rank_above_size(pairs: list[LoRAPair], mode: str, what: str = "pairs given to attach") -> list[LoRAPair]:
    """``rank_above_size="skip"``: the pairs without those whose rank exceeds their layer's size
    (one warning naming them; an error if that leaves none)."""
    above = [p for p in pairs if rank_above_size(p)]
    if not above or mode == "act":
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
        f"leaving {len(above)} pair(s) whose rank exceeds the layer's size (r > min(m, n)) to the bare "
        f"optimizer: {names}{more}. B A can use at most min(m, n) of their r directions; pass "
        "rank_above_size='act' to apply RefLoRA to them anyway",
        stacklevel=3,
    )
    return [p for p in pairs if not rank_above_size(p)]


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The ``torch.optim.Optimizer`` whose ``step()`` runs (accelerate's wrapper unwrapped);
    raises for closure-only optimizers (LBFGS)."""
    # accelerate's AcceleratedOptimizer (and similar wrappers) keep the real one in .optimizer;
    # hooks must go on the object whose step() actually runs.
    seen = 0
    while not isinstance(optimizer, torch.optim.Optimizer) or (
        type(optimizer).__name__ == "AcceleratedOptimizer" and hasattr(optimizer, "optimizer")
    ):
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or seen > 4:
            break
        optimizer, seen = inner, seen + 1
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer; got {type(optimizer).__name__}")
    step = inspect.signature(type(optimizer).step).parameters.get("closure")
    if step is not None and step.default is inspect.Parameter.empty:
        raise UnsupportedOptimizerError(
            f"{qualname(optimizer)}.step requires a closure: it re-evaluates the loss several "
            "times per step, and RefLoRA's per-step preconditioning / refactoring would have to run "
            "inside every evaluation. Use a first-order optimizer (SGD, Adam, AdamW, ...)."
        )
    return optimizer


def default_space(optimizer: Any) -> Literal["gradient", "parameter"]:
    """The space ``attach(optimizer, pairs)`` uses (``space="auto"``), from the optimizer alone.

    ``"parameter"`` for optimizers with a registered transport that moves element-wise second
    moments (Adam, AdamW, NAdam, RAdam, RMSprop, Adagrad, Adafactor, and the 8-bit / 4-bit /
    paged ones of :mod:`reflora.lowbit`: Adam-like, whose second moments undo most of a
    gradient-space preconditioner); ``"gradient"`` for the others (SGD, bitsandbytes' Lion:
    first moments only, optimizers without a registered transport) and under DeepSpeed ZeRO.
    Subclasses follow their
    nearest registered base class. :func:`reflora.attach` then falls back from ``"parameter"``
    to ``"gradient"`` where the pairs rule parameter space out (:func:`reflora.config.resolve_space`);
    ``handle.space`` reports what was used. The measurements behind the choice are in the
    docs/options.md, "Defaults (measured)".

    Args:
        optimizer: the optimizer ``attach`` would get (accelerate / DeepSpeed wrappers
            included), or an optimizer class.

    Returns:
        ``"parameter"`` or ``"gradient"``.

    Example:
        >>> import torch
        >>> import reflora
        >>> w = torch.nn.Parameter(torch.zeros(2))
        >>> reflora.default_space(torch.optim.AdamW([w])), reflora.default_space(torch.optim.SGD([w], lr=0.1))
        ('parameter', 'gradient')
    """
    if isinstance(optimizer, type):
        transport = get_state_transport(optimizer)
    else:
        if zero_optimizer(optimizer) is not None:
            return "gradient"
        transport = get_state_transport(unwrap_optimizer(optimizer))
    return "parameter" if transport is not None and keeps_second_moments(transport) else "gradient"


def resolve_space(
    opt: torch.optim.Optimizer, zero: Any, pairs: list[LoRAPair], cfg: RefLoRAConfig
) -> Literal["gradient", "parameter"]:
    """``space="auto"``: :func:`reflora.default_space`, then the fallbacks the pairs force: FSDP2
    (``DTensor``) factors with a function transport, ``solver="newton_schulz"`` with a full-variant
    pair of rank above its layer's size, and (with a warning) state the transport cannot move."""
    if zero is not None or default_space(opt) == "gradient":
        if zero is None and get_state_transport(opt) is None:
            warnings.warn(
                f"space='auto' runs RefLoRA in gradient space for {qualname(opt)}, which has no registered state "
                "transport; if its state is Adam-like (second moments), parameter space usually does better: "
                f"declare the state with reflora.register_state_transport({type(opt).__name__}, {{...}}), or pass "
                "space='gradient' to keep this and silence the notice",
                GradientSpaceFallbackWarning,
                stacklevel=3,
            )
        return "gradient"
    transport = get_state_transport(opt)
    if getattr(transport, "spec", None) is None and any_sharded(pairs):
        if hasattr(transport, "move_state"):  # low-bit state: a user of it expects parameter space
            warnings.warn(
                f"space='auto': {qualname(opt)} would use space='parameter', but its quantized state cannot be "
                "moved shard by shard on sharded (DTensor / FSDP2) factors; using space='gradient'",
                stacklevel=3,
            )
        return "gradient"  # attach refuses function transports on sharded factors
    if cfg.solver == "newton_schulz" and cfg.variant == "full" and any(rank_above_size(p) for p in pairs):
        return "gradient"  # attach refuses this in parameter space (NaN measured)
    try:
        check_transportable(opt, transport, cfg.second_moment, pairs)
    except Exception as err:  # noqa: BLE001 - any refusal of the transport means: not parameter space
        warnings.warn(
            f"space='auto': {qualname(opt)} would use space='parameter', but its state cannot be moved "
            f"({type(err).__name__}: {err}); using space='gradient'",
            stacklevel=3,
        )
        return "gradient"
    return "parameter"
