"""Helpers for LoRA on timm vision transformers (through PEFT).

timm's ViT-family models (ViT, DeiT, Swin, BEiT, EVA, ...) name their transformer blocks'
linear maps ``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``; PEFT wraps them like any
``nn.Linear``, and the ``peft_lora`` finder finds the pairs. :func:`vit_target_modules` proposes
those names so users need not know them.

Example:
    >>> import timm
    >>> from peft import LoraConfig, get_peft_model
    >>> from reflora.adapters.timm import vit_target_modules
    >>> vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2)
    >>> targets = vit_target_modules(vit)
    >>> targets[:4]
    ['blocks.0.attn.proj', 'blocks.0.attn.qkv', 'blocks.0.mlp.fc1', 'blocks.0.mlp.fc2']
    >>> model = get_peft_model(vit, LoraConfig(r=4, target_modules=targets))
"""

from __future__ import annotations

from typing import Iterable

from torch import nn

__all__ = ["vit_target_modules"]


def vit_target_modules(model: nn.Module, *, parts: Iterable[str] = ("attn", "mlp")) -> list[str]:
    """Qualified names of the ``nn.Linear`` maps inside the attention and MLP blocks of a timm ViT.

    Args:
        model: a timm model (any ``nn.Module`` whose blocks name sub-modules ``attn`` / ``mlp``).
        parts: which block parts to adapt: ``"attn"`` (qkv / q, k, v and the output projection)
            and/or ``"mlp"`` (fc1 / fc2). The classifier head, patch embedding and patch merging
            layers are never proposed.

    Returns:
        A sorted list of exact module names, suitable for ``peft.LoraConfig(target_modules=...)``.

    Raises:
        ValueError: no such linear map exists (not a ViT-family model, or unknown ``parts``).
    """
    parts = tuple(parts)
    bad = [p for p in parts if p not in ("attn", "mlp")]
    if bad or not parts:
        raise ValueError(f"parts must be a non-empty subset of ('attn', 'mlp'); got {parts}")
    names = []
    for qual, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        pieces = qual.split(".")
        if any(p in pieces[:-1] for p in parts):
            names.append(qual)
    if not names:
        raise ValueError(
            f"no nn.Linear inside {' / '.join(parts)} blocks of {type(model).__name__}; "
            "pass PEFT's target_modules yourself"
        )
    return sorted(names)
