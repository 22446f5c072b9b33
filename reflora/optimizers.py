"""What reflora needs to know about the user's optimizer, and the space it gets.

* Which optimizer steps: accelerate's wrapper unwrapped (:func:`unwrap_optimizer`), closure-only
  optimizers (LBFGS) refused, DeepSpeed's ZeRO optimizers recognised by module name without
  importing deepspeed (:func:`zero_optimizer`, :func:`check_zero_stage`, :func:`check_zero_factors`).
* Which space ``space="auto"`` means: from the optimizer alone (:func:`reflora.default_space`),
  then from the pairs (:func:`resolve_space`).
* What parameter space needs of it: a transport that can move these pairs' state
  (:func:`transport_for`).
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any, Literal

import torch

from reflora.config import RefLoRAConfig, UnsupportedOptimizerError
from reflora.distributed import any_sharded
from reflora.pairs import LoRAPair
from reflora.transport import StateTransport, get_state_transport, qualname

__all__ = [
    "ZERO3_MESSAGE",
    "GradientSpaceFallbackWarning",
    "check_zero_factors",
    "check_zero_stage",
    "default_space",
    "resolve_space",
    "transport_for",
    "unwrap_optimizer",
    "zero_optimizer",
]


class GradientSpaceFallbackWarning(UserWarning):
    """``space="auto"`` chose gradient space because no state transport is registered for the
    optimizer. For Adam-like optimizers parameter space is usually the better mode (their
    element-wise second moments undo much of a gradient-space preconditioner), and it needs the
    transport. Silence it by passing ``space="gradient"``, or with
    ``warnings.filterwarnings("ignore", category=reflora.GradientSpaceFallbackWarning)``."""


# ------------------------------------------------------------------------------- which optimizer


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


def _is_deepspeed(obj: Any) -> bool:
    return type(obj).__module__.split(".")[0] == "deepspeed"


def zero_optimizer(optimizer: Any) -> tuple[Any, torch.optim.Optimizer] | None:
    """``(DeepSpeed's optimizer wrapper, the torch optimizer inside)`` if ``optimizer`` is (or
    wraps, as accelerate's ``AcceleratedOptimizer`` does) a DeepSpeed ZeRO / mixed-precision
    optimizer; ``None`` otherwise. deepspeed is not imported: it is recognised by module name."""
    seen, obj = 0, optimizer
    while obj is not None and seen < 6:
        if _is_deepspeed(obj) and not isinstance(obj, torch.optim.Optimizer):
            inner = obj
            while not isinstance(inner, torch.optim.Optimizer):
                inner = getattr(inner, "optimizer", None)
                if inner is None:
                    raise TypeError(
                        f"{type(obj).__module__}.{type(obj).__qualname__} holds no torch optimizer in "
                        ".optimizer; RefLoRA does not know this DeepSpeed optimizer"
                    )
            return obj, inner
        obj, seen = getattr(obj, "optimizer", None), seen + 1
    return None


ZERO3_MESSAGE = (
    "DeepSpeed ZeRO-3{name} partitions the parameters themselves: outside its forward and backward passes "
    "every rank holds a flat slice of each factor, so RefLoRA cannot see A and B. Use ZeRO-1 or ZeRO-2 with "
    "space='gradient', or FSDP2 (torch.distributed.fsdp.fully_shard, see reflora.distributed), where all four "
    "modes work"
)


def check_zero_stage(wrapper: Any) -> None:
    """Raise for ZeRO-3 (checked before the pairs are looked for: its factors are empty placeholders)."""
    if "Stage3" in type(wrapper).__name__:
        raise UnsupportedOptimizerError(ZERO3_MESSAGE.format(name=f" ({qualname(wrapper)})"))


def check_zero_factors(wrapper: Any, pairs: list[LoRAPair]) -> None:
    """Raise for factors ZeRO has partitioned (ZeRO-3 parameters that got past :func:`check_zero_stage`)."""
    check_zero_stage(wrapper)
    if any(hasattr(t, "ds_tensor") for p in pairs for t in (p.A, p.B)):
        raise UnsupportedOptimizerError(ZERO3_MESSAGE.format(name=f" ({qualname(wrapper)})"))


# ------------------------------------------------------------------------------- which space


def _keeps_second_moments(transport: StateTransport | None) -> bool:
    return transport is not None and transport.keeps_second_moments()


def default_space(optimizer: Any) -> Literal["gradient", "parameter"]:
    """The space ``attach(optimizer, pairs)`` uses (``space="auto"``), from the optimizer alone.

    ``"parameter"`` for optimizers with a registered transport that moves element-wise second
    moments (Adam, AdamW, NAdam, RAdam, RMSprop, Adagrad, Adafactor, and the 8-bit / 4-bit /
    paged ones of :mod:`reflora.transport.lowbit`: Adam-like, whose second moments undo most of
    a gradient-space preconditioner); ``"gradient"`` for the others (SGD, bitsandbytes' Lion:
    first moments only, optimizers without a registered transport) and under DeepSpeed ZeRO.
    Subclasses follow their nearest registered base class. :func:`reflora.attach` then falls
    back from ``"parameter"`` to ``"gradient"`` where the pairs rule parameter space out
    (:func:`reflora.optimizers.resolve_space`); ``handle.space`` reports what was used. Why:
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
    return "parameter" if _keeps_second_moments(transport) else "gradient"


def resolve_space(
    opt: torch.optim.Optimizer, zero: Any, pairs: list[LoRAPair], cfg: RefLoRAConfig
) -> Literal["gradient", "parameter"]:
    """``space="auto"``: :func:`reflora.default_space`, then the fallbacks the pairs force:
    sharded (FSDP2 ``DTensor``) factors with a transport that cannot move their state shard by
    shard, a pair parameter space cannot refactor (:meth:`reflora.RefLoRAConfig.refuses_parameter_space`),
    and (with a warning) state the transport cannot move. ``frame="block"`` acts in parameter space
    only: any optimizer with a transport gets it (and attach raises where it cannot)."""
    if cfg.frame == "block" and zero is None and get_state_transport(opt) is not None:
        return "parameter"
    if zero is not None or default_space(opt) == "gradient":
        if zero is None and get_state_transport(opt) is None:
            warnings.warn(
                f"space='auto' runs RefLoRA in gradient space for {qualname(opt)}, which has no registered state "
                "transport; if its state is Adam-like (second moments), parameter space usually does better: "
                f"declare the state with reflora.register_state_transport({type(opt).__name__}, {example_spec(opt)}), or pass "
                "space='gradient' to keep this and silence the notice",
                GradientSpaceFallbackWarning,
                stacklevel=3,
            )
        return "gradient"
    transport = get_state_transport(opt)
    assert transport is not None  # (default_space gave "parameter")
    if transport.sharded_refusal(opt) is not None and any_sharded(pairs):
        if transport.quantized:  # low-bit state: a user of it expects parameter space
            warnings.warn(
                f"space='auto': {qualname(opt)} would use space='parameter', but its quantized state cannot be "
                "moved shard by shard on sharded (DTensor / FSDP2) factors; using space='gradient'",
                stacklevel=3,
            )
        return "gradient"  # attach refuses this transport on sharded factors
    if any(cfg.refuses_parameter_space(*p.shape) for p in pairs):
        return "gradient"  # attach refuses this in parameter space (NaN measured)
    try:
        transport.check_pairs(opt, pairs, cfg.second_moment)
    except Exception as err:  # noqa: BLE001 - any refusal of the transport means: not parameter space
        warnings.warn(
            f"space='auto': {qualname(opt)} would use space='parameter', but its state cannot be moved "
            f"({type(err).__name__}: {err}); using space='gradient'",
            stacklevel=3,
        )
        return "gradient"
    return "parameter"


#: state keys whose kind their name gives away (the example in the unregistered-optimizer error)
_KNOWN_KINDS = {
    "step": "keep", "exp_avg": "first", "momentum_buffer": "first", "grad_avg": "first", "exp_avg_slow": "first",
    "exp_avg_sq": "second", "max_exp_avg_sq": "second", "sum": "second", "square_avg": "second",
    "z": "iterate", "p0": "iterate",
}


def example_spec(opt: torch.optim.Optimizer) -> str:
    """A ``register_state_transport`` spec for ``opt`` from the keys its state holds now (kinds
    guessed from the names, ``'?'`` where the name says nothing), or an Adam-like template."""
    keys = sorted({k for st in opt.state.values() for k in st})
    if not keys:
        return "{'exp_avg': 'first', 'exp_avg_sq': 'second', ...}"
    return "{" + ", ".join(f"{k!r}: {_KNOWN_KINDS.get(k, '?')!r}" for k in keys[:8]) + "}"


def transport_for(opt: torch.optim.Optimizer, pairs: list[LoRAPair]) -> StateTransport:
    """Parameter space: the transport of ``opt``; raises unless it can move these pairs' state."""
    transport = get_state_transport(opt)
    if transport is None:
        raise UnsupportedOptimizerError(
            f"space='parameter' needs a state transport for {type(opt).__name__}, and none is registered: declare "
            f"its state with reflora.register_state_transport({type(opt).__name__}, {example_spec(opt)}), or use "
            "space='gradient' (the registered ones: reflora.transport.registered_optimizers())"
        )
    refused = transport.refusal(opt)
    if refused is not None:
        raise UnsupportedOptimizerError(refused)
    refusal = transport.sharded_refusal(opt)
    if refusal is not None and any_sharded(pairs):
        raise UnsupportedOptimizerError(refusal)
    return transport
