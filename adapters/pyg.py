"""LoRA for torch-geometric GNNs, and the finder for it.

PEFT only wraps ``torch.nn`` layers; torch-geometric's own ``Linear`` (used inside ``GCNConv``,
``GATConv``, ``GATv2Conv``, ``SAGEConv``, ``TransformerConv``, ...) is not an ``nn.Linear``, so
no LoRA library covers GNNs. :func:`add_lora` wraps every linear map inside the model's
message-passing layers (PyG ``Linear`` and ``nn.Linear``, e.g. ``GINConv``'s MLP) in a
:class:`LoRALinear`; lazily initialised layers (``in_channels=-1``) are supported, their LoRA
factor is created at the first forward pass. :func:`merge_lora` folds the updates back in.

Example:
    >>> import torch
    >>> from torch_geometric.nn import GCNConv
    >>> from reflora.adapters.pyg import add_lora
    >>> class Net(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.conv = GCNConv(8, 4)
    ...     def forward(self, x, edge_index):
    ...         return self.conv(x, edge_index)
    >>> net = add_lora(Net(), r=2)
    >>> sorted(n for n, p in net.named_parameters() if p.requires_grad)
    ['conv.lin.lora_A', 'conv.lin.lora_B']
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import Tensor, nn

from reflora.pairs import LoRAPair

__all__ = ["LoRALinear", "add_lora", "find_reflora_pyg", "merge_lora"]


class LoRALinear(nn.Module):
    """``y = base(x) + s * (x @ A^T) @ B^T`` with ``A`` ``(r, in)``, ``B = 0`` ``(out, r)``, ``s = alpha / r``.

    ``base`` is a torch-geometric ``Linear`` or an ``nn.Linear``; it is kept frozen by
    :func:`add_lora`. With ``in_channels = -1`` the factor ``A`` is created at the first forward.
    """

    def __init__(self, base: nn.Module, r: int, alpha: float) -> None:
        super().__init__()
        out_f = getattr(base, "out_channels", getattr(base, "out_features", None))
        in_f = getattr(base, "in_channels", getattr(base, "in_features", None))
        if out_f is None or in_f is None:
            raise TypeError(f"LoRALinear wraps a linear layer; got {type(base).__name__}")
        self.base = base
        self.r = r
        self.scaling = alpha / r
        self.out_features = out_f
        if in_f == -1:
            self.lora_A = nn.parameter.UninitializedParameter()
        else:
            self.lora_A = nn.Parameter(torch.empty(r, in_f))
            self._init_A()
        self.lora_B = nn.Parameter(torch.zeros(out_f, r))
        self._freeze_base_on_init = False

    def _init_A(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's default for lora_A

    def reset_parameters(self) -> None:
        if hasattr(self.base, "reset_parameters"):
            self.base.reset_parameters()
        if not isinstance(self.lora_A, nn.parameter.UninitializedParameter):
            self._init_A()
        nn.init.zeros_(self.lora_B)

    # PyG layers read these off their linear maps
    @property
    def weight(self) -> Tensor:
        return self.base.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base.bias

    @property
    def in_channels(self) -> int:
        return getattr(self.base, "in_channels", getattr(self.base, "in_features", -1))

    @property
    def out_channels(self) -> int:
        return self.out_features

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(self.lora_A, nn.parameter.UninitializedParameter):
            with torch.no_grad():
                self.lora_A.materialize((self.r, x.size(-1)), device=x.device, dtype=x.dtype)
                self._init_A()
        out = self.base(x)
        if self._freeze_base_on_init:  # a lazy base layer has just been materialised
            self.base.requires_grad_(False)
            self._freeze_base_on_init = False
        return out + (x @ self.lora_A.mT) @ self.lora_B.mT * self.scaling

    def merged_weight(self) -> Tensor:
        with torch.no_grad():
            return self.base.weight + self.scaling * (self.lora_B @ self.lora_A)

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}"


def _linear_types() -> tuple[type, ...]:
    from torch_geometric.nn.dense.linear import Linear as PygLinear

    return (PygLinear, nn.Linear)


def add_lora(
    model: nn.Module,
    *,
    r: int = 8,
    alpha: float | None = None,
    targets: Iterable[str] | None = None,
    freeze_base: bool = True,
    trainable: Iterable[str] = (),
) -> nn.Module:
    """Give every linear map inside ``model``'s message-passing layers a LoRA pair, in place.

    Args:
        model: a torch-geometric model.
        r: LoRA rank.
        alpha: scale numerator (``s = alpha / r``); default ``r`` (``s = 1``).
        targets: optional qualified-name suffixes (e.g. ``["conv1.lin", "conv2.nn.0"]``) to limit
            which linear maps get LoRA; default: all inside ``MessagePassing`` layers.
        freeze_base: set ``requires_grad=False`` on every parameter that is not a LoRA factor...
        trainable: ...except those whose qualified name starts with one of these prefixes
            (e.g. a new classifier head).

    Returns:
        ``model`` (modified in place).

    Raises:
        ValueError: nothing matched (never a silent no-op).
    """
    from torch_geometric.nn.conv import MessagePassing

    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"r must be a positive int; got {r!r}")
    alpha = float(r if alpha is None else alpha)
    linear_types = _linear_types()
    targets = None if targets is None else tuple(targets)

    def wanted(qual: str, inside_mp: bool) -> bool:
        if targets is None:
            return inside_mp
        return any(qual == t or qual.endswith("." + t) for t in targets)

    replaced: list[str] = []

    def visit(parent: nn.Module, prefix: str, inside_mp: bool) -> None:
        for child_name, child in list(parent.named_children()):
            qual = f"{prefix}.{child_name}" if prefix else child_name
            if isinstance(child, LoRALinear):
                continue
            if isinstance(child, linear_types) and wanted(qual, inside_mp):
                setattr(parent, child_name, LoRALinear(child, r, alpha))
                replaced.append(qual)
            else:
                visit(child, qual, inside_mp or isinstance(child, MessagePassing))

    visit(model, "", isinstance(model, MessagePassing))
    if not replaced:
        raise ValueError(
            "add_lora found no linear map to adapt: no torch_geometric Linear / nn.Linear inside a "
            f"MessagePassing layer{'' if targets is None else f' matching targets {targets}'}"
        )
    if freeze_base:
        keep = tuple(trainable)
        lazy_bases = set()
        for module in model.modules():
            if isinstance(module, LoRALinear) and any(
                isinstance(p, nn.parameter.UninitializedParameter) for p in module.base.parameters()
            ):
                module._freeze_base_on_init = True  # frozen right after its first forward
                lazy_bases.update(id(p) for p in module.base.parameters())
        for qual, p in model.named_parameters():
            is_lora = qual.endswith(".lora_A") or qual.endswith(".lora_B")
            flag = is_lora or (bool(keep) and qual.startswith(keep))
            if isinstance(p, nn.parameter.UninitializedParameter):
                if id(p) in lazy_bases or flag:
                    continue
                raise ValueError(
                    f"{qual} is a lazily initialised parameter outside the adapted layers; run one "
                    "forward pass before add_lora so it can be frozen"
                )
            p.requires_grad_(flag)
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every :class:`LoRALinear` back into its base layer (``W + s B A``) and unwrap it."""
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                with torch.no_grad():
                    child.base.weight.copy_(child.merged_weight())
                setattr(parent, child_name, child.base)
    return model


def find_reflora_pyg(name: str, module: nn.Module, options) -> list[LoRAPair] | None:
    """The pair of a :class:`LoRALinear` (no torch_geometric import needed)."""
    if isinstance(module, LoRALinear):
        return [LoRAPair(name, module.lora_A, module.lora_B, module=module)]
    return None
