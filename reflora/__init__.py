"""reflora: RefLoRA (arXiv 2505.18877) as an add-on for any PyTorch optimizer.

Importing ``reflora`` imports torch only; peft, transformers, timm and torch_geometric are
imported lazily by the parts that need them.
"""

from __future__ import annotations

from reflora import functional
from reflora.functional import precondition, preconditioner, refactor, refactor_transform
from reflora.pairs import LoRAPair

__version__ = "0.1.0"

__all__ = [
    "LoRAPair",
    "__version__",
    "functional",
    "precondition",
    "preconditioner",
    "refactor",
    "refactor_transform",
]
