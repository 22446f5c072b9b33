r"""The base optimizer steps of :mod:`reflora.func`: a table of pure functions over parameter dicts.

Each entry of :data:`reflora.base_steps.BASE_STEPS` is one ``torch.optim`` optimizer written out of place, following
its single-tensor kernel op for op (``_single_tensor_adam`` with decoupled weight decay,
``_single_tensor_sgd``) and tested equal to it in float64: a frozen hyperparameter record,
validated when built as ``torch.optim`` validates its constructor arguments; the names of the
per-parameter moments it keeps; and the step, ``step(t, lr, grads, moments, params, hyper) ->
(new_params, new_moments)``. Step-dependent scalars are 0-d float64 tensors (bias corrections
included), never Python floats, so a step runs under ``torch.func.vmap`` and ``torch.compile``
without recompiling. Why ``torch.optim``'s own functional kernels are not reused: docs/func.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

__all__ = ["BASE_STEPS", "AdamWHyper", "BaseStep", "SGDHyper", "adamw_step", "check_bool", "check_float", "sgd_step"]

Tensors = Mapping[str, Tensor]
Moments = Mapping[str, Mapping[str, Tensor]]


def check_float(name: str, value: Any, lo: float, hi: float | None = None, hi_open: bool = False) -> float:
    """``value`` as a float in ``[lo, hi]`` (``[lo, hi)`` with ``hi_open``; no upper bound without ``hi``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float; got {type(value).__name__}")
    value = float(value)
    ok = value >= lo and (hi is None or (value < hi if hi_open else value <= hi))
    if not ok:
        interval = f"[{lo}, {hi})" if hi_open else (f"[{lo}, {hi}]" if hi is not None else f">= {lo}")
        raise ValueError(f"{name} must be {'in ' if hi is not None else ''}{interval}; got {value!r}")
    return value


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool; got {type(value).__name__}")
    return value


@dataclass(frozen=True)
class AdamWHyper:
    """``torch.optim.AdamW``'s hyperparameters (same defaults), validated."""

    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-2
    amsgrad: bool = False

    def __post_init__(self) -> None:
        betas = self.betas
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise TypeError(f"betas must be a (beta1, beta2) tuple; got {betas!r}")
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        set_("betas", (check_float("betas[0]", betas[0], 0.0, 1.0, True), check_float("betas[1]", betas[1], 0.0, 1.0, True)))
        set_("eps", check_float("eps", self.eps, 0.0))
        set_("weight_decay", check_float("weight_decay", self.weight_decay, 0.0))
        check_bool("amsgrad", self.amsgrad)


@dataclass(frozen=True)
class SGDHyper:
    """``torch.optim.SGD``'s hyperparameters (same defaults, same checks: Nesterov needs
    ``momentum > 0`` and ``dampening == 0``), validated."""

    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False

    def __post_init__(self) -> None:
        momentum, dampening = self.momentum, self.dampening
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        set_("momentum", check_float("momentum", momentum, 0.0))
        set_("dampening", check_float("dampening", dampening, float("-inf")))
        set_("weight_decay", check_float("weight_decay", self.weight_decay, 0.0))
        check_bool("nesterov", self.nesterov)
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError(
                f"nesterov=True needs momentum > 0 and dampening == 0; got momentum={momentum!r}, dampening={dampening!r}"
            )


def adamw_step(
    t: Tensor, lr: Tensor, grads: Tensors, moments: Moments, params: Tensors, hp: AdamWHyper,
) -> tuple[dict[str, Tensor], dict[str, dict[str, Tensor]]]:
    """One AdamW step (``_single_tensor_adam``, ``capturable=False``, decoupled weight decay) out
    of place: ``(new_params, new_moments)``."""
    beta1, beta2 = hp.betas
    eps, wd, amsgrad = hp.eps, hp.weight_decay, hp.amsgrad
    new_params = dict(params)
    new = {key: dict(moments[key]) for key in moments}
    step = (t + 1).to(torch.float64)
    decay = 1 - lr * wd
    step_size = lr / (1 - beta1**step)
    bias_correction2_sqrt = (1 - beta2**step).sqrt()
    for k, p in params.items():
        g, dtype = grads[k], p.dtype
        if wd != 0:
            p = p * decay.to(dtype)
        m = new["exp_avg"][k].lerp(g, 1 - beta1)
        v = new["exp_avg_sq"][k].mul(beta2).addcmul(g, g, value=1 - beta2)
        if amsgrad:
            vmax = torch.maximum(new["max_exp_avg_sq"][k], v)
            new["max_exp_avg_sq"][k] = vmax
            denom = (vmax.sqrt() / bias_correction2_sqrt.to(dtype)).add(eps)
        else:
            denom = (v.sqrt() / bias_correction2_sqrt.to(dtype)).add(eps)
        new_params[k] = p - step_size.to(dtype) * m / denom
        new["exp_avg"][k], new["exp_avg_sq"][k] = m, v
    return new_params, new


def sgd_step(
    t: Tensor, lr: Tensor, grads: Tensors, moments: Moments, params: Tensors, hp: SGDHyper,
) -> tuple[dict[str, Tensor], dict[str, dict[str, Tensor]]]:
    """One SGD step (``_single_tensor_sgd``) out of place: ``(new_params, new_moments)``. Its
    ``buf is None`` branch (the first step takes the gradient itself, without dampening) is a
    selection on ``t == 0``."""
    momentum, dampening, wd, nesterov = hp.momentum, hp.dampening, hp.weight_decay, hp.nesterov
    new_params = dict(params)
    new = {key: dict(moments[key]) for key in moments}
    first = t == 0
    for k, p in params.items():
        g = grads[k]
        if wd != 0:
            g = g.add(p, alpha=wd)
        if momentum != 0:
            buf = new["momentum_buffer"][k].mul(momentum).add(g, alpha=1 - dampening)
            buf = torch.where(first, g, buf)
            new["momentum_buffer"][k] = buf
            g = g.add(buf, alpha=momentum) if nesterov else buf
        new_params[k] = p - lr.to(p.dtype) * g
    return new_params, new


@dataclass(frozen=True)
class BaseStep:
    """One base optimizer of :mod:`reflora.func`.

    Attributes:
        torch_optimizer: the ``torch.optim`` class it equals: ``space="auto"`` and the kinds of
            its moments follow that class's registration (:func:`reflora.default_space`,
            :func:`reflora.transport.state_kinds`).
        moments: the names of the per-parameter moments it keeps, given its hyperparameters.
        step: the step, ``step(t, lr, grads, moments, params, hyper) -> (new_params, new_moments)``.
    """

    torch_optimizer: type
    moments: Callable[[Any], tuple[str, ...]]
    step: Callable[..., tuple[dict[str, Tensor], dict[str, dict[str, Tensor]]]]


#: The base steps of :mod:`reflora.func`, by the name its constructors give (``"adamw"``, ``"sgd"``).
BASE_STEPS: dict[str, BaseStep] = {
    "adamw": BaseStep(
        torch.optim.AdamW,
        lambda hp: ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if hp.amsgrad else ()),
        adamw_step,
    ),
    "sgd": BaseStep(torch.optim.SGD, lambda hp: ("momentum_buffer",) if hp.momentum != 0 else (), sgd_step),
}
