"""``LoRAPair``: one low-rank factor pair of a model, presented in the core's layout."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

__all__ = ["LoRAPair"]


@dataclass(frozen=True, eq=False)
class LoRAPair:
    """A trainable factor pair ``(A, B)`` with ``delta W = B @ A``.

    Attributes:
        name: qualified name of the module that owns both factors (unique within a model).
        A: the parameter holding the down-projection, presented as ``(r, m)`` by :meth:`a`.
        B: the parameter holding the up-projection, presented as ``(n, r)`` by :meth:`b`.
        transposed: ``(A_transposed, B_transposed)``; True where the parameter is stored
            transposed relative to the core's layout (e.g. an embedding LoRA's roles). The views
            returned by :meth:`a` / :meth:`b` share storage with the parameters (no copies).
        module: the owning module, when there is one.
    """

    name: str
    A: nn.Parameter
    B: nn.Parameter
    transposed: tuple[bool, bool] = (False, False)
    module: nn.Module | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        for label, p in (("A", self.A), ("B", self.B)):
            if not isinstance(p, Tensor):
                raise TypeError(f"pair {self.name!r}: {label} must be a tensor; got {type(p).__name__}")
            if p.dim() != 2:
                raise ValueError(
                    f"pair {self.name!r}: {label} must be 2-D; got shape {tuple(p.shape)}"
                )
        a, b = self.a(), self.b()
        if a.shape[0] != b.shape[1]:
            raise ValueError(
                f"pair {self.name!r}: A has rank {a.shape[0]} (shape {tuple(a.shape)}) but B has "
                f"rank {b.shape[1]} (shape {tuple(b.shape)})"
            )

    def a(self) -> Tensor:
        """``A`` as an ``(r, m)`` view."""
        return self.A.mT if self.transposed[0] else self.A

    def b(self) -> Tensor:
        """``B`` as an ``(n, r)`` view."""
        return self.B.mT if self.transposed[1] else self.B

    def grad_a(self) -> Tensor | None:
        """``A.grad`` as an ``(r, m)`` view (None when there is no gradient)."""
        g = self.A.grad
        return None if g is None else (g.mT if self.transposed[0] else g)

    def grad_b(self) -> Tensor | None:
        """``B.grad`` as an ``(n, r)`` view (None when there is no gradient)."""
        g = self.B.grad
        return None if g is None else (g.mT if self.transposed[1] else g)

    @property
    def rank(self) -> int:
        return self.a().shape[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(r, m, n)``."""
        r, m = self.a().shape
        return r, m, self.b().shape[0]

    def delta(self) -> Tensor:
        """``B @ A`` (detached), the update this pair contributes, without any scaling."""
        with torch.no_grad():
            return self.b() @ self.a()
