"""Adapter discovery: find the trainable low-rank pairs of a model (installed as ``reflora.adapters``).

Discovery is an ordered list of *finders*. A finder is a callable
``finder(name, module) -> list[LoRAPair] | None`` asked about every submodule of the model in
``named_modules()`` order: it returns the pairs that module owns, or ``None`` when it does not
recognise it. Finders are asked in priority order (highest first) and the first that answers
for a module wins; the submodules of a module that was claimed are not visited again.
Optional dependencies (peft, timm, torch_geometric) are imported inside the finders that need
them, never here.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from reflora.adapters import find_pairs
    >>> class LoRALinear(nn.Module):  # loralib-style: the module owns lora_A and lora_B
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.lora_A = nn.Parameter(torch.randn(4, 16))
    ...         self.lora_B = nn.Parameter(torch.zeros(8, 4))
    >>> [p.name for p in find_pairs(nn.Sequential(LoRALinear(), LoRALinear()))]
    ['0', '1']
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from torch import Tensor, nn

from reflora.pairs import LoRAPair

__all__ = [
    "Finder",
    "LoRAPair",
    "NoPairsFoundError",
    "find_pairs",
    "list_finders",
    "register_finder",
    "unregister_finder",
]

Finder = Callable[[str, nn.Module], Optional[list[LoRAPair]]]


class NoPairsFoundError(ValueError):
    """Raised when discovery finds no trainable low-rank pair in a model."""


@dataclass(frozen=True)
class _Entry:
    name: str
    finder: Finder
    priority: int


_REGISTRY: list[_Entry] = []


def register_finder(name: str, finder: Finder, *, priority: int = 0) -> Finder:
    """Register ``finder`` under ``name``; higher ``priority`` is asked first.

    Raises:
        TypeError: ``name`` is not a string, ``finder`` not callable or ``priority`` not an int.
        ValueError: a finder called ``name`` is already registered (unregister it first).
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"finder name must be a non-empty str; got {name!r}")
    if not callable(finder):
        raise TypeError(f"finder {name!r} must be callable; got {type(finder).__name__}")
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise TypeError(f"priority must be an int; got {type(priority).__name__}")
    if any(e.name == name for e in _REGISTRY):
        raise ValueError(
            f"a finder named {name!r} is already registered; call "
            f"reflora.adapters.unregister_finder({name!r}) first to replace it"
        )
    _REGISTRY.append(_Entry(name, finder, priority))
    # stable sort: equal priorities keep registration order
    _REGISTRY.sort(key=lambda e: -e.priority)
    return finder


def unregister_finder(name: str) -> None:
    """Remove the finder registered as ``name`` (KeyError if there is none)."""
    for i, e in enumerate(_REGISTRY):
        if e.name == name:
            del _REGISTRY[i]
            return
    raise KeyError(f"no finder named {name!r}; registered: {[e.name for e in _REGISTRY]}")


def list_finders() -> list[tuple[str, int]]:
    """``(name, priority)`` of every registered finder, in the order they are asked."""
    return [(e.name, e.priority) for e in _REGISTRY]


def find_pairs(model: nn.Module, *, trainable_only: bool = True) -> list[LoRAPair]:
    """Every low-rank pair in ``model``, in module order.

    Args:
        model: any ``nn.Module``.
        trainable_only: drop pairs whose ``A`` and ``B`` both have ``requires_grad=False``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        NoPairsFoundError: nothing was found (never a silent no-op).
        ValueError: two pairs share a parameter.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    pairs: list[LoRAPair] = []
    claimed: str | None = None  # named_modules() is pre-order: a claimed subtree is contiguous
    for name, module in model.named_modules():
        if claimed is not None and (claimed == "" or name.startswith(claimed + ".")):
            continue
        claimed = None
        for entry in _REGISTRY:
            found = entry.finder(name, module)
            if found is not None:
                pairs.extend(found)
                claimed = name
                break
    if trainable_only:
        pairs = [p for p in pairs if p.A.requires_grad or p.B.requires_grad]
    _check_unique(pairs)
    if not pairs:
        raise NoPairsFoundError(
            f"no trainable low-rank pair found in {type(model).__name__}. Supported: modules "
            f"that own both factors, recognised by the registered finders "
            f"{[e.name for e in _REGISTRY]}. For another layout register a finder: "
            "reflora.adapters.register_finder('mine', lambda name, module: [LoRAPair(name, A, B)] "
            "if isinstance(module, MyLoRA) else None, priority=10)"
        )
    return pairs


def _check_unique(pairs: list[LoRAPair]) -> None:
    seen: dict[int, str] = {}
    for p in pairs:
        for t in (p.A, p.B):
            key = id(t)
            if key in seen:
                raise ValueError(
                    f"parameter of pair {p.name!r} is also used by pair {seen[key]!r}; "
                    "each factor may belong to one pair only"
                )
            seen[key] = p.name


def _owned_factor_finder(name: str, module: nn.Module) -> list[LoRAPair] | None:
    """loralib-style modules that own ``lora_A`` / ``lora_B`` as 2-D parameters directly."""
    A = module._parameters.get("lora_A")
    B = module._parameters.get("lora_B")
    if isinstance(A, Tensor) and isinstance(B, Tensor) and A.dim() == 2 and B.dim() == 2:
        return [LoRAPair(name, A, B, module=module)]
    return None


from reflora.adapters.peft import find_peft_lora  # noqa: E402  (imports peft lazily)

register_finder("peft_lora", find_peft_lora, priority=100)
register_finder("owned_factors", _owned_factor_finder, priority=-100)
