r"""Where a handle's step happens: the :class:`Strategy` protocol and its two implementations.

* :class:`HookStrategy` (the default): the whole step in the optimizer's step pre-hook, on the
  gradients the optimizer is about to read.
* :class:`ZeroGradientStrategy`: DeepSpeed ZeRO-1 / ZeRO-2, where the torch optimizer steps on
  flattened fp32 partitions of all parameters and an optimizer hook can no longer see the
  factors' gradients (they are reduced into those partitions, and freed, during backward). ZeRO-1/2
  keep every parameter whole on every rank, so RefLoRA acts *before* DeepSpeed's own gradient
  hooks: a tensor hook on each factor (``register_hook``: it runs on the gradient before it is
  accumulated into ``.grad``, where DeepSpeed's hooks pick it up) applies ``grad_A <- S^-1 grad_A``
  and ``grad_B <- grad_B S`` to this rank's micro-batch gradient. ``S`` depends on the factors
  only, which are the same on every rank, so it is computed once per optimizer step with no
  communication, and preconditioning each rank's gradient before DeepSpeed averages them equals
  preconditioning the average. DeepSpeed's gradient clipping then runs on the preconditioned
  gradients. Parameter space and ZeRO-3 are refused at :func:`reflora.attach`.

A strategy talks to the handle through :class:`Host`, the part of :class:`reflora.RefLoRAHandle`
it may use; it calls no private method.
"""

from __future__ import annotations

import functools
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from reflora.cache import MetricCache
from reflora.config import RefLoRAConfig
from reflora.pairs import LoRAPair
from reflora.runner import StepRunner
from reflora.step import group_metrics, precondition_one

__all__ = ["HookStrategy", "Host", "Strategy", "ZeroGradientStrategy"]


class Host(Protocol):
    """What a strategy may use of the handle it serves."""

    pairs: tuple[LoRAPair, ...]
    config: RefLoRAConfig
    runner: StepRunner
    cache: MetricCache

    @property
    def groups(self) -> list[list[int]]: ...

    @property
    def step_count(self) -> int: ...

    @property
    def removed(self) -> bool: ...


class Strategy(Protocol):
    """Where the gradients are handled, around the optimizer step hooks the handle installs."""

    def install(self, handle: Host) -> list[RemovableHandle]:
        """Register what the strategy needs besides the optimizer's step hooks; removed with the handle."""
        ...

    def pre_step(self, handle: Host, optimizer: torch.optim.Optimizer, kwargs: Any) -> None:
        """The optimizer is about to step on the gradients now present (``step(closure)``: those
        the closure just computed)."""
        ...

    def post_step(self, handle: Host) -> None:
        """The optimizer step has finished and been counted."""
        ...


class HookStrategy:
    """The default strategy: the whole step runs in the optimizer's step pre-hook."""

    def install(self, handle: Host) -> list[RemovableHandle]:
        return []

    def pre_step(self, handle: Host, optimizer: torch.optim.Optimizer, kwargs: Any) -> None:
        handle.runner.run(optimizer, kwargs)

    def post_step(self, handle: Host) -> None:
        pass


class ZeroGradientStrategy:
    """Under DeepSpeed ZeRO-1/2: gradient hooks on the factors precondition each rank's gradient
    during backward, before DeepSpeed reduces it; the optimizer's pre-hook does nothing. ``S``
    comes from the handle's :class:`~reflora.cache.MetricCache` (refreshed as in the plain hook:
    every ``interval`` steps), once per optimizer step.

    Attributes:
        deepspeed_optimizer: DeepSpeed's optimizer wrapper (``None`` if not given).
    """

    def __init__(self, deepspeed_optimizer: Any = None) -> None:
        self.deepspeed_optimizer = deepspeed_optimizer
        self._step_metrics: dict[int, tuple[Tensor, Tensor]] | None = None  # per pair, for this step

    def install(self, handle: Host) -> list[RemovableHandle]:
        return [
            t.register_hook(functools.partial(self._grad_hook, handle, i, role))
            for i, p in enumerate(handle.pairs)
            for role, t in (("A", p.A), ("B", p.B))
        ]

    def pre_step(self, handle: Host, optimizer: torch.optim.Optimizer, kwargs: Any) -> None:
        return None  # the gradients were preconditioned in backward, before DeepSpeed reduced them

    def post_step(self, handle: Host) -> None:
        self._step_metrics = None  # the factors changed: the next backward recomputes S

    def _metrics(self, handle: Host) -> dict[int, tuple[Tensor, Tensor]]:
        cfg, t = handle.config, handle.step_count
        work = list(enumerate(handle.groups))
        with torch.no_grad():
            metrics = handle.cache.metrics(
                work, cfg.active(t) or cfg.interval == 1,
                lambda jobs: group_metrics(jobs, cfg, transform=False),  # type: ignore[arg-type,return-value]
            )
        return {i: (S[j].clone(), S_inv[j].clone()) for (_, group), (S, S_inv) in zip(work, metrics)
                for j, i in enumerate(group)}

    def _grad_hook(self, handle: Host, i: int, role: str, grad: Tensor) -> Tensor | None:
        if handle.removed or handle.step_count < handle.config.warmup_steps:
            return None
        if self._step_metrics is None:
            self._step_metrics = self._metrics(handle)
        S, S_inv = self._step_metrics[i]
        with torch.no_grad():
            return precondition_one(grad, handle.pairs[i], role, S, S_inv, handle.config.variant == "scalar")
