"""The gradient-space metric cache: ``S`` and ``S^{-1}`` kept between refreshes (``interval > 1``).

Per same-shape group, preallocated buffers ``(S, S^{-1}, valid)``: a compiled step writes into
fixed tensors instead of growing a dict (a new guard), and ``valid[j]`` says whether member ``j``
has a metric yet. Eager steps keep a Python mirror of the ``valid`` flags, so that they never sync
with the device to decide; a traced step cannot update the mirror and drops it, and the next eager
read syncs once.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import Tensor

from reflora.pairs import LoRAPair

__all__ = ["MetricCache"]

Metrics = list[tuple[Tensor, Tensor]]


class MetricCache:
    """``(S, S^{-1})`` per pair of a handle, between the refreshes of gradient space.

    Args:
        pairs: the handle's pairs.
        groups: their same-shape groups (indices into ``pairs``).
        enabled: whether to keep anything (gradient space with ``interval > 1``); a disabled
            cache computes every metric fresh and holds none.
        scalar: the scalar variant (metrics ``(1, 1)``) instead of the full one (``(r, r)``).
    """

    def __init__(self, pairs: tuple[LoRAPair, ...], groups: list[list[int]], enabled: bool, scalar: bool) -> None:
        self.pairs = pairs
        self.groups = groups
        self.buffers: list[tuple[Tensor, Tensor, Tensor]] | None = None
        if enabled:
            self.buffers = []
            for group in groups:
                p = pairs[group[0]]
                r = 1 if scalar else p.rank
                shape = (len(group), *((p.experts,) if p.experts > 1 else ()), r, r)
                # the dtype the metrics are applied in (reflora.step.apply_dtype): float32, float64
                # for float64 factors; a cached S is what a fresh one is rounded to when applied,
                # so this changes no step and halves the cache against float64 storage
                kw = dict(dtype=torch.float64 if p.A.dtype == torch.float64 else torch.float32, device=p.A.device)
                self.buffers.append((torch.zeros(shape, **kw), torch.zeros(shape, **kw),
                                     torch.zeros(len(group), dtype=torch.bool, device=p.A.device)))
        self._valid: set[int] | None = set()  # Python mirror of the buffers' `valid` flags

    @property
    def enabled(self) -> bool:
        return self.buffers is not None

    def valid(self) -> set[int]:
        """Indices of the pairs with a cached metric (one host sync after a traced step)."""
        if self.buffers is None:
            return set()
        if self._valid is None:  # compiled steps wrote the buffers: read the flags back once
            self._valid = {
                group[j] for group, (_, _, valid) in zip(self.groups, self.buffers)
                for j in valid.nonzero().flatten().tolist()
            }
        return self._valid

    def forget_mirror(self) -> None:
        """A traced step wrote the buffers: resync the Python mirror at the next eager read."""
        self._valid = None

    def as_dict(self) -> dict[int, tuple[Tensor, Tensor]]:
        """``{pair index: (S, S^{-1})}`` of the cached metrics (views of the buffers)."""
        if self.buffers is None:
            return {}
        valid = self.valid()
        return {
            i: (S[j], S_inv[j])
            for group, (S, S_inv, _) in zip(self.groups, self.buffers)
            for j, i in enumerate(group)
            if i in valid
        }

    def entries(self) -> Iterator[tuple[int, Tensor, Tensor]]:
        """``(pair index, S, S^{-1})`` of every pair, cached or not (zeros where not), in group order."""
        for group, (S, S_inv, _) in zip(self.groups, self.buffers or ()):
            for j, i in enumerate(group):
                yield i, S[j], S_inv[j]

    def metrics(
        self, work: list[tuple[int, list[int]]], refresh: bool, compute: Callable[[list[list[LoRAPair]]], Metrics],
    ) -> Metrics:
        """``(S, S^{-1})`` for each ``(group index, members)`` of an eager gradient-space step:
        fresh (from ``compute``) where ``refresh`` or a member has none cached, else the cached
        ones; fresh ones are cached."""
        fresh_groups = [(g, members) for g, members in work if refresh or any(i not in self.valid() for i in members)]
        fresh_metrics = iter(compute([[self.pairs[i] for i in m] for _, m in fresh_groups]))
        is_fresh = {g for g, _ in fresh_groups}
        out = []
        for g, members in work:
            group = self.groups[g]
            bufs = None if self.buffers is None else self.buffers[g]
            if g in is_fresh:
                S, S_inv = next(fresh_metrics)
                if bufs is not None:
                    if members == group:  # the usual case: no index tensor, no host-to-device copy
                        bufs[0].copy_(S)
                        bufs[1].copy_(S_inv)
                        bufs[2].fill_(True)
                    else:
                        pos = torch.tensor([group.index(i) for i in members], device=S.device)
                        bufs[0].index_copy_(0, pos, S)
                        bufs[1].index_copy_(0, pos, S_inv)
                        bufs[2].index_fill_(0, pos, True)
                    self.valid().update(members)
            else:
                assert bufs is not None
                if members == group:
                    S, S_inv = bufs[0], bufs[1]
                else:
                    pos = [group.index(i) for i in members]
                    S, S_inv = bufs[0][pos], bufs[1][pos]
            out.append((S, S_inv))
        return out

    def traced(
        self, g: int, members: list[int], S: Tensor, S_inv: Tensor, gate: Tensor, refresh_gate: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """The cache step of a traced step, as tensor arithmetic: the fresh ``S`` at a refresh step
        or for a pair without a cached one, else the cached ``S``; what was applied is stored
        when ``gate``."""
        assert self.buffers is not None
        bufs = self.buffers[g]
        S_buf, S_inv_buf, valid = bufs
        group = self.groups[g]
        pos = [group.index(i) for i in members]
        if pos == list(range(len(group))):
            idx = None
            old, old_inv, ok = S_buf, S_inv_buf, valid
        else:
            idx = torch.tensor(pos, device=S.device)
            old, old_inv, ok = S_buf[idx], S_inv_buf[idx], valid[idx]
        fresh = (refresh_gate | ~ok).view(-1, *(1,) * (S.dim() - 1))
        S, S_inv = torch.where(fresh, S, old), torch.where(fresh, S_inv, old_inv)
        new = (torch.where(gate, S, old), torch.where(gate, S_inv, old_inv), ok | gate)
        for buf, value in zip(bufs, new):
            if idx is None:
                buf.copy_(value)
            else:
                buf.index_copy_(0, idx, value)
        return S, S_inv

    def clear(self) -> None:
        """Forget every cached metric (before loading a checkpoint)."""
        for _, _, valid in self.buffers or ():
            valid.zero_()
        self._valid = set()

    def put(self, i: int, S: Tensor, S_inv: Tensor, name: str) -> None:
        """Cache ``(S, S^{-1})`` for pair ``i`` (saved as ``name`` in a checkpoint); raises for a
        shape this cache does not hold."""
        if self.buffers is None:
            raise ValueError("checkpoint holds cached metrics but this handle caches none (interval=1)")
        g, j = next((g, group.index(i)) for g, group in enumerate(self.groups) if i in group)
        S_buf, S_inv_buf, valid = self.buffers[g]
        if S.shape != S_buf.shape[1:]:
            raise ValueError(
                f"cached metric of pair {name!r} has shape {tuple(S.shape)}; this handle expects "
                f"{tuple(S_buf.shape[1:])}"
            )
        S_buf[j].copy_(S)
        S_inv_buf[j].copy_(S_inv)
        valid[j] = True
        self.valid().add(i)
