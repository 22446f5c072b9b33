r"""The full variant on factors sharded along their rank dimension: FSDP2's default ``Shard(0)``.

FSDP2 shards every parameter along dimension 0 unless told otherwise, and so do Trainer's
``fsdp_config`` and ``accelerate launch``. That is right for ``B = lora_B.weight`` ``(n, r)`` but
splits the rank dimension ``r`` of ``A = lora_A.weight`` ``(r, m)``: rank ``k`` holds some rows of
``A``, while the full variant of RefLoRA (arXiv 2505.18877) mixes all ``r`` rows, in ``X = A A^T``,
``P^T A``, ``P^{-1} grad_A``, ``S^{-1} grad_A`` and the state maps.

Around the step (inside the optimizer's pre-hook, before the optimizer reads anything), every such
tensor is gathered along the mesh dimension that splits ``r`` (``Shard(0) -> Replicate()``: one
all-gather per tensor), the step runs on the whole copies (a gathered ``A`` adds its Gram to the
all-reduce from one rank only, as a replicated factor does, so the sum counts it once; ``B`` stays
sharded along ``n``), and each rank copies its own rows of what the step changed back into its
shard (``Replicate() -> Shard(0)``: a slice, no communication)::

    A, grad_A (+ A's optimizer state in parameter space)   Shard(0) --all-gather--> Replicate()
    the step on the whole copies (reflora.step, unchanged)
    grad_A (+ A and its state in parameter space)          Replicate() --own rows--> Shard(0)

What is gathered: in gradient space ``A`` (the Grams) and ``grad_A``; in parameter space ``A``,
``grad_A`` and each optimizer state tensor shaped and sharded like ``A`` (AdamW's ``exp_avg`` /
``exp_avg_sq``, SGD's ``momentum_buffer``). Per rank and step that is ``(W - 1) / W`` of each
tensor's whole size received, and a whole ``r x m`` copy of each held during the hook. The
alternative, a ``Shard(0) -> Shard(1)`` all-to-all there and back, receives ``2 (W - 1) / W^2``:
the same at ``W = 2``, less beyond, but two collectives per tensor instead of one, and on gloo
(CPU) DTensor performs it as an all-gather each way. ``docs/fsdp2.md`` has both measured.
A ``B`` sharded along its rank dimension (``Shard(1)``) is gathered the same way.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Iterable, Iterator

import torch
from torch import Tensor

from reflora.distributed import comm_stats, is_dtensor, local
from reflora.pairs import LoRAPair

__all__ = ["moved_roles", "needs_restaging", "restaged"]


def moved_roles(pair: LoRAPair) -> tuple[str, ...]:
    """The factors of ``pair`` (``"A"``, ``"B"``) the full variant steps on as work copies."""
    s = getattr(pair, "sharding", None)
    if s is None:
        return ()
    return tuple(role for role, work in zip("AB", s.work) if work is not None)


def needs_restaging(pairs: Iterable[LoRAPair]) -> bool:
    """Whether any of ``pairs`` has a factor sharded along its rank dimension (see module doc)."""
    return any(moved_roles(p) for p in pairs)


def _redistribute(t: Tensor, placements: tuple) -> Tensor:
    """``t`` (a ``DTensor``) redistributed to ``placements``; a gather is counted in
    :func:`comm_stats` (the payload this rank hands to the collective: its local shard), taking
    one's own shard of a replicated tensor is local and not counted."""
    from torch.distributed.tensor import Shard

    stats = comm_stats()
    start = time.perf_counter()
    out = t.detach().redistribute(t.device_mesh, placements)
    if any(isinstance(src, Shard) and src != dst for src, dst in zip(t.placements, placements)):
        stats.seconds += time.perf_counter() - start
        stats.calls += 1
        payload = local(t).numel() * t.element_size()
        stats.bytes += payload
        stats.redistributed += payload
    return out


@contextlib.contextmanager
def restaged(pairs: Iterable[LoRAPair], optimizer: torch.optim.Optimizer | None, write_factors: bool) -> Iterator[None]:
    """Within the block, ``pairs`` whose factors are sharded along their rank dimension read and
    write whole work copies (gathered along that mesh dimension): their views (``a()``, ``grad_a()``, ...) and,
    with ``write_factors`` (parameter space), the optimizer's state entries of those factors.

    On leaving the block normally, each rank copies its own part of the gradients (and with
    ``write_factors`` of the factors and the state) back into its original shards, in place, and the state entries are
    the original tensors again. If the block raises, the work copies are dropped unwritten (the
    step core checks everything before it writes, and a collective on the way out could hang a
    rank that did not raise).

    Every rank must enter with the same pairs (the redistributions are collectives).
    """
    todo = [(p, role) for p in pairs for role in moved_roles(p)]
    if not todo:
        yield
        return
    writes: list[tuple[Tensor, Tensor]] = []  # (original, work copy) to copy back
    swapped: list[tuple[dict, Any, Tensor]] = []  # (state dict, key, original) to restore
    try:
        for p, role in todo:
            param = p.A if role == "A" else p.B
            work_placements = p.sharding.work[0 if role == "A" else 1]  # type: ignore[attr-defined]
            p.staged[role] = _redistribute(param, work_placements)
            if write_factors:
                writes.append((param, p.staged[role]))
            if param.grad is not None:
                p.staged["g" + role] = _redistribute(param.grad, work_placements)
                writes.append((param.grad, p.staged["g" + role]))
            state = optimizer.state.get(param) if (write_factors and optimizer is not None) else None
            for key, value in list((state or {}).items()):
                if is_dtensor(value) and value.shape == param.shape and tuple(value.placements) == tuple(param.placements):
                    state[key] = _redistribute(value, work_placements)  # type: ignore[index]
                    swapped.append((state, key, value))  # type: ignore[arg-type]
        yield
    except BaseException:
        for state, key, original in swapped:
            state[key] = original
        for p, _ in todo:
            p.staged.clear()  # type: ignore[attr-defined]
        raise
    for original, work in writes:
        local(original).copy_(local(_redistribute(work, tuple(original.placements))))
    for state, key, original in swapped:
        # (the entry the step left: a transport may have replaced the work copy by a new tensor)
        local(original).copy_(local(_redistribute(state[key], tuple(original.placements))))
        state[key] = original
    for p, _ in todo:
        p.staged.clear()  # type: ignore[attr-defined]
