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

from reflora.pairs import LoRAPair, to_core

__all__ = ["ZeroGradientHandle", "zero_optimizer"]


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
    from reflora.transport import UnsupportedOptimizerError

    if "Stage3" in type(wrapper).__name__:
        raise UnsupportedOptimizerError(
            ZERO3_MESSAGE.format(name=f" ({type(wrapper).__module__}.{type(wrapper).__qualname__})"))


def check_zero(wrapper: Any, pairs: list[LoRAPair], space: str) -> None:
    """Raise for what RefLoRA cannot do under this DeepSpeed optimizer (before anything is hooked)."""
    from reflora.transport import UnsupportedOptimizerError

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


def _attach_handle_class():
    from reflora.attach import RefLoRAHandle, _apply_dtype

    class ZeroGradientHandle(RefLoRAHandle):
        """RefLoRA in gradient space under DeepSpeed ZeRO-1/2 (see :mod:`reflora.integrations.deepspeed`).

        The same API as :class:`~reflora.RefLoRAHandle` (``remove``, ``state_dict``,
        ``load_state_dict``, ``step_count``); the gradients are preconditioned in tensor hooks
        during backward instead of in the optimizer's step pre-hook.
        """

        def __init__(self, wrapper: Any, inner: torch.optim.Optimizer, pairs: list[LoRAPair], **kw: Any) -> None:
            super().__init__(inner, pairs, **kw)
            self.deepspeed_optimizer = wrapper
            self._step_metrics: dict[int, tuple[Tensor, Tensor]] | None = None  # per pair, for this step
            for i, p in enumerate(self.pairs):
                for role, t in (("A", p.A), ("B", p.B)):
                    self._hooks.append(t.register_hook(functools.partial(self._grad_hook, i, role)))

        def _pre_hook(self, optimizer, args, kwargs) -> None:
            return None  # the gradients were preconditioned in backward, before DeepSpeed reduced them

        def _post_hook(self, optimizer, args, kwargs) -> None:
            super()._post_hook(optimizer, args, kwargs)
            self._step_metrics = None  # the factors changed: the next backward recomputes S

        def _compute_metrics(self) -> dict[int, tuple[Tensor, Tensor]]:
            """``S`` and ``S^-1`` of every pair for the current factors (with ``interval > 1``:
            recomputed at refresh steps, the cached ones in between), as in the plain hook."""
            t = self.step_count
            refresh = self._active(t) or self.interval == 1
            out: dict[int, tuple[Tensor, Tensor]] = {}
            with torch.no_grad():
                for g, group in enumerate(self._groups):
                    pairs = [self.pairs[i] for i in group]
                    bufs = None if self._bufs is None else self._bufs[g]
                    if refresh or any(i not in self._cached_pairs() for i in group):
                        S, S_inv = self._metrics([pairs], transform=False)[0]
                        if bufs is not None:
                            bufs[0].copy_(S)
                            bufs[1].copy_(S_inv)
                            bufs[2].fill_(True)
                            self._cached_pairs().update(group)
                    else:
                        assert bufs is not None
                        S, S_inv = bufs[0], bufs[1]
                    for j, i in enumerate(group):
                        out[i] = (S[j].clone(), S_inv[j].clone())
            return out

        def _grad_hook(self, i: int, role: str, grad: Tensor) -> Tensor | None:
            if self._removed or self.step_count < self.warmup_steps:
                return None
            if self._step_metrics is None:
                self._step_metrics = self._compute_metrics()
            S, S_inv = self._step_metrics[i]
            pair = self.pairs[i]
            layout = pair.layout[0 if role == "A" else 1]
            with torch.no_grad():
                g = to_core(grad, layout, pair.experts)
                T = _apply_dtype(S_inv if role == "A" else S, g)
                if self.variant == "scalar":
                    new = g.to(T.dtype) * T
                else:
                    new = T @ g.to(T.dtype) if role == "A" else g.to(T.dtype) @ T
                out = torch.empty_like(grad)
                to_core(out, layout, pair.experts).copy_(new)
            return out

    return ZeroGradientHandle


@functools.lru_cache(maxsize=1)
def handle_class():
    """The handle class (built on first use: it subclasses :class:`reflora.RefLoRAHandle`, and
    :mod:`reflora.attach` imports this module)."""
    return _attach_handle_class()


def __getattr__(name: str) -> Any:
    if name == "ZeroGradientHandle":
        return handle_class()
    raise AttributeError(name)
