"""``LoRAPair``: one low-rank factor pair of a model, presented in the core's layout.

Layouts are normalised here and only here. A factor is stored in one of three layouts:

* ``"plain"``: already the core's layout (``A`` is ``(r, m)``, ``B`` is ``(n, r)``);
* ``"transposed"``: stored as the transpose (``A`` as ``(m, r)``, ``B`` as ``(r, n)``);
* ``"flatten"``: a convolution kernel, ``A`` ``(r, in, *k)`` folded to ``(r, in * prod(k))`` and
  ``B`` ``(out, r, 1, ...)`` folded to ``(out, r)``.

All three are views of the parameter's storage (no copies), so writing into a view with
``copy_`` updates the parameter. Optimizer state tensors shaped like the parameter use the same
views.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

__all__ = ["LAYOUTS", "LoRAPair", "to_core"]

Layout = Literal["plain", "transposed", "flatten"]
LAYOUTS = ("plain", "transposed", "flatten")


def to_core(t: Tensor, layout: str) -> Tensor:
    """View ``t`` (a factor, its gradient or a same-shaped state tensor) in the core's layout."""
    if layout == "plain":
        return t
    if layout == "transposed":
        return t.mT
    return t.view(t.shape[0], -1)


@dataclass(frozen=True, eq=False)
class LoRAPair:
    """A trainable factor pair ``(A, B)`` with ``delta W = B @ A`` (in the core's layout).

    Attributes:
        name: qualified name of the pair (unique within a model), e.g. ``"...q_proj.default"``.
        A: the parameter holding the down-projection.
        B: the parameter holding the up-projection.
        layout: ``(layout_of_A, layout_of_B)``, each ``"plain"``, ``"transposed"`` or
            ``"flatten"`` (see the module docstring); :meth:`a` / :meth:`b` return the views.
        module: the module that owns the pair, when there is one.
    """

    name: str
    A: nn.Parameter
    B: nn.Parameter
    layout: tuple[str, str] = ("plain", "plain")
    module: nn.Module | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        for label, p, lay in (("A", self.A, self.layout[0]), ("B", self.B, self.layout[1])):
            if not isinstance(p, Tensor):
                raise TypeError(f"pair {self.name!r}: {label} must be a tensor; got {type(p).__name__}")
            if lay not in LAYOUTS:
                raise ValueError(f"pair {self.name!r}: layout of {label} must be one of {LAYOUTS}; got {lay!r}")
            if isinstance(p, nn.parameter.UninitializedParameter):
                raise ValueError(
                    f"pair {self.name!r}: {label} is not initialised yet (a lazy module); run one forward "
                    "pass before looking for pairs or building the optimizer"
                )
            if lay == "flatten" and p.dim() < 2 or lay != "flatten" and p.dim() != 2:
                raise ValueError(
                    f"pair {self.name!r}: {label} must be 2-D for layout {lay!r}; got shape {tuple(p.shape)}"
                )
        a, b = self.a(), self.b()
        if a.shape[0] != b.shape[1]:
            raise ValueError(
                f"pair {self.name!r}: A has rank {a.shape[0]} (shape {tuple(a.shape)}) but B has "
                f"rank {b.shape[1]} (shape {tuple(b.shape)})"
            )

    def a(self) -> Tensor:
        """``A`` as an ``(r, m)`` view."""
        return to_core(self.A, self.layout[0])

    def b(self) -> Tensor:
        """``B`` as an ``(n, r)`` view."""
        return to_core(self.B, self.layout[1])

    def grad_a(self) -> Tensor | None:
        """``A.grad`` as an ``(r, m)`` view (None when there is no gradient)."""
        g = self.A.grad
        return None if g is None else to_core(g, self.layout[0])

    def grad_b(self) -> Tensor | None:
        """``B.grad`` as an ``(n, r)`` view (None when there is no gradient)."""
        g = self.B.grad
        return None if g is None else to_core(g, self.layout[1])

    @property
    def rank(self) -> int:
        return self.a().shape[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(r, m, n)``."""
        r, m = self.a().shape
        return r, m, self.b().shape[0]

    def delta(self) -> Tensor:
        """``B @ A`` (detached, core layout), the update this pair contributes before scaling."""
        with torch.no_grad():
            return self.b() @ self.a()
