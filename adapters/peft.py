"""Finder for PEFT's LoRA layers, and the warnings for PEFT tuners RefLoRA does not apply to.

peft is imported only when it is already loaded (a model that holds PEFT layers has imported
it), so this finder costs nothing for users without peft.
"""

from __future__ import annotations

import sys
import warnings

from torch import nn

from reflora.pairs import LoRAPair

__all__ = ["find_peft_lora"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _peft_classes():
    if "peft" not in sys.modules:
        return None
    try:
        from peft.tuners.lora import LoraLayer
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover - a broken peft install
        return None
    try:
        from peft.tuners.lora.layer import ParamWrapper
    except ImportError:  # older peft: no target_parameters, hence no expert-stacked LoRA
        ParamWrapper = ()
    return LoraLayer, BaseTunerLayer, ParamWrapper


def _adapter_names(module: nn.Module, everything: bool) -> list[str]:
    if everything:
        names = list(getattr(module, "lora_A", {}).keys()) + list(getattr(module, "lora_embedding_A", {}).keys())
        return list(dict.fromkeys(names))
    names = getattr(module, "active_adapters", None)
    if names is None:
        names = getattr(module, "active_adapter", [])
    return [names] if isinstance(names, str) else list(names)


def _skip(module: nn.Module, name: str, why: str) -> list[LoRAPair]:
    warnings.warn(f"skipping {type(module).__name__} at {name!r}: {why}", stacklevel=4)
    return []


def find_peft_lora(name: str, module: nn.Module, options) -> list[LoRAPair] | None:
    """Pairs of a PEFT ``LoraLayer``.

    * Linear and GPT-2 ``Conv1D`` targets: ``fan_in_fan_out`` only transposes the *base* weight;
      PEFT's ``lora_A`` / ``lora_B`` are always ``nn.Linear`` with ``(r, in)`` / ``(out, r)``
      weights, used as stored.
    * Embedding: ``lora_embedding_A`` is ``(r, vocab)``, ``lora_embedding_B`` is ``(dim, r)``; the
      update is ``(B A)^T``, and refactoring only needs the product ``B A``, so both are used as
      stored.
    * Conv1d/2d/3d: ``lora_A`` is a ``(r, in, *k)`` kernel and ``lora_B`` a 1x1 ``(out, r, 1, ...)``
      kernel; the update is ``B @ A`` with ``A`` folded to ``(r, in * prod(k))`` (layout
      ``"flatten"``).
    * DoRA and rsLoRA: the ``A`` / ``B`` pair only; DoRA's magnitude vector is left alone (the
      refactoring keeps ``B A``, so the DoRA output is unchanged too).
    * MoE experts (``ParamWrapper`` from ``target_parameters`` or ``"all-linear"`` on a
      transformers-5 MoE, ``num_experts = E > 1``): ``lora_A`` is ``(E * r, in)``, used as
      ``A.reshape(E, r, in)``, and ``lora_B`` is ``(out, r * E)``, used as
      ``B.reshape(out, r, E).permute(2, 0, 1)``; expert ``e``'s update is ``B_e @ A_e``. One
      ``LoRAPair`` with ``experts=E`` and layouts ``("expert_rows", "expert_cols")`` presents
      exactly those views, so every expert is refactored on its own (a single rank-``E r`` pair
      would keep ``B @ A`` but change every expert's update). Whether PEFT swaps in/out for the
      stored ``(E, in, out)`` vs ``(E, out, in)`` weight only transposes the update, which
      refactoring keeps anyway. Nested wrappers (one per targeted parameter of the same experts
      module) are each found. ``num_experts == 1`` is a plain pair.

    AdaLoRA (an ``SVD``-form ``P diag(E) Q``), VeRA, LoHa, LoKr, IA3 and the other non-LoRA PEFT
    tuners are claimed and skipped with a warning that says why.
    """
    classes = _peft_classes()
    if classes is None:
        return None
    LoraLayer, BaseTunerLayer, ParamWrapper = classes
    if not isinstance(module, BaseTunerLayer):
        return None
    if not isinstance(module, LoraLayer):
        return _skip(
            module, name,
            "it is not a LoRA B @ A pair (VeRA's factors are frozen shared projections, LoHa/LoKr "
            "use Hadamard/Kronecker products, IA3 scales activations); RefLoRA does not apply",
        )
    if hasattr(module, "lora_E"):
        return _skip(
            module, name,
            "AdaLoRA parameterises the update as P diag(E) Q with its own orthogonality "
            "regulariser and rank allocator; refactoring P and Q would fight both",
        )
    pairs: list[LoRAPair] = []
    for adapter in _adapter_names(module, options.adapters == "all"):
        qual = f"{name}.{adapter}" if name else adapter
        if adapter in getattr(module, "lora_A", {}):
            A_mod, B_mod = module.lora_A[adapter], module.lora_B[adapter]
            if isinstance(A_mod, _CONV):
                if A_mod.groups != 1 or any(k != 1 for k in B_mod.kernel_size):
                    raise NotImplementedError(
                        f"{qual}: conv LoRA with groups={A_mod.groups} or a non-1x1 lora_B kernel "
                        f"{tuple(B_mod.kernel_size)} is not a B @ A product; register a finder for it"
                    )
                pairs.append(LoRAPair(qual, A_mod.weight, B_mod.weight, ("flatten", "flatten"), module))
            elif isinstance(A_mod, nn.Linear) and isinstance(B_mod, nn.Linear):
                experts = getattr(module, "num_experts", 1) if isinstance(module, ParamWrapper) else 1
                if experts > 1:
                    pairs.append(
                        LoRAPair(qual, A_mod.weight, B_mod.weight, ("expert_rows", "expert_cols"), module,
                                 experts=experts)
                    )
                else:
                    pairs.append(LoRAPair(qual, A_mod.weight, B_mod.weight, module=module))
            else:
                raise NotImplementedError(
                    f"{qual}: PEFT LoRA with lora_A of type {type(A_mod).__name__} on "
                    f"{type(module).__name__} is not supported; register a finder for it"
                )
        elif adapter in getattr(module, "lora_embedding_A", {}):
            pairs.append(
                LoRAPair(qual, module.lora_embedding_A[adapter], module.lora_embedding_B[adapter], module=module)
            )
    return pairs
