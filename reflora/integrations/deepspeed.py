r"""RefLoRA under DeepSpeed ZeRO-1 / ZeRO-2: the names under which it was first published.

Nothing here is needed to use it: :func:`reflora.attach` recognises a DeepSpeed optimizer (without
importing deepspeed) and runs gradient space through
:class:`reflora.strategies.ZeroGradientStrategy`, which preconditions each rank's gradient in a
tensor hook on each factor, before DeepSpeed's own hooks reduce it. ``space="parameter"`` and
ZeRO-3 raise at :func:`reflora.attach` with the way out (gradient space on ZeRO-1/2, or FSDP2).
The recognition and those checks live in :mod:`reflora.optimizers`.
"""

from __future__ import annotations

from typing import Any

from reflora.config import RefLoRAConfig
from reflora.optimizers import ZERO3_MESSAGE, check_zero_factors, check_zero_stage, zero_optimizer
from reflora.pairs import LoRAPair, validate
from reflora.strategies import ZeroGradientStrategy
from reflora.transport import qualname

__all__ = ["ZERO3_MESSAGE", "ZeroGradientStrategy", "check_zero", "check_zero_stage", "zero_optimizer"]


def check_zero(wrapper: Any, pairs: list[LoRAPair], space: str) -> None:
    """Raise for what RefLoRA cannot do under this DeepSpeed optimizer (before anything is hooked):
    ZeRO-3, ``space="parameter"``, a factor that does not require a gradient."""
    check_zero_factors(wrapper, pairs)
    RefLoRAConfig(space=space).check_zero_space(qualname(wrapper))  # type: ignore[arg-type]
    validate(pairs, trained=True)
