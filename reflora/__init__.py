"""reflora: RefLoRA (arXiv 2505.18877) as an add-on for any PyTorch optimizer.

Importing ``reflora`` imports torch only; peft, transformers, timm and torch_geometric are
imported lazily by the parts that need them.
"""

from __future__ import annotations

from reflora import diagnostics, distributed, func, functional, lowbit, transport
from reflora.attaching import attach
from reflora.config import DivergenceWarning, RefLoRAConfig, UnstableOptionWarning, UnsupportedOptimizerError
from reflora.functional import precondition, preconditioner, refactor, refactor_transform
from reflora.handle import RefLoRAHandle
from reflora.optimizers import GradientSpaceFallbackWarning, default_space
from reflora.pairs import LoRAPair, UnusedPairWarning
from reflora.transport import register_state_transport

__version__ = "0.3.0"

__all__ = [
    "DivergenceWarning",
    "GradientSpaceFallbackWarning",
    "LoRAPair",
    "RefLoRAConfig",
    "RefLoRAHandle",
    "UnstableOptionWarning",
    "UnsupportedOptimizerError",
    "UnusedPairWarning",
    "__version__",
    "attach",
    "default_space",
    "diagnostics",
    "distributed",
    "func",
    "functional",
    "lowbit",
    "precondition",
    "preconditioner",
    "refactor",
    "refactor_transform",
    "register_state_transport",
    "transport",
]
