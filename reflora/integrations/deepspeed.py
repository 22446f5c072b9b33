r"""RefLoRA under DeepSpeed ZeRO-1 / ZeRO-2 (gradient space), and clear errors for the rest.

Under ZeRO the torch optimizer steps on flattened fp32 partitions of all parameters, not on the
factors: an optimizer step hook cannot see the pairs, and ``A.grad`` / ``B.grad`` are already
reduced into those partitions (and freed) by the time it runs. What ZeRO-1/2 keep is every
parameter whole on every rank. So RefLoRA acts *before* DeepSpeed's own gradient hooks:

* a tensor hook on each factor (``register_hook``: it runs on the gradient before it is
  accumulated into ``.grad``, where DeepSpeed's hooks pick it up for the reduction) applies
  ``grad_A <- S^-1 grad_A`` and ``grad_B <- grad_B S`` to this rank's (micro-batch) gradient;
* ``S`` is computed once per optimizer step from the factors, which are the same on every rank
  (DeepSpeed all-gathers them after each step): identical inputs, identical ``S``, no
  communication; it is recomputed after each step of the inner optimizer (a step post-hook,
  which also counts steps: a step DeepSpeed skips on overflow is not counted).

The preconditioning is linear and ``S`` depends on the factors only, so preconditioning each
rank's gradient before DeepSpeed averages them equals preconditioning the average (what one
process would do). Differences from the plain-torch semantics: DeepSpeed's gradient clipping
(``gradient_clipping``) runs after the reduction, on the preconditioned gradients; and every rank
computes the Grams of every pair (ZeRO-1/2 hold every factor whole anyway).

Not supported, with an error at :func:`reflora.attach` that says so: ``space="parameter"``
(the refactor would have to rewrite the fp32 master weights and the optimizer state, which ZeRO
holds as flat partitions across ranks) and ZeRO-3 (the factors themselves are partitioned).
Both work with FSDP2 (``torch.distributed.fsdp.fully_shard``), see :mod:`reflora.distributed`.

deepspeed is never imported here: its optimizers are recognised by their module name.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from reflora.handle import RefLoRAHandle
from reflora.pairs import LoRAPair
from reflora.step import precondition_one
from reflora.transport import UnsupportedOptimizerError

__all__ = ["ZeroGradientHandle", "ZeroGradientStrategy", "check_zero", "check_zero_stage", "zero_optimizer"]


def _is_deepspeed(obj: Any) -> bool:
    return type(obj).__module__.split(".")[0] == "deepspeed"


def zero_optimizer(optimizer: Any) -> tuple[Any, torch.optim.Optimizer] | None:
    """``(DeepSpeed's optimizer wrapper, the torch optimizer inside)`` if ``optimizer`` is (or
    wraps, as accelerate's ``AcceleratedOptimizer`` does) a DeepSpeed ZeRO / mixed-precision
    optimizer; ``None`` otherwise."""
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
        raise UnsupportedOptimizerError(
            ZERO3_MESSAGE.format(name=f" ({type(wrapper).__module__}.{type(wrapper).__qualname__})"))


def check_zero(wrapper: Any, pairs: list[LoRAPair], space: str) -> None:
    """Raise for what RefLoRA cannot do under this DeepSpeed optimizer (before anything is hooked)."""
    name = f"{type(wrapper).__module__}.{type(wrapper).__qualname__}"
    check_zero_stage(wrapper)
    if any(hasattr(t, "ds_tensor") for p in pairs for t in (p.A, p.B)):
        raise UnsupportedOptimizerError(ZERO3_MESSAGE.format(name=f" ({name})"))
    if space == "parameter":
        raise UnsupportedOptimizerError(
            f"space='parameter' under DeepSpeed ZeRO ({name}): a refactor must rewrite the fp32 master weights "
            "and the optimizer state of A and B, which ZeRO keeps as flat partitions spread over the ranks. Use "
            "space='gradient' (supported on ZeRO-1/2: gradients are preconditioned before DeepSpeed reduces them), "
            "or FSDP2 (torch.distributed.fsdp.fully_shard, see reflora.distributed), where all four modes work"
        )
    for p in pairs:
        for label, t in (("A", p.A), ("B", p.B)):
            if not t.requires_grad:
                raise ValueError(f"pair {p.name!r}: {label} does not require a gradient; nothing to precondition")


class ZeroGradientStrategy:
    """Where the step happens under ZeRO-1/2: gradient hooks on the factors precondition each
    rank's gradient during backward, before DeepSpeed reduces it; the optimizer's pre-hook does
    nothing. ``S`` comes from the handle's :meth:`~reflora.RefLoRAHandle.gradient_metrics` (cached
    between refreshes with ``interval > 1``, as in the plain hook), once per optimizer step."""

    def __init__(self) -> None:
        self._step_metrics: dict[int, tuple[Tensor, Tensor]] | None = None  # per pair, for this step

    def install(self, handle: Any) -> list[Any]:
        return [
            t.register_hook(functools.partial(self._grad_hook, handle, i, role))
            for i, p in enumerate(handle.pairs)
            for role, t in (("A", p.A), ("B", p.B))
        ]

    def pre_step(self, handle: Any, optimizer: torch.optim.Optimizer, kwargs: Any) -> None:
        return None  # the gradients were preconditioned in backward, before DeepSpeed reduced them

    def post_step(self, handle: Any) -> None:
        self._step_metrics = None  # the factors changed: the next backward recomputes S

    def _compute_metrics(self, handle: Any) -> dict[int, tuple[Tensor, Tensor]]:
        cfg, t = handle.config, handle.step_count
        groups = list(enumerate(handle.groups))
        with torch.no_grad():
            metrics = handle.gradient_metrics(groups, refresh=cfg.active(t) or cfg.interval == 1)
        return {i: (S[j].clone(), S_inv[j].clone()) for (_, group), (S, S_inv) in zip(groups, metrics)
                for j, i in enumerate(group)}

    def _grad_hook(self, handle: Any, i: int, role: str, grad: Tensor) -> Tensor | None:
        if handle.removed or handle.step_count < handle.config.warmup_steps:
            return None
        if self._step_metrics is None:
            self._step_metrics = self._compute_metrics(handle)
        S, S_inv = self._step_metrics[i]
        with torch.no_grad():
            return precondition_one(grad, handle.pairs[i], role, S, S_inv, handle.config.variant == "scalar")


class ZeroGradientHandle(RefLoRAHandle):
    """RefLoRA in gradient space under DeepSpeed ZeRO-1/2: a :class:`reflora.RefLoRAHandle` whose
    strategy (:class:`reflora.integrations.deepspeed.ZeroGradientStrategy`) preconditions the
    gradients in tensor hooks during backward instead of in the optimizer's step pre-hook.

    Attributes:
        deepspeed_optimizer: DeepSpeed's optimizer wrapper.
    """

    def __init__(self, wrapper: Any, inner: torch.optim.Optimizer, pairs: list[LoRAPair], config: Any,
                 strategy: Any) -> None:
        self.deepspeed_optimizer = wrapper
        super().__init__(inner, pairs, config, strategy=strategy)
