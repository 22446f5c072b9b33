"""Finder for PEFT LoRA layers (``peft.tuners.lora.LoraLayer``).

peft is imported only when it is already loaded (a model that holds PEFT layers has imported
it), so registering this finder costs nothing for users without peft.
"""

from __future__ import annotations

import sys

from torch import nn

from reflora.pairs import LoRAPair

__all__ = ["find_peft_lora"]


def _lora_layer_cls():
    if "peft" not in sys.modules:
        return None
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - a broken peft install
        return None
    return LoraLayer


def _active(module: nn.Module) -> list[str]:
    names = getattr(module, "active_adapters", None)
    if names is None:
        names = getattr(module, "active_adapter", [])
    return [names] if isinstance(names, str) else list(names)


def find_peft_lora(name: str, module: nn.Module) -> list[LoRAPair] | None:
    """The active LoRA adapters of a PEFT ``LoraLayer`` (Linear, incl. GPT-2 ``Conv1D``; Embedding).

    ``fan_in_fan_out`` only transposes the *base* weight; PEFT's ``lora_A`` / ``lora_B`` are
    always ``(r, in)`` / ``(out, r)``. An embedding's ``lora_embedding_A`` is ``(r, vocab)`` and
    ``lora_embedding_B`` ``(dim, r)``: its update is ``(B A)^T``, and refactoring only needs the
    product ``B A``, so both are used as stored.
    """
    cls = _lora_layer_cls()
    if cls is None or not isinstance(module, cls):
        return None
    pairs: list[LoRAPair] = []
    for adapter in _active(module):
        qual = f"{name}.{adapter}" if name else adapter
        if adapter in getattr(module, "lora_A", {}):
            A = module.lora_A[adapter].weight
            B = module.lora_B[adapter].weight
            if A.dim() != 2:
                raise NotImplementedError(
                    f"{qual}: LoRA on {type(module).__name__} with a {A.dim()}-D factor is not "
                    "supported yet (convolution LoRA)"
                )
            pairs.append(LoRAPair(qual, A, B, module=module))
        elif adapter in getattr(module, "lora_embedding_A", {}):
            pairs.append(
                LoRAPair(qual, module.lora_embedding_A[adapter], module.lora_embedding_B[adapter], module=module)
            )
    return pairs
