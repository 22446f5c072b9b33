"""The methods ``reflora bench`` compares: plain LoRA, its best-known neighbours (through PEFT, as
they ship) and every RefLoRA mode. All use AdamW on the same trainable parameters."""

from __future__ import annotations

import torch
from torch import nn

import reflora

__all__ = ["METHODS", "MethodUnavailable", "make_optimizer"]

# name -> description shown in tables
METHODS = {
    "lora": "plain LoRA (AdamW)",
    "lora+": "LoRA+ (PEFT create_loraplus_optimizer, ratio 16)",
    "riemannian": "Riemannian / ScaledGD (PEFT create_riemannian_optimizer)",
    "reflora": "RefLoRA: full, gradient space (the paper's reference form)",
    "reflora-param": "RefLoRA: full, parameter space + state transport",
    "reflora-s": "RefLoRA-S: scalar, parameter space (exact state transport)",
    "reflora-s-grad": "RefLoRA-S: scalar, gradient space",
}
MODES = {
    "reflora": ("full", "gradient"),
    "reflora-param": ("full", "parameter"),
    "reflora-s": ("scalar", "parameter"),
    "reflora-s-grad": ("scalar", "gradient"),
}


class MethodUnavailable(RuntimeError):
    """The method cannot run on this task (reported as n/a, with the reason)."""


def make_optimizer(method: str, model: nn.Module, lr: float, **attach_kw):
    """``(optimizer, handle or None)`` for ``method`` on ``model``'s trainable parameters.

    ``attach_kw`` go to :func:`reflora.attach` (``interval=``, ``warmup_steps=``, ...): RefLoRA
    methods only."""
    if attach_kw and method not in MODES:
        raise ValueError(f"attach options {sorted(attach_kw)} apply to the RefLoRA methods only; got method {method!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    if method == "lora":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0), None
    if method == "lora+":
        from peft.optimizers import create_loraplus_optimizer

        try:
            return create_loraplus_optimizer(model, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=16.0, weight_decay=0.0), None
        except Exception as exc:  # noqa: BLE001 - reported, never swallowed silently
            raise MethodUnavailable(f"PEFT LoRA+ failed on this model: {exc}") from exc
    if method == "riemannian":
        from peft.optimizers import create_riemannian_optimizer

        try:
            return create_riemannian_optimizer(model, torch.optim.AdamW, lr=lr, weight_decay=0.0), None
        except Exception as exc:  # noqa: BLE001
            raise MethodUnavailable(f"PEFT's Riemannian optimizer does not apply: {exc}") from exc
    if method in MODES:
        variant, space = MODES[method]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        return opt, reflora.attach(opt, model, variant=variant, space=space, **attach_kw)
    raise ValueError(f"method must be one of {list(METHODS)}; got {method!r}")
